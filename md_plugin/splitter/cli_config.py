"""The ``md-doctor split`` flags turned into validated SearchConfig / GradConfig /
SensitivityConfig / CalibrationConfig.

Why a module of its own: :mod:`.cli` holds the parser and the run; the rules that read the
parsed flags (``--init-ratios`` auto or numbers, the gradient search's ``--mask-init``, flags of
the other search refused, each config validated) live here. They compare flags with the
parser's defaults, so :func:`search_config` takes the parser: importing :mod:`.cli` from here
would tie the two modules into an import circle.
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .calibrate import CalibrationConfig
from .gradsearch import GradConfig
from .search import SearchConfig
from .split import SensitivityConfig

__all__ = ["parse_init_ratios", "search_config", "stage_configs"]


def parse_init_ratios(args: argparse.Namespace) -> tuple[str, tuple[float, ...] | None]:
    """``('auto', None)`` or ``('fixed', ratios)`` from ``--init-ratios`` (CLI strings or YAML
    values); a mix, or forward-order flags with 'auto', is one line."""
    vals = args.init_ratios if args.init_ratios is not None else ["auto"]  # the GA's default
    vals = vals if isinstance(vals, (list, tuple)) else [vals]
    words = [str(v).strip().lower() for v in vals]
    if "auto" in words:
        if len(words) > 1:
            raise ConfigError(
                f"--init-ratios takes 'auto' or keep ratios, not both: {' '.join(words)}"
            )
        given = [f for f, v in (("--init-ratios-sensitive", args.init_ratios_sensitive),
                                ("--sensitive-fraction", args.sensitive_fraction)) if v is not None]  # fmt: skip
        if given:
            raise ConfigError(
                f"{' and '.join(given)} only apply to numeric --init-ratios (the forward-order "
                "rule); with --init-ratios auto the layer sensitivity sets every group's ratios"
            )
        return "auto", None
    try:
        return "fixed", tuple(float(v) for v in vals)
    except ValueError:
        raise ConfigError(
            f"--init-ratios takes 'auto' or keep ratios in (0, 1], got {' '.join(words)}"
        ) from None


_GA_ONLY = ("generations", "population", "mutation", "parents_frac", "keep_frac", "alpha", "gamma",
            "init_ratios_sensitive", "sensitive_fraction", "eval_mode")  # fmt: skip
_SENSITIVITY = ("sensitivity_images", "sensitivity_tolerance")
_GRADIENT_ONLY = ("epochs", "head_epochs", "images_per_epoch", "mask_lr", "head_lr",
                  "kernel_alpha", "target_kernels", "mask_init", "select_tolerance")  # fmt: skip


def _mask_init(args: argparse.Namespace) -> str:
    """The gradient search's ``--mask-init``: as given, else ``auto`` when ``--init-ratios
    auto`` is given (the layer sensitivity sets the kernel target), else GradSplitter's
    ``ones``."""
    if args.mask_init:
        return args.mask_init
    return (
        "auto" if args.init_ratios is not None and parse_init_ratios(args)[0] == "auto" else "ones"
    )


def _check_search_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A flag of the other search (or of the sensitivity a run skips), set away from its
    default (``parser``'s), is one line; so are numeric --init-ratios with the sensitivity's
    mask init."""
    other = _GA_ONLY if args.search == "gradient" else _GRADIENT_ONLY
    init = _mask_init(args) if args.search == "gradient" else None
    if init not in (None, "auto"):
        other = other + ("init_ratios", *_SENSITIVITY)
    if init == "auto" and parse_init_ratios(args)[0] != "auto":
        raise ConfigError(
            "--mask-init auto takes its kernel target from the layer sensitivity (--init-ratios "
            "auto); numeric --init-ratios are the GA's"
        )
    given = [k for k in other if getattr(args, k) != parser.get_default(k)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        what = f"--search {args.search}"
        if init not in (None, "auto"):
            what += f" --mask-init {init}"
        raise ConfigError(f"{flags} {'does' if len(given) == 1 else 'do'} not apply to {what}")


def _grad_config(args: argparse.Namespace) -> GradConfig:
    cfg = GradConfig(
        epochs=args.epochs, head_epochs=args.head_epochs, images_per_epoch=args.images_per_epoch,
        mask_lr=args.mask_lr, head_lr=args.head_lr, alpha=args.kernel_alpha,
        target_kernels=args.target_kernels, select_tolerance=args.select_tolerance,
        mask_init=_mask_init(args), val_images=args.val_images, seed=args.seed,
        eval_batch_size=args.batch_size,
    )  # fmt: skip
    cfg.validate()
    return cfg


def search_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> SearchConfig | GradConfig:
    """The GA's or, with ``--search gradient``, the gradient search's settings, validated.

    Args:
        args: from :func:`~.cli.parse_split_args`.
        parser: the split parser (:func:`~.cli.create_split_parser`): a flag of the other search
            is refused when it differs from the parser's default.
    """
    _check_search_flags(args, parser)
    if args.search == "gradient":
        return _grad_config(args)
    d = SearchConfig()
    _, fixed = parse_init_ratios(args)
    sens = args.init_ratios_sensitive
    cfg = SearchConfig(
        generations=args.generations, population=args.population, val_images=args.val_images,
        seed=args.seed, mutation=args.mutation, parents_frac=args.parents_frac,
        keep_frac=args.keep_frac, alpha=args.alpha, gamma=args.gamma,
        ratios_sensitive=tuple(sens) if sens is not None else d.ratios_sensitive,
        ratios=fixed or d.ratios,
        sensitive_fraction=d.sensitive_fraction if args.sensitive_fraction is None else args.sensitive_fraction,
        eval_mode=args.eval_mode, batch_size=args.batch_size,
    )  # fmt: skip
    cfg.validate()
    return cfg


def stage_configs(args: argparse.Namespace) -> tuple[SensitivityConfig, CalibrationConfig]:
    """(SensitivityConfig, CalibrationConfig) from the flags, validated."""
    sens = SensitivityConfig(images=args.sensitivity_images, tolerance=args.sensitivity_tolerance)
    n = len(args.classes) if args.classes else 2
    if parse_init_ratios(args)[0] == "auto":
        sens.validate(n)
    cal = CalibrationConfig(
        mode=args.calibrate, images=args.calibrate_images, steps=args.calibrate_steps,
        lr=args.calibrate_lr, batch_size=args.calibrate_batch_size, seed=args.seed,
    )  # fmt: skip
    cal.validate()
    return sens, cal
