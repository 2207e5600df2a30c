"""Weakly-supervised semantic segmentation with adaptive Gaussian mixtures."""

from agmm_lightning.callbacks import AGMMPseudoLabeler
from agmm_lightning.mixtures import ClassMixtures
from agmm_lightning.module import AGMMSegmenter

__all__ = ["AGMMPseudoLabeler", "AGMMSegmenter", "ClassMixtures"]
