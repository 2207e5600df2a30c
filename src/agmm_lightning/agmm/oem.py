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
from agmm_lightning.agmm.mixtures import ClassMixtures, Expectation, MixtureStatistics
from agmm_lightning.agmm.sampling import LabelledPixels, labelled_pixels, sample_at
from agmm_lightning.errors import InputError, check_choice
from agmm_lightning.targets import allowed_classes

__all__ = ["KERNEL_TERMS", "OEMOptions", "StepLosses", "fitting_weights", "oem_losses"]

KERNEL_TERMS = ("gmm_to_pred", "label_to_gmm", "separation")
"""CVPR mode's per-image Gaussian-kernel terms that OEM mode adds with ``lambda_kernel``."""


@dataclass(frozen=True)
class OEMOptions:
    """The options of OEM mode: their one home (defaults, documentation and checks).

    :class:`~agmm_lightning.AGMMSegmenter` takes each as a flat init argument of the same name,
    default and documentation (``--model.mixture_count=4``).

    Attributes:
        mixture_count: Gaussian components per class K.
        oem_momentum: Online EM momentum m in ``[0, 1)``.
        embed_dim: Dimension D of the embedding the mixtures live in.
        normalize_embeddings: L2-normalise the embeddings.
        min_variance: Variance floor of the mixtures.
        temperature: T of the GMM posterior and the maximization loss; None uses ``embed_dim``.
        prior: Class prior of the GMM posterior: ``"uniform"`` (the GMM alone) or
            ``"prediction"`` (the detached segmentation output).
        adaptation: Relevance factor of the per-image adaptation of the class means in the GMM
            posterior (:meth:`~agmm_lightning.agmm.ClassMixtures.adapted_means`), in labelled
            features; None uses the global mixtures alone (METHOD §3.3 as written).
        lambda_max: Weight of the maximization loss.
        lambda_gmm: Weight of the GMM pseudo supervision (ramped up over ``warmup_steps``).
        lambda_kernel: Weight of CVPR mode's per-image Gaussian-kernel terms (``gmm_to_pred``,
            ``label_to_gmm``, ``separation``; METHOD §2) in OEM mode, on the decoder features;
            0 leaves METHOD §3.5 as written.
        pseudo_mode: ``"soft"`` (CE against G), ``"agree"`` (argmax G above ``confidence`` where
            the prediction agrees: the GMM never argues against the network; it starts after
            ``warmup_steps`` and only agreeing cells join the fitting set), ``"hard"`` (argmax G
            above ``confidence``) or ``"surer"`` (CE against G where G is more confident than the
            prediction).
        pseudo_gradient: What the pseudo loss trains: ``"network"`` (every layer) or ``"head"``
            (the segmentation head alone, on detached decoder features).
        confidence: Posterior threshold of the pseudo labels (``agree`` and ``hard`` modes).
        fit_confidence: Posterior threshold of the unlabelled features that join the mixtures'
            fitting set.
        unlabelled_mass: Cap on each class's unlabelled fitting mass per step, relative to its
            labelled mass in the step; None leaves it unbounded.
        warmup_steps: Steps over which the pseudo loss is ramped up (``agree``: before it
            starts, then ramps up over as many); unlabelled pixels join the fitting set after.
        max_labelled_samples: Cap on the labelled features used per step (dense labels),
            shared evenly by the classes.

    Raises:
        InputError: For a value out of its range or an unknown choice, naming the option.
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

    def __post_init__(self) -> None:
        check_choice("prior", self.prior, ("prediction", "uniform"))
        check_choice("pseudo_mode", self.pseudo_mode, ("agree", "soft", "hard", "surer"))
        check_choice("pseudo_gradient", self.pseudo_gradient, ("network", "head"))
        if not 0 <= self.oem_momentum < 1:
            raise InputError(f"oem_momentum must be in [0, 1), got {self.oem_momentum}")
        if (
            self.warmup_steps < 0
            or not 0 <= self.confidence <= 1
            or not 0 <= self.fit_confidence <= 1
        ):
            raise InputError(
                "warmup_steps must be >= 0, and confidence and fit_confidence in [0, 1]; got "
                f"{self.warmup_steps}, {self.confidence}, {self.fit_confidence}"
            )
        if self.unlabelled_mass is not None and self.unlabelled_mass < 0:
            raise InputError(f"unlabelled_mass must be None or >= 0, got {self.unlabelled_mass}")
        if self.adaptation is not None and self.adaptation <= 0:
            raise InputError(f"adaptation must be None or > 0, got {self.adaptation}")

    @classmethod
    def documentation(cls) -> str:
        """The ``Attributes`` entries of this docstring, as they are indented there."""
        doc = cls.__doc__ or ""
        return doc[doc.index("Attributes:\n") + len("Attributes:\n") : doc.index("\n\n    Raises:")]

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
    target, image_classes, boxes = batch["target"], batch["image_classes"], batch.get("allowed")
    labelled = _labelled_embeddings(features, target, logits.shape[1], embed, options)
    maximization = _maximization_term(labelled, image_classes, mixtures, options)
    cells = _feature_cells(features, logits, target, image_classes, boxes, options)
    gmm = _gmm_posterior(
        features,
        labelled,
        cells,
        image_classes,
        boxes,
        embed=embed,
        mixtures=mixtures,
        options=options,
    )
    pseudo, pseudo_cells = _pseudo_term(features, cells, gmm, classify, options, step)
    terms = _loss_terms(
        logits, target, image_classes, boxes, cells, maximization, pseudo, options, hard_fraction
    )
    stats = _refit_statistics(labelled, cells, gmm, mixtures, options, step)
    return StepLosses(terms, gmm.posterior, stats, pseudo_cells)


class _LabelledEmbeddings(NamedTuple):
    """The labelled pixels of a step and their embeddings.

    Attributes:
        pixels: Where the labels are, and their classes.
        embeddings: ``[n, D]`` embeddings at those pixels, with gradients.
    """

    pixels: LabelledPixels
    embeddings: Tensor


class _FeatureCells(NamedTuple):
    """What the GMM posterior and the pseudo loss read at feature resolution ``(h, w)``.

    Attributes:
        kernel: CVPR mode's terms (METHOD §2), empty without ``lambda_kernel``.
        logits: ``[B, C, h, w]`` float32 logits averaged over each feature cell.
        unlabelled: ``[B, h, w]`` each cell's share of unlabelled pixels.
    """

    kernel: dict[str, Tensor]
    logits: Tensor
    unlabelled: Tensor


class _GMMPosterior(NamedTuple):
    """One detached E-step over every feature cell of the batch.

    Attributes:
        embeddings: ``[B*h*w, D]`` embeddings of every cell, without gradients.
        expectation: The densities, shared with the refit's statistics.
        rows: ``[B*h*w, C]`` the GMM posterior, one row per cell.
        posterior: ``[B, C, h, w]`` the same as a map (a view of ``rows``).
        agrees: ``[B, h, w]`` bool, where the posterior's argmax equals the cell logits' (only
            with ``pseudo_mode="agree"``), else None.
    """

    embeddings: Tensor
    expectation: Expectation
    rows: Tensor
    posterior: Tensor
    agrees: Tensor | None


def _labelled_embeddings(
    features: Tensor,
    target: Tensor,
    num_classes: int,
    embed: Callable[[Tensor], Tensor],
    options: OEMOptions,
) -> _LabelledEmbeddings:
    """The embeddings of the labelled pixels, the only ones that carry gradients.

    The decoder features are read by bilinear sampling at the labels' own coordinates (so a label
    is not moved to the coarser feature grid), at most ``max_labelled_samples`` of them.
    """
    pixels = labelled_pixels(target, num_classes, options.max_labelled_samples)
    return _LabelledEmbeddings(pixels, sample_at(features, pixels, target.shape[-2:], embed))


def _maximization_term(
    labelled: _LabelledEmbeddings,
    image_classes: Tensor,
    mixtures: ClassMixtures,
    options: OEMOptions,
) -> Tensor:
    """The weighted maximization loss, which pulls each labelled embedding to its class's mixture.

    Each embedding is compared only with the classes of its own image that have a mixture: a
    class without one has no density yet, and the classes absent from the image are no rivals.
    """
    pixels = labelled.pixels
    valid = mixtures.initialized[None] & (image_classes[pixels.image] > 0)
    log_likelihood = mixtures.log_likelihood(labelled.embeddings)
    loss = maximization_loss(log_likelihood, pixels.labels, options.effective_temperature, valid)
    return options.lambda_max * loss


def _feature_cells(
    features: Tensor,
    logits: Tensor,
    target: Tensor,
    image_classes: Tensor,
    boxes: Tensor | None,
    options: OEMOptions,
) -> _FeatureCells:
    """The kernel terms, and the logits and unlabelled share of each feature cell.

    The GMM posterior lives at feature resolution, and so do its prior and the pseudo loss. The
    kernel block reads the logits anyway, so with ``lambda_kernel`` it also returns their average
    over each cell; without it they are pooled here.
    """
    num_classes = logits.shape[1]
    size = (features.shape[-2], features.shape[-1])
    kernel = {}
    if options.lambda_kernel:
        kernel = cvpr_agmm_losses(
            features, logits, target, num_classes, image_classes, boxes, with_cell_logits=True
        )
        cell_logits = kernel["cell_logits"]
    else:
        cell_logits = F.adaptive_avg_pool2d(logits, size).float()
    unlabelled = (target == num_classes).float()[:, None]
    unlabelled = F.adaptive_avg_pool2d(unlabelled, size)[:, 0]
    return _FeatureCells(kernel, cell_logits, unlabelled)


def _gmm_posterior(
    features: Tensor,
    labelled: _LabelledEmbeddings,
    cells: _FeatureCells,
    image_classes: Tensor,
    boxes: Tensor | None,
    *,
    embed: Callable[[Tensor], Tensor],
    mixtures: ClassMixtures,
    options: OEMOptions,
) -> _GMMPosterior:
    """One E-step over every feature cell, which serves the pseudo loss and the refit alike.

    Without gradients: only the labelled embeddings train the embedding, and every cell's is built
    directly in the ``[N, D]`` rows the mixtures read. With ``adaptation``, each image's class
    means move toward its own labelled embeddings first; the posterior is restricted to the
    classes each cell may take (its image's, or its boxes').
    """
    batch_size, channels, height, width = features.shape
    num_classes = cells.logits.shape[1]
    allowed = allowed_classes(image_classes, boxes, (height, width))
    with torch.no_grad():
        flat = embed(features.permute(0, 2, 3, 1).reshape(-1, channels))
        rows, means = flat, None
        if options.adaptation is not None:
            pixels = labelled.pixels
            means = mixtures.adapted_means(
                labelled.embeddings.detach(),
                pixels.labels,
                pixels.image,
                batch_size,
                options.adaptation,
            )
            rows = flat.view(batch_size, height * width, -1)
        expectation = mixtures.expectation(rows, means)
        prior = None
        if options.prior == "prediction":
            prior = cells.logits.detach().softmax(1).permute(0, 2, 3, 1).reshape(-1, num_classes)
        flat_allowed = allowed.permute(0, 2, 3, 1).reshape(-1, num_classes)
        posterior_rows = mixtures.posterior_from_log_likelihood(
            expectation.log_likelihood, prior, flat_allowed, options.effective_temperature
        )
        posterior = posterior_rows.view(batch_size, height, width, num_classes).permute(0, 3, 1, 2)
        agrees = None
        if options.pseudo_mode == "agree":
            agrees = posterior.argmax(1) == cells.logits.detach().argmax(1)
    return _GMMPosterior(flat, expectation, posterior_rows, posterior, agrees)


def _pseudo_term(
    features: Tensor,
    cells: _FeatureCells,
    gmm: _GMMPosterior,
    classify: Callable[[Tensor], Tensor],
    options: OEMOptions,
    step: int,
) -> tuple[Tensor, Tensor]:
    """The weighted GMM pseudo supervision of the unlabelled cells, and the cells it supervises.

    Its weight ramps up over ``warmup_steps``; with ``pseudo_mode="agree"`` only after as many
    steps again, since the agreement gate waits for a network worth agreeing with. With
    ``pseudo_gradient="head"`` the teacher's signal reaches the head alone: detached, the decoder
    features the GMM reads are not pulled toward the GMM's own mistakes.

    Returns:
        The weighted term and the ``[B, h, w]`` bool map of the cells it supervised (all False
        while its weight is 0).
    """
    warmup = options.warmup_steps
    start = warmup if options.pseudo_mode == "agree" else 0
    ramp = min(1.0, max(0.0, (step + 1 - start) / warmup)) if warmup else 1.0
    weight = ramp * options.lambda_gmm
    pseudo_logits = cells.logits
    if options.pseudo_gradient == "head":
        pseudo_logits = classify(features.detach())
    pseudo, pseudo_cells = pseudo_label_loss(
        pseudo_logits,
        gmm.posterior,
        cells.unlabelled,
        options.pseudo_mode,
        options.confidence,
        gmm.agrees,
    )
    active = pseudo_cells if weight > 0 else torch.zeros_like(pseudo_cells)
    return weight * pseudo, active


def _loss_terms(
    logits: Tensor,
    target: Tensor,
    image_classes: Tensor,
    boxes: Tensor | None,
    cells: _FeatureCells,
    maximization: Tensor,
    pseudo: Tensor,
    options: OEMOptions,
    hard_fraction: float,
) -> dict[str, Tensor]:
    """The weighted terms of the training loss: seg, maximization, pseudo, kernel, absent.

    Their order is that of the sum that makes the loss. The kernel block's ``seg`` term is the
    partial cross-entropy without OHEM, and its ``absent`` term is :func:`absent_class_loss`:
    taking them from it spares their own logit gradients.
    """
    kernel = cells.kernel
    if "seg" in kernel and hard_fraction == 1:
        seg = kernel["seg"]
    else:
        seg = partial_cross_entropy(logits, target, hard_fraction=hard_fraction)
    terms = {"seg": seg, "maximization": maximization, "pseudo": pseudo}
    if kernel:
        terms |= {name: options.lambda_kernel * kernel[name] for name in KERNEL_TERMS}
        terms["absent"] = kernel["absent"]
    else:
        terms["absent"] = absent_class_loss(
            logits, image_classes if boxes is None else boxes, target
        )
    return terms


def _refit_statistics(
    labelled: _LabelledEmbeddings,
    cells: _FeatureCells,
    gmm: _GMMPosterior,
    mixtures: ClassMixtures,
    options: OEMOptions,
    step: int,
) -> MixtureStatistics:
    """The detached statistics of the refit: every labelled embedding, and trusted cells.

    The labelled embeddings count fully for their class. Unlabelled cells join with their
    posterior by :func:`fitting_weights`, and only after ``warmup_steps``: before that the
    mixtures would fit their own guesses about an untrained network.
    """
    labels = F.one_hot(labelled.pixels.labels, gmm.rows.shape[1]).to(gmm.rows.dtype)
    trusted = cells.unlabelled.flatten() > 0.5
    if gmm.agrees is not None:
        trusted &= gmm.agrees.flatten()
    fitting = fitting_weights(gmm.rows, trusted, labels.sum(0), options)
    if step < options.warmup_steps:
        fitting = torch.zeros_like(fitting)
    labelled_stats = mixtures.sufficient_statistics(labelled.embeddings.detach(), labels)
    pixel_stats = mixtures.sufficient_statistics(gmm.embeddings, fitting, gmm.expectation)
    return labelled_stats + pixel_stats


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
