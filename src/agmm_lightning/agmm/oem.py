"""OEM mode (METHOD §3): class mixtures in a learned embedding, refitted by Online EM.

One training step: the labelled features are embedded (with gradients) and pulled toward their
class by the maximization loss; one E-step over every pixel at feature resolution (without
gradients) gives the GMM posterior, with class means adapted to each image's labels, which
supervises the prediction of each feature cell where its pixels are unlabelled; CVPR mode's kernel
terms shape the decoder features; and the statistics of the labelled and confident unlabelled
features are returned for the refit that follows the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from agmm_lightning.agmm.cvpr import cvpr_agmm_losses
from agmm_lightning.agmm.losses import (
    absent_class_loss,
    maximization_loss,
    partial_cross_entropy,
    pseudo_label_loss,
)
from agmm_lightning.agmm.mixtures import ClassMixtures, MixtureStatistics
from agmm_lightning.agmm.sampling import labelled_pixels, sample_at
from agmm_lightning.targets import allowed_classes

__all__ = ["KERNEL_TERMS", "OEMOptions", "StepLosses", "fitting_weights", "oem_losses"]

KERNEL_TERMS = ("gmm_to_pred", "label_to_gmm", "separation")
"""CVPR mode's per-image Gaussian-kernel terms that OEM mode adds with ``lambda_kernel``."""


@dataclass(frozen=True)
class OEMOptions:
    """The options of OEM mode; :class:`~agmm_lightning.AGMMSegmenter` documents each.

    Attributes:
        mixture_count: Gaussian components per class K.
        oem_momentum: Online EM momentum m.
        embed_dim: Dimension D of the embedding.
        normalize_embeddings: L2-normalise the embeddings.
        min_variance: Variance floor.
        temperature: T of the posterior and the maximization loss; None uses ``embed_dim``.
        prior: ``"uniform"`` or ``"prediction"`` class prior of the GMM posterior.
        adaptation: Relevance factor of the per-image means; None uses the global mixtures.
        lambda_max: Weight of the maximization loss.
        lambda_gmm: Weight of the GMM pseudo supervision (ramped over ``warmup_steps``).
        lambda_kernel: Weight of the CVPR kernel terms.
        pseudo_mode: ``"agree"``, ``"soft"``, ``"hard"`` or ``"surer"`` pseudo supervision.
        pseudo_gradient: What the pseudo loss trains: ``"network"`` or only the ``"head"``.
        confidence: Posterior threshold of the pseudo labels (``"agree"``, ``"hard"``).
        fit_confidence: Posterior threshold of unlabelled features in the fitting set.
        unlabelled_mass: Cap on each class's unlabelled fitting mass, relative to its labelled
            mass in the same step; None leaves it unbounded.
        warmup_steps: Steps of the pseudo loss's ramp (``"agree"``: steps before it starts, then
            ramps up over as many); unlabelled pixels join the fitting set after them.
        max_labelled_samples: Cap on the labelled features per step, shared evenly by classes.
    """

    mixture_count: int = 1
    oem_momentum: float = 0.9
    embed_dim: int = 64
    normalize_embeddings: bool = True
    min_variance: float = 1e-4
    temperature: float | None = None
    prior: Literal["prediction", "uniform"] = "uniform"
    adaptation: float | None = 4.0
    lambda_max: float = 0.1
    lambda_gmm: float = 1.0
    lambda_kernel: float = 1.0
    pseudo_mode: Literal["agree", "soft", "hard", "surer"] = "soft"
    pseudo_gradient: Literal["network", "head"] = "network"
    confidence: float = 0.9
    fit_confidence: float = 0.9
    unlabelled_mass: float | None = None
    warmup_steps: int = 100
    max_labelled_samples: int = 16384

    @property
    def effective_temperature(self) -> float:
        """T: ``temperature``, or the embedding dimension (a per-dimension log-likelihood)."""
        return float(self.temperature or self.embed_dim)


class StepLosses(NamedTuple):
    """What one training step of a method computes.

    Attributes:
        terms: The weighted loss terms; their sum is the training loss.
        posterior: ``[B, C, h, w]`` detached GMM posterior at feature resolution (OEM mode),
            else None; :func:`~agmm_lightning.targets.upsample_posterior` brings it to the labels'.
        stats: Detached statistics for the mixtures' refit (OEM mode), else None.
        pseudo_cells: ``[B, h, w]`` bool, the feature cells the pseudo loss supervised at this
            step (OEM mode), else None.
    """

    terms: dict[str, Tensor]
    posterior: Tensor | None = None
    stats: MixtureStatistics | None = None
    pseudo_cells: Tensor | None = None


def oem_losses(
    batch: dict[str, Any],
    logits: Tensor,
    features: Tensor,
    *,
    embed: Callable[[Tensor], Tensor],
    classify: Callable[[Tensor], Tensor],
    mixtures: ClassMixtures,
    options: OEMOptions,
    step: int,
    hard_fraction: float = 1.0,
) -> StepLosses:
    """The loss terms of OEM mode (METHOD §3.5) and the statistics of its refit (§3.4).

    Args:
        batch: ``target`` ``[B, H, W]``, ``image_classes`` ``[B, C]`` and, for boxes,
            ``allowed`` ``[B, C, H, W]``.
        logits: ``[B, C, H, W]`` segmentation logits.
        features: ``[B, D0, h, w]`` decoder features.
        embed: Maps ``[..., D0]`` decoder feature vectors to the embedding.
        classify: Maps ``[B, D0, h, w]`` decoder features to logits at their resolution (the
            segmentation head without its upsampling).
        mixtures: The class mixtures (read only here).
        options: OEM mode's options.
        step: The optimizer step (the warm-up counts in steps).
        hard_fraction: OHEM fraction of the segmentation loss.

    Returns:
        The terms, the GMM posterior at feature resolution and the refit's statistics.
    """
    target = batch["target"]
    num_classes = logits.shape[1]
    batch_size, channels, height, width = features.shape
    temperature = options.effective_temperature
    image_classes, boxes = batch["image_classes"], batch.get("allowed")

    # Labelled features, read by bilinear sampling at the labels' own coordinates. The
    # maximization loss compares each with the classes of its image that have a mixture.
    pixels = labelled_pixels(target, num_classes, options.max_labelled_samples)
    labelled = sample_at(features, pixels, target.shape[-2:], embed)
    valid = mixtures.initialized[None] & (image_classes[pixels.image] > 0)
    log_likelihood = mixtures.log_likelihood(labelled)
    maximization = maximization_loss(log_likelihood, pixels.labels, temperature, valid)

    # The GMM posterior lives at feature resolution, and so do its prior and the pseudo loss: the
    # logits averaged over each feature cell (by the kernel block, which reads the logits anyway),
    # and each cell's share of unlabelled pixels.
    kernel = {}
    if options.lambda_kernel:
        kernel = cvpr_agmm_losses(
            features, logits, target, num_classes, image_classes, boxes, with_cell_logits=True
        )
        cell_logits = kernel["cell_logits"]
    else:
        cell_logits = F.adaptive_avg_pool2d(logits, (height, width)).float()
    unlabelled = (target == num_classes).float()[:, None]
    unlabelled = F.adaptive_avg_pool2d(unlabelled, (height, width))[:, 0]

    # One E-step over every pixel at feature resolution serves both the GMM posterior and the
    # statistics of the refit (the labelled features have their own).
    allowed_low = allowed_classes(image_classes, boxes, (height, width))
    with torch.no_grad():
        # Only the labelled features carry gradients: every pixel's embedding is built without
        # autograd, directly in the [N, D] rows the mixtures read.
        flat = embed(features.permute(0, 2, 3, 1).reshape(-1, channels))
        rows, means = flat, None
        if options.adaptation is not None:
            means = mixtures.adapted_means(
                labelled.detach(), pixels.labels, pixels.image, batch_size, options.adaptation
            )
            rows = flat.view(batch_size, height * width, -1)
        expectation = mixtures.expectation(rows, means)
        prior = None
        if options.prior == "prediction":
            prior = cell_logits.detach().softmax(1).permute(0, 2, 3, 1).reshape(-1, num_classes)
        flat_allowed = allowed_low.permute(0, 2, 3, 1).reshape(-1, num_classes)
        posterior_low = mixtures.posterior_from_log_likelihood(
            expectation.log_likelihood, prior, flat_allowed, temperature
        )
        posterior = posterior_low.view(batch_size, height, width, num_classes).permute(0, 3, 1, 2)
        agree = options.pseudo_mode == "agree"
        agrees = posterior.argmax(1) == cell_logits.detach().argmax(1) if agree else None

    warmup = options.warmup_steps
    start = warmup if agree else 0  # the agreement gate waits for a network worth agreeing with
    ramp = min(1.0, max(0.0, (step + 1 - start) / warmup)) if warmup else 1.0
    pseudo_logits = cell_logits
    if options.pseudo_gradient == "head":
        # The head alone learns from the GMM: detached, the decoder features the GMM reads are
        # not pulled toward the GMM's own mistakes.
        pseudo_logits = classify(features.detach())
    pseudo, pseudo_cells = pseudo_label_loss(
        pseudo_logits, posterior, unlabelled, options.pseudo_mode, options.confidence, agrees
    )
    # The kernel block's seg term is the partial cross-entropy without OHEM, and its absent term
    # is absent_class_loss: taking them from it spares their own logit gradients.
    if "seg" in kernel and hard_fraction == 1:
        seg = kernel["seg"]
    else:
        seg = partial_cross_entropy(logits, target, hard_fraction=hard_fraction)
    terms = {
        "seg": seg,
        "maximization": options.lambda_max * maximization,
        "pseudo": ramp * options.lambda_gmm * pseudo,
    }
    if kernel:
        terms |= {name: options.lambda_kernel * kernel[name] for name in KERNEL_TERMS}
        terms["absent"] = kernel["absent"]
    else:
        terms["absent"] = absent_class_loss(
            logits, image_classes if boxes is None else boxes, target
        )

    labels = F.one_hot(pixels.labels, num_classes).to(posterior_low.dtype)
    trusted = unlabelled.flatten() > 0.5
    if agrees is not None:
        trusted &= agrees.flatten()
    fitting = fitting_weights(posterior_low, trusted, labels.sum(0), options)
    if step < warmup:
        fitting = torch.zeros_like(fitting)
    labelled_stats = mixtures.sufficient_statistics(labelled.detach(), labels)
    pixel_stats = mixtures.sufficient_statistics(flat, fitting, expectation)
    active = pseudo_cells if ramp * options.lambda_gmm > 0 else torch.zeros_like(pseudo_cells)
    return StepLosses(terms, posterior, labelled_stats + pixel_stats, active)


def fitting_weights(
    posterior: Tensor, trusted: Tensor, labelled_mass: Tensor, options: OEMOptions
) -> Tensor:
    """The fitting weights ``[N, C]`` of unlabelled features in the online EM (METHOD §3.4).

    A feature joins with its posterior G where G reaches ``fit_confidence`` and ``trusted`` holds
    (an unlabelled cell; with ``pseudo_mode="agree"``, one whose GMM label the network's
    prediction agrees with). With ``unlabelled_mass``, each class's
    unlabelled mass is then scaled down to at most ``unlabelled_mass`` times its labelled mass
    in the step, so the mixtures stay anchored to the labels instead of to their own output.

    Args:
        posterior: ``[N, C]`` GMM posterior of the features.
        trusted: ``[N]`` bool, the features that may join.
        labelled_mass: ``[C]`` labelled features of each class in the step.
        options: OEM mode's options.
    """
    confident = (posterior.amax(1) >= options.fit_confidence) & trusted
    weights = posterior * confident[:, None]
    if options.unlabelled_mass is None:
        return weights
    mass = weights.sum(0)
    scale = (options.unlabelled_mass * labelled_mass / mass.clamp_min(1e-12)).clamp_max(1.0)
    return weights * scale
