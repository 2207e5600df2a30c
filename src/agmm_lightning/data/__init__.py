"""Datasets and DataModules: weak-label loading, augmentation, batching and worker seeding."""

from agmm_lightning.data.base import AGMMDataModule
from agmm_lightning.data.synthetic import SyntheticDataModule

__all__ = ["AGMMDataModule", "SyntheticDataModule"]
