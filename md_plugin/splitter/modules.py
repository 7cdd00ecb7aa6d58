"""The modules artifact: per-class kept channels, fingerprint, own-logit ranges, measurements.

One safetensors file holds, for every class the split covers, a bool mask over the channels of
every coupled group (concatenated in group order), the (min, max) of the module's own-class
logit on that class's validation images (the patching rule's normaliser, spec section 5), and
in the metadata the strong model's fingerprint, the group layout, per-module cost and accuracy
and the composed accuracy. Loading it against another model is refused with one line.

Format version 2 adds the optional calibration (:mod:`.calibrate`): ``calib_scale`` and
``calib_shift`` [N, S], one per-channel affine per mask site (``AffineLayout``), and the site
layout they were made for in the metadata (``calib_layout``). A calibrated module is the strong
model with the affine folded into its BatchNorm (or bias-carrying conv) parameters, then masked
or extracted. Version-1 files (no calibration) still load.

Modules of the gradient search (:mod:`.gradsearch`) also carry GradSplitter's module heads,
``head.0.weight`` [N, 10, N_out], ``head.0.bias``, ``head.2.weight``, ``head.2.bias`` stacked over
modules (:class:`~.head.ModuleHeads`; ``options["head"]`` describes them), optional in version 2.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import Artifact, load_artifact, save_artifact
from ..doctor.diagnosis import model_fingerprint
from ..errors import MDError
from .bank import create_affine_layout
from .calibrate import fold_affine
from .extract import count_cost, extract_module
from .groups import SplitGraph, create_split_graph
from .head import ModuleHeads
from .masking import create_masked_model

__all__ = ["SplitModules", "split_fingerprint", "modules_from_diagnosis"]

FORMAT = "md_plugin.splitter.modules"
FORMAT_VERSION = 2  # 2: optional calib_scale / calib_shift


def split_fingerprint(model: nn.Module, sg: SplitGraph) -> dict[str, Any]:
    """The doctor's model fingerprint with the weights hash, plus the channel-group layout.

    The weights hash matters here: modules of another model of the same architecture have the
    same shapes and groups, but patched into a weak model they are garbage.

    Args:
        model: The strong model.
        sg: Its split graph.

    Returns:
        ``{"arch", "params", "weights", "groups"}``, JSON-serialisable.
    """
    fp = model_fingerprint(model, [], weights=True)
    fp.pop("layers", None)
    fp["groups"] = [[g.name, g.channels] for g in sg.groups]
    return fp


@dataclass
class SplitModules:
    """Per-class modules of a strong model (``classes`` are the model's output indices).

    ``masks`` [N, sum C_g] bool; ``ranges`` [N, 2] own-logit (min, max) on class-c validation
    images (NaN until :meth:`measure`); ``stats`` per-module and composed measurements.
    ``heads`` (gradient search only): GradSplitter's module heads stacked over modules
    (:class:`~.head.ModuleHeads` tensors); with them a module's output is its head's score, and
    the composition is the argmax over the scores instead of over the own-class logits.
    """

    classes: list[int]
    group_names: list[str]
    group_channels: list[int]
    masks: torch.Tensor
    fingerprint: dict[str, Any]
    ranges: torch.Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    calib_scale: torch.Tensor | None = None
    calib_shift: torch.Tensor | None = None
    calib_layout: list | None = None
    heads: dict[str, torch.Tensor] | None = None
    _model: nn.Module | None = field(default=None, repr=False)
    _sg: SplitGraph | None = field(default=None, repr=False)
    _source: str | None = field(default=None, repr=False)  # the file it was loaded from

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
        """Refuse a strong model these modules were not split from (shapes, groups, weights).

        A file written before the weights were recorded is accepted with a warning.

        Args:
            model: The strong model.
            sg: Its split graph.

        Raises:
            MDError: One line naming the mismatch.
        """
        fp = split_fingerprint(model, sg)
        if fp["params"] != self.fingerprint.get("params") or fp["groups"] != self.fingerprint.get(
            "groups"
        ):
            raise MDError(
                f"these modules were split from another model ({self.fingerprint.get('arch')!r} "
                f"with different parameter shapes); this model is {fp['arch']!r}"
            )
        theirs = self.fingerprint.get("weights")
        where = f" ({self._source})" if self._source else ""
        if theirs is None:
            warnings.warn(
                f"these modules{where} record no weights hash (written by an older md_plugin): "
                "cannot check that they were split from this model's weights",
                stacklevel=3,
            )
        elif theirs != fp["weights"]:
            raise MDError(
                f"these modules{where} were split from another model: same architecture "
                f"({fp['arch']!r}) but other weights (weights {theirs[:12]}, this model "
                f"{fp['weights'][:12]}); use the strong checkpoint they were split from"
            )
        if self.calibrated and create_affine_layout(sg).signature() != self.calib_layout:
            raise MDError(
                f"these modules{where} were calibrated at other mask sites than this version of "
                "the splitter finds in the model; split again"
            )

    # -- calibration -------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return self.calib_scale is not None

    def set_calibration(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """Store the modules' per-site affine [N, S] (None, None: uncalibrated); bound only."""
        if scale is None or shift is None:
            self.calib_scale = self.calib_shift = self.calib_layout = None
            return
        layout = create_affine_layout(self.split_graph)
        want = (self.num_modules, layout.size)
        if tuple(scale.shape) != want or tuple(shift.shape) != want:
            raise ValueError(f"calibration must be {want}, got {tuple(scale.shape)}")
        self.calib_scale = scale.detach().float().cpu().clone()
        self.calib_shift = shift.detach().float().cpu().clone()
        self.calib_layout = layout.signature()

    def module_graph(self, c: int) -> SplitGraph:
        """The split graph module ``c`` is cut from: the strong model's, with class ``c``'s
        calibration folded in when the modules are calibrated."""
        sg = self.split_graph
        if not self.calibrated:
            return sg
        i = self.index(c)
        return fold_affine(sg, self.calib_scale[i], self.calib_shift[i])

    @property
    def split_graph(self) -> SplitGraph:
        if self._sg is None:
            raise MDError("modules are not bound to a model: call .bind(model) first")
        return self._sg

    def module(self, c: int, extract: bool = False) -> nn.Module:
        """Class ``c``'s module: the masked strong model, or with ``extract`` the physically
        narrower network. Both return all N logits; only logit ``c`` is the module's output."""
        masks = self.group_masks(c)
        sg = self.module_graph(c)
        if extract:
            return extract_module(sg, masks)
        return create_masked_model(sg, masks)

    def module_head(self, c: int) -> nn.Module | None:
        """Class ``c``'s head (``[B, N]`` logits -> ``[B]`` scores), or None without heads."""
        if self.heads is None:
            return None
        return ModuleHeads.from_tensors(self.heads).select(self.index(c))

    @torch.no_grad()
    def own_logits(
        self, x: torch.Tensor, modules: Sequence[nn.Module] | None = None
    ) -> torch.Tensor:
        """[B, N] own-class logit of every module (column i = module of ``classes[i]``)."""
        return self._outputs(x, modules)[0]

    @torch.no_grad()
    def scores(self, x: torch.Tensor, modules: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """[B, N] what the composition compares: the head scores with heads, else the
        own-class logits."""
        return self._outputs(x, modules)[1]

    def _outputs(self, x, modules) -> tuple[torch.Tensor, torch.Tensor]:
        """(own-class logits, scores), both [B, N], from one forward per module."""
        modules = modules or [self.module(c) for c in self.classes]
        z = torch.stack([m(x) for m in modules])  # [M, B, N_out]
        own = torch.stack([z[i, :, c] for i, c in enumerate(self.classes)], 1)
        if self.heads is None:
            return own, own
        return own, ModuleHeads.from_tensors(self.heads).to(z.device)(z).t()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Composed prediction: the class whose module scores highest (class labels)."""
        return torch.tensor(self.classes, device=x.device)[self.scores(x).argmax(1)]

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
            own, score = (t.cpu() for t in self._outputs(x, mods))
            row = (y[:, None] == cls[None]).float().argmax(1)
            strong = model(x)[:, cls.to(x.device)].cpu()
            for i in range(len(cls)):
                sel = row == i
                if sel.any():
                    v = own[sel, i]
                    lo[i] = min(lo[i], v.min())
                    hi[i] = max(hi[i], v.max())
            pred = score.argmax(1)
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
            macs, params = count_cost(mods[i], size)
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
        """Write the modules file atomically (unique temp file, fsync, rename).

        Args:
            path: The ``.safetensors`` file to write; its folder is created.

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        tensors = {
            "masks": self.masks.to(torch.uint8),
            "ranges": self.ranges.float(),
            "classes": torch.tensor(self.classes, dtype=torch.int64),
        }
        if self.calibrated:
            tensors["calib_scale"] = self.calib_scale.float()
            tensors["calib_shift"] = self.calib_shift.float()
        for k, v in (self.heads or {}).items():
            tensors[f"head.{k}"] = v.float()
        meta = {
            "groups": [list(g) for g in zip(self.group_names, self.group_channels)],
            "fingerprint": self.fingerprint,
            "stats": self.stats,
            "options": self.options,
        }
        if self.calibrated:
            meta["calib_layout"] = self.calib_layout
        return save_artifact(path, FORMAT, FORMAT_VERSION, tensors, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        input_size: Sequence[int] | None = None,
    ) -> SplitModules:
        """Read a modules file; with ``model`` also bind it, refusing another model.

        Args:
            path: The ``.safetensors`` file written by :meth:`save`.
            model: The strong model the modules were split from (other weights of the same
                architecture are refused too).
            input_size: ``(C, H, W)`` to trace the model at; default the recorded size.

        Returns:
            The :class:`SplitModules` (bound when ``model`` is given).

        Raises:
            MDError: One line for a missing or damaged file, or a model it does not fit.
        """
        out = load_artifact(path, FORMAT, "modules", cls._from_artifact, max_version=FORMAT_VERSION)
        out._source = str(path)
        if model is not None:
            out.bind(model, input_size)
        return out

    @classmethod
    def _from_artifact(cls, art: Artifact) -> SplitModules:
        t, meta = art.tensors, art.meta
        groups = meta["groups"]
        out = cls(
            classes=[int(c) for c in t["classes"].tolist()],
            group_names=[g[0] for g in groups],
            group_channels=[int(g[1]) for g in groups],
            masks=t["masks"].bool(),
            fingerprint=meta["fingerprint"],
            ranges=t["ranges"],
            stats=meta.get("stats", {}),
            options=meta.get("options", {}),
        )
        if out.masks.shape != (len(out.classes), sum(out.group_channels)):
            raise ValueError(f"mask shape {tuple(out.masks.shape)} does not match the groups")
        if "calib_scale" in t or "calib_shift" in t:
            out.calib_scale, out.calib_shift = t["calib_scale"], t["calib_shift"]
            out.calib_layout = meta["calib_layout"]
            want = (len(out.classes), sum(int(e[2]) for e in out.calib_layout))
            if out.calib_scale.shape != want or out.calib_shift.shape != want:
                raise ValueError(f"calibration shape {tuple(out.calib_scale.shape)} is not {want}")
        heads = {k[5:]: v for k, v in t.items() if k.startswith("head.")}
        if heads:
            h = ModuleHeads.from_tensors(heads)  # checks names and shapes
            if h.num_modules != len(out.classes):
                raise ValueError(f"{h.num_modules} module heads for {len(out.classes)} classes")
            out.heads = heads
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
