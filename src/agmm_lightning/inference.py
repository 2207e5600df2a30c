"""Whole-image, sliding-window and multi-scale + flip inference (METHOD §6), and its input."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from agmm_lightning.data.io import read_rgb_image
from agmm_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from agmm_lightning.errors import InputError

LogitsFn = Callable[[Tensor], Tensor]
ImageInput = str | Path | Image.Image | np.ndarray | Tensor
"""An image to segment: a file, a PIL image, an [H,W,3] (or [H,W]) array, or a [3,H,W] or
[B,3,H,W] tensor. Arrays and tensors of any dtype are read by one rule (:func:`pixel_scale`):
integers are 0..255; floats are 0..1 when none exceeds 1, else 0..255."""

__all__ = ["ImageInput", "image_batch", "infer_logits", "pixel_scale", "sliding_window_logits"]


def pixel_scale(pixels: Tensor) -> float:
    """The value of full intensity in an image tensor: 255 or 1.

    Integers (uint8, int64, uint16, ...) are 0..255; floats are 0..1 when no value exceeds 1
    and 0..255 otherwise (a float image whose brightest pixel is at most 1 reads as 0..1).

    Raises:
        InputError: For a bool tensor, or values outside 0..255 (a 16-bit or signed image:
            scale it to 0..255 or 0..1 first).
    """
    if pixels.dtype == torch.bool:
        raise InputError("Expected image pixels, got a bool array; give 0..255 or 0..1 values.")
    if pixels.numel() == 0:
        return 255.0
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 255:
        raise InputError(
            f"Expected pixels in 0..255 (integers, or floats) or 0..1 (floats); got values in "
            f"{low:g}..{high:g}. Scale the image to one of those ranges first."
        )
    return 1.0 if pixels.is_floating_point() and high <= 1 else 255.0


def image_batch(image: ImageInput) -> Tensor:
    """The network's input for one image or a batch: float [B,3,H,W], ImageNet-normalised.

    Args:
        image: See :data:`ImageInput`.

    Returns:
        The normalised batch (B = 1 unless a batch tensor is given).

    Raises:
        InputError: If the array or tensor is not an RGB image of a shape listed above.
    """
    if isinstance(image, (str, Path)):
        image = read_rgb_image(Path(image))
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.dtype == np.uint16:  # torch has no unsigned 16-bit arithmetic on every build
            image = image.astype(np.int32)
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    batch = image[None] if image.ndim == 3 else image
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise InputError(
            f"Expected an RGB image: [H,W,3] array, [3,H,W] or [B,3,H,W] tensor; got shape "
            f"{tuple(image.shape)}."
        )
    batch = batch.float() / pixel_scale(batch)
    mean = batch.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = batch.new_tensor(IMAGENET_STD)[:, None, None]
    return (batch - mean) / std


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
        logits_fn: Maps ``[B, 3, h, w]`` images to ``[B, C, h, w]`` logits.
        images: ``[B, 3, H, W]`` images; smaller than a tile means one window.
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
