"""What many tests build: the tiny models, data and trainer, and writable copies of the fixtures.

Each factory gives the small configuration the tests share (a CPU runs it in seconds, with a real
timm encoder, no weights and no network access); keyword arguments override or add options, so
a test names only what it is about.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import segmentation_models_pytorch as smp

from agmm_lightning import AGMMSegmenter, CAMClassifier
from agmm_lightning.agmm import build_network
from agmm_lightning.data import SyntheticDataModule

DATA = Path(__file__).parent / "data"
TINY_ENCODER = "tu-test_resnet"
"""timm's smallest ResNet: real convolutions and strides at a test's cost."""
TINY_CLASSES = 6


def tiny_network(arch: str = "Unet", num_classes: int = TINY_CLASSES) -> smp.base.SegmentationModel:
    """An smp network on the tiny encoder, without weights."""
    return build_network(arch, TINY_ENCODER, None, num_classes)


def tiny_segmenter(**overrides: Any) -> AGMMSegmenter:
    """An AGMMSegmenter: a U-Net on the tiny encoder for the synthetic data's 6 classes."""
    options: dict[str, Any] = {"num_classes": TINY_CLASSES, "arch": "Unet", "encoder": TINY_ENCODER}
    return AGMMSegmenter(**(options | overrides))


def tiny_classifier(**overrides: Any) -> CAMClassifier:
    """A CAMClassifier on the tiny encoder, at one scale (multi-scale CAMs cost several passes)."""
    options: dict[str, Any] = {
        "num_classes": TINY_CLASSES,
        "encoder": TINY_ENCODER,
        "cam_scales": (1.0,),
    }
    return CAMClassifier(**(options | overrides))


def tiny_data(**overrides: Any) -> SyntheticDataModule:
    """Synthetic scenes of 32x32 pixels: 8 to train on, 4 to validate, 4 to test, batches of 4."""
    options: dict[str, Any] = {
        "num_train": 8,
        "num_val": 4,
        "num_test": 4,
        "image_size": 32,
        "crop_size": 32,
        "batch_size": 4,
    }
    return SyntheticDataModule(**(options | overrides))


def tiny_trainer(root: Path, **overrides: Any) -> pl.Trainer:
    """A CPU trainer that writes nothing (no logger, no checkpoints) and prints no progress.

    Args:
        root: Its ``default_root_dir``, usually the test's ``tmp_path``.
        **overrides: Further Trainer arguments, e.g. ``max_steps`` or ``enable_checkpointing``.
    """
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    return pl.Trainer(**(options | overrides))


def copy_fixture(name: str, tmp_path: Path) -> Path:
    """A writable copy of the fixture dataset ``tests/data/<name>``, for a test that breaks it."""
    root = tmp_path / name
    shutil.copytree(DATA / name, root)
    return root
