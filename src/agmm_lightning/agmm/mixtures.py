"""Class-wise diagonal Gaussian mixtures refitted by Online EM (METHOD §3.2-3.4).

Pure torch: no Lightning here, so the algorithm can be tested and benchmarked alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor, nn

from agmm_lightning.agmm.precision import float32_method

__all__ = ["LIVE_WEIGHT", "ClassMixtures", "Expectation", "MixtureStatistics"]

# Weight below which a class counts as unobserved in a batch.
_MIN_OBSERVED = 1e-6
_LLOYD_ITERATIONS = 5
LIVE_WEIGHT = 0.1
"""A component whose weight is below ``LIVE_WEIGHT / K`` is dead: it is re-seeded."""
# Multiplicative hash of row indices into [0, _KEYS): the keys of the candidate sample.
_HASH, _KEYS = 2654435761, 2**32


class Expectation(NamedTuple):
    """One evaluation of the densities, shared by the posterior and the statistics.

    The responsibilities are kept unnormalised (``component_mass / class_mass``): the
    statistics fold the normalisation into their fitting weights and save a pass over
    ``[N, K, C]``.

    Attributes:
        log_likelihood: ``[N, C]`` class log-likelihoods ``log p(x | c)``.
        component_mass: ``[N, K, C]`` (component-major) ``exp`` of each joint log-density minus
            its class's largest one.
        class_mass: ``[N, C]`` its sum over the components.
        squares: ``[N, D]`` squared features ``x⊙x``, which the statistics reuse.
    """

    log_likelihood: Tensor
    component_mass: Tensor
    class_mass: Tensor
    squares: Tensor

    @property
    def responsibilities(self) -> Tensor:
        """``[N, C, K]`` component responsibilities ``r_{jck}`` within each class."""
        return (self.component_mass / self.class_mass[:, None]).transpose(1, 2)


@dataclass
class MixtureStatistics:
    """Sufficient statistics of one E-step.

    The first three fields are plain sums, so statistics of several batches or ranks add up to
    those of the whole batch. The candidates are a small per-class sample of fitting features
    used only to seed new classes' components and re-seed dead ones; merging concatenates them.

    Attributes:
        weight: ``[C, K]`` sum of fitting weight times responsibility, ``S0``.
        sum: ``[C, K, D]`` weighted sum of features, ``S1``.
        square_sum: ``[C, K, D]`` weighted sum of squared features, ``S2``.
        candidates: ``[C, M, D]`` sampled fitting features of each class (none for K = 1).
        candidate_valid: ``[C, M]`` which candidate slots hold a feature.
        candidate_score: ``[C, M]`` class log-likelihood of each candidate under the mixture that
            computed the statistics (the lowest is the worst explained).
    """

    weight: Tensor
    sum: Tensor
    square_sum: Tensor
    candidates: Tensor
    candidate_valid: Tensor
    candidate_score: Tensor

    _SUMMED = ("weight", "sum", "square_sum")

    def tensors(self) -> dict[str, Tensor]:
        """The fields by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reduced(
        self, sum_across: Callable[[Tensor], Tensor], gather: Callable[[Tensor], Tensor]
    ) -> MixtureStatistics:
        """The statistics of every rank (every rank must call): sums summed, candidates pooled.

        Args:
            sum_across: All-reduce sum of a tensor across ranks.
            gather: All-gather of a tensor: ``[...] -> [world, ...]``.

        Returns:
            The global statistics, the same on every rank.
        """
        reduced = {}
        for name, value in self.tensors().items():
            if name in self._SUMMED:
                # all_reduce works in place; on a non-contiguous view (moments are sliced from
                # one matmul) gloo reduces a temporary copy and the view keeps its local sum.
                reduced[name] = sum_across(value.contiguous())
            else:  # [world, C, M, ...] -> [C, world * M, ...]
                reduced[name] = gather(value).transpose(0, 1).flatten(1, 2)
        return MixtureStatistics(**reduced)

    def __add__(self, other: MixtureStatistics) -> MixtureStatistics:
        """Sum the statistics and pool the candidates."""
        merged = {
            name: a + b if name in self._SUMMED else torch.cat([a, b], dim=1)
            for (name, a), b in zip(self.tensors().items(), other.tensors().values(), strict=True)
        }
        return MixtureStatistics(**merged)


class ClassMixtures(nn.Module):
    """One diagonal Gaussian mixture per class, fitted by Online EM.

    The state is five buffers, so checkpoints carry it and only :meth:`update` changes it:
    ``means`` ``[C, K, D]``, ``variances`` ``[C, K, D]``, ``weights`` ``[C, K]``, ``initialized``
    ``[C]`` and ``mass`` ``[C]`` (each class's running fitting mass). The running normalised
    statistics of the online update are recovered from them (``s0 = w``, ``s1 = w·mu``,
    ``s2 = w·(sigma^2 + mu^2)``), so they need no buffers of their own; the variance floor is the
    only information this loses.

    Args:
        num_classes: Number of classes C.
        dim: Feature dimension D.
        mixture_count: Components per class K.
        momentum: OEM momentum m in ``[0, 1)``; 0 refits every class from each batch alone.
        min_variance: Floor of every variance.
        candidates_per_class: Features per class kept in the statistics for seeding.
    """

    means: Tensor
    variances: Tensor
    weights: Tensor
    initialized: Tensor
    mass: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        mixture_count: int = 1,
        momentum: float = 0.9,
        min_variance: float = 1e-4,
        candidates_per_class: int = 32,
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        if mixture_count < 1:
            raise ValueError(f"mixture_count must be >= 1, got {mixture_count}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if min_variance <= 0:
            raise ValueError(f"min_variance must be > 0, got {min_variance}")
        if candidates_per_class < 1:
            raise ValueError(f"candidates_per_class must be >= 1, got {candidates_per_class}")
        self.momentum = momentum
        self.min_variance = min_variance
        self.candidates_per_class = candidates_per_class
        shape = (num_classes, mixture_count)
        self.register_buffer("means", torch.zeros(*shape, dim))
        self.register_buffer("variances", torch.ones(*shape, dim))
        self.register_buffer("weights", torch.full(shape, 1.0 / mixture_count))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("mass", torch.zeros(num_classes))

    @property
    def num_classes(self) -> int:
        """Number of classes C: the state's first dimension."""
        return self.means.shape[0]

    @property
    def mixture_count(self) -> int:
        """Components per class K."""
        return self.means.shape[1]

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return self.means.shape[2]

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, "
            f"mixture_count={self.mixture_count}, momentum={self.momentum}"
        )

    def live_components(self) -> Tensor:
        """``[C, K]`` bool: the components of initialised classes that are not dead."""
        alive = self.weights >= LIVE_WEIGHT / self.mixture_count
        return alive & self.initialized[:, None]

    # ----------------------------------------------------------------------------- evaluation
    def _check_features(self, x: Tensor, means: Tensor | None = None) -> None:
        if means is None and (x.ndim != 2 or x.shape[1] != self.dim or not x.is_floating_point()):
            raise ValueError(
                f"features must be a float [N, {self.dim}] tensor, got {tuple(x.shape)}"
            )
        if means is not None and (
            x.ndim != 3 or x.shape[0] != means.shape[0] or x.shape[2] != self.dim
        ):
            raise ValueError(
                f"grouped features must be [G, M, {self.dim}] with G = {means.shape[0]} groups of "
                f"means, got {tuple(x.shape)}"
            )

    @float32_method
    def component_log_prob(self, x: Tensor, means: Tensor | None = None) -> Tensor:
        """``log w_ck + log N(x; mu_ck, diag sigma^2_ck)`` for every class and component.

        Two matrix products, of ``x`` and of ``x⊙x`` with the natural parameters, accumulated
        into one ``[N, K·C]`` result: never an ``[N, C, K, D]`` broadcast.

        Args:
            x: ``[N, D]`` features, or ``[G, M, D]`` groups of them when ``means`` is given.
            means: Optional ``[G, C, K, D]`` component means of each group (see
                :meth:`adapted_means`); the variances and weights stay the mixtures' own.

        Returns:
            ``[N, C, K]`` joint log-densities (``N = G·M`` for groups), a view of a
            component-major ``[N, K, C]`` tensor.
        """
        self._check_features(x, means)
        x = x.to(self.means.dtype)
        return self._log_joint(x, x * x, means).transpose(1, 2)

    def _log_joint(self, x: Tensor, squares: Tensor, means: Tensor | None = None) -> Tensor:
        """Component-major ``[N, K, C]`` joint log-densities of ``x`` and its ``squares``."""
        linear, quadratic, constant = self._natural_parameters(means)
        if means is None:
            log_joint = torch.addmm(constant, x, linear)
        else:
            log_joint = torch.baddbmm(constant[:, None], x, linear).flatten(0, 1)
        log_joint = log_joint.addmm_(squares.flatten(0, -2), quadratic)
        return log_joint.view(-1, self.mixture_count, self.num_classes)

    def _natural_parameters(self, means: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The natural parameters of the log-densities, as matrix product operands.

        ``mu/sigma^2`` (``[..., D, K·C]``), ``-1/(2 sigma^2)`` (``[D, K·C]``) and the constant
        (``[..., K·C]``). ``means`` (``[..., C, K, D]``, default the mixtures' own) gives the
        leading shape. Columns are component-major (``k·C + c``), so each component's classes
        are contiguous.
        """
        means = self.means if means is None else means
        precision = self.variances.reciprocal()
        scaled_means = means * precision
        quadratic_and_volume = (
            (means * scaled_means).sum(-1)
            + self.variances.log().sum(-1)
            + self.dim * math.log(2 * math.pi)
        )
        constant = self.weights.clamp_min(1e-30).log() - 0.5 * quadratic_and_volume
        return (
            _component_major(scaled_means).transpose(-1, -2),
            _component_major(-0.5 * precision).T,
            _component_major(constant[..., None]).squeeze(-1),
        )

    @float32_method
    @torch.no_grad()
    def adapted_means(
        self, x: Tensor, labels: Tensor, groups: Tensor, num_groups: int, relevance: float
    ) -> Tensor:
        """Component means adapted to each group (image) by its labelled features.

        Mean-only MAP adaptation with a relevance factor (as GMM-UBM speaker models adapt a
        universal model to one speaker): ``mu_gck = (sum_j r_jck x_j + relevance · mu_ck) /
        (sum_j r_jck + relevance)`` over the features j of group g labelled c. A class labelled in
        an image moves toward that image's own appearance; the other classes keep the global means.

        Args:
            x: ``[N, D]`` labelled features.
            labels: ``[N]`` their classes.
            groups: ``[N]`` their group (image) indices in ``[0, num_groups)``.
            num_groups: Number of groups G.
            relevance: Weight of the global mean, in features (> 0).

        Returns:
            ``[G, C, K, D]`` means, for :meth:`expectation` of ``[G, M, D]`` grouped features.
        """
        if relevance <= 0:
            raise ValueError(f"relevance must be > 0, got {relevance}")
        cells = num_groups * self.num_classes
        prior = self.means.expand(num_groups, -1, -1, -1).reshape(cells, self.mixture_count, -1)
        if x.shape[0] == 0:
            return prior.reshape(num_groups, *self.means.shape).clone()
        x = x.detach().to(self.means.dtype)
        responsibilities = self.expectation(x).responsibilities
        own = responsibilities[torch.arange(x.shape[0], device=x.device), labels]  # [N, K]
        cell = groups * self.num_classes + labels
        count = x.new_zeros(cells, self.mixture_count).index_add_(0, cell, own)
        total = x.new_zeros(cells, self.mixture_count, self.dim)
        total.index_add_(0, cell, own[..., None] * x[:, None])
        adapted = (total + relevance * prior) / (count[..., None] + relevance)
        return adapted.view(num_groups, *self.means.shape)

    @float32_method
    def log_likelihood(self, x: Tensor) -> Tensor:
        """``log p(x | c)`` of every feature under every class's mixture.

        Args:
            x: ``[N, D]`` features.

        Returns:
            ``[N, C]`` log-likelihoods.
        """
        return self.component_log_prob(x).logsumexp(-1)

    @float32_method
    @torch.no_grad()
    def expectation(self, x: Tensor, means: Tensor | None = None) -> Expectation:
        """E-step: class log-likelihoods and component responsibilities from one density pass.

        The component masses are computed in place in the ``[N, K, C]`` joint log-densities, and
        the reductions over K are chains of ``[N, C]`` operations: every pass over ``[N, K, C]``
        costs a fair share of a matrix product, and a reduction over a short middle dimension
        several such passes on CPU.

        Args:
            x: ``[N, D]`` features (detached here), or ``[G, M, D]`` with ``means``.
            means: Optional ``[G, C, K, D]`` per-group means (:meth:`adapted_means`).

        Returns:
            The :class:`Expectation` (``N = G·M`` rows for groups), to hand to
            :meth:`posterior_from_log_likelihood` and :meth:`sufficient_statistics`.
        """
        self._check_features(x, means)
        x = x.detach().to(self.means.dtype)
        squares = x * x
        log_joint = self._log_joint(x, squares, means)
        squares = squares.flatten(0, -2)
        if self.mixture_count == 1:
            log_likelihood = log_joint[:, 0]
            mass, total = torch.ones_like(log_joint), torch.ones_like(log_likelihood)
            return Expectation(log_likelihood, mass, total, squares)
        peak = _over_components(torch.maximum, log_joint)
        mass = log_joint.sub_(peak[:, None]).exp_()
        total = _over_components(torch.add, mass)
        return Expectation(peak.add_(total.log()), mass, total, squares)

    @float32_method
    def posterior(
        self,
        x: Tensor,
        prior: Tensor | None = None,
        allowed: Tensor | None = None,
        temperature: float | None = None,
    ) -> Tensor:
        """GMM class posterior ``G ∝ prior · exp(log p(x|c) / T)`` (METHOD §3.3).

        Only initialised classes allowed for a feature get mass; a feature with none gets an
        all-zero row.

        Args:
            x: ``[N, D]`` features.
            prior: ``[N, C]`` class prior (e.g. the detached prediction); uniform if None.
            allowed: ``[N, C]`` bool, classes each feature may take; all if None.
            temperature: T; defaults to D (the per-dimension average log-likelihood).

        Returns:
            ``[N, C]`` posterior, exactly zero on classes that are not allowed.
        """
        return self.posterior_from_log_likelihood(
            self.log_likelihood(x), prior, allowed, temperature
        )

    @float32_method
    def posterior_from_log_likelihood(
        self,
        log_likelihood: Tensor,
        prior: Tensor | None = None,
        allowed: Tensor | None = None,
        temperature: float | None = None,
    ) -> Tensor:
        """:meth:`posterior` from class log-likelihoods already computed (``[N, C]``)."""
        log_likelihood = log_likelihood.float()
        if prior is None:
            scores = log_likelihood / (temperature or self.dim)
        else:
            scores = prior.to(log_likelihood.dtype).log()
            scores.add_(log_likelihood, alpha=1 / (temperature or self.dim))
        excluded = ~self.initialized if allowed is None else ~(allowed.bool() & self.initialized)
        scores.masked_fill_(excluded, float("-inf"))
        # A row without a class is all -inf, so its softmax is NaN: it gets zeros.
        return scores.softmax(1).nan_to_num_(0.0)

    # -------------------------------------------------------------------------------- fitting
    @float32_method
    @torch.no_grad()
    def sufficient_statistics(
        self, x: Tensor, weights: Tensor, expectation: Expectation | None = None
    ) -> MixtureStatistics:
        """Sufficient statistics of the fitting set under the current mixtures.

        Args:
            x: ``[N, D]`` features (detached here).
            weights: ``[N, C]`` fitting weight of each feature for each class (1 for a labelled
                pixel's class, G for a confident pseudo-labelled one, 0 elsewhere).
            expectation: :meth:`expectation` of ``x`` when the caller already has it (its
                component masses are overwritten); computed here otherwise.

        Returns:
            The statistics: plain sums over the features, plus candidate features per class.
        """
        self._check_features(x)
        if weights.shape != (x.shape[0], self.num_classes):
            raise ValueError(
                f"weights must be [N, C] = {(x.shape[0], self.num_classes)}, "
                f"got {tuple(weights.shape)}"
            )
        x = x.detach().to(self.means.dtype)
        weights = weights.detach().to(self.means.dtype)
        log_likelihood, mass, class_mass, squares = expectation or self.expectation(x)
        if x.shape[0] == 0:
            return self._empty_statistics(x)

        # Fitting weight times responsibility, component-major [N, K·C], summed alone and
        # against x and x⊙x: S0, S1 and S2.
        weighted = mass.mul_((weights / class_mass)[:, None]).view(x.shape[0], -1)
        shape = (self.mixture_count, self.num_classes, -1)
        moments = [m.view(shape).transpose(0, 1) for m in (weighted.T @ x, weighted.T @ squares)]
        candidates, valid, index = self._sample_candidates(x, weights)
        score = log_likelihood.gather(0, index.T).T.masked_fill(~valid, 0)
        return MixtureStatistics(
            weight=weighted.sum(0).view(shape[:2]).T.contiguous(),
            sum=moments[0].contiguous(),
            square_sum=moments[1].contiguous(),
            candidates=candidates,
            candidate_valid=valid,
            candidate_score=score,
        )

    def _empty_statistics(self, x: Tensor) -> MixtureStatistics:
        shape = (self.num_classes, self.mixture_count)
        slots = (self.num_classes, self.candidates_per_class)
        return MixtureStatistics(
            weight=x.new_zeros(shape),
            sum=x.new_zeros(*shape, self.dim),
            square_sum=x.new_zeros(*shape, self.dim),
            candidates=x.new_zeros(*slots, self.dim),
            candidate_valid=torch.zeros(slots, dtype=torch.bool, device=x.device),
            candidate_score=x.new_zeros(slots),
        )

    def _sample_candidates(self, x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A fixed pseudo-random sample of each class's features, the same on every call.

        Each fitting feature is a candidate of the class that weighs it most and gets a key, a
        hash of its row index. Keys below a per-class threshold that admits about twice
        ``candidates_per_class`` features are sorted, and each class keeps at most that many of
        its smallest: a sample spread over the whole batch, deterministic so that ranks and
        resumes agree. Every tensor keeps its size (rows that are not admitted sort into an extra
        class and slot that are dropped), so the device never waits for the host. With
        ``mixture_count == 1`` nothing is ever seeded and every slot stays empty.

        Returns:
            ``[C, M, D]`` candidates, ``[C, M]`` validity and ``[C, M]`` row indices into x.
        """
        classes, slots = self.num_classes, self.candidates_per_class
        if self.mixture_count == 1:
            index = torch.zeros(classes, slots, dtype=torch.long, device=x.device)
            valid = torch.zeros(classes, slots, dtype=torch.bool, device=x.device)
            return x.new_zeros(classes, slots, self.dim), valid, index
        top, owner = weights.max(1)  # argmax, but twice as fast on CPU
        owner = owner.masked_fill_(top <= 0, classes)  # class C: not fitting
        count = torch.zeros(classes + 1, dtype=torch.long, device=x.device)
        count.index_add_(0, owner, torch.ones_like(owner))
        row = torch.arange(owner.numel(), device=x.device)
        key = row.mul(_HASH).remainder_(_KEYS)
        threshold = (2 * slots * _KEYS // count.clamp_min(1)).clamp_max(_KEYS)
        owner = owner.masked_fill_(key >= threshold[owner], classes)
        order = (owner * _KEYS + key).argsort()  # by class, then by key
        owner = owner[order]
        taken = torch.zeros_like(count).index_add_(0, owner, torch.ones_like(owner))
        slot = row - (taken.cumsum(0) - taken)[owner]
        kept = (slot < slots) & (owner < classes)
        cell = (torch.where(kept, owner, classes), torch.where(kept, slot, slots))
        index = torch.zeros(classes + 1, slots + 1, dtype=torch.long, device=x.device)
        valid = torch.zeros(classes + 1, slots + 1, dtype=torch.bool, device=x.device)
        index.index_put_(cell, order)
        valid.index_put_(cell, kept)
        index, valid = index[:classes, :slots], valid[:classes, :slots]
        candidates = x[index] * valid[..., None]
        return candidates, valid, index

    @float32_method
    @torch.no_grad()
    def update(self, stats: MixtureStatistics) -> Tensor:
        """M-step with the online update of METHOD §3.4, for the classes observed in ``stats``.

        ``s <- (1 - r)·s + r·s_hat`` on statistics normalised per class, with the rate
        ``r = (1 - m)·n / (m·N + (1 - m)·n)`` for a batch mass ``n`` and a running mass ``N``:
        ``1 - m`` when a class gets its usual mass, far less when it gets a sliver (the online EM
        of unnormalised statistics). A class seen for the first time is initialised from the
        batch alone (k-means++-style seeding for K > 1); a component
        whose weight falls below ``1/(10K)`` is re-seeded at the class's worst-explained candidate.
        Statistics that hold NaN or inf (a diverged batch) change nothing: the update is skipped,
        and the caller learns it from the result without waiting for the device.

        Args:
            stats: Statistics from :meth:`sufficient_statistics` (summed over ranks under DDP).

        Returns:
            A bool scalar tensor: whether the update was applied (False for non-finite stats).
        """
        finite = (
            stats.weight.isfinite().all()
            & stats.sum.isfinite().all()
            & stats.square_sum.isfinite().all()
        )
        # Non-finite statistics count as no observation at all.
        total = torch.where(finite, stats.weight.sum(1), 0.0)
        observed = total > _MIN_OBSERVED
        norm = total.clamp_min(_MIN_OBSERVED)
        batch_s0 = stats.weight / norm[:, None]
        batch_s1 = stats.sum / norm[:, None, None]
        batch_s2 = stats.square_sum / norm[:, None, None]

        fresh = observed & ~self.initialized
        # Each class moves by (1 - m) times its share of the evidence: a batch that gives a class
        # a sliver of its usual mass (posterior tails of other classes' pixels) barely moves it.
        incoming = (1 - self.momentum) * total
        rate = torch.where(fresh, 1.0, incoming / (self.momentum * self.mass + incoming))
        keep = (1 - rate)[:, None]
        s0 = keep * self.weights + (1 - keep) * batch_s0
        s1 = (
            keep[..., None] * self.weights[..., None] * self.means
            + (1 - keep[..., None]) * batch_s1
        )
        old_s2 = self.weights[..., None] * (self.variances + self.means.square())
        s2 = keep[..., None] * old_s2 + (1 - keep[..., None]) * batch_s2
        safe_s0 = s0.clamp_min(1e-12)[..., None]
        means = torch.where(s0[..., None] > 0, s1 / safe_s0, self.means)
        variances = (s2 / safe_s0 - means.square()).clamp_min(self.min_variance)
        variances = torch.where(s0[..., None] > 0, variances, self.variances)
        weights = s0 / s0.sum(1, keepdim=True).clamp_min(1e-12)

        class_mean = batch_s1.sum(1)
        class_variance = (batch_s2.sum(1) - class_mean.square()).clamp_min(self.min_variance)
        if self.mixture_count > 1:
            means, variances, weights = self._seed_fresh(
                fresh, stats, class_mean, class_variance, means, variances, weights
            )
            means, variances, weights = self._reseed_dead(
                observed & ~fresh, stats, class_variance, means, variances, weights
            )

        rows = observed[:, None]
        self.means.copy_(torch.where(rows[..., None], means, self.means))
        self.variances.copy_(torch.where(rows[..., None], variances, self.variances))
        self.weights.copy_(torch.where(rows, weights, self.weights))
        mass = torch.where(fresh, total, self.momentum * self.mass + (1 - self.momentum) * total)
        self.mass.copy_(torch.where(observed, mass, self.mass))
        self.initialized |= observed
        return finite

    def _seed_fresh(
        self,
        fresh: Tensor,
        stats: MixtureStatistics,
        class_mean: Tensor,
        class_variance: Tensor,
        means: Tensor,
        variances: Tensor,
        weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Initialise new classes: seeded means, the class variance, equal weights.

        Seeds are drawn for every class and kept for the fresh ones: a few small operations on
        ``[C, M, D]`` candidates instead of a host round trip to find which classes are fresh.
        """
        seeds = _kmeans_seeds(
            stats.candidates, stats.candidate_valid, class_mean, class_variance, self.mixture_count
        )
        means = torch.where(fresh[:, None, None], seeds, means)
        variances = torch.where(fresh[:, None, None], class_variance[:, None], variances)
        weights = torch.where(fresh[:, None], 1.0 / self.mixture_count, weights)
        return means, variances, weights

    def _reseed_dead(
        self,
        refitted: Tensor,
        stats: MixtureStatistics,
        class_variance: Tensor,
        means: Tensor,
        variances: Tensor,
        weights: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Move components whose weight fell below ``1/(10K)`` to the worst-explained features."""
        dead = refitted[:, None] & (weights < LIVE_WEIGHT / self.mixture_count)
        score = stats.candidate_score.masked_fill(~stats.candidate_valid, float("inf"))
        order = score.argsort(1)  # worst explained first
        dead_rank = (dead.long().cumsum(1) - 1).clamp(0, order.shape[1] - 1)
        slot = order.gather(1, dead_rank)
        usable = dead & stats.candidate_valid.gather(1, slot)
        target = stats.candidates.gather(1, slot[..., None].expand(-1, -1, self.dim))
        means = torch.where(usable[..., None], target, means)
        variances = torch.where(usable[..., None], class_variance[:, None], variances)
        weights = torch.where(usable, 1.0 / self.mixture_count, weights)
        return means, variances, weights / weights.sum(1, keepdim=True)


def _component_major(parameters: Tensor) -> Tensor:
    """``[..., C, K, P]`` -> ``[..., K·C, P]``: rows ordered ``k·C + c``."""
    return parameters.transpose(-3, -2).flatten(-3, -2)


def _over_components(op: Callable[..., Tensor], tensor: Tensor) -> Tensor:
    """Reduce ``[N, K, C]`` over K (K >= 2) by a chain of the binary ``op`` on ``[N, C]`` slices.

    On CPU, ``amax``/``sum`` over a short middle dimension are several times slower.
    """
    out = op(tensor[:, 0], tensor[:, 1])
    for k in range(2, tensor.shape[1]):
        op(out, tensor[:, k], out=out)
    return out


def _kmeans_seeds(
    candidates: Tensor,
    valid: Tensor,
    class_mean: Tensor,
    class_variance: Tensor,
    count: int,
) -> Tensor:
    """Deterministic k-means++-style seeds, refined by a few Lloyd steps, for several classes.

    The first seed is the candidate nearest the class mean, each next one the candidate farthest
    from the seeds so far (the greedy limit of D^2 sampling, so every rank picks the same seeds).
    A class with fewer distinct candidates than seeds gets the duplicates spread by a fixed
    fraction of its standard deviation so that EM can separate them.

    Args:
        candidates: ``[n, M, D]`` candidate features of n classes.
        valid: ``[n, M]`` which candidates exist.
        class_mean: ``[n, D]`` class means.
        class_variance: ``[n, D]`` class variances.
        count: Seeds per class K.

    Returns:
        ``[n, K, D]`` component means.
    """
    n, _, dim = candidates.shape
    batch = torch.arange(n, device=candidates.device)
    to_mean = (candidates - class_mean[:, None]).square().sum(-1).masked_fill(~valid, float("inf"))
    first = to_mean.argmin(1)
    seeds = [candidates[batch, first]]
    nearest = (candidates - seeds[0][:, None]).square().sum(-1)
    for _ in range(1, count):
        farthest = nearest.masked_fill(~valid, -1.0).argmax(1)
        seeds.append(candidates[batch, farthest])
        nearest = torch.minimum(nearest, (candidates - seeds[-1][:, None]).square().sum(-1))
    # A class without candidates (only ever a minority in soft weights) starts at its mean.
    centers = torch.where(valid.any(1)[:, None, None], torch.stack(seeds, 1), class_mean[:, None])
    members = valid.to(candidates.dtype)
    for _ in range(_LLOYD_ITERATIONS):
        assignment = torch.cdist(candidates, centers).argmin(-1)
        one_hot = torch.nn.functional.one_hot(assignment, count).to(candidates.dtype)
        one_hot = one_hot * members[..., None]
        size = one_hot.sum(1)[..., None]
        moved = one_hot.transpose(1, 2) @ candidates / size.clamp_min(1)
        centers = torch.where(size > 0, moved, centers)
    # Fixed +-1 pattern (same on every rank) to split coinciding seeds.
    pattern = torch.arange(count * dim, device=candidates.device).view(count, dim)
    pattern = ((pattern * _HASH) % 7 < 4).to(candidates.dtype) * 2 - 1
    spread = 0.5 * class_variance.sqrt()[:, None] * pattern
    duplicate = torch.cdist(centers, centers) + torch.eye(count, device=centers.device) > 0
    duplicate = ~duplicate.all(-1, keepdim=True)
    return torch.where(duplicate, centers + spread, centers)
