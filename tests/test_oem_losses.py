"""OEM-mode losses (METHOD §3.5) and partial cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from agmm_lightning.agmm import OEMOptions, cvpr_agmm_losses
from agmm_lightning.agmm.losses import (
    absent_class_loss,
    maximization_loss,
    partial_cross_entropy,
    pseudo_label_loss,
)
from agmm_lightning.agmm.oem import fitting_weights


def make_batch(seed=0, num_classes=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 5, 6, generator=gen, requires_grad=True)
    target = torch.randint(num_classes + 1, (2, 5, 6), generator=gen)
    target[0, 0] = 255
    return logits, target


def test_partial_cross_entropy_ignores_unlabelled_and_void():
    logits, target = make_batch()
    labelled = target < 4
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[labelled], target[labelled])
    torch.testing.assert_close(partial_cross_entropy(logits, target), expected)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    expected = F.cross_entropy(
        logits.permute(0, 2, 3, 1)[labelled], target[labelled], weight=weights
    )
    torch.testing.assert_close(partial_cross_entropy(logits, target, weights), expected)


def test_hard_fraction_keeps_the_largest_losses():
    logits, target = make_batch(1)
    labelled = target < 4
    per_pixel = F.cross_entropy(
        logits.permute(0, 2, 3, 1)[labelled], target[labelled], reduction="none"
    )
    keep = int(0.5 * per_pixel.numel())
    expected = per_pixel.sort(descending=True).values[:keep].mean()
    torch.testing.assert_close(partial_cross_entropy(logits, target, hard_fraction=0.5), expected)
    # With class weights: the weighted mean over the pixels of largest weighted loss.
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    pixel_weights = weights[target[labelled]]
    order = (per_pixel * pixel_weights).argsort(descending=True)[:keep]
    expected = (per_pixel * pixel_weights)[order].sum() / pixel_weights[order].sum()
    loss = partial_cross_entropy(logits, target, weights, hard_fraction=0.5)
    torch.testing.assert_close(loss, expected)


def test_losses_stay_finite_without_labels():
    logits, _ = make_batch()
    target = torch.full((2, 5, 6), 4)
    assert partial_cross_entropy(logits, target) == 0
    assert partial_cross_entropy(logits, target, hard_fraction=0.3) == 0
    posterior = torch.zeros(2, 4, 5, 6)
    loss, supervised = pseudo_label_loss(logits, posterior, (target == 4).float())
    assert loss == 0 and not supervised.any()
    void = torch.full((2, 5, 6), 255)
    assert absent_class_loss(logits, torch.ones(2, 4), void) == 0


@pytest.mark.parametrize("mode", ["soft", "hard", "surer", "agree"])
def test_pseudo_label_loss_only_on_unlabelled_pixels(mode):
    logits, target = make_batch(2)
    gen = torch.Generator().manual_seed(3)
    posterior = (torch.randn(2, 4, 5, 6, generator=gen) * 2).softmax(1)
    posterior[1, :, 0, 0] = 0  # no valid class there
    loss, supervised = pseudo_label_loss(
        logits, posterior, (target == 4).float(), mode, confidence=0.6
    )
    log_probs = logits.log_softmax(1)
    counted = (target == 4) & (posterior.sum(1) > 0)
    if mode == "surer":
        surer = posterior.max(1).values > log_probs.exp().max(1).values
        assert (counted & ~surer).any()  # the gate leaves some unlabelled pixels out
        counted &= surer
    if mode in ("soft", "surer"):
        per_pixel = -(posterior * log_probs).sum(1)
    else:
        counted &= posterior.max(1).values >= 0.6
        if mode == "agree":
            agree = posterior.argmax(1) == logits.argmax(1)
            assert (counted & ~agree).any()  # the gate leaves some confident pixels out
            counted &= agree
        per_pixel = -log_probs.gather(1, posterior.argmax(1, keepdim=True))[:, 0]
    assert counted.any()
    assert torch.equal(supervised, counted)
    expected = per_pixel[counted].mean()
    torch.testing.assert_close(loss, expected)
    (gradient,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(gradient, torch.autograd.grad(expected, logits)[0])
    assert (gradient.abs().sum(1)[~counted] == 0).all()


@pytest.mark.parametrize("mode", ["soft", "hard", "agree"])
def test_pseudo_label_loss_weighs_positions_by_their_unlabelled_share(mode):
    """At feature resolution, a cell weighted by its share of unlabelled pixels counts as those
    pixels would at label resolution (logits and posterior constant over each 4x4 cell); the soft
    loss keeps nothing of the logits' size for backward but the logits and the posterior."""
    gen = torch.Generator().manual_seed(7)
    cells = torch.randn(2, 4, 4, 4, generator=gen, requires_grad=True)
    posterior = (torch.randn(2, 4, 4, 4, generator=gen) * 3).softmax(1)
    target = torch.full((2, 16, 16), 4)
    target[:, ::3, ::5] = 1
    target[0, :4, :4] = 255
    unlabelled = (target == 4).float()
    share = F.avg_pool2d(unlabelled[:, None], 4)[:, 0]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss, _ = pseudo_label_loss(cells, posterior, share, mode, confidence=0.5)
    spread = cells.repeat_interleave(4, 2).repeat_interleave(4, 3)
    dense = posterior.repeat_interleave(4, 2).repeat_interleave(4, 3)
    expected, _ = pseudo_label_loss(spread, dense, unlabelled, mode, confidence=0.5)
    torch.testing.assert_close(loss, expected)
    (gradient,) = torch.autograd.grad(loss, cells)
    torch.testing.assert_close(gradient, torch.autograd.grad(expected, cells)[0])
    if mode == "soft":
        assert all(t is cells or t is posterior for t in saved if t.shape == cells.shape)


def test_a_teacher_worse_than_the_student_does_not_move_it():
    """Where the GMM's label disagrees with the network's prediction, however sure the GMM is,
    the agreement-gated pseudo loss gives the network no gradient; where they agree, it teaches."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 4, 5, 6, generator=gen).mul(3).requires_grad_()
    student = logits.argmax(1)
    wrong = (student + 1) % 4  # a confident teacher, wrong wherever the student is right
    posterior = F.one_hot(wrong, 4).permute(0, 3, 1, 2).float() * 0.97 + 0.01
    unlabelled = torch.ones(2, 5, 6)
    loss, supervised = pseudo_label_loss(logits, posterior, unlabelled, "agree")
    (gradient,) = torch.autograd.grad(loss, logits)
    assert not supervised.any() and (gradient == 0).all()
    # The same teacher where it agrees with the student on half of the pixels teaches there.
    half = torch.rand(2, 5, 6, generator=gen) < 0.5
    teacher = torch.where(half, student, wrong)
    posterior = F.one_hot(teacher, 4).permute(0, 3, 1, 2).float() * 0.97 + 0.01
    loss, supervised = pseudo_label_loss(logits, posterior, unlabelled, "agree")
    (gradient,) = torch.autograd.grad(loss, logits)
    assert torch.equal(supervised, half)
    assert (gradient.abs().sum(1)[half] > 0).all() and (gradient.abs().sum(1)[~half] == 0).all()


def test_pseudo_label_loss_rejects_unknown_mode():
    logits, target = make_batch()
    with pytest.raises(ValueError, match="mode"):
        pseudo_label_loss(logits, torch.ones(2, 4, 5, 6), (target == 4).float(), mode="median")


def test_absent_class_loss_with_a_pixel_allowed_map():
    logits, target = make_batch(4)
    gen = torch.Generator().manual_seed(5)
    allowed = torch.rand(2, 4, 5, 6, generator=gen) > 0.5
    probs = logits.softmax(1)
    per_pixel = -((~allowed).float() * torch.log(1 - probs + 1e-6)).sum(1)
    expected = per_pixel[target != 255].mean()
    torch.testing.assert_close(absent_class_loss(logits, allowed, target), expected)


def test_the_kernel_blocks_absent_term_is_the_tag_absent_loss():
    """OEM mode takes the absent term from CVPR's block when tags give it: same value, same
    gradient as absent_class_loss."""
    logits, target = make_batch(6)
    features = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(7))
    tags = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    ours = absent_class_loss(logits, tags, target)
    (expected,) = torch.autograd.grad(ours, logits)
    block = cvpr_agmm_losses(features, logits, target, 4, tags)["absent"]
    (gradient,) = torch.autograd.grad(block, logits)
    torch.testing.assert_close(block, ours)
    torch.testing.assert_close(gradient, expected)


def test_the_kernel_blocks_seg_term_is_the_partial_cross_entropy():
    """OEM mode takes seg from CVPR's block without OHEM: same value, same gradient."""
    logits, target = make_batch(8)
    features = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(9))
    ours = partial_cross_entropy(logits, target)
    (expected,) = torch.autograd.grad(ours, logits)
    block = cvpr_agmm_losses(features, logits, target, 4)["seg"]
    (gradient,) = torch.autograd.grad(block, logits)
    torch.testing.assert_close(block, ours)
    torch.testing.assert_close(gradient, expected)


def test_maximization_loss_is_cross_entropy_over_valid_classes():
    gen = torch.Generator().manual_seed(6)
    log_lik = torch.randn(8, 3, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    valid = torch.ones(8, 3, dtype=torch.bool)
    valid[0, 2] = False  # an excluded rival
    valid[1, 1] = False  # own class invalid: skipped
    valid[2, :2] = False  # nothing to compare its own class with: skipped
    loss = maximization_loss(log_lik, labels, temperature=2.0, valid=valid)
    scores = (log_lik / 2).masked_fill(~valid, float("-inf"))
    keep = (torch.arange(8) != 1) & (torch.arange(8) != 2)
    torch.testing.assert_close(loss, F.cross_entropy(scores[keep], labels[keep]))
    loss.backward()
    assert log_lik.grad[1:3].abs().sum() == 0 and log_lik.grad[0, 2] == 0
    nothing = maximization_loss(log_lik, labels, 2.0, torch.zeros(8, 3, dtype=torch.bool))
    assert nothing == 0


def test_unlabelled_fitting_mass_is_trusted_confident_and_bounded_by_the_labels():
    """Only confident features the prediction agrees with join the refit, and no class takes
    more unlabelled mass than ``unlabelled_mass`` times its labelled mass in the step."""
    gen = torch.Generator().manual_seed(12)
    posterior = (torch.randn(400, 3, generator=gen) * 4).softmax(1)
    trusted = torch.rand(400, generator=gen) < 0.7
    labelled_mass = torch.tensor([100.0, 2.0, 0.0])
    options = OEMOptions(fit_confidence=0.8, unlabelled_mass=1.0)
    weights = fitting_weights(posterior, trusted, labelled_mass, options)
    joins = (posterior.amax(1) >= 0.8) & trusted
    assert (weights[~joins] == 0).all() and (weights[joins] > 0).any()
    unbounded = posterior * joins[:, None]
    assert unbounded[:, 1].sum() > 2 and unbounded[:, 2].sum() > 0  # the caps bind
    torch.testing.assert_close(weights.sum(0)[1:], labelled_mass[1:])
    assert unbounded[:, 0].sum() < 100  # under its cap: kept whole
    torch.testing.assert_close(weights[:, 0], unbounded[:, 0])
    free = fitting_weights(
        posterior, trusted, labelled_mass, OEMOptions(fit_confidence=0.8, unlabelled_mass=None)
    )
    torch.testing.assert_close(free, unbounded)
