"""Losses of the three methods: CVPR AGMM (METHOD §2), OEM mode (§3.5) and partial cross-entropy.

Every function takes the target map of METHOD §1: ``0..C-1`` labelled, ``C`` unlabelled and
``255`` void. Averages over an empty set of pixels are 0, so a crop without labels keeps every loss
finite (the published code returns NaN there).
"""

from __future__ import annotations

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
    return _absent_class_loss(logits.softmax(1), allowed, target)


def _absent_class_loss(probs: Tensor, allowed: Tensor, target: Tensor) -> Tensor:
    if allowed.ndim == 2:
        allowed = allowed[:, :, None, None]
    forbidden = 1.0 - allowed.to(probs.dtype)
    loss = -(forbidden * torch.log(1 - probs + _EPS)).sum(1)
    return _masked_mean(loss, target != VOID)


def _present_classes(target: Tensor, num_classes: int) -> Tensor:
    """``[B, C]`` indicator ``c_{b,k}`` of classes with at least one labelled pixel."""
    index = target.flatten(1).clamp(max=num_classes).long()
    hits = torch.zeros(target.shape[0], num_classes + 1, device=target.device)
    return hits.scatter_(1, index, 1.0)[:, :num_classes]


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
    present = _present_classes(target, num_classes).to(features.dtype)  # c_{b,k}
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

    class_count = present.sum(1)[:, None, None] + _EPS

    def class_average(values: Tensor) -> Tensor:
        return (values * slot_present[..., None, None]).sum(1) / class_count

    probs = logits.softmax(1)
    slot_probs = probs.gather(1, slot_class[..., None, None].expand_as(kernel))
    gmm_to_pred = _masked_mean(class_average(_binary_cross_entropy(slot_probs, kernel) / 2), valid)
    label_to_gmm = _masked_mean(class_average(_binary_cross_entropy(kernel, one_hot) / 2), labelled)

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
        "seg": partial_cross_entropy(logits, target),
        "gmm_to_pred": gmm_to_pred,
        "label_to_gmm": label_to_gmm,
        "separation": separation,
        "absent": _absent_class_loss(probs, image_classes, target),
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
