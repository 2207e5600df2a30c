"""The AGMM algorithm in pure torch: no Lightning here, so it is tested and benchmarked alone.

:class:`AGMMModel` holds a segmentation network and computes one method's losses;
:class:`ClassMixtures` are the class-wise Gaussian mixtures of OEM mode; :func:`cvpr_agmm_losses`
are CVPR mode's terms.
"""

from agmm_lightning.agmm.cvpr import cvpr_agmm_losses
from agmm_lightning.agmm.mixtures import ClassMixtures, MixtureStatistics
from agmm_lightning.agmm.model import METHODS, AGMMModel, Method, build_network
from agmm_lightning.agmm.oem import OEMOptions, StepLosses

__all__ = [
    "METHODS",
    "AGMMModel",
    "ClassMixtures",
    "Method",
    "MixtureStatistics",
    "OEMOptions",
    "StepLosses",
    "build_network",
    "cvpr_agmm_losses",
]
