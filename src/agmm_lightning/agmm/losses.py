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

from agmm_lightning.targets import VOID, upsample_posterior

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
        valid: Optional ``[N, C]`` bool, classes each feature may be compared against (allowed
            and initialised). A feature whose own class is not valid is skipped.

    Returns:
        Scalar loss, 0 when no feature counts.
    """
    scores = log_likelihood.float() / temperature
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
    allowed: Tensor | None = None,
) -> Tensor:
    """GMM supervision of the segmentation output on unlabelled pixels (METHOD §3.5).

    Args:
        logits: ``[B, C, H, W]`` logits.
        posterior: ``[B, C, h, w]`` detached GMM posterior G at feature (or label) resolution,
            upsampled here (:func:`~agmm_lightning.targets.upsample_posterior`); all-zero where
            no class was valid.
        target: ``[B, H, W]`` target map; only pixels equal to C count.
        mode: ``"soft"`` for ``CE(P, G)``, ``"hard"`` for CE on ``argmax G`` where
            ``max G >= confidence``.
        confidence: Threshold of the hard mode.
        allowed: Optional ``[B, C, H, W]`` map of boxes the upsampled posterior is restricted to.

    Returns:
        Scalar loss, 0 when no pixel counts.
    """
    unlabelled = target == logits.shape[1]
    if mode == "soft":
        return _SoftCrossEntropy.apply(logits, posterior, allowed, unlabelled)
    if mode == "hard":
        confident, label = upsample_posterior(posterior, logits.shape[-2:], allowed).max(1)
        keep = unlabelled & (confident > 0) & (confident >= confidence)
        loss = F.cross_entropy(logits.float(), label.masked_fill(~keep, -100), reduction="none")
        return masked_mean(loss, keep)
    raise ValueError(f"mode must be 'soft' or 'hard', got {mode!r}")


class _SoftCrossEntropy(torch.autograd.Function):
    """Soft cross-entropy ``-sum_c q_c log softmax(z)_c`` against the upsampled posterior q.

    Averaged over the unlabelled pixels where q has mass (there it sums to 1, so the loss is
    ``logsumexp(z) - q·z`` and its gradient ``softmax(z) - q``). Nothing of size ``[B, C, H, W]``
    is kept for backward but the logits: q is upsampled again from the low-resolution posterior.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, posterior: Tensor, allowed: Tensor | None, unlabelled: Tensor
    ) -> Tensor:
        size = logits.shape[-2:]
        target = upsample_posterior(posterior.float(), size, allowed)
        mask = unlabelled & (target.amax(1) > 0)
        count = mask.sum().clamp_min(1).float()
        z = logits.float()
        per_pixel = torch.logsumexp(z, 1) - (target * z).sum(1)
        ctx.save_for_backward(logits, posterior, allowed, mask, count)
        return (per_pixel * mask).sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        logits, posterior, allowed, mask, count = ctx.saved_tensors
        target = upsample_posterior(posterior.float(), logits.shape[-2:], allowed)
        grad_logits = logits.float().softmax(1).sub_(target)
        return grad_logits.mul_(mask[:, None] * (grad / count)), None, None, None
