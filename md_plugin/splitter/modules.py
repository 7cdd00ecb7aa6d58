"""The modules artifact: per-class kept channels, fingerprint, own-logit ranges, measurements.

One safetensors file holds, for every class the split covers, a bool mask over the channels of
every coupled group (concatenated in group order), the (min, max) of the module's own-class
logit on that class's validation images (the patching rule's normaliser, spec section 5), and
in the metadata the strong model's fingerprint, the group layout, per-module cost and accuracy
and the composed accuracy. Loading it against another model is refused with one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..doctor.diagnosis import model_fingerprint
from ..errors import MDError
from .extract import count_cost, extract_module
from .groups import SplitGraph, create_split_graph
from .masking import create_masked_model

__all__ = ["SplitModules", "split_fingerprint", "modules_from_diagnosis"]

FORMAT = "md_plugin.splitter.modules"
FORMAT_VERSION = 1


def split_fingerprint(model: nn.Module, sg: SplitGraph) -> dict[str, Any]:
    """The doctor's model fingerprint plus the channel-group layout."""
    fp = model_fingerprint(model, [])
    fp.pop("layers", None)
    fp["groups"] = [[g.name, g.channels] for g in sg.groups]
    return fp


@dataclass
class SplitModules:
    """Per-class modules of a strong model (``classes`` are the model's output indices).

    ``masks`` [N, sum C_g] bool; ``ranges`` [N, 2] own-logit (min, max) on class-c validation
    images (NaN until :meth:`measure`); ``stats`` per-module and composed measurements.
    """

    classes: list[int]
    group_names: list[str]
    group_channels: list[int]
    masks: torch.Tensor
    fingerprint: dict[str, Any]
    ranges: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    _model: nn.Module | None = field(default=None, repr=False)
    _sg: SplitGraph | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ranges is None:
            self.ranges = torch.full((len(self.classes), 2), float("nan"))

    # -- class lookup ------------------------------------------------------------------------
    @property
    def num_modules(self) -> int:
        return len(self.classes)

    def index(self, c: int) -> int:
        """Row of class ``c`` (a model output index); one-line error if it is not covered."""
        try:
            return self.classes.index(int(c))
        except ValueError:
            raise MDError(
                f"class {c} has no module: the modules cover classes {self.classes}"
            ) from None

    def group_masks(self, c: int) -> list[torch.Tensor]:
        """Class ``c``'s kept channels as one bool vector per group."""
        return list(torch.split(self.masks[self.index(c)], self.group_channels))

    def range(self, c: int) -> tuple[float, float]:
        r = self.ranges[self.index(c)]
        return float(r[0]), float(r[1])

    # -- binding to the strong model ---------------------------------------------------------
    def bind(self, model: nn.Module, input_size: Sequence[int] | None = None) -> SplitModules:
        """Attach the strong model (checked against the fingerprint); returns self."""
        size = input_size or self.options.get("input_size")
        sg = create_split_graph(model, size)
        self.check_compatible(model, sg)
        self._model, self._sg = model, sg
        return self

    def check_compatible(self, model: nn.Module, sg: SplitGraph) -> None:
        fp = split_fingerprint(model, sg)
        if fp["params"] != self.fingerprint.get("params") or fp["groups"] != self.fingerprint.get(
            "groups"
        ):
            raise MDError(
                f"these modules were split from another model ({self.fingerprint.get('arch')!r} "
                f"with different parameter shapes); this model is {fp['arch']!r}"
            )

    @property
    def split_graph(self) -> SplitGraph:
        if self._sg is None:
            raise MDError("modules are not bound to a model: call .bind(model) first")
        return self._sg

    def module(self, c: int, extract: bool = False) -> nn.Module:
        """Class ``c``'s module: the masked strong model, or with ``extract`` the physically
        narrower network. Both return all N logits; only logit ``c`` is the module's output."""
        masks = self.group_masks(c)
        if extract:
            return extract_module(self.split_graph, masks)
        return create_masked_model(self.split_graph, masks)

    @torch.no_grad()
    def own_logits(
        self, x: torch.Tensor, modules: Sequence[nn.Module] | None = None
    ) -> torch.Tensor:
        """[B, N] own-class logit of every module (column i = module of ``classes[i]``)."""
        modules = modules or [self.module(c) for c in self.classes]
        return torch.stack([m(x)[:, c] for m, c in zip(modules, self.classes)], 1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Composed prediction: the class whose module's own logit is largest (class labels)."""
        return torch.tensor(self.classes, device=x.device)[self.own_logits(x).argmax(1)]

    # -- measurements ------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, loader: Iterable, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Ranges, per-module cost and own-class accuracy, composed vs strong accuracy.

        ``loader`` yields validation ``(images, labels)`` in the model's output space; images of
        classes the modules do not cover are ignored. Stores and returns :attr:`stats`.
        """
        sg = self.split_graph
        model = self._model.eval()
        mods = [self.module(c, extract=True).to(device) for c in self.classes]
        cls = torch.tensor(self.classes)
        lo = torch.full((len(cls),), float("inf"))
        hi = torch.full((len(cls),), float("-inf"))
        hits = torch.zeros(len(cls))
        seen = torch.zeros(len(cls))
        strong_hits = torch.zeros(len(cls))
        for batch in loader:
            x, y = batch[0].to(device), batch[1].cpu()
            keep = (y[:, None] == cls[None]).any(1)
            if not keep.any():
                continue
            x, y = x[keep.to(x.device)], y[keep]
            own = self.own_logits(x, mods).cpu()
            row = (y[:, None] == cls[None]).float().argmax(1)
            strong = model(x)[:, cls.to(x.device)].cpu()
            for i in range(len(cls)):
                sel = row == i
                if sel.any():
                    v = own[sel, i]
                    lo[i] = min(lo[i], v.min())
                    hi[i] = max(hi[i], v.max())
            pred = own.argmax(1)
            for i in range(len(cls)):
                sel = row == i
                seen[i] += sel.sum()
                hits[i] += (pred[sel] == i).sum()
                strong_hits[i] += (strong.argmax(1)[sel] == i).sum()
        if seen.sum() == 0:
            raise MDError(f"no validation image of the split classes {self.classes}")
        self.ranges = torch.stack([lo, hi], 1)
        size = tuple(sg.input_size)
        full_macs, full_params = count_cost(model, size)
        total_k = sum(g.kernels * g.channels for g in sg.groups)
        per_module = []
        for i, c in enumerate(self.classes):
            masks = self.group_masks(c)
            kept = sum(g.kernels * int(m.sum()) for g, m in zip(sg.groups, masks))
            macs, params = count_cost(extract_module(sg, masks), size)
            per_module.append(
                dict(
                    cls=c,
                    kernels_pct=100.0 * kept / total_k,
                    flops_pct=100.0 * macs / full_macs,
                    params_pct=100.0 * params / full_params,
                    own_acc=100.0 * float(hits[i] / seen[i]) if seen[i] else float("nan"),
                    val_images=int(seen[i]),
                    logit_min=float(lo[i]),
                    logit_max=float(hi[i]),
                )
            )
        self.stats = dict(
            modules=per_module,
            composed_acc=100.0 * float(hits.sum() / seen.sum()),
            strong_acc=100.0 * float(strong_hits.sum() / seen.sum()),
            strong_macs=full_macs,
            strong_params=full_params,
            val_images=int(seen.sum()),
        )
        return self.stats

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "masks": self.masks.to(torch.uint8).contiguous(),
            "ranges": self.ranges.float().contiguous(),
            "classes": torch.tensor(self.classes, dtype=torch.int64),
        }
        meta = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "groups": json.dumps(list(zip(self.group_names, self.group_channels))),
            "fingerprint": json.dumps(self.fingerprint),
            "stats": json.dumps(self.stats),
            "options": json.dumps(self.options),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        input_size: Sequence[int] | None = None,
    ) -> SplitModules:
        """Read a modules file; with ``model`` also bind it (refusing another model)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise MDError(f"modules file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("not a md_plugin modules file")
            t = load_file(str(path))
            groups = json.loads(meta["groups"])
            out = cls(
                classes=[int(c) for c in t["classes"].tolist()],
                group_names=[g[0] for g in groups],
                group_channels=[int(g[1]) for g in groups],
                masks=t["masks"].bool(),
                fingerprint=json.loads(meta["fingerprint"]),
                ranges=t["ranges"],
                stats=json.loads(meta.get("stats", "{}")),
                options=json.loads(meta.get("options", "{}")),
            )
            if out.masks.shape != (len(out.classes), sum(out.group_channels)):
                raise ValueError(f"mask shape {tuple(out.masks.shape)} does not match the groups")
        except (
            SafetensorError,
            ValueError,
            KeyError,
            OSError,
            TypeError,
            json.JSONDecodeError,
        ) as e:
            raise MDError(
                f"cannot read modules file {path}: corrupt or not a modules file ({e})"
            ) from None
        if model is not None:
            out.bind(model, input_size)
        return out


def create_split_modules(
    model: nn.Module,
    sg: SplitGraph,
    classes: Sequence[int],
    masks: Sequence[Sequence[torch.Tensor]],
    options: dict[str, Any] | None = None,
) -> SplitModules:
    """Bound :class:`SplitModules` from per-class, per-group bool masks."""
    flat = torch.stack([torch.cat([m.bool() for m in per]) for per in masks])
    opts = dict(options or {}, input_size=list(sg.input_size))
    out = SplitModules(
        classes=[int(c) for c in classes],
        group_names=[g.name for g in sg.groups],
        group_channels=[g.channels for g in sg.groups],
        masks=flat,
        fingerprint=split_fingerprint(model, sg),
        options=opts,
    )
    out._model, out._sg = model, sg
    return out


def modules_from_diagnosis(
    model: nn.Module,
    diagnosis: Any,
    classes: Sequence[int] | None = None,
    input_size: Sequence[int] | None = None,
) -> SplitModules:
    """Modules from a Model Doctor :class:`~md_plugin.doctor.Diagnosis` (a baseline to the GA).

    Class c keeps, in the group produced by each diagnosed conv layer, the channels the
    diagnosis marks relevant to c (its top-scoring channel if none); every other group is kept
    whole. A diagnosed layer must be a conv that produces a group (e.g. ``last_conv``).
    """
    sg = create_split_graph(model, input_size)
    classes = list(range(diagnosis.num_classes)) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < diagnosis.num_classes]
    if bad:
        raise MDError(f"class(es) {bad} out of range: the diagnosis has {diagnosis.num_classes}")
    owner = {p: g.index for g in sg.groups for p in g.producers}
    per_class = [[torch.ones(g.channels, dtype=torch.bool) for g in sg.groups] for _ in classes]
    for name, ld in diagnosis.layers.items():
        if name not in owner:
            raise MDError(
                f"diagnosed layer {name!r} is not a convolution that produces a channel group; "
                f"diagnose one of: {', '.join(sorted(owner)[:8])} ..."
            )
        g = owner[name]
        unit = sg.groups[g].unit
        for i, c in enumerate(classes):
            m = ld.masks[c].bool().clone()
            if not m.any():
                m[ld.scores[c].argmax()] = True
            m = m.view(-1, unit).any(1)  # a grouped conv's whole conv group (unit) is kept
            per_class[i][g] = per_class[i][g] & m
    return create_split_modules(
        model, sg, classes, per_class, options=dict(source="diagnosis", **diagnosis.options)
    )
