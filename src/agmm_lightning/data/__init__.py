"""Datasets and DataModules: weak-label loading, augmentation, batching and worker seeding."""

from agmm_lightning.data.ade20k import ADE20KDataModule
from agmm_lightning.data.base import AGMMDataModule
from agmm_lightning.data.cityscapes import CityscapesDataModule
from agmm_lightning.data.coco import COCODataModule
from agmm_lightning.data.folder import FolderDataModule
from agmm_lightning.data.images import ImageFolderDataModule
from agmm_lightning.data.synthetic import SyntheticDataModule
from agmm_lightning.data.voc import VOCDataModule

__all__ = [
    "ADE20KDataModule",
    "AGMMDataModule",
    "COCODataModule",
    "CityscapesDataModule",
    "FolderDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "VOCDataModule",
]
