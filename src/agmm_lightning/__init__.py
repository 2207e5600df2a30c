"""Weakly-supervised semantic segmentation with adaptive Gaussian mixtures."""
