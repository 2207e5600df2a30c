"""Whole-image, sliding-window and multi-scale + flip inference (METHOD §6), in pure torch.

How an image becomes the network's input (files, arrays, tensors; scaling and normalisation) is
the data side's: :mod:`agmm_lightning.data.pixels`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]

__all__ = ["LogitsFn", "infer_logits", "sliding_window_logits"]


# Windows per forward pass: memory stays bounded on large images (Cityscapes: 18 windows of 512).
_WINDOWS_PER_PASS = 8


def _window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``length`` with windows of ``tile``; the last one ends at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def sliding_window_logits(logits_fn: LogitsFn, images: Tensor, tile: int, stride: int) -> Tensor:
    """Average the logits of overlapping ``tile x tile`` windows, run as batches of windows.

    Hand-written rather than taken from MONAI: forty lines against a heavy dependency.

    Args:
        logits_fn: Maps ``[B, in_channels, h, w]`` images to ``[B, C, h, w]`` logits.
        images: ``[B, in_channels, H, W]`` images; smaller than a tile means one window.
        tile: Window size.
        stride: Step between windows (at most ``tile``, so that every pixel is covered).

    Returns:
        ``[B, C, H, W]`` logits.
    """
    if not 1 <= stride <= tile:
        raise ValueError(f"tile and stride must satisfy 1 <= stride <= tile, got {tile}, {stride}")
    height, width = images.shape[-2:]
    corners = [
        (top, left)
        for top in _window_starts(height, tile, stride)
        for left in _window_starts(width, tile, stride)
    ]
    total: Tensor | None = None
    counts = images.new_zeros(1, 1, height, width)
    for first in range(0, len(corners), _WINDOWS_PER_PASS):
        chunk = corners[first : first + _WINDOWS_PER_PASS]
        windows = [images[..., top : top + tile, left : left + tile] for top, left in chunk]
        logits = logits_fn(torch.cat(windows)).split(images.shape[0])
        if total is None:
            total = logits[0].new_zeros(*logits[0].shape[:2], height, width)
        for (top, left), window_logits in zip(chunk, logits, strict=True):
            total[..., top : top + tile, left : left + tile] += window_logits
            counts[..., top : top + tile, left : left + tile] += 1
    assert total is not None
    return total / counts


def infer_logits(
    logits_fn: LogitsFn,
    images: Tensor,
    tile: int | None = None,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> Tensor:
    """Logits at the input resolution, optionally sliding-window, multi-scale and flipped.

    The softmax-free logits of every scale (resized back) and flip are averaged.

    Args:
        logits_fn: Maps ``[B, in_channels, h, w]`` images to ``[B, C, h, w]`` logits.
        images: ``[B, in_channels, H, W]`` images.
        tile: Sliding-window size; None runs on the whole image.
        stride: Sliding-window step (default: two thirds of the tile).
        scales: Image scales to average over.
        flip: Also average the horizontally flipped image.

    Returns:
        ``[B, C, H, W]`` logits.
    """
    size = images.shape[-2:]

    def run(batch: Tensor) -> Tensor:
        if tile is None:
            return logits_fn(batch)
        return sliding_window_logits(logits_fn, batch, tile, stride or max(1, 2 * tile // 3))

    total: Tensor | None = None
    for scale in scales:
        scaled = images
        if scale != 1:
            scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        logits = run(scaled)
        if flip:
            logits = logits + run(scaled.flip(-1)).flip(-1)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        total = logits if total is None else total + logits
    assert total is not None
    return total / (len(scales) * (2 if flip else 1))
