"""What a diagnosis is: per layer, each class's channel scores and relevant-channel masks.

:class:`Diagnosis` is the record :func:`~md_plugin.doctor.diagnose` returns and the treatment
reads. It is saved as one safetensors artifact, and it checks that a model it is applied to
has the layers, widths and class count it was made for (:func:`model_fingerprint`): a mask of
another network would silently penalise the wrong channels.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import Artifact, load_artifact, save_artifact
from ..checkpoint import weights_hash
from ..errors import MDError
from ..layers import LayerRef, resolve_layers
from .masks import compute_masks

__all__ = ["Diagnosis", "LayerDiagnosis", "model_fingerprint", "GRAD_MODES"]

GRAD_MODES = ("relu", "abs")
FORMAT = "md_plugin.diagnosis"
FORMAT_VERSION = 1


@dataclass
class LayerDiagnosis:
    """Per-layer result: ``scores`` [K, C] float, ``masks`` [K, C] bool (True = relevant).

    Args:
        name: The layer's module name.
        scores: Per-class, per-channel gradient mass.
        masks: Per-class relevant channels.
    """

    name: str
    scores: torch.Tensor
    masks: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.scores.shape[1])

    def __repr__(self) -> str:
        return (
            f"LayerDiagnosis({self.name!r}, {self.scores.shape[0]} classes x {self.channels} "
            f"channels, relevant per class: {_summarise(self.masks.sum(1).tolist())})"
        )


@dataclass
class Diagnosis:
    """The outcome of :func:`diagnose`, saved with enough metadata to refuse a wrong model.

    Args:
        layers: Layer name -> :class:`LayerDiagnosis`, in forward order.
        counts: ``[K]`` images used per class.
        fingerprint: :func:`model_fingerprint` of the diagnosed model (with its weights hash).
        options: The diagnosis options (per class, mask rule, input size, ...).
    """

    layers: dict[str, LayerDiagnosis]
    counts: torch.Tensor  # images used per class, [K]
    fingerprint: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.counts.numel())

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def remask(
        self, mask_rule: str = "theta", theta: float = 0.2, topk: int | None = None
    ) -> Diagnosis:
        """Same scores, another mask rule (no need to re-run the gradient pass).

        Args:
            mask_rule: One of ``MASK_RULES`` (``theta``, ``mean``, ``topk``).
            theta: The min-max threshold of the ``theta`` rule.
            topk: Channels kept per class by the ``topk`` rule.

        Returns:
            A new :class:`Diagnosis` with the same scores, counts and fingerprint.
        """
        layers = {
            n: LayerDiagnosis(
                n, ld.scores, compute_masks(ld.scores, self.counts, mask_rule, theta, topk)
            )
            for n, ld in self.layers.items()
        }
        opts = dict(self.options, mask_rule=mask_rule, theta=theta, topk=topk)
        return Diagnosis(layers, self.counts, self.fingerprint, opts)

    def __repr__(self) -> str:
        """A short summary (layers, classes, images and relevant channels per class)."""
        arch = self.fingerprint.get("arch", "?")
        lines = [
            f"Diagnosis of {arch}: {self.num_classes} classes, {len(self.layers)} layer(s)",
            f"  images per class: {_summarise(self.counts.tolist())}",
        ]
        for ld in self.layers.values():
            lines.append(
                f"  {ld.name} ({ld.channels} channels), relevant per class: "
                f"{_summarise(ld.masks.sum(1).tolist())}"
            )
        return "\n".join(lines)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically (unique temp file, fsync, rename).

        Args:
            path: The file to write; its folder is created.

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        tensors = {"counts": self.counts.to(torch.int64)}
        for i, ld in enumerate(self.layers.values()):
            tensors[f"layer{i}.scores"] = ld.scores.float()
            tensors[f"layer{i}.masks"] = ld.masks.to(torch.uint8)
        meta = {
            "layers": list(self.layers),
            "fingerprint": self.fingerprint,
            "options": self.options,
        }
        return save_artifact(path, FORMAT, FORMAT_VERSION, tensors, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        input_size: Sequence[int] | None = None,
    ) -> Diagnosis:
        """Read a diagnosis file; with ``model``, refuse one made for another model.

        Another architecture, other target-layer widths or another class count is one
        ``MDError`` line. Other weights of the same architecture are only a warning: treating
        (and resuming, and reporting on) a model fine-tuned from the diagnosed one is the
        normal use of a diagnosis.

        Args:
            path: The ``.safetensors`` file written by :meth:`save`.
            model: The model the diagnosis is for (optional).
            input_size: ``(C, H, W)`` to resolve the layers at; default the recorded size.

        Returns:
            The :class:`Diagnosis`.

        Raises:
            MDError: One line for a missing or damaged file, or a model it does not fit.
        """
        out = load_artifact(path, FORMAT, "diagnosis", cls._from_artifact)
        if model is not None:
            out.check_model(model, input_size, source=path)
        return out

    @classmethod
    def _from_artifact(cls, art: Artifact) -> Diagnosis:
        t, meta = art.tensors, art.meta
        layers = {
            n: LayerDiagnosis(n, t[f"layer{i}.scores"], t[f"layer{i}.masks"].bool())
            for i, n in enumerate(meta["layers"])
        }
        return cls(layers, t["counts"], meta["fingerprint"], meta.get("options", {}))

    def check_model(
        self,
        model: nn.Module,
        input_size: Sequence[int] | None = None,
        source: str | Path | None = None,
    ) -> None:
        """Refuse a model this diagnosis was not made for; warn when only the weights differ.

        Args:
            model: The model to check.
            input_size: ``(C, H, W)`` to resolve the layers at; default the recorded size.
            source: The file the diagnosis came from (named in the messages).

        Raises:
            MDError: Another architecture, layer widths or class count (one line).
        """
        where = f" {source}" if source is not None else ""
        fp = model_fingerprint(model, [])
        if fp["params"] != self.fingerprint.get("params"):
            raise MDError(
                f"diagnosis{where} was made for a model with different parameter shapes "
                f"({self.fingerprint.get('arch')!r}, this model is {fp['arch']!r})"
            )
        size = input_size if input_size is not None else self.options.get("input_size")
        refs = resolve_layers(model, self.layer_names, size)
        self.check_compatible(model, refs, getattr(model, "num_classes", 0) or self.num_classes)
        theirs = self.fingerprint.get("weights")
        if theirs is not None:
            mine = weights_hash(model)
            if mine != theirs:
                warnings.warn(
                    f"diagnosis{where} was made from other weights of {fp['arch']} (weights "
                    f"{theirs[:12]}, this model {mine[:12]}): expected for a model fine-tuned or "
                    "treated from the diagnosed one; otherwise diagnose this model",
                    stacklevel=3,
                )

    def check_compatible(
        self, model: nn.Module, layers: Sequence[LayerRef], num_classes: int
    ) -> None:
        """Refuse a diagnosis made for another model, layer set or class count.

        Shapes only: the weights may differ (the trainer checks the model it is treating).

        Args:
            model: The model to check.
            layers: Its resolved target layers.
            num_classes: Its number of classes.

        Raises:
            MDError: One line naming the mismatch.
        """
        fp = model_fingerprint(model, layers)
        if self.num_classes != num_classes:
            raise MDError(
                f"diagnosis has {self.num_classes} classes but the model has {num_classes}"
            )
        mine = {ref.name: ref.channels for ref in layers}
        theirs = self.fingerprint.get("layers", {})
        if set(mine) != set(self.layers) or any(theirs.get(n) != c for n, c in mine.items()):
            raise MDError(
                f"diagnosis layers {theirs} do not match the target layers {mine} of this model"
            )
        if fp["params"] != self.fingerprint.get("params"):
            raise MDError(
                "diagnosis was made for a model with different parameter shapes "
                f"({self.fingerprint.get('arch')!r}, this model is {fp['arch']!r})"
            )


def _summarise(values: Sequence[int], show: int = 10) -> str:
    """``"50 each"``, the values, or the first ``show`` and the range for many classes."""
    if values and all(v == values[0] for v in values):
        return f"{values[0]} each"
    head = " ".join(str(v) for v in values[:show])
    if len(values) <= show:
        return head
    return f"{head} ... (min {min(values)}, max {max(values)})"


def model_fingerprint(
    model: nn.Module, layers: Sequence[LayerRef], weights: bool = False
) -> dict[str, Any]:
    """Architecture name, target layer widths and a hash of all parameter shapes.

    Args:
        model: The model.
        layers: Its target layers (their widths are recorded).
        weights: Also record :func:`~md_plugin.checkpoint.weights_hash` of the weights.

    Returns:
        ``{"arch", "layers", "params"}`` (plus ``"weights"``), JSON-serialisable.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or type(model).__name__
    shapes = "|".join(f"{n}:{tuple(p.shape)}" for n, p in model.state_dict().items())
    fp = {
        "arch": arch,
        "layers": {ref.name: ref.channels for ref in layers},
        "params": hashlib.sha1(shapes.encode()).hexdigest(),
    }
    if weights:
        fp["weights"] = weights_hash(model)
    return fp
