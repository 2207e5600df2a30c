"""Lightning tasks: training, evaluation and prediction around the pure-torch models."""

from agmm_lightning.tasks.cam import CAMClassifier
from agmm_lightning.tasks.segmenter import AGMMSegmenter

__all__ = ["AGMMSegmenter", "CAMClassifier"]
