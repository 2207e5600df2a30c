"""The class mixtures under their documented name, ``agmm_lightning.mixtures``."""

from agmm_lightning.agmm.mixtures import ClassMixtures, MixtureStatistics

__all__ = ["ClassMixtures", "MixtureStatistics"]
