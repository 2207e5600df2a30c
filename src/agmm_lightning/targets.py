"""The target-map convention (METHOD §1), in one place.

A *target map* holds ``0..C-1`` for labelled pixels, ``C`` (the class count) for unlabelled ones
and :data:`VOID` (255) for pixels every loss ignores (crop padding, a dataset's "don't care"). A
*dense mask* holds ``0..C-1`` and :data:`VOID`. Image classes are ``[B, C]`` multi-hot vectors;
the allowed map of boxes is ``[B, C, H, W]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "VOID",
    "allowed_classes",
    "check_target",
    "posterior_labels",
    "present_classes",
    "upsample_posterior",
]

VOID = 255
"""Value of void pixels in dense masks and target maps."""


def check_target(target: Tensor, num_classes: int) -> None:
    """Check that ``target`` is an integer map with values in ``{0..C-1, C, 255}``.

    Args:
        target: Target map of any shape.
        num_classes: Number of classes C.

    Raises:
        ValueError: If the dtype or a value is outside the convention.
    """
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor, got dtype {target.dtype}")
    bad = (target < 0) | ((target > num_classes) & (target != VOID))
    if bad.any():
        values = torch.unique(target[bad])[:8].tolist()
        raise ValueError(
            f"target values must be in 0..{num_classes - 1} (labelled), {num_classes} (unlabelled) "
            f"or {VOID} (void); got {values}"
        )


def present_classes(target: Tensor, num_classes: int) -> Tensor:
    """``[B, C]`` indicator of the classes with at least one pixel in each map.

    Args:
        target: ``[B, H, W]`` target map or dense mask; values ``>= C`` (unlabelled, void) are
            ignored.
        num_classes: Number of classes C.

    Returns:
        ``[B, C]`` float multi-hot.
    """
    index = target.flatten(1).clamp(max=num_classes).long()
    hits = torch.zeros(target.shape[0], num_classes + 1, device=target.device)
    return hits.scatter_(1, index, 1.0)[:, :num_classes]


def allowed_classes(image_classes: Tensor, allowed: Tensor | None, size: tuple[int, ...]) -> Tensor:
    """``[B, C, *size]`` bool map of the classes each pixel may take.

    Args:
        image_classes: ``[B, C]`` classes of each image (tags, or the classes labelled in it).
        allowed: Optional ``[B, C, H, W]`` map of boxes (METHOD §4); a class allowed anywhere in a
            feature cell is allowed in the cell.
        size: The map's ``(h, w)``.

    Returns:
        The map (a broadcast view when it comes from the image classes).
    """
    if allowed is not None:
        allowed = allowed.float()
        if allowed.shape[-2:] != size:
            allowed = F.adaptive_max_pool2d(allowed, size)
        return allowed > 0
    tags = image_classes > 0
    return tags[..., None, None].expand(*tags.shape, *size)


def upsample_posterior(
    posterior: Tensor, size: tuple[int, ...], allowed: Tensor | None = None
) -> Tensor:
    """A ``[B, C, h, w]`` posterior at label resolution ``size``, by bilinear upsampling.

    Upsampling blends neighbouring cells. Without a map of boxes every cell of an image is a
    distribution over the same allowed classes (or all zero), and so is any blend of them; with a
    ``[B, C, H, W]`` map of boxes (``allowed``) neighbours allow different classes, so the blend is
    restricted to each pixel's classes again and renormalised.
    """
    if posterior.shape[-2:] == tuple(size):
        return posterior
    posterior = F.interpolate(posterior, size=size, mode="bilinear", align_corners=False)
    if allowed is None:
        return posterior
    posterior = posterior * allowed
    return posterior / posterior.sum(1, keepdim=True).clamp_min(1e-12)


def posterior_labels(posterior: Tensor) -> Tensor:
    """Hard labels of a ``[B, C, H, W]`` posterior: its argmax, void where it has no mass."""
    return posterior.argmax(1).masked_fill(posterior.sum(1) == 0, VOID)
