"""CVPR mode (METHOD §2): the sparsely-annotated AGMM losses of the CVPR 2023 code.

Equal to the published formulas to float tolerance, but computed only for the classes present in
each crop, without the ``[B, C, D, h, w]`` feature-center differences or upsampled features of the
published code: centers are pooled from the bilinear taps of the labelled pixels, distances are an
L1 ``cdist`` whose backward runs one class slot at a time, and the pixel terms share one softmax,
taken a band of rows at a time, with a hand-written backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from agmm_lightning.agmm.bands import BackwardBand, ForwardBand, ForwardOut, band_functions
from agmm_lightning.agmm.losses import EPS
from agmm_lightning.agmm.precision import float32_math, in_float32
from agmm_lightning.agmm.sampling import bilinear_taps
from agmm_lightning.targets import VOID, check_target, present_classes

__all__ = ["cvpr_agmm_losses"]


def _binary_cross_entropy(p: Tensor, q: Tensor) -> Tensor:
    """``-q·log(p+1e-6) - (1-q)·log(1-p+1e-6)`` elementwise, as in the published code."""
    return -q * torch.log(p + EPS) - (1 - q) * torch.log(1 - p + EPS)


def _class_pooling(
    features: Tensor, slots: int, size: tuple[int, ...], pixels: tuple[Tensor, ...]
) -> Tensor:
    """``W [B, S, h·w]`` with ``W @ F`` the mean of the upsampled ``F`` over each slot's pixels.

    Each labelled pixel spreads its bilinear weights over four feature cells, so the upsampled
    features are never built.

    Args:
        features: ``[B, D, h, w]`` features (for their shape, dtype and device).
        slots: Number of slots S.
        size: Label resolution ``(H, W)``.
        pixels: ``(image, slot, row, col)``, each ``[n]``: the labelled pixels and their slots.
    """
    batch, _, height, width = features.shape
    image, slot, row, col = pixels
    cell, weight = bilinear_taps(row, col, (height, width), size, features.dtype)
    group = image * slots + slot
    pooling = features.new_zeros(batch * slots, height * width)
    pooling.index_put_((group[:, None].expand_as(cell), cell), weight, accumulate=True)
    counts = torch.bincount(group, minlength=batch * slots).to(features.dtype)
    return (pooling / (counts[:, None] + EPS)).view(batch, slots, -1)


def _check_shapes(features: Tensor, logits: Tensor, target: Tensor, num_classes: int) -> None:
    if features.ndim != 4 or not features.is_floating_point():
        raise ValueError(
            f"features must be a float [B, D, h, w] tensor, got {tuple(features.shape)}"
        )
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(
            f"logits must be [B, {num_classes}, H, W] for num_classes={num_classes}, "
            f"got {tuple(logits.shape)}"
        )
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected or features.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must be [B, H, W] = {expected} matching logits and features batch "
            f"{features.shape[0]}, got {tuple(target.shape)}"
        )
    check_target(target, num_classes)


CHUNK_ELEMENTS = 2**24
"""Elements of the ``[B, C, H, W]`` logits the pixel terms process at once (64 MiB in float32)."""

CPU_CHUNK_ELEMENTS = 2**20
"""The same on a CPU (4 MiB in float32): each band's temporaries then stay below malloc's mmap
threshold, so their memory is reused instead of mapped and page-faulted afresh for every band."""


def _row_chunks(logits: Tensor, multiple: int = 1) -> list[slice]:
    """Bands of about a chunk of ``[B, C, H, W]`` logits each, ``multiple`` rows or a multiple."""
    batch, classes, height, width = logits.shape
    chunk = CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else CHUNK_ELEMENTS
    rows = max(1, chunk // (batch * classes * width * multiple)) * multiple
    return [slice(start, min(start + rows, height)) for start in range(0, height, rows)]


def _forbidden_rows(forbidden: Tensor, rows: slice) -> Tensor:
    """The ``[B, C]`` classes forbidden in each image, or the ``[B, C, H, W]`` map's band."""
    return forbidden if forbidden.ndim == 2 else forbidden[:, :, rows]


class _PixelLosses(torch.autograd.Function):
    """``seg``, ``gmm_to_pred`` and ``absent`` of METHOD §2 with a hand-written backward.

    The three terms read the same softmax over every class and pixel, the largest tensors of the
    method. It is taken a band of rows at a time, in float32 whatever the logits' dtype, and
    taken again in backward instead of being kept: no float32 copy of the logits and no
    ``[B, C, H, W]`` intermediate lives beyond one band (autograd would keep a dozen and sum three
    logit gradients). Only ``[B, S, H, W]`` maps of the present classes' slots are kept.

    Given a cell stride, it also returns the logits averaged over each feature cell, which OEM
    mode's GMM prior and pseudo loss read, and adds their gradient in the same bands: autograd
    would build it as one more ``[B, C, H, W]`` map and sum it with the others.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        kernel: Tensor,
        slot_class: Tensor,
        slot_weight: Tensor,
        forbidden: Tensor,
        target: Tensor,
        labelled: tuple[Tensor, Tensor, Tensor, Tensor],
        cell: tuple[int, int] | None,
        parts: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        dtype = kernel.dtype
        bands = band_functions(logits)
        cell_logits = None if cell is None else F.avg_pool2d(logits, cell).to(dtype)
        index = slot_class[..., None, None].expand_as(kernel)
        slot_probs = torch.empty_like(kernel)
        slot_log_not = torch.empty_like(kernel)  # log(1 - P + 1e-6) at each slot's class
        absent_map = kernel.new_empty(target.shape)  # sum_c t_c log(1 - P_c + 1e-6)
        for rows in _row_chunks(logits):
            band_forbidden = _forbidden_rows(forbidden, rows)
            bands.forward(
                ForwardBand(logits[:, :, rows], index[:, :, rows], band_forbidden),
                ForwardOut(slot_probs[:, :, rows], slot_log_not[:, :, rows], absent_map[:, rows]),
                dtype,
            )
        slot_log_probs = torch.add(slot_probs, EPS).log_()
        if parts is None:
            # -BCE(P, G) = L + G (log(P + 1e-6) - L) with L = log(1 - P + 1e-6).
            log_fit = torch.sub(slot_log_probs, slot_log_not).mul_(kernel).add_(slot_log_not)
        else:  # only the parts of -BCE that each slot keeps at each pixel
            pull, push = parts
            log_fit = (kernel * slot_log_probs * pull).add_((1 - kernel) * slot_log_not * push)
        valid = target != VOID
        pixel = valid / valid.sum().clamp_min(1).to(dtype)  # mean over non-void pixels
        fit_map = torch.bmm(slot_weight[:, None], log_fit.flatten(2)).view_as(pixel)
        gmm_to_pred = -(fit_map * pixel).sum()
        absent = -(absent_map * pixel).sum()

        image, row, col, labels = labelled
        pixel_logits = logits[image, :, row, col].to(dtype)
        seg = F.cross_entropy(pixel_logits, labels) if labels.numel() else kernel.new_zeros(())
        ctx.save_for_backward(
            logits, kernel, slot_class, slot_probs, slot_log_probs, slot_log_not, slot_weight,
            forbidden, pixel,
        )  # fmt: skip
        ctx.labelled = (image, row, col, labels, pixel_logits)
        ctx.bands = bands
        ctx.cell = cell
        ctx.parts = parts
        ctx.set_materialize_grads(False)
        return seg, gmm_to_pred, absent, cell_logits

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any,
        grad_seg: Tensor | None,
        grad_gmm: Tensor | None,
        grad_absent: Tensor | None,
        grad_cell: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        (
            logits, kernel, slot_class, slot_probs, slot_log_probs, slot_log_not, slot_weight,
            forbidden, pixel,
        ) = ctx.saved_tensors  # fmt: skip
        dtype = kernel.dtype
        index = slot_class[..., None, None].expand_as(kernel)
        # Outputs left out of the loss (OEM mode uses only gmm_to_pred) come as None: skipped.
        slot_grad = None
        if grad_gmm is not None:
            # P dL/dP of gmm_to_pred at each slot's class: w P [(1-G)/(1-P+eps) - G/(P+eps)].
            slot_scale = (grad_gmm * slot_weight)[..., None, None]
            to_not = slot_probs.neg().add_(1 + EPS)
            to_not = torch.div(slot_probs, to_not, out=to_not)  # P / (1 - P + eps)
            to_fit = torch.add(slot_probs, EPS)
            to_fit = torch.div(slot_probs, to_fit, out=to_fit)  # P / (P + eps)
            if ctx.parts is None:
                slot_grad = to_not.sub_(to_fit.add_(to_not).mul_(kernel))
            else:
                pull, push = ctx.parts
                slot_grad = (to_not * (1 - kernel) * push).sub_(to_fit.mul_(kernel).mul_(pull))
            slot_grad.mul_(slot_scale).mul_(pixel[:, None])
        grad_logits = torch.empty_like(logits)
        cell_rows, cell_cols = ctx.cell or (1, 1)
        if grad_cell is not None:  # each pixel gets its cell's gradient over the cell's area
            grad_cell = grad_cell / (cell_rows * cell_cols)
        absent_weight = None if grad_absent is None else (pixel * -grad_absent)[:, None]
        for rows in _row_chunks(logits, cell_rows):
            cells = slice(rows.start // cell_rows, rows.stop // cell_rows)
            ctx.bands.backward(
                BackwardBand(
                    logits[:, :, rows],
                    index[:, :, rows],
                    None if slot_grad is None else slot_grad[:, :, rows],
                    None
                    if absent_weight is None
                    else (_forbidden_rows(forbidden, rows), absent_weight[:, :, rows]),
                    None
                    if grad_cell is None
                    else grad_cell[:, :, cells].repeat_interleave(cell_cols, 3),
                ),
                grad_logits[:, :, rows],
                dtype,
            )
        image, row, col, labels, pixel_logits = ctx.labelled
        if grad_seg is not None and labels.numel():
            ce = pixel_logits.softmax(1)
            ce[torch.arange(labels.numel(), device=labels.device), labels] -= 1
            at_labels = grad_logits[image, :, row, col].to(dtype)  # labelled pixels are unique
            at_labels.add_(ce * (grad_seg / labels.numel()))
            grad_logits[image, :, row, col] = at_labels.to(grad_logits.dtype)
        grad_kernel = None
        if ctx.needs_input_grad[1] and grad_gmm is not None:
            if ctx.parts is None:
                grad_kernel = torch.sub(slot_log_not, slot_log_probs)
            else:
                pull, push = ctx.parts
                grad_kernel = (slot_log_not * push).sub_(slot_log_probs * pull)
            grad_kernel.mul_(slot_scale).mul_(pixel[:, None])
        return grad_logits, grad_kernel, None, None, None, None, None, None, None


class _CentersAndDistances(torch.autograd.Function):
    """Class centers and every feature's mean absolute distance to them (METHOD §2, steps 1-2).

    ``centers[b, s] = sum_j F[b, :, j] W[b, s, j]`` for pooling weights W, and
    ``distance[b, s, j] = mean_d |F[b, d, j] - centers[b, s, d]|``. The forward is a matrix
    product and an L1 ``cdist``. The backward needs the sign of every feature-center difference,
    a ``[B, S, D, N]`` tensor: it is built one center slot at a time, so that only one
    ``[B, D, N]`` difference lives, and both gradient paths to the features are summed in place.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, features: Tensor, weights: Tensor
    ) -> tuple[Tensor, Tensor]:
        centers = torch.bmm(weights, features.transpose(1, 2))
        distance = torch.cdist(centers, features.transpose(1, 2), p=1) / features.shape[1]
        ctx.save_for_backward(features, weights, centers)
        return centers, distance

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_centers: Tensor, grad_distance: Tensor
    ) -> tuple[Tensor, None]:
        features, weights, centers = ctx.saved_tensors
        grad_distance = grad_distance / features.shape[1]
        grad_centers = grad_centers.clone()
        grad_features = torch.zeros_like(features)
        sign = torch.empty_like(features)
        for slot in range(centers.shape[1]):
            torch.sub(features, centers[:, slot, :, None], out=sign).sign_()
            grad_centers[:, slot] -= torch.bmm(sign, grad_distance[:, slot, :, None])[..., 0]
            grad_features.addcmul_(sign, grad_distance[:, slot, None])
        return grad_features.baddbmm_(grad_centers.transpose(1, 2), weights), None


def _kernel_parts(allowed: Tensor, slot_class: Tensor) -> tuple[Tensor, Tensor]:
    """Where each slot's ``gmm_to_pred`` keeps its pull and its push, given a box map.

    The pull is ``-G log P``, the push ``-(1-G) log(1-P)``; both maps are ``[B, S, H, W]``
    float, from the ``[B, C, H, W]`` bool box map. A class allowed at every pixel of its image
    (background) is image-wide; a class allowed at a pixel only through a box covering it is a
    box class there. Outside boxes the image-wide classes keep both parts; inside a box, the
    box's classes keep only the pull and the image-wide ones only the push. A class is never
    read where it is not allowed.
    """
    index = slot_class[..., None, None].expand(-1, -1, *allowed.shape[-2:])
    slot_allowed = allowed.gather(1, index)
    image_wide = allowed.flatten(2).all(2)
    boxed = slot_allowed & ~image_wide.gather(1, slot_class)[..., None, None]
    in_box = (allowed & ~image_wide[..., None, None]).any(1, keepdim=True)
    pull = slot_allowed & (boxed | ~in_box)
    push = slot_allowed & ~boxed
    return pull.float(), push.float()


def cvpr_agmm_losses(
    features: Tensor,
    logits: Tensor,
    target: Tensor,
    num_classes: int,
    image_classes: Tensor | None = None,
    allowed: Tensor | None = None,
    with_cell_logits: bool = False,
) -> dict[str, Tensor]:
    """The sparsely-annotated AGMM losses of the CVPR 2023 code (METHOD §2).

    Equal to the published formulas to float tolerance, but computed only for the classes present
    in each crop (the others contribute exactly zero to every term but ``absent``). The centers
    are pooled from the bilinear taps of the labelled pixels, the distances are an L1 ``cdist``
    whose backward runs one class slot at a time, and the pixel terms share one softmax: neither
    ``[B, C, D, h, w]`` differences nor upsampled features are built.

    Args:
        features: ``[B, D0, h, w]`` decoder features.
        logits: ``[B, C, H, W]`` logits at label resolution.
        target: ``[B, H, W]`` long target map (``C`` unlabelled, ``255`` void).
        num_classes: Number of classes C.
        image_classes: ``[B, C]`` classes present in each image; defaults to the classes
            labelled in ``target``.
        allowed: Optional ``[B, C, H, W]`` map of the classes each pixel may take (boxes,
            METHOD §4). The absent term then forbids, per pixel, the classes it does not allow,
            and ``gmm_to_pred`` reads each class only where it is allowed; inside a box it only
            pulls the box's classes up (where their kernel is high) and pushes the image-wide
            classes, such as background, down (where theirs is low), so it never pushes a box's
            class down inside its box. Without it the terms are the published ones exactly.
        with_cell_logits: Also return ``cell_logits``, the logits averaged over each feature
            cell (``[B, C, h, w]``, differentiable, in the losses' float32), which OEM mode
            reads: where the cells tile the logits evenly, their gradient joins the pixel
            terms' in the same pass.

    Returns:
        Dict with ``seg``, ``gmm_to_pred``, ``label_to_gmm``, ``separation``, ``absent`` and
        ``total`` (their sum), and ``cell_logits`` if asked.

    Raises:
        ValueError: On shapes, dtypes or label values that do not fit.
    """
    _check_shapes(features, logits, target, num_classes)
    (features,) = in_float32(features)  # the logits are upcast a band at a time where they are read
    with float32_math(logits.device):
        return _cvpr_agmm_losses(
            features, logits, target, num_classes, image_classes, allowed, with_cell_logits
        )


def _cvpr_agmm_losses(
    features: Tensor,
    logits: Tensor,
    target: Tensor,
    num_classes: int,
    image_classes: Tensor | None,
    allowed: Tensor | None,
    with_cell_logits: bool,
) -> dict[str, Tensor]:
    """:func:`cvpr_agmm_losses` on checked float32 inputs, with autocast off."""
    batch, channels, height, width = features.shape
    labelled = target < num_classes
    valid = target != VOID
    present = present_classes(target, num_classes).to(features.dtype)  # c_{b,k}
    if image_classes is None:
        image_classes = present
    elif image_classes.shape != present.shape:
        raise ValueError(
            f"image_classes must be [B, C] = {tuple(present.shape)}, "
            f"got {tuple(image_classes.shape)}"
        )

    # Pack each image's present classes into the first slots; padded slots are masked out.
    slots = max(int(present.sum(1).max()), 1)
    order = present.argsort(dim=1, descending=True, stable=True)
    slot_class = order[:, :slots]
    slot_present = present.gather(1, slot_class)
    slot_of_class = order.argsort(dim=1)  # the inverse permutation

    # Centers: mean of the upsampled features over each class's labelled pixels; distances at
    # feature resolution.
    image, row, col = labelled.nonzero(as_tuple=True)
    labels = target[image, row, col]
    pixels = (image, slot_of_class[image, labels], row, col)
    pooling = _class_pooling(features, slots, target.shape[-2:], pixels)
    centers, distance = _CentersAndDistances.apply(features.flatten(2), pooling)
    distance = distance.view(batch, slots, height, width)

    # Kernel: exp(-(mean_channels |F - mu|)^2), void-preserved, then upsampled.
    preserve = F.interpolate(
        valid[:, None].to(features.dtype),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    distance = distance * slot_present[..., None, None] * preserve
    kernel = F.interpolate(
        torch.exp(-distance.square()), size=target.shape[-2:], mode="bilinear", align_corners=False
    ).mul_(slot_present[..., None, None])

    # Per-image class averaging weights c_{b,k} / (sum_k c_{b,k} + 1e-6), halved as in the code.
    slot_weight = slot_present / (2 * (present.sum(1, keepdim=True) + EPS))
    forbidden = 1.0 - image_classes.to(features.dtype)
    parts = None
    if allowed is not None:
        if allowed.shape != logits.shape:
            raise ValueError(
                f"allowed must be [B, C, H, W] = {tuple(logits.shape)}, got {tuple(allowed.shape)}"
            )
        forbidden = 1.0 - allowed.to(features.dtype)
        parts = _kernel_parts(allowed > 0, slot_class)
    label_height, label_width = target.shape[-2:]
    tiled = label_height % height == 0 and label_width % width == 0
    cell = (label_height // height, label_width // width) if with_cell_logits and tiled else None
    seg, gmm_to_pred, absent, cell_logits = _PixelLosses.apply(
        logits,
        kernel,
        slot_class,
        slot_weight,
        forbidden,
        target,
        (image, row, col, labels),
        cell,
        parts,
    )
    if with_cell_logits and cell is None:
        cell_logits = F.adaptive_avg_pool2d(logits, (height, width)).to(features.dtype)

    # label_to_gmm only needs the labelled pixels: read the kernel there.
    kernel_at_labels = kernel[image, :, row, col]  # [n, S]
    own_class = (labels[:, None] == slot_class[image]).to(kernel.dtype)
    bce_labels = _binary_cross_entropy(kernel_at_labels, own_class)
    label_to_gmm = (bce_labels * slot_weight[image]).sum(1).mean() if image.numel() else seg * 0

    # Separation of the batch-level class vectors, over unordered pairs of present classes.
    all_centers = centers.new_zeros(batch, num_classes, channels).scatter(
        1, slot_class[..., None].expand_as(centers), centers
    )
    images_with_class = present.sum(0)
    vectors = all_centers.sum(0) * (images_with_class / (images_with_class + EPS))[:, None]
    pair_distance = torch.cdist(vectors[None], vectors[None], p=1)[0] / channels
    seen = images_with_class > 0
    pairs = torch.triu(seen[:, None] & seen[None, :], diagonal=1).to(features.dtype)
    separation = (torch.exp(-pair_distance.square()) * pairs).sum() / (pairs.sum() + EPS)

    losses = {
        "seg": seg,
        "gmm_to_pred": gmm_to_pred,
        "label_to_gmm": label_to_gmm,
        "separation": separation,
        "absent": absent,
    }
    losses["total"] = sum(losses.values(), torch.zeros((), device=logits.device))
    if cell_logits is not None:
        losses["cell_logits"] = cell_logits
    return losses
