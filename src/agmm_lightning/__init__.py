"""Weakly-supervised semantic segmentation with adaptive Gaussian mixtures."""

import os

# albumentations asks PyPI for a newer version at import: never phone home from a library.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


from agmm_lightning.agmm import ClassMixtures  # noqa: E402
from agmm_lightning.tasks import AGMMSegmenter, CAMClassifier  # noqa: E402

__all__ = ["AGMMSegmenter", "CAMClassifier", "ClassMixtures"]
