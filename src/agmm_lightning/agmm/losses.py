"""The loss terms OEM mode adds to the network (METHOD §3.5) and the baseline's partial CE.

Every function takes the target map of METHOD §1 (``0..C-1`` labelled, ``C`` unlabelled, ``255``
void) and runs in float32 whatever the autocast state and the inputs' dtype. Averages over an
empty set of pixels are 0, so a crop without labels keeps every loss finite.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from agmm_lightning.targets import VOID

__all__ = [
    "EPS",
    "absent_class_loss",
    "masked_mean",
    "maximization_loss",
    "partial_cross_entropy",
    "pseudo_label_loss",
]

EPS = 1e-6
"""The published code's epsilon inside ``log(p + eps)`` and class averages."""


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, 0 where it holds nowhere."""
    return (values * mask).sum() / mask.sum().clamp_min(1).to(values.dtype)


def absent_class_loss(logits: Tensor, allowed: Tensor, target: Tensor) -> Tensor:
    """``-sum_k (1 - A_k) log(1 - P_k + 1e-6)``, mean over non-void pixels (METHOD §2, §3.5).

    Args:
        logits: ``[B, C, H, W]`` segmentation logits.
        allowed: Classes a pixel may take: ``[B, C]`` image classes or ``[B, C, H, W]`` map.
        target: ``[B, H, W]`` target map (void pixels are excluded).

    Returns:
        Scalar loss.
    """
    probs = logits.float().softmax(1)
    if allowed.ndim == 2:
        allowed = allowed[:, :, None, None]
    forbidden = 1.0 - allowed.to(probs.dtype)
    loss = -(forbidden * torch.log(1 - probs + EPS)).sum(1)
    return masked_mean(loss, target != VOID)


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
            pixels with the largest (weighted) loss (1 keeps all).

    Returns:
        Scalar loss, 0 when no pixel is labelled.
    """
    if not 0 < hard_fraction <= 1:
        raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
    num_classes = logits.shape[1]
    # Gather the labelled pixels' logits by index: with sparse labels a tiny fraction of the map,
    # and no permuted copy of the whole logit map (a mask on a permuted view would make one).
    image, row, col = (target < num_classes).nonzero(as_tuple=True)
    pixel_logits = logits[image, :, row, col].float()
    labels = target[image, row, col].long()
    if labels.numel() == 0:
        return logits.float().sum() * 0
    if hard_fraction == 1:
        return F.cross_entropy(pixel_logits, labels, weight=class_weights)
    loss = F.cross_entropy(pixel_logits, labels, weight=class_weights, reduction="none")
    hardest = loss.topk(max(1, int(hard_fraction * loss.numel()))).indices
    if class_weights is None:
        return loss[hardest].mean()
    return loss[hardest].sum() / class_weights[labels[hardest]].sum().clamp_min(1e-12)


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
        valid: Optional ``[N, C]`` bool, classes each feature may be compared against (its
            image's classes that have a mixture). A feature whose own class is not valid, or
            that has no other valid class, is skipped (it would add 0 and dilute the mean).

    Returns:
        Scalar loss, 0 when no feature counts.
    """
    scores = log_likelihood.float() / temperature
    own_class = torch.ones_like(labels, dtype=torch.bool)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
        # A feature with no other valid class to compare against has nothing to learn here.
        own_class = valid.gather(1, labels[:, None])[:, 0] & (valid.sum(1) > 1)
    if not own_class.any():
        return log_likelihood.sum() * 0
    return F.cross_entropy(scores[own_class], labels[own_class])


def pseudo_label_loss(
    logits: Tensor,
    posterior: Tensor,
    weight: Tensor,
    mode: str = "soft",
    confidence: float = 0.9,
    agrees: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GMM supervision of the prediction where labels are missing (METHOD §3.5).

    It runs at the resolution of the posterior: OEM mode passes the logits averaged over each
    feature cell and weighs each cell by its share of unlabelled pixels (at label resolution, when
    the features are there too, the share is 1 on unlabelled pixels and 0 elsewhere).

    Args:
        logits: ``[B, C, h, w]`` logits.
        posterior: ``[B, C, h, w]`` detached GMM posterior G; all-zero where no class was valid.
        weight: ``[B, h, w]`` weight of each position; 0 leaves it out.
        mode: ``"agree"`` for CE on ``argmax G`` where ``max G >= confidence`` and ``agrees``
            holds, so a teacher never argues against the prediction; ``"hard"`` for the same
            without the agreement; ``"soft"`` for ``CE(P, G)``; ``"surer"`` for ``CE(P, G)``
            where ``max G > max P`` (the GMM teaches only where it is more confident).
        confidence: Threshold of the ``"agree"`` and ``"hard"`` modes.
        agrees: ``[B, h, w]`` bool, where the prediction's argmax equals G's (``"agree"``);
            computed from ``logits`` when None.

    Returns:
        The weighted mean over the positions it supervises (0 when there are none) and the
        ``[B, h, w]`` bool map of those positions.
    """
    confident, hard_label = posterior.max(1)
    weight = weight.float() * (confident > 0)
    if mode == "surer":
        weight = weight * (confident > logits.detach().float().softmax(1).amax(1))
    if mode in ("soft", "surer"):
        return _SoftCrossEntropy.apply(logits, posterior, weight), weight > 0
    if mode not in ("agree", "hard"):
        raise ValueError(f"mode must be 'agree', 'soft', 'hard' or 'surer', got {mode!r}")
    weight = weight * (confident >= confidence)
    if mode == "agree":
        if agrees is None:
            agrees = logits.detach().argmax(1) == hard_label
        weight = weight * agrees
    loss = F.cross_entropy(logits.float(), hard_label, reduction="none")
    return (loss * weight).sum() / weight.sum().clamp_min(EPS), weight > 0


class _SoftCrossEntropy(torch.autograd.Function):
    """Soft cross-entropy ``-sum_c q_c log softmax(z)_c``, a weighted mean over positions.

    Where the weight is positive q sums to 1, so the loss is ``logsumexp(z) - q·z`` and its
    gradient ``softmax(z) - q``. Nothing of the logits' size is kept for backward but the logits
    and q, which exist anyway.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        scale = (weight / weight.sum().clamp_min(EPS))[:, None]
        z = logits.float()
        per_position = torch.logsumexp(z, 1, keepdim=True).sub_((target * z).sum(1, keepdim=True))
        ctx.save_for_backward(logits, target, scale)
        return (per_position * scale).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, target, scale = ctx.saved_tensors
        grad_logits = logits.float().softmax(1).sub_(target)
        return grad_logits.mul_(scale * grad), None, None
