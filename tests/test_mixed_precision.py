"""Mixed precision: everything AGMM computes from the network's outputs runs in float32.

Under ``torch.autocast`` (Lightning's ``bf16-mixed`` / ``16-mixed``) the network runs in half
precision; the mixtures, the CVPR distance block, pixel counts, bilinear taps and every loss must
give their float32 results (tight tolerance) whatever the autocast state or the inputs' dtype.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_data, tiny_segmenter, tiny_trainer

from agmm_lightning.agmm import ClassMixtures, cvpr_agmm_losses
from agmm_lightning.agmm.losses import absent_class_loss, partial_cross_entropy, pseudo_label_loss
from agmm_lightning.agmm.sampling import bilinear_taps

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def bf16_autocast():
    return torch.autocast("cpu", torch.bfloat16)


def fitted_mixtures(dim=16, classes=5, components=2):
    gen = torch.Generator().manual_seed(0)
    mixtures = ClassMixtures(classes, dim, components, momentum=0.5, min_variance=1e-4)
    x = torch.randn(400, dim, generator=gen)
    weights = F.one_hot(torch.arange(400) % classes, classes).float()
    mixtures.update(mixtures.sufficient_statistics(x, weights))
    # Tight clusters put variances at the floor, where half precision loses the most.
    mixtures.update(mixtures.sufficient_statistics(x * 1e-3, weights))
    return mixtures, x * 1e-3, weights


def test_mixtures_give_their_float32_results_under_bf16_autocast():
    mixtures, x, weights = fitted_mixtures()
    x = x.clone().requires_grad_(True)
    reference = mixtures.log_likelihood(x)
    (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    ref_stats = mixtures.sufficient_statistics(x, weights)
    with bf16_autocast():
        log_likelihood = mixtures.log_likelihood(x)
        posterior = mixtures.posterior(x)
        stats = mixtures.sufficient_statistics(x, weights)
    (grad,) = torch.autograd.grad(log_likelihood.sum(), x)  # backward outside, as autocast asks
    assert log_likelihood.dtype == torch.float32
    torch.testing.assert_close(log_likelihood, reference, **TIGHT)
    torch.testing.assert_close(grad, reference_grad, **TIGHT)
    torch.testing.assert_close(posterior, mixtures.posterior(x), **TIGHT)
    for name in ("weight", "sum", "square_sum"):
        torch.testing.assert_close(getattr(stats, name), getattr(ref_stats, name), **TIGHT)
    # Half-precision features are upcast, not computed in half.
    half = x.detach().bfloat16()
    torch.testing.assert_close(mixtures.log_likelihood(half), mixtures.log_likelihood(half.float()))


def test_the_online_update_and_seeding_are_the_same_under_bf16_autocast():
    _, x, weights = fitted_mixtures()
    fresh, plain = ClassMixtures(5, 16, 3, momentum=0.5), ClassMixtures(5, 16, 3, momentum=0.5)
    stats = fresh.sufficient_statistics(x + 1, weights)  # new classes: k-means seeding
    plain.update(stats)
    with bf16_autocast():
        fresh.update(stats)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, **TIGHT)


def cvpr_inputs(batch=2, classes=5, size=(40, 48), feature_size=(10, 12), channels=8):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(batch, channels, *feature_size, generator=gen, requires_grad=True)
    logits = torch.randn(batch, classes, *size, generator=gen, requires_grad=True)
    target = torch.full((batch, *size), classes)
    clicks = torch.randint(0, size[0] * size[1], (batch, 12), generator=gen)
    labels = torch.randint(0, classes, (batch, 12), generator=gen)
    target.view(batch, -1).scatter_(1, clicks, labels)
    target[:, -3:] = 255
    return features, logits, target


def test_cvpr_losses_and_gradients_are_float32_under_bf16_autocast():
    features, logits, target = cvpr_inputs()
    reference = cvpr_agmm_losses(features, logits, target, 5)
    reference_grads = torch.autograd.grad(reference["total"], [features, logits])
    with bf16_autocast():
        losses = cvpr_agmm_losses(features, logits, target, 5)
    grads = torch.autograd.grad(losses["total"], [features, logits])
    for name, value in reference.items():
        assert losses[name].dtype == torch.float32
        torch.testing.assert_close(losses[name], value, **TIGHT, msg=name)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad, **TIGHT)


def test_half_inputs_give_the_float32_result_of_the_same_values():
    features, logits, target = cvpr_inputs()
    features, logits = features.detach().bfloat16(), logits.detach().bfloat16()
    losses = cvpr_agmm_losses(features, logits, target, 5)
    reference = cvpr_agmm_losses(features.float(), logits.float(), target, 5)
    for name, value in reference.items():
        torch.testing.assert_close(losses[name], value, **TIGHT, msg=name)


def test_more_valid_pixels_than_float16_can_count():
    """A 300 x 300 crop has 90,000 valid pixels (> 65,504): means over them stay right."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 300, 300, generator=gen).half()
    features = torch.randn(1, 4, 75, 75, generator=gen).half()
    target = torch.full((1, 300, 300), 3)
    target[0, ::50, ::50] = 1
    target[0, 25::50, 25::50] = 0
    tags = torch.tensor([[1.0, 1.0, 0.0]])
    posterior = torch.rand(1, 3, 300, 300, generator=gen).softmax(1).half()
    wide = {"logits": logits.float(), "posterior": posterior.float()}
    checks = [
        (absent_class_loss(logits, tags, target), absent_class_loss(wide["logits"], tags, target)),
        (
            pseudo_label_loss(logits, posterior, (target == 3).float(), "soft")[0],
            pseudo_label_loss(wide["logits"], wide["posterior"], (target == 3).float(), "soft")[0],
        ),
    ]
    losses = cvpr_agmm_losses(features, logits, target, 3, tags)
    reference = cvpr_agmm_losses(features.float(), wide["logits"], target, 3, tags)
    checks += [(losses[name], reference[name]) for name in reference]
    for value, expected in checks:
        assert expected > 0
        torch.testing.assert_close(value, expected, **TIGHT)


def test_a_class_with_more_labelled_pixels_than_float16_can_count():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 2, 300, 300, generator=gen).half()
    features = torch.randn(1, 4, 75, 75, generator=gen).half()
    target = torch.zeros(1, 300, 300, dtype=torch.long)  # 90,000 pixels of class 0
    target[0, :10] = 1
    losses = cvpr_agmm_losses(features, logits, target, 2)
    reference = cvpr_agmm_losses(features.float(), logits.float(), target, 2)
    for name, value in reference.items():
        torch.testing.assert_close(losses[name], value, **TIGHT, msg=name)
    torch.testing.assert_close(
        partial_cross_entropy(logits, target), partial_cross_entropy(logits.float(), target)
    )


def test_bilinear_taps_of_a_2048_pixel_label_map_in_half_precision():
    row = torch.arange(2048)
    col = torch.arange(2048).flip(0)
    cells, weights = bilinear_taps(row, col, (512, 512), (2048, 2048), torch.float16)
    expected_cells, expected_weights = bilinear_taps(row, col, (512, 512), (2048, 2048))
    assert torch.equal(cells, expected_cells)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=0)
    # The taps are those of F.interpolate: upsampling an index map reads them back.
    index = torch.arange(512 * 512, dtype=torch.float64).view(1, 1, 512, 512)
    upsampled = F.interpolate(index, size=(2048, 2048), mode="bilinear", align_corners=False)
    blended = (index.flatten()[cells] * weights.double()).sum(1)
    torch.testing.assert_close(blended, upsampled[0, 0, row, col])


def tiny_model(method, **kwargs):
    oem = {"warmup_steps": 0} if method == "agmm" else {}
    return tiny_segmenter(method=method, **oem, **kwargs)


@pytest.mark.parametrize("method", ["baseline", "cvpr", "agmm"])
def test_each_method_under_bf16_autocast_is_close_to_float32(method):
    """The network runs in bfloat16, so only loose agreement: the losses themselves are float32."""
    batch = next(iter(tiny_data(augment=False).train_dataloader()))
    torch.manual_seed(0)
    model = tiny_model(method).model
    if method == "agmm":  # fitted mixtures, so that every OEM term is at work
        with torch.no_grad():
            step, _ = model.losses(batch)
        model.mixtures.update(step.stats)
    reference = model.losses(batch)[0].terms
    parameters = [p for p in model.parameters() if p.requires_grad]
    reference_grads = torch.autograd.grad(sum(reference.values()), parameters, allow_unused=True)
    with bf16_autocast():
        losses = model.losses(batch)[0].terms
    grads = torch.autograd.grad(sum(losses.values()), parameters, allow_unused=True)
    assert reference.keys() == losses.keys()
    for name, value in reference.items():
        assert losses[name].dtype == torch.float32
        torch.testing.assert_close(losses[name], value, rtol=0.05, atol=0.02, msg=name)
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    reference_flat = torch.cat([g.flatten() for g in reference_grads if g is not None])
    # bfloat16 convolutions alone turn the baseline's gradient by about 0.06 in cosine.
    assert F.cosine_similarity(flat, reference_flat, dim=0) > 0.9


@pytest.mark.parametrize("method", ["baseline", "cvpr", "agmm"])
def test_bf16_mixed_training_fits_each_method(tmp_path, method):
    model = tiny_model(method)
    trainer = tiny_trainer(tmp_path, precision="bf16-mixed", max_steps=3, limit_val_batches=1)
    trainer.fit(model, tiny_data(augment=False))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"]) and torch.isfinite(metrics["val_miou"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if method == "agmm":
        assert model.model.mixtures.initialized.any()
        assert torch.isfinite(model.model.mixtures.means).all()
