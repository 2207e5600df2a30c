"""The names users import keep working wherever the code behind them lives."""

import importlib

import pytest

PUBLIC = {
    "agmm_lightning": ["AGMMSegmenter", "CAMClassifier", "ClassMixtures"],
    "agmm_lightning.losses": ["cvpr_agmm_losses", "partial_cross_entropy", "absent_class_loss"],
    "agmm_lightning.mixtures": ["ClassMixtures", "MixtureStatistics"],
    "agmm_lightning.agmm": ["AGMMModel", "ClassMixtures", "OEMOptions", "cvpr_agmm_losses"],
    "agmm_lightning.data": [
        "ADE20KDataModule",
        "AGMMDataModule",
        "COCODataModule",
        "CityscapesDataModule",
        "FolderDataModule",
        "SyntheticDataModule",
        "VOCDataModule",
    ],
    "agmm_lightning.weak_labels": ["WeakLabel", "simulate_weak_label", "rasterize_points"],
    "agmm_lightning.cli": ["main"],
}


@pytest.mark.parametrize(("module", "names"), PUBLIC.items())
def test_public_names_import(module, names):
    imported = importlib.import_module(module)
    for name in names:
        assert callable(getattr(imported, name)), f"{module}.{name}"


def test_the_documented_names_are_the_implementations():
    from agmm_lightning import ClassMixtures, agmm, losses, mixtures

    assert losses.cvpr_agmm_losses is agmm.cvpr_agmm_losses
    assert mixtures.ClassMixtures is ClassMixtures is agmm.ClassMixtures
