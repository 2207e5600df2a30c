"""ClassMixtures: likelihoods, posterior, E-step statistics and the online update."""

import math

import pytest
import torch
import torch.nn.functional as F

from agmm_lightning.agmm import ClassMixtures


def sample_mixture(means, stds, weights, count, gen):
    component = torch.multinomial(torch.tensor(weights), count, replacement=True, generator=gen)
    noise = torch.randn(count, means.shape[1], generator=gen)
    return means[component] + noise * stds[component], component


def one_class_weights(count, num_classes, cls=0):
    weights = torch.zeros(count, num_classes)
    weights[:, cls] = 1
    return weights


def fitted(mixtures, x, weights):
    mixtures.update(mixtures.sufficient_statistics(x, weights))
    return mixtures


def test_log_likelihood_equals_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mixtures = ClassMixtures(3, 5, mixture_count=2)
    mixtures.means.normal_(generator=gen)
    mixtures.variances.uniform_(0.2, 2.0, generator=gen)
    mixtures.weights.copy_(torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.9, 0.1]]))
    x = torch.randn(7, 5, generator=gen)
    normal = torch.distributions.Normal(mixtures.means, mixtures.variances.sqrt())
    expected = (normal.log_prob(x[:, None, None]).sum(-1) + mixtures.weights.log()).logsumexp(-1)
    torch.testing.assert_close(mixtures.log_likelihood(x), expected, rtol=1e-5, atol=1e-4)


def test_k1_recovers_mean_and_variance_exactly():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, 4, generator=gen) * torch.tensor([0.5, 1.0, 2.0, 0.1]) + 3
    mixtures = fitted(ClassMixtures(2, 4), x, one_class_weights(len(x), 2))
    torch.testing.assert_close(mixtures.means[0, 0], x.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        mixtures.variances[0, 0], x.var(0, unbiased=False), rtol=1e-3, atol=1e-5
    )
    assert mixtures.initialized.tolist() == [True, False]


def test_k3_online_em_recovers_a_known_mixture():
    gen = torch.Generator().manual_seed(2)
    dim = 6
    means = torch.tensor([[-4.0] * dim, [0.0] * dim, [4.0] * dim])
    means[:, 1] = torch.tensor([2.0, -2.0, 0.0])
    stds = torch.tensor([0.5, 1.0, 0.7])[:, None].expand(3, dim)
    true_weights = [0.5, 0.3, 0.2]
    mixtures = ClassMixtures(1, dim, mixture_count=3, momentum=0.7)
    for _ in range(60):
        x, _ = sample_mixture(means, stds, true_weights, 512, gen)
        fitted(mixtures, x, torch.ones(len(x), 1))
    order = mixtures.means[0, :, 0].argsort()
    torch.testing.assert_close(mixtures.means[0, order], means, atol=0.15, rtol=0)
    torch.testing.assert_close(mixtures.variances[0, order].sqrt(), stds, atol=0, rtol=0.12)
    torch.testing.assert_close(
        mixtures.weights[0, order], torch.tensor(true_weights), atol=0.05, rtol=0
    )


def test_momentum_zero_equals_one_batch_em_step():
    gen = torch.Generator().manual_seed(3)
    mixtures = ClassMixtures(2, 3, mixture_count=2, momentum=0.0)
    mixtures.means.normal_(generator=gen)
    mixtures.variances.uniform_(0.5, 1.5, generator=gen)
    mixtures.initialized.fill_(True)
    x = torch.randn(300, 3, generator=gen) * 2
    cls = torch.randint(2, (300,), generator=gen)
    weights = torch.nn.functional.one_hot(cls, 2).float()

    # Plain EM step, class by class, component by component.
    expected_means = torch.empty_like(mixtures.means)
    expected_vars = torch.empty_like(mixtures.variances)
    expected_weights = torch.empty_like(mixtures.weights)
    for c in range(2):
        xc = x[cls == c]
        normal = torch.distributions.Normal(mixtures.means[c], mixtures.variances[c].sqrt())
        joint = normal.log_prob(xc[:, None]).sum(-1) + mixtures.weights[c].log()
        resp = (joint - joint.logsumexp(1, keepdim=True)).exp()
        for k in range(2):
            r = resp[:, k]
            expected_means[c, k] = (r[:, None] * xc).sum(0) / r.sum()
            expected_vars[c, k] = (r[:, None] * (xc - expected_means[c, k]) ** 2).sum(0) / r.sum()
            expected_weights[c, k] = r.sum() / len(xc)

    fitted(mixtures, x, weights)
    torch.testing.assert_close(mixtures.means, expected_means, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixtures.variances, expected_vars, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(mixtures.weights, expected_weights, rtol=1e-4, atol=1e-5)


def test_momentum_blends_normalised_statistics():
    gen = torch.Generator().manual_seed(4)
    first = torch.randn(400, 2, generator=gen)
    second = torch.randn(100, 2, generator=gen) * 3 + 5
    mixtures = ClassMixtures(1, 2, momentum=0.9)
    fitted(mixtures, first, torch.ones(400, 1))
    fitted(mixtures, second, torch.ones(100, 1))
    # The step is 1 - m for a batch of the class's usual mass, here a quarter of it.
    rate = 0.1 * 100 / (0.9 * 400 + 0.1 * 100)
    mean = (1 - rate) * first.mean(0) + rate * second.mean(0)
    second_moment = (1 - rate) * (first**2).mean(0) + rate * (second**2).mean(0)
    torch.testing.assert_close(mixtures.means[0, 0], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        mixtures.variances[0, 0], second_moment - mean**2, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("mixture_count", [1, 3])
def test_split_statistics_sum_to_the_whole_batch(mixture_count):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200, 4, generator=gen)
    weights = torch.rand(200, 3, generator=gen) * (torch.rand(200, 3, generator=gen) > 0.5)
    mixtures = ClassMixtures(3, 4, mixture_count=mixture_count, momentum=0.5)
    fitted(mixtures, torch.randn(300, 4, generator=gen), torch.ones(300, 3))
    whole = mixtures.sufficient_statistics(x, weights)
    split = mixtures.sufficient_statistics(x[:70], weights[:70]) + mixtures.sufficient_statistics(
        x[70:], weights[70:]
    )
    for name in ("weight", "sum", "square_sum"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=1e-5, atol=1e-5)
    assert split.candidates.shape[1] == 2 * whole.candidates.shape[1]
    twin = ClassMixtures(3, 4, mixture_count=mixture_count, momentum=0.5)
    twin.load_state_dict(mixtures.state_dict())
    mixtures.update(whole)
    twin.update(split)
    for name, buffer in mixtures.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], buffer, rtol=1e-5, atol=1e-6)


def test_classes_absent_from_a_batch_stay_untouched():
    gen = torch.Generator().manual_seed(6)
    mixtures = ClassMixtures(3, 4, mixture_count=2)
    fitted(mixtures, torch.randn(300, 4, generator=gen), torch.ones(300, 3))
    before = {k: v.clone() for k, v in mixtures.state_dict().items()}
    fitted(mixtures, torch.randn(50, 4, generator=gen) + 3, one_class_weights(50, 3, cls=1))
    after = mixtures.state_dict()
    for name in ("means", "variances", "weights"):
        assert torch.equal(after[name][[0, 2]], before[name][[0, 2]])
        assert not torch.equal(after[name][1], before[name][1])


def test_empty_fitting_set_changes_nothing():
    mixtures = ClassMixtures(2, 3, mixture_count=2)
    before = {k: v.clone() for k, v in mixtures.state_dict().items()}
    fitted(mixtures, torch.randn(10, 3), torch.zeros(10, 2))
    for name, value in mixtures.state_dict().items():
        assert torch.equal(value, before[name])


def test_first_observation_seeds_components_on_the_data():
    gen = torch.Generator().manual_seed(7)
    means = torch.tensor([[-5.0, 0.0], [5.0, 0.0]])
    x, _ = sample_mixture(means, torch.full((2, 2), 0.3), [0.5, 0.5], 400, gen)
    mixtures = fitted(ClassMixtures(1, 2, mixture_count=2), x, torch.ones(400, 1))
    seeds = mixtures.means[0, mixtures.means[0, :, 0].argsort()]
    torch.testing.assert_close(seeds, means, atol=0.5, rtol=0)
    torch.testing.assert_close(mixtures.weights[0], torch.full((2,), 0.5))


def test_dead_component_is_reseeded_at_the_worst_explained_feature():
    gen = torch.Generator().manual_seed(8)
    mixtures = ClassMixtures(1, 2, mixture_count=2, momentum=0.0)
    mixtures.initialized.fill_(True)
    mixtures.means.copy_(torch.tensor([[[0.0, 0.0], [100.0, 100.0]]]))
    x = torch.randn(300, 2, generator=gen)
    x[0] = torch.tensor([6.0, -6.0])  # the outlier the mixture explains worst
    fitted(mixtures, x, torch.ones(300, 1))
    assert torch.equal(mixtures.means[0, 1], x[0])
    torch.testing.assert_close(mixtures.weights.sum(), torch.tensor(1.0))
    assert (mixtures.weights > 0.1 / 2).all()


def test_candidates_are_a_fixed_spread_sample_of_each_class():
    gen = torch.Generator().manual_seed(9)
    owner = torch.cat([torch.zeros(5000), torch.ones(600), torch.full((20,), 2)]).long()
    owner = owner[torch.randperm(owner.numel(), generator=gen)]
    x = torch.randn(owner.numel(), 3, generator=gen)
    weights = torch.nn.functional.one_hot(owner, 4) * torch.rand(owner.numel(), 1, generator=gen)
    mixtures = ClassMixtures(4, 3, mixture_count=2, candidates_per_class=32)
    stats = mixtures.sufficient_statistics(x, weights)
    assert stats.candidate_valid.sum(1).tolist() == [32, 32, 20, 0]
    rows = [row[valid] for row, valid in zip(stats.candidates, stats.candidate_valid, strict=True)]
    for cls, candidates in enumerate(rows[:3]):
        matches = (candidates[:, None] == x[owner == cls]).all(-1)
        assert (matches.sum(1) == 1).all()  # each is one of the class's own features
        assert matches.any(0).sum() == candidates.shape[0]  # no feature twice
    row_index = (stats.candidates[0, :, None] == x).all(-1).float().argmax(1)
    assert row_index.max() - row_index.min() > owner.numel() / 2  # spread over the batch
    again = mixtures.sufficient_statistics(x, weights)
    assert torch.equal(again.candidates, stats.candidates)


def test_posterior_masks_disallowed_and_uninitialised_classes():
    gen = torch.Generator().manual_seed(9)
    mixtures = ClassMixtures(4, 3)
    x = torch.randn(400, 3, generator=gen)
    weights = torch.zeros(400, 4)
    weights[:, :3] = 1
    fitted(mixtures, x, weights)  # class 3 stays uninitialised
    allowed = torch.rand(50, 4, generator=gen) > 0.4
    allowed[0] = False
    allowed[1] = torch.tensor([False, False, False, True])
    posterior = mixtures.posterior(x[:50], allowed=allowed)
    assert (posterior[~allowed] == 0).all() and (posterior[:, 3] == 0).all()
    sums = posterior.sum(1)
    has_class = allowed[:, :3].any(1)
    torch.testing.assert_close(sums[has_class], torch.ones(int(has_class.sum())))
    assert (sums[~has_class] == 0).all()
    prior = torch.tensor([0.0, 1.0, 1.0, 1.0]).expand(50, 4)
    assert (mixtures.posterior(x[:50], prior=prior)[:, 0] == 0).all()


@pytest.mark.parametrize("mixture_count", [1, 2, 3, 5])
def test_one_expectation_serves_posterior_and_statistics(mixture_count):
    gen = torch.Generator().manual_seed(6)
    mixtures = ClassMixtures(3, 4, mixture_count=mixture_count)
    fitted(mixtures, torch.randn(300, 4, generator=gen), torch.ones(300, 3))
    x = torch.randn(50, 4, generator=gen)
    prior = torch.rand(50, 3, generator=gen).softmax(1)
    expectation = mixtures.expectation(x)
    torch.testing.assert_close(expectation.log_likelihood, mixtures.log_likelihood(x))
    torch.testing.assert_close(expectation.responsibilities.sum(-1), torch.ones(50, 3))
    joint = mixtures.component_log_prob(x)
    torch.testing.assert_close(expectation.responsibilities, joint.softmax(-1))
    posterior = mixtures.posterior_from_log_likelihood(expectation.log_likelihood, prior)
    torch.testing.assert_close(posterior, mixtures.posterior(x, prior))
    weights = posterior * (posterior.amax(1, keepdim=True) > 0.5)
    shared = mixtures.sufficient_statistics(x, weights, expectation)
    alone = mixtures.sufficient_statistics(x, weights)
    for name, value in alone.tensors().items():
        torch.testing.assert_close(getattr(shared, name), value)


def test_adapted_means_follow_the_map_formula():
    gen = torch.Generator().manual_seed(7)
    mixtures = ClassMixtures(3, 4, mixture_count=2)
    fitted(mixtures, torch.randn(300, 4, generator=gen), torch.ones(300, 3))
    x = torch.randn(20, 4, generator=gen)
    labels = torch.randint(0, 2, (20,), generator=gen)  # class 2 is never labelled
    groups = torch.randint(0, 2, (20,), generator=gen)
    adapted = mixtures.adapted_means(x, labels, groups, num_groups=3, relevance=2.0)
    responsibilities = mixtures.component_log_prob(x).softmax(-1)
    for g in range(3):
        for c in range(3):
            mine = (groups == g) & (labels == c)
            r = responsibilities[mine, c]  # [n, K]
            expected = (r.T @ x[mine] + 2.0 * mixtures.means[c]) / (r.sum(0)[:, None] + 2.0)
            torch.testing.assert_close(adapted[g, c], expected)
    torch.testing.assert_close(adapted[2], mixtures.means)  # a group without labels


def test_grouped_expectation_uses_each_groups_means():
    gen = torch.Generator().manual_seed(8)
    mixtures = ClassMixtures(3, 4, mixture_count=2)
    fitted(mixtures, torch.randn(300, 4, generator=gen), torch.ones(300, 3))
    means = mixtures.means + torch.randn(2, 3, 2, 4, generator=gen)
    x = torch.randn(2, 10, 4, generator=gen)
    grouped = mixtures.expectation(x, means)
    for g in range(2):
        twin = ClassMixtures(3, 4, mixture_count=2)
        twin.load_state_dict(mixtures.state_dict())
        twin.means.copy_(means[g])
        alone = twin.expectation(x[g])
        rows = slice(10 * g, 10 * (g + 1))
        torch.testing.assert_close(grouped.log_likelihood[rows], alone.log_likelihood)
        torch.testing.assert_close(grouped.responsibilities[rows], alone.responsibilities)


def test_posterior_temperature_and_prior():
    mixtures = ClassMixtures(2, 1)
    mixtures.means.copy_(torch.tensor([[[0.0]], [[2.0]]]))
    mixtures.initialized.fill_(True)
    x = torch.tensor([[0.5]])
    log_lik = mixtures.log_likelihood(x)
    expected = (log_lik / 4).softmax(1)
    torch.testing.assert_close(mixtures.posterior(x, temperature=4), expected)
    prior = torch.tensor([[0.2, 0.8]])
    expected = (log_lik + prior.log()).softmax(1)
    torch.testing.assert_close(mixtures.posterior(x, prior=prior), expected)


def test_high_dimension_stays_finite_in_log_domain():
    gen = torch.Generator().manual_seed(10)
    dim = 256
    mixtures = ClassMixtures(3, dim, mixture_count=4, min_variance=1e-4)
    x = torch.randn(600, dim, generator=gen) * 0.01 + torch.randn(3, dim, generator=gen).repeat(
        200, 1
    )
    labels = torch.arange(3).repeat(200)
    fitted(mixtures, x, torch.nn.functional.one_hot(labels, 3).float())
    far = x * 30
    log_lik = mixtures.log_likelihood(far)
    assert torch.isfinite(log_lik).all() and (log_lik < -1e4).any()
    expectation = mixtures.expectation(far)
    torch.testing.assert_close(expectation.log_likelihood, log_lik)
    assert torch.isfinite(expectation.responsibilities).all()
    posterior = mixtures.posterior(far)
    assert torch.isfinite(posterior).all()
    torch.testing.assert_close(posterior.sum(1), torch.ones(600))
    assert (mixtures.posterior(x).argmax(1) == labels).all()


def test_variance_floor():
    mixtures = fitted(ClassMixtures(1, 2, min_variance=0.01), torch.ones(20, 2), torch.ones(20, 1))
    assert torch.equal(mixtures.variances, torch.full((1, 1, 2), 0.01))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mixture_count": 0}, "mixture_count"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"min_variance": 0.0}, "min_variance"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassMixtures(3, 4, **kwargs)


def test_bad_feature_and_weight_shapes():
    mixtures = ClassMixtures(3, 4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        mixtures.log_likelihood(torch.randn(5, 3))
    with pytest.raises(ValueError, match="weights must be"):
        mixtures.sufficient_statistics(torch.randn(5, 4), torch.ones(5, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_skip_the_update_and_leave_the_mixtures_unchanged(bad):
    gen = torch.Generator().manual_seed(9)
    mixtures = ClassMixtures(3, 4, mixture_count=2)
    fitted(mixtures, torch.randn(200, 4, generator=gen), torch.ones(200, 3))
    before = {name: value.clone() for name, value in mixtures.state_dict().items()}
    x = torch.randn(20, 4, generator=gen)
    x[3, 1] = bad
    stats = mixtures.sufficient_statistics(x, torch.ones(20, 3))
    assert not mixtures.update(stats)
    for name, value in mixtures.state_dict().items():
        assert torch.equal(value, before[name]), name
    # Finite statistics of the same features apply again.
    x[3, 1] = 0.0
    assert mixtures.update(mixtures.sufficient_statistics(x, torch.ones(20, 3)))
    assert not torch.equal(mixtures.means, before["means"])


def test_buffers_are_the_state():
    mixtures = ClassMixtures(3, 4, mixture_count=2)
    assert set(mixtures.state_dict()) == {"means", "variances", "weights", "initialized", "mass"}
    assert math.isclose(float(mixtures.weights.sum()), 3.0)


def two_clusters(count=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(count, 4, generator=gen) * 0.1 + 1.0
    b = torch.randn(count, 4, generator=gen) * 0.1 - 1.0
    return a, b


def test_a_class_fed_only_posterior_tails_does_not_drift():
    """Its clicks cropped away, a class still gets 0.1% of every other class's pixels."""
    mixtures = ClassMixtures(2, 4, momentum=0.9)
    a, b = two_clusters()
    own = torch.cat([a, b])
    labels = F.one_hot(torch.cat([torch.zeros(200), torch.ones(200)]).long(), 2).float()
    for _ in range(5):
        mixtures.update(mixtures.sufficient_statistics(own, labels))
    start = mixtures.means[1, 0].clone()
    tails = torch.tensor([[0.999, 0.001]]).expand(200, 2)  # a's pixels, a sliver of class 1
    for _ in range(10):
        mixtures.update(mixtures.sufficient_statistics(a, tails))
    moved = (mixtures.means[1, 0] - start).norm() / (a.mean(0) - start).norm()
    assert moved < 0.02  # the evidence-blind update moved it 65% of the way to class 0


def test_a_class_with_real_evidence_still_converges():
    mixtures = ClassMixtures(2, 4, momentum=0.9)
    a, b = two_clusters()
    labels = F.one_hot(torch.cat([torch.zeros(200), torch.ones(200)]).long(), 2).float()
    mixtures.update(mixtures.sufficient_statistics(torch.cat([a, b]), labels))
    moved = b + 3.0  # class 1's features move away, with their full mass
    for _ in range(60):
        mixtures.update(mixtures.sufficient_statistics(torch.cat([a, moved]), labels))
    torch.testing.assert_close(mixtures.means[1, 0], moved.mean(0), atol=0.01, rtol=0)
    torch.testing.assert_close(mixtures.mass, torch.full((2,), 200.0))


@pytest.mark.parametrize("mixture_count", [1, 3])
def test_the_refit_never_waits_for_the_host(mixture_count):
    """Statistics and update trace into one graph: no branch on a tensor value, no sized-by-data
    tensor, so a GPU runs the refit without a host round trip (and under CUDA graphs)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=gen)
    weights = F.one_hot(torch.randint(0, 3, (300,), generator=gen), 3).float()
    weights[:40] = 0  # rows outside the fitting set
    compiled, eager = ClassMixtures(3, 4, mixture_count), ClassMixtures(3, 4, mixture_count)
    statistics = torch.compile(compiled.sufficient_statistics, fullgraph=True, backend="eager")
    update = torch.compile(compiled.update, fullgraph=True, backend="eager")
    for shift in (0.0, 0.5, 1.0):  # the first update seeds, the next ones refit
        assert update(statistics(x + shift, weights))
        eager.update(eager.sufficient_statistics(x + shift, weights))
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value)
