"""Diagnosis: sifting images and aggregating per-class channel gradients."""

from .diagnosis import GRAD_MODES, Diagnosis, LayerDiagnosis, diagnose, model_fingerprint
from .masks import MASK_RULES, compute_masks

__all__ = [
    "GRAD_MODES",
    "MASK_RULES",
    "Diagnosis",
    "LayerDiagnosis",
    "compute_masks",
    "diagnose",
    "model_fingerprint",
]
