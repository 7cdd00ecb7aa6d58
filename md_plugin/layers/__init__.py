"""Layer selection and feature capture."""

from .hooks import FeatureCapture
from .select import DEFAULT_LAYER_SPEC, LayerRef, TraceEntry, resolve_layers, trace_model

__all__ = [
    "DEFAULT_LAYER_SPEC",
    "FeatureCapture",
    "LayerRef",
    "TraceEntry",
    "resolve_layers",
    "trace_model",
]
