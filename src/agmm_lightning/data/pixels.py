"""How pixels enter the network: scaled to 0..1 by one rule, then normalised per channel.

**Scaling.** Files are read at their full bit depth (:func:`~agmm_lightning.data.io.read_image`):
8-bit pixels are divided by 255 and 16-bit ones by 65535, so every image is 0..1 of its format's
full range. Arrays and tensors handed to :meth:`~agmm_lightning.AGMMSegmenter.segment` follow
:func:`pixel_scale`: integers are 0..255, floats 0..1 (or 0..255 when a value exceeds 1); a
16-bit array is given as floats (``pixels / 65535``) or as its file.

**Normalisation.** ``(pixel - mean) / std`` per channel: ImageNet's statistics for three channels
unless the data says otherwise, or the training split's own (``mean: auto``,
:func:`image_statistics`). The DataModule normalises its samples, and the model carries the same
numbers in its hyper-parameters, so a checkpoint normalises the images it segments as its
training did.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from agmm_lightning.data.io import image_pixels, read_image
from agmm_lightning.errors import InputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageInput",
    "Normalization",
    "check_normalization",
    "default_normalization",
    "image_batch",
    "image_statistics",
    "pixel_scale",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Normalization = tuple[tuple[float, ...], tuple[float, ...]]
"""Per-channel ``(mean, std)`` of 0..1 pixels."""

ImageInput = str | Path | Image.Image | np.ndarray | Tensor
"""An image to segment: a file, a PIL image, an [H,W,C] (or [H,W]) array, or a [C,H,W] or
[B,C,H,W] tensor, C the model's ``in_channels``. Files are read at full depth (8-bit /255, 16-bit
/65535); arrays and tensors of any dtype by one rule (:func:`pixel_scale`): integers are 0..255;
floats are 0..1 when none exceeds 1, else 0..255."""


def default_normalization(in_channels: int) -> Normalization | None:
    """ImageNet's statistics for three channels; None (no default) for other channel counts."""
    return (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else None


def check_normalization(
    mean: Sequence[float] | None, std: Sequence[float] | None, in_channels: int
) -> None:
    """Raise unless ``mean`` and ``std`` (when given) hold one value per channel, ``std > 0``.

    Raises:
        InputError: Naming the option, what it holds and what was expected.
    """
    if in_channels < 1:
        raise InputError(f"in_channels must be >= 1, got {in_channels}.")
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != in_channels:
            raise InputError(
                f"{name}={list(values)} has {len(values)} value(s) but in_channels={in_channels}: "
                f"give one per channel (of pixels scaled to 0..1), or 'auto' to compute them from "
                "the training images."
            )
    if std is not None and min(std) <= 0:
        raise InputError(f"std must be > 0 for every channel, got {list(std)}.")


def image_statistics(images: Iterable[np.ndarray], in_channels: int) -> Normalization:
    """Per-channel mean and standard deviation over every pixel of some images, scaled to 0..1.

    A channel that is constant over all the images (an opaque alpha channel) gets std 1: its
    normalised values are then all 0.

    Args:
        images: [H,W,C] images as read: uint8 (0..255) or float (0..1).
        in_channels: C.

    Returns:
        ``(mean, std)``, one float per channel.

    Raises:
        InputError: If there is no image, or an image does not have C channels.
    """
    total = np.zeros(in_channels)
    squares = np.zeros(in_channels)
    count = 0
    for image in images:
        if image.ndim != 3 or image.shape[2] != in_channels:
            raise InputError(
                f"Expected [H, W, {in_channels}] training images, got shape {image.shape}."
            )
        pixels = image.reshape(-1, in_channels).astype(np.float64)
        if image.dtype == np.uint8:
            pixels /= 255
        total += pixels.sum(0)
        squares += np.square(pixels).sum(0)
        count += pixels.shape[0]
    if count == 0:
        raise InputError("No training image to compute mean and std from; give them as numbers.")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0))
    std[std < 1e-6] = 1.0
    return tuple(float(value) for value in mean), tuple(float(value) for value in std)


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
            f"{low:g}..{high:g}. Scale the image to one of those ranges first (a 16-bit image: "
            "divide it by 65535, or give its file)."
        )
    return 1.0 if pixels.is_floating_point() and high <= 1 else 255.0


def image_batch(
    image: ImageInput,
    in_channels: int = 3,
    normalization: Normalization | None = None,
) -> Tensor:
    """The network's input for one image or a batch: float [B,C,H,W], scaled and normalised.

    Args:
        image: See :data:`ImageInput`.
        in_channels: C, the channels the network takes.
        normalization: Per-channel ``(mean, std)``; None uses ImageNet's (three channels only).

    Returns:
        The normalised batch (B = 1 unless a batch tensor is given).

    Raises:
        InputError: If the array or tensor is not an image of C channels of a shape listed
            above, or no normalisation is given for other than three channels.
    """
    normalization = normalization or default_normalization(in_channels)
    if normalization is None:
        raise InputError(
            f"No mean and std for {in_channels}-channel images: give the model the data's "
            "(`mean` and `std`; the CLI links them, a checkpoint holds them)."
        )
    if isinstance(image, (str, Path)):
        image = read_image(Path(image), in_channels)
    if isinstance(image, Image.Image):
        image = image_pixels(image, in_channels, "the PIL image")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3 if in_channels == 3 else 1, axis=2)
        if image.dtype == np.uint16:  # torch has no unsigned 16-bit arithmetic on every build
            image = image.astype(np.int32)
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    batch = image[None] if image.ndim == 3 else image
    if batch.ndim != 4 or batch.shape[1] != in_channels:
        kind = "an RGB image" if in_channels == 3 else f"an image of {in_channels} channel(s)"
        raise InputError(
            f"Expected {kind}: [H,W,{in_channels}] array, [{in_channels},H,W] or "
            f"[B,{in_channels},H,W] tensor; got shape {tuple(image.shape)}."
        )
    batch = batch.float() / pixel_scale(batch)
    mean = batch.new_tensor(normalization[0])[:, None, None]
    std = batch.new_tensor(normalization[1])[:, None, None]
    return (batch - mean) / std
