"""Losses of the three methods: CVPR AGMM (METHOD §2), OEM mode (§3.5) and partial cross-entropy.

Every function takes the target map of METHOD §1: ``0..C-1`` labelled, ``C`` unlabelled and
``255`` void. Averages over an empty set of pixels are 0, so a crop without labels keeps every loss
finite (the published code returns NaN there).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

VOID = 255
_EPS = 1e-6

__all__ = [
    "VOID",
    "absent_class_loss",
    "check_target",
    "cvpr_agmm_losses",
    "maximization_loss",
    "partial_cross_entropy",
    "posterior_labels",
    "present_classes",
    "pseudo_label_loss",
]


def check_target(target: Tensor, num_classes: int) -> None:
    """Check that ``target`` is an integer map with values in ``{0..C-1, C, 255}``.

    Args:
        target: Target map of any shape.
        num_classes: Number of classes C.

    Raises:
        ValueError: If the dtype or a value is outside the convention of METHOD §1.
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


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, 0 where it holds nowhere."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _binary_cross_entropy(p: Tensor, q: Tensor) -> Tensor:
    """``-q·log(p+1e-6) - (1-q)·log(1-p+1e-6)`` elementwise, as in the published code."""
    return -q * torch.log(p + _EPS) - (1 - q) * torch.log(1 - p + _EPS)


def _bilinear_adjoint(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Apply the transpose of bilinear upsampling ``size -> x.shape[-2:]`` to ``x``.

    ``sum_j x(j) · up(F)(j) = sum_p adjoint(x)(p) · F(p)``, so pooling features through this map
    equals pooling the upsampled features without ever building them.
    """
    probe = x.new_zeros(*x.shape[:2], *size, requires_grad=True)
    with torch.enable_grad():
        upsampled = F.interpolate(probe, size=x.shape[-2:], mode="bilinear", align_corners=False)
        (adjoint,) = torch.autograd.grad(upsampled, probe, grad_outputs=x)
    return adjoint


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


def absent_class_loss(logits: Tensor, allowed: Tensor, target: Tensor) -> Tensor:
    """``-sum_k (1 - A_k) log(1 - P_k + 1e-6)``, mean over non-void pixels (METHOD §2, §3.5).

    Args:
        logits: ``[B, C, H, W]`` segmentation logits.
        allowed: Classes a pixel may take: ``[B, C]`` image classes or ``[B, C, H, W]`` map.
        target: ``[B, H, W]`` target map (void pixels are excluded).

    Returns:
        Scalar loss.
    """
    probs = logits.softmax(1)
    if allowed.ndim == 2:
        allowed = allowed[:, :, None, None]
    forbidden = 1.0 - allowed.to(probs.dtype)
    loss = -(forbidden * torch.log(1 - probs + _EPS)).sum(1)
    return _masked_mean(loss, target != VOID)


def posterior_labels(posterior: Tensor) -> Tensor:
    """Hard labels of a ``[B, C, H, W]`` posterior: its argmax, void where it has no mass."""
    return posterior.argmax(1).masked_fill(posterior.sum(1) == 0, VOID)


def present_classes(target: Tensor, num_classes: int) -> Tensor:
    """``[B, C]`` indicator ``c_{b,k}`` of the classes with at least one pixel in each map.

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


class _PixelLosses(torch.autograd.Function):
    """``seg``, ``gmm_to_pred`` and ``absent`` of METHOD §2 with a hand-written backward.

    The three terms read the same softmax; autograd would keep a dozen ``[B, C, H, W]``
    intermediates and sum three logit gradients. Here only the softmax is saved and the
    gradient is assembled in one buffer, which halves the time and memory of these terms.
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
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_classes = logits.shape[1]
        probs = logits.softmax(1)
        log_not_probs = torch.log(1 - probs + _EPS)
        index = slot_class[..., None, None].expand_as(kernel)
        bce = -kernel * torch.log(probs.gather(1, index) + _EPS)
        bce -= (1 - kernel) * log_not_probs.gather(1, index)
        valid = target != VOID
        count = valid.sum().clamp_min(1).to(logits.dtype)
        gmm_to_pred = (torch.einsum("bshw,bs->bhw", bce, slot_weight) * valid).sum() / count
        absent = -(torch.einsum("bchw,bc->bhw", log_not_probs, forbidden) * valid).sum() / count

        image, row, col = (target < num_classes).nonzero(as_tuple=True)
        labels = target[image, row, col]
        pixel_logits = logits[image, :, row, col]
        seg = F.cross_entropy(pixel_logits, labels) if labels.numel() else logits.new_zeros(())
        ctx.save_for_backward(probs, kernel, slot_class, slot_weight, forbidden, valid, count)
        ctx.labelled = (image, row, col, labels, pixel_logits)
        return seg, gmm_to_pred, absent

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_seg: Tensor, grad_gmm: Tensor, grad_absent: Tensor
    ) -> tuple[Tensor | None, ...]:
        probs, kernel, slot_class, slot_weight, forbidden, valid, count = ctx.saved_tensors
        pixel = (valid / count)[:, None]
        index = slot_class[..., None, None].expand_as(kernel)
        inverse_not = (1 - probs + _EPS).reciprocal_()
        # d/dP of absent: (1 - t_k) / (1 - P_k + eps), per valid pixel.
        grad_probs = inverse_not * (grad_absent * forbidden)[..., None, None] * pixel
        slot_probs = probs.gather(1, index)
        slot_scale = (grad_gmm * slot_weight)[..., None, None] * pixel
        grad_slots = slot_scale * ((1 - kernel) * inverse_not.gather(1, index))
        grad_slots -= slot_scale * kernel / (slot_probs + _EPS)
        grad_probs.scatter_add_(1, index, grad_slots)
        # Softmax backward: dz = P * (dP - sum_c P_c dP_c), in place.
        grad_logits = grad_probs.sub_((probs * grad_probs).sum(1, keepdim=True)).mul_(probs)
        image, row, col, labels, pixel_logits = ctx.labelled
        if labels.numel():
            ce = pixel_logits.softmax(1)
            ce[torch.arange(labels.numel(), device=labels.device), labels] -= 1
            grad_logits.permute(0, 2, 3, 1).index_put_(
                (image, row, col), ce * (grad_seg / labels.numel()), accumulate=True
            )
        log_ratio = torch.log(1 - slot_probs + _EPS) - torch.log(slot_probs + _EPS)
        grad_kernel = slot_scale * log_ratio if ctx.needs_input_grad[1] else None
        return grad_logits, grad_kernel, None, None, None, None


def cvpr_agmm_losses(
    features: Tensor,
    logits: Tensor,
    target: Tensor,
    num_classes: int,
    image_classes: Tensor | None = None,
) -> dict[str, Tensor]:
    """The sparsely-annotated AGMM losses of the CVPR 2023 code (METHOD §2).

    Equal to the published formulas to float tolerance, but computed only for the classes present
    in each crop (the others contribute exactly zero to every term but ``absent``), with L1
    ``cdist`` for the feature-to-center distances and the adjoint of the bilinear upsampling for
    the centers: neither ``[B, C, D, h, w]`` differences nor upsampled features are built.

    Args:
        features: ``[B, D0, h, w]`` decoder features.
        logits: ``[B, C, H, W]`` logits at label resolution.
        target: ``[B, H, W]`` long target map (``C`` unlabelled, ``255`` void).
        num_classes: Number of classes C.
        image_classes: ``[B, C]`` classes present in each image; defaults to the classes
            labelled in ``target``.

    Returns:
        Dict with ``seg``, ``gmm_to_pred``, ``label_to_gmm``, ``separation``, ``absent`` and
        ``total`` (their sum).

    Raises:
        ValueError: On shapes, dtypes or label values that do not fit.
    """
    _check_shapes(features, logits, target, num_classes)
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
    slot_class = present.argsort(dim=1, descending=True, stable=True)[:, :slots]
    slot_present = present.gather(1, slot_class)
    one_hot = (target[:, None] == slot_class[..., None, None]).to(features.dtype)
    one_hot = one_hot * slot_present[..., None, None]

    # Centers: mean of the upsampled features over each class's labelled pixels.
    pooling = _bilinear_adjoint(one_hot, (height, width)).flatten(2)
    counts = one_hot.sum(dim=(2, 3))[..., None]
    centers = torch.bmm(pooling, features.flatten(2).transpose(1, 2)) / (counts + _EPS)

    # Kernel: exp(-(mean_channels |F - mu|)^2) at feature resolution, then upsampled.
    preserve = F.interpolate(
        valid[:, None].to(features.dtype),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    distance = torch.cdist(features.flatten(2).transpose(1, 2), centers, p=1) / channels
    distance = distance.transpose(1, 2).reshape(batch, slots, height, width)
    distance = distance * slot_present[..., None, None] * preserve
    kernel = F.interpolate(
        torch.exp(-distance.square()), size=target.shape[-2:], mode="bilinear", align_corners=False
    )
    kernel = kernel * slot_present[..., None, None]

    # Per-image class averaging weights c_{b,k} / (sum_k c_{b,k} + 1e-6), halved as in the code.
    slot_weight = slot_present / (2 * (present.sum(1, keepdim=True) + _EPS))
    forbidden = 1.0 - image_classes.to(logits.dtype)
    seg, gmm_to_pred, absent = _PixelLosses.apply(
        logits, kernel, slot_class, slot_weight, forbidden, target
    )

    # label_to_gmm only needs the labelled pixels: read the kernel there.
    image, row, col = labelled.nonzero(as_tuple=True)
    kernel_at_labels = kernel[image, :, row, col]  # [n, S]
    own_class = (target[image, row, col][:, None] == slot_class[image]).to(kernel.dtype)
    bce_labels = _binary_cross_entropy(kernel_at_labels, own_class)
    label_to_gmm = (bce_labels * slot_weight[image]).sum(1).mean() if image.numel() else seg * 0

    # Separation of the batch-level class vectors, over unordered pairs of present classes.
    all_centers = centers.new_zeros(batch, num_classes, channels).scatter(
        1, slot_class[..., None].expand_as(centers), centers
    )
    images_with_class = present.sum(0)
    vectors = all_centers.sum(0) * (images_with_class / (images_with_class + _EPS))[:, None]
    pair_distance = torch.cdist(vectors[None], vectors[None], p=1)[0] / channels
    seen = images_with_class > 0
    pairs = torch.triu(seen[:, None] & seen[None, :], diagonal=1).to(features.dtype)
    separation = (torch.exp(-pair_distance.square()) * pairs).sum() / (pairs.sum() + _EPS)

    losses = {
        "seg": seg,
        "gmm_to_pred": gmm_to_pred,
        "label_to_gmm": label_to_gmm,
        "separation": separation,
        "absent": absent,
    }
    losses["total"] = sum(losses.values(), torch.zeros((), device=logits.device))
    return losses


def partial_cross_entropy(
    logits: Tensor,
    target: Tensor,
    class_weights: Tensor | None = None,
    hard_fraction: float = 1.0,
) -> Tensor:
    """Cross-entropy on labelled pixels only (``target < C``).

    Args:
        logits: ``[B, C, H, W]`` logits.
        target: ``[B, H, W]`` target map.
        class_weights: Optional ``[C]`` per-class weights (weighted mean, as in PyTorch).
        hard_fraction: Online hard example mining: average over this fraction of the labelled
            pixels with the largest loss (1 keeps all).

    Returns:
        Scalar loss, 0 when no pixel is labelled.
    """
    if not 0 < hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
    num_classes = logits.shape[1]
    labelled = target < num_classes
    # Gather the labelled pixels first: with sparse labels this is a tiny fraction of the map.
    pixel_logits = logits.permute(0, 2, 3, 1)[labelled]
    labels = target[labelled].long()
    if labels.numel() == 0:
        return logits.sum() * 0
    if hard_fraction < 1:
        loss = F.cross_entropy(pixel_logits, labels, reduction="none")
        keep = max(1, int(hard_fraction * loss.numel()))
        return loss.topk(keep).values.mean()
    return F.cross_entropy(pixel_logits, labels, weight=class_weights)


def maximization_loss(
    log_likelihood: Tensor,
    labels: Tensor,
    temperature: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Discriminative maximization of each labelled feature's own class likelihood (METHOD §3.5).

    Cross-entropy of ``softmax_c(log p(e|c) / T)`` over the valid classes against the label.

    Args:
        log_likelihood: ``[N, C]`` class log-likelihoods of labelled features (gradient flows
            into the features; the mixtures are buffers).
        labels: ``[N]`` class of each feature.
        temperature: T, the divisor of the log-likelihoods.
        valid: Optional ``[N, C]`` bool, classes each feature may be compared against (allowed
            and initialised). A feature whose own class is not valid is skipped.

    Returns:
        Scalar loss, 0 when no feature counts.
    """
    scores = log_likelihood / temperature
    own_class = torch.ones_like(labels, dtype=torch.bool)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
        own_class = valid.gather(1, labels[:, None])[:, 0]
    if not own_class.any():
        return log_likelihood.sum() * 0
    return F.cross_entropy(scores[own_class], labels[own_class])


def pseudo_label_loss(
    logits: Tensor,
    posterior: Tensor,
    target: Tensor,
    mode: str = "soft",
    confidence: float = 0.9,
) -> Tensor:
    """GMM supervision of the segmentation output on unlabelled pixels (METHOD §3.5).

    Args:
        logits: ``[B, C, H, W]`` logits.
        posterior: ``[B, C, H, W]`` detached GMM posterior G; all-zero where no class was valid.
        target: ``[B, H, W]`` target map; only pixels equal to C count.
        mode: ``"soft"`` for ``CE(P, G)``, ``"hard"`` for CE on ``argmax G`` where
            ``max G >= confidence``.
        confidence: Threshold of the hard mode.

    Returns:
        Scalar loss, 0 when no pixel counts.
    """
    num_classes = logits.shape[1]
    confident, hard_label = posterior.max(1)
    unlabelled = (target == num_classes) & (confident > 0)
    log_probs = logits.log_softmax(1)
    if mode == "soft":
        loss = -(posterior * log_probs).sum(1)
        return _masked_mean(loss, unlabelled)
    if mode == "hard":
        loss = -log_probs.gather(1, hard_label[:, None])[:, 0]
        return _masked_mean(loss, unlabelled & (confident >= confidence))
    raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")
