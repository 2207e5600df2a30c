"""Whole-image, sliding-window and multi-scale + flip inference (METHOD §6)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]

__all__ = ["infer_logits", "sliding_window_logits"]


def _window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets covering ``length`` with windows of ``tile``; the last one ends at the edge."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def sliding_window_logits(logits_fn: LogitsFn, images: Tensor, tile: int, stride: int) -> Tensor:
    """Average the logits of overlapping ``tile x tile`` windows.

    Args:
        logits_fn: Maps ``[B, 3, h, w]`` images to ``[B, C, h, w]`` logits.
        images: ``[B, 3, H, W]`` images; smaller than a tile means one window.
        tile: Window size.
        stride: Step between windows.

    Returns:
        ``[B, C, H, W]`` logits.
    """
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be >= 1, got {tile} and {stride}")
    height, width = images.shape[-2:]
    total: Tensor | None = None
    counts = images.new_zeros(1, 1, height, width)
    for top in _window_starts(height, tile, stride):
        for left in _window_starts(width, tile, stride):
            window = images[..., top : top + tile, left : left + tile]
            logits = logits_fn(window)
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], height, width)
            total[..., top : top + tile, left : left + tile] += logits
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
        logits_fn: Maps ``[B, 3, h, w]`` images to ``[B, C, h, w]`` logits.
        images: ``[B, 3, H, W]`` images.
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
