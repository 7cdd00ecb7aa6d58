"""Model Doctor: diagnose (sift images, aggregate per-class channel gradients) and treat.

``diagnosis`` and ``masks`` find the channels each class relies on, ``record`` is the saved
result (:class:`Diagnosis`); ``treatment`` (:class:`ModelDoctor`) penalises gradients outside
them; ``step`` is the forward half of a training step that both training loops share.
"""

from .diagnosis import diagnose
from .masks import MASK_RULES, compute_masks
from .record import GRAD_MODES, Diagnosis, LayerDiagnosis, model_fingerprint
from .step import loss_scale, treatment_step
from .treatment import MD_LOSSES, ModelDoctor, check_wrapped_model, dominant_label

__all__ = [
    "GRAD_MODES",
    "MASK_RULES",
    "MD_LOSSES",
    "Diagnosis",
    "LayerDiagnosis",
    "ModelDoctor",
    "check_wrapped_model",
    "compute_masks",
    "diagnose",
    "dominant_label",
    "loss_scale",
    "model_fingerprint",
    "treatment_step",
]
