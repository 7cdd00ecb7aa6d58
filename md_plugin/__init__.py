"""md_plugin: Model Doctor for timm.

The public API, importable from the top level::

    from md_plugin import diagnose, Diagnosis, ModelDoctor, ModelDoctorTask

``import md_plugin`` registers the CIFAR ResNets with timm (so it imports timm) and nothing
else; every other name is imported on first use (PEP 562), so the import stays as cheap as
timm's own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import models  # noqa: F401  (registers the CIFAR ResNets with timm)
from .errors import ConfigError, DataError, MDError
from .version import __version__

# public name -> module that defines it
_LAZY = {
    "diagnose": "md_plugin.doctor.diagnosis",
    "Diagnosis": "md_plugin.doctor.diagnosis",
    "LayerDiagnosis": "md_plugin.doctor.diagnosis",
    "shard_dataset": "md_plugin.doctor.diagnosis",
    "compute_masks": "md_plugin.doctor.masks",
    "ModelDoctor": "md_plugin.doctor.treatment",
    "ModelDoctorTask": "md_plugin.task",
    "resolve_layers": "md_plugin.layers.select",
    "trace_model": "md_plugin.layers.select",
    "LayerRef": "md_plugin.layers.select",
    "FeatureCapture": "md_plugin.layers.hooks",
    "spatial_gradient_maps": "md_plugin.report.gradmaps",
}

__all__ = [
    "ConfigError",
    "DataError",
    "Diagnosis",
    "FeatureCapture",
    "LayerDiagnosis",
    "LayerRef",
    "MDError",
    "ModelDoctor",
    "ModelDoctorTask",
    "__version__",
    "compute_masks",
    "diagnose",
    "resolve_layers",
    "shard_dataset",
    "spatial_gradient_maps",
    "trace_model",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from .doctor.diagnosis import Diagnosis, LayerDiagnosis, diagnose, shard_dataset
    from .doctor.masks import compute_masks
    from .doctor.treatment import ModelDoctor
    from .layers.hooks import FeatureCapture
    from .layers.select import LayerRef, resolve_layers, trace_model
    from .report.gradmaps import spatial_gradient_maps
    from .task import ModelDoctorTask


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'md_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
