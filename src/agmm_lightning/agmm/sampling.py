"""Reading features at label pixels: the taps of bilinear upsampling, and labelled samples.

A label map is finer than the decoder's feature map. The feature of a labelled pixel is the
bilinear upsampling of the feature map read at that pixel (METHOD §3.1): a blend of four feature
cells, computed from the cells alone, so no upsampled feature map is ever built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LabelledPixels", "bilinear_taps", "class_quota", "labelled_pixels", "sample_at"]


def _axis_taps(index: Tensor, source: int, size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Source cells ``[n, 2]`` and weights ``[n, 2]`` of bilinear upsampling along one axis."""
    position = ((index.to(dtype) + 0.5) * (source / size) - 0.5).clamp_min(0)
    low = position.floor()
    cells = torch.stack([low, (low + 1).clamp_max(source - 1)], dim=1).long()
    fraction = position - low
    return cells, torch.stack([1 - fraction, fraction], dim=1)


def bilinear_taps(
    row: Tensor,
    col: Tensor,
    source: tuple[int, ...],
    size: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The feature cells that bilinear upsampling (align_corners=False) blends at some pixels.

    Args:
        row: ``[n]`` pixel rows at label resolution.
        col: ``[n]`` pixel columns.
        source: Feature map size ``(h, w)``.
        size: Label map size ``(H, W)``.
        dtype: Floating dtype of the computation and the weights; half precision is raised to
            float32, which keeps the ``.5`` of a pixel center above 1024 pixels.

    Returns:
        ``[n, 4]`` flat cell indices ``r·w + c`` and ``[n, 4]`` weights (summing to one), as
        ``F.interpolate`` computes them.
    """
    dtype = torch.promote_types(dtype, torch.float32)
    rows, row_weight = _axis_taps(row, source[0], size[0], dtype)
    cols, col_weight = _axis_taps(col, source[1], size[1], dtype)
    cells = (rows[:, :, None] * source[1] + cols[:, None, :]).flatten(1)
    return cells, (row_weight[:, :, None] * col_weight[:, None, :]).flatten(1)


class LabelledPixels(NamedTuple):
    """The labelled pixels of a batch of target maps.

    Attributes:
        image: ``[n]`` image index of each pixel.
        row: ``[n]`` row.
        col: ``[n]`` column.
        labels: ``[n]`` class.
    """

    image: Tensor
    row: Tensor
    col: Tensor
    labels: Tensor


def labelled_pixels(target: Tensor, num_classes: int, limit: int | None = None) -> LabelledPixels:
    """The pixels of ``[B, H, W]`` target maps labelled with a class (values below C).

    Args:
        target: The target maps.
        num_classes: C.
        limit: At most this many, shared evenly by the classes (:func:`class_quota`): a random
            subset of each class that has more than its share, so a small structure keeps its
            pixels beside a large background; None keeps all.

    Returns:
        The pixels, in raster order unless subsampled (then grouped by class).
    """
    index = (target < num_classes).nonzero()
    if limit is not None and index.shape[0] > limit:
        labels = target[tuple(index.T)].long()
        # Random order within each class: sort by class plus a random fraction.
        order = (labels + torch.rand(labels.shape, device=labels.device)).argsort()
        labels = labels[order]
        counts = torch.bincount(labels, minlength=num_classes)
        rank = (
            torch.arange(labels.numel(), device=labels.device) - (counts.cumsum(0) - counts)[labels]
        )
        index = index[order[rank < class_quota(counts, limit)]]
    image, row, col = index.unbind(1)
    return LabelledPixels(image, row, col, target[image, row, col].long())


def class_quota(counts: Tensor, limit: int) -> Tensor:
    """The largest per-class quota q with ``sum_c min(counts_c, q) <= limit`` (water filling).

    Args:
        counts: ``[C]`` items of each class, more than ``limit`` in all.
        limit: The total to keep.

    Returns:
        A scalar tensor q: classes below it keep everything, the others q items each.
    """
    ascending = counts.sort().values
    before = ascending.cumsum(0) - ascending  # items of the smaller classes
    remaining = torch.arange(counts.numel(), 0, -1, device=counts.device)
    share = (limit - before) // remaining  # the quota if this class and larger ones are capped
    capped = (ascending > share).float().argmax()  # the first class that exceeds its share
    return share[capped]


def sample_at(
    features: Tensor,
    pixels: LabelledPixels,
    size: tuple[int, ...],
    transform: Callable[[Tensor], Tensor] = lambda taps: taps,
) -> Tensor:
    """``transform(features)``, upsampled bilinearly to ``size``, read at the pixels.

    The four feature cells each pixel blends are transformed (channels last) and blended with
    their weights: the same as upsampling the transformed map, for any per-cell ``transform``,
    with gradients through the four cells alone.

    Args:
        features: ``[B, D0, h, w]`` feature map.
        pixels: The pixels, at label resolution ``size``.
        size: The label maps' ``(H, W)``.
        transform: Maps ``[..., D0]`` feature vectors to ``[..., D]`` (e.g. an embedding head).

    Returns:
        ``[n, D]`` vectors.
    """
    cells, weights = bilinear_taps(pixels.row, pixels.col, features.shape[-2:], size)
    taps = features.flatten(2)[pixels.image[:, None], :, cells]  # [n, 4, D0]
    return (transform(taps) * weights[..., None]).sum(1)
