"""Weakly-supervised semantic segmentation with adaptive Gaussian mixtures."""

import os
from importlib.metadata import PackageNotFoundError, version

# albumentations asks PyPI for a newer version at import: never phone home from a library.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


from agmm_lightning.agmm import ClassMixtures  # noqa: E402
from agmm_lightning.tasks import AGMMSegmenter, CAMClassifier  # noqa: E402

try:
    __version__ = version("agmm-lightning")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"

__all__ = ["AGMMSegmenter", "CAMClassifier", "ClassMixtures", "__version__"]
