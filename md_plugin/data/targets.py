"""Integer labels of a dataset, read without decoding its images where the dataset allows.

Its own module because both :mod:`md_plugin.data.datasets` (which builds the splits) and
:mod:`md_plugin.data.class_map` (which relabels them) need it; in either of them it made the two
import each other.
"""

from __future__ import annotations

from torch.utils.data import Dataset

__all__ = ["get_targets"]


def get_targets(ds: Dataset) -> list[int]:
    """Integer labels of every item, without decoding images where the dataset allows.

    Args:
        ds: a dataset with ``targets``/``labels``, a timm reader with ``samples``, or any
            map-style dataset of ``(image, label)`` items (then every item is read).

    Returns:
        One ``int`` label per item, in dataset order.
    """
    for attr in ("targets", "labels"):
        t = getattr(ds, attr, None)
        if t is not None:
            return [int(v) for v in t]
    reader = getattr(ds, "reader", None)
    samples = getattr(reader, "samples", None)
    if samples is not None:
        return [int(s[1]) for s in samples]
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]
