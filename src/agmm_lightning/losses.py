"""The loss functions under their documented name, ``agmm_lightning.losses`` (see :mod:`.agmm`)."""

from agmm_lightning.agmm.cvpr import cvpr_agmm_losses
from agmm_lightning.agmm.losses import (
    absent_class_loss,
    maximization_loss,
    partial_cross_entropy,
    pseudo_label_loss,
)

__all__ = [
    "absent_class_loss",
    "cvpr_agmm_losses",
    "maximization_loss",
    "partial_cross_entropy",
    "pseudo_label_loss",
]
