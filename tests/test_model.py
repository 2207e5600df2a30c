"""AGMMModel, the pure-torch algorithm: the network's outputs, labelled samples and the losses."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_data, tiny_network

from agmm_lightning.agmm import AGMMModel, OEMOptions
from agmm_lightning.agmm.sampling import labelled_pixels, sample_at


def tiny_model(method="agmm", arch="Unet", hard_fraction=1.0, **oem):
    options = OEMOptions(**({"warmup_steps": 1} | oem))
    return AGMMModel(tiny_network(arch), 6, method, options, hard_fraction)


def embedding_map(model, features):
    """The embedding map of [B, D0, h, w] features, by the 1x1 convolution head."""
    return F.normalize(model.embedding_head(features), dim=1)


def test_labelled_features_are_the_upsampled_embeddings_at_the_labels():
    model = tiny_model()
    features = torch.randn(2, model.embedding_head.in_channels, 8, 10, requires_grad=True)
    embeddings = embedding_map(model, features)
    target = torch.full((2, 32, 40), 6)
    target[0, 3, 5] = 1
    target[1, 30, 39] = 4
    target[1, 0, 0] = 2
    pixels = labelled_pixels(target, 6)
    samples = sample_at(features, pixels, target.shape[-2:], model.embed)
    upsampled = F.interpolate(embeddings, size=(32, 40), mode="bilinear", align_corners=False)
    expected = torch.stack([upsampled[0, :, 3, 5], upsampled[1, :, 0, 0], upsampled[1, :, 30, 39]])
    torch.testing.assert_close(samples, expected)
    assert pixels.labels.tolist() == [1, 2, 4] and pixels.image.tolist() == [0, 1, 1]
    # Gradients reach the features through the samples as through the upsampled map.
    weights = torch.randn_like(samples)
    (grad,) = torch.autograd.grad((samples * weights).sum(), features)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), features)
    torch.testing.assert_close(grad, expected_grad)


def test_embedding_rows_equal_the_normalized_convolution_head():
    model = tiny_model()
    features = torch.randn(2, model.embedding_head.in_channels, 5, 7)
    rows = model.embed(features.permute(0, 2, 3, 1))
    torch.testing.assert_close(rows.permute(0, 3, 1, 2), embedding_map(model, features))


def test_capped_dense_labels_are_sampled_at_their_own_pixels():
    """More labelled pixels than the cap: a subset, each read at its own pixel."""
    model = tiny_model()
    features = torch.randn(3, model.embedding_head.in_channels, 8, 8)
    embeddings = embedding_map(model, features)
    target = torch.randint(6, (3, 16, 16))
    pixels = labelled_pixels(target, 6, limit=50)
    with torch.no_grad():
        samples = sample_at(features, pixels, target.shape[-2:], model.embed)
    images, labels = pixels.image, pixels.labels
    # At most the cap, shared evenly: 8 of each class (the cap's floor per class).
    assert samples.shape == (48, 64) and set(images.tolist()) == {0, 1, 2}
    assert (torch.bincount(labels, minlength=6) == 8).all()
    upsampled = F.interpolate(embeddings, size=(16, 16), mode="bilinear", align_corners=False)
    matches = (samples[:, :, None, None] - upsampled[images]).abs().amax(1) < 1e-5  # [n, H, W]
    assert matches.flatten(1).any(1).all()
    pixel = matches.flatten(1).float().argmax(1)
    assert torch.equal(target[images, pixel // 16, pixel % 16], labels)


def test_the_sample_cap_is_shared_evenly_by_the_classes():
    """A small structure beside a large background keeps all its pixels; the cap is met."""
    target = torch.full((2, 64, 64), 6)
    target[:, :48] = 0  # 6,144 background pixels
    target[0, 50:53, 10:20] = 3  # 30 pixels of a small structure
    target[1, 55:63, :40] = 5  # 320
    pixels = labelled_pixels(target, 6, limit=400)
    counts = torch.bincount(pixels.labels, minlength=6)
    assert counts.sum() == 400 and counts[3] == 30 and counts[5] == 185 and counts[0] == 185
    assert torch.equal(target[pixels.image, pixels.row, pixels.col], pixels.labels)
    assert len(set(zip(*(t.tolist() for t in pixels[:3]), strict=True))) == 400


@pytest.mark.parametrize("method", ["agmm", "cvpr", "baseline"])
def test_a_crop_without_labels_keeps_the_loss_finite(method):
    model = tiny_model(method=method, warmup_steps=0)
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "target": torch.full((2, 32, 32), 6),
        "image_classes": torch.zeros(2, 6),
    }
    batch["target"][:, :, 20:] = 255
    step, _ = model.losses(batch)
    total = sum(step.terms.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_label_values_are_rejected():
    model = tiny_model()
    batch = {"image": torch.randn(1, 3, 32, 32), "target": torch.full((1, 32, 32), 9)}
    with pytest.raises(ValueError, match="target values"):
        model.losses(batch)


def test_forward_crops_padding_back_for_any_size():
    model = tiny_model(arch="DeepLabV3Plus").eval()
    logits, features = model(torch.randn(1, 3, 37, 45))
    assert logits.shape == (1, 6, 37, 45)
    assert features.shape[-2:] == (10, 12)


def test_only_oem_mode_holds_an_embedding_head_and_mixtures():
    assert hasattr(tiny_model("agmm"), "mixtures")
    for method in ("cvpr", "baseline"):
        model = tiny_model(method)
        assert not hasattr(model, "mixtures") and not hasattr(model, "embedding_head")


def test_image_adaptation_moves_the_posterior_toward_each_images_labels():
    gen = torch.Generator().manual_seed(0)
    batch = next(iter(tiny_data(augment=False).train_dataloader()))
    labelled = batch["target"] < 6
    assert labelled.any()
    posteriors, stats = [], []
    for adaptation in (None, 1.0):
        torch.manual_seed(0)
        model = tiny_model(adaptation=adaptation, warmup_steps=10)
        features = F.normalize(torch.randn(60, 64, generator=gen), dim=1)
        weights = F.one_hot(torch.arange(60) % 6, 6).float()
        model.mixtures.update(model.mixtures.sufficient_statistics(features, weights))
        with torch.no_grad():
            step, _ = model.losses(batch)
        posteriors.append(step.posterior)
        stats.append(step.stats)
    # Before the warm-up only labelled features are fitted: the statistics do not change ...
    for name in ("weight", "sum", "square_sum"):
        torch.testing.assert_close(getattr(stats[1], name), getattr(stats[0], name))
    # ... but each image's labelled classes now explain its labelled pixels better.
    own = batch["target"].clamp(max=5)[:, None]
    own_global = posteriors[0].gather(1, own)[:, 0][labelled]
    own_adapted = posteriors[1].gather(1, own)[:, 0][labelled]
    assert own_adapted.mean() > own_global.mean()


def test_oem_mode_adds_the_cvpr_kernel_terms_with_their_weight():
    batch = next(iter(tiny_data(augment=False).train_dataloader()))
    kernel_terms = ("gmm_to_pred", "label_to_gmm", "separation")
    losses = {}
    for method, weight in (("cvpr", 1.0), ("agmm", 0.5), ("agmm", 0.0)):
        torch.manual_seed(0)  # the same network weights for every model
        model = tiny_model(method=method, lambda_kernel=weight)
        losses[method, weight] = model.losses(batch)[0].terms
    cvpr, half, off = losses["cvpr", 1.0], losses["agmm", 0.5], losses["agmm", 0.0]
    for name in kernel_terms:
        assert cvpr[name] > 0
        torch.testing.assert_close(half[name], 0.5 * cvpr[name])
        assert name not in off
    # seg comes from the kernel block when it runs, else from the partial cross-entropy: the same.
    torch.testing.assert_close(half["seg"], off["seg"])
    # The kernel terms train the decoder features themselves, not only the embedding head.
    model = tiny_model(lambda_kernel=1.0)
    step, _ = model.losses(batch)
    step.terms["label_to_gmm"].backward()
    assert model.network.decoder.blocks[-1].conv1[0].weight.grad.abs().sum() > 0
    assert model.embedding_head.weight.grad is None


def test_the_model_is_built_from_its_options():
    options = OEMOptions(mixture_count=2, embed_dim=16)
    model = AGMMModel(tiny_network(), 6, "agmm", options)
    assert model.mixtures.means.shape == (6, 2, 16) and model.embedding_head.out_channels == 16
    assert options.effective_temperature == 16.0
    assert replace(options, temperature=2.0).effective_temperature == 2.0


@pytest.mark.parametrize("pseudo_gradient", ["network", "head"])
def test_the_pseudo_loss_trains_the_decoder_only_with_the_network_gradient(pseudo_gradient):
    batch = next(iter(tiny_data(augment=False).train_dataloader()))
    torch.manual_seed(0)
    model = tiny_model(pseudo_gradient=pseudo_gradient, pseudo_mode="soft")
    features = F.normalize(torch.randn(60, 64), dim=1)
    model.mixtures.update(
        model.mixtures.sufficient_statistics(features, F.one_hot(torch.arange(60) % 6, 6).float())
    )
    step, _ = model.losses(batch, step=5)
    step.terms["pseudo"].backward()
    assert step.terms["pseudo"] > 0
    assert model.network.segmentation_head[0].weight.grad.abs().sum() > 0
    decoder_grad = model.network.decoder.blocks[-1].conv1[0].weight.grad
    assert (decoder_grad is not None and decoder_grad.abs().sum() > 0) == (
        pseudo_gradient == "network"
    )


def test_classify_is_the_segmentation_head_at_feature_resolution():
    model = tiny_model()
    features = torch.randn(2, model.embedding_head.in_channels, 8, 10)
    torch.testing.assert_close(model.classify(features), model.network.segmentation_head(features))


@pytest.mark.parametrize(
    ("method", "touching"),
    [("baseline", set()), ("cvpr", {"absent"}), ("agmm", {"absent", "pseudo"})],
)
def test_a_tag_only_image_is_taught_by_the_absent_and_gmm_terms_alone(method, touching):
    """In a mixed batch, an image with tags and no labelled pixel gets gradient only from the
    absent-class term and, in OEM mode, the GMM pseudo loss, whose posterior stays inside its
    tags; every term of labelled pixels (seg, kernel, maximization) leaves it alone."""
    torch.manual_seed(0)
    model = tiny_model(method, warmup_steps=0).eval()  # BatchNorm would couple the images
    target = torch.full((2, 32, 32), 6)
    target[0, 5:8, 5:8], target[0, 20:23, 20:23], target[0, 10, 25] = 1, 0, 3
    tags = torch.zeros(2, 6)
    tags[0, [0, 1, 3]] = 1
    tags[1, [0, 2]] = 1
    batch = {"image": torch.randn(2, 3, 32, 32), "target": target, "image_classes": tags}
    if method == "agmm":  # mixtures fitted from the first image's labels
        model.mixtures.update(model.losses(batch)[0].stats)
    step, logits = model.losses(batch, step=5)
    touched = set()
    for name, term in step.terms.items():
        (grad,) = torch.autograd.grad(term, logits, retain_graph=True, allow_unused=True)
        if grad is not None and grad[1].abs().sum() > 0:
            touched.add(name)
    assert touched == touching
    if method == "agmm":
        untagged = step.posterior[1][tags[1] == 0]
        assert untagged.abs().sum() == 0 and step.pseudo_cells[1].all()


@pytest.mark.parametrize("method", ["baseline", "cvpr", "agmm"])
def test_a_mixed_batch_weighs_each_form_by_its_pixels_and_images(method):
    """A batch of point and box images: the terms of labelled pixels (seg, label_to_gmm) equal
    the per-form terms computed apart, weighted by each form's labelled pixels, so no form counts
    more for being mixed with another. (The absent-class and kernel terms average over the pixels,
    images and class pairs they apply to, which the crops decide.)"""
    data = tiny_data(weak_label={"point": 0.5, "box": 0.5}, box_core_fraction=0.3, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model = tiny_model(method).eval()

    def terms(rows):
        part = {
            k: v[rows] if torch.is_tensor(v) else [v[i] for i in rows] for k, v in batch.items()
        }
        with torch.no_grad():
            return model.losses(part)[0].terms, int((part["target"] < 6).sum()), len(rows)

    whole, _, _ = terms(list(range(8)))
    forms = {
        form: [i for i, f in enumerate(batch["form"]) if f == form] for form in ("point", "box")
    }
    assert all(forms.values())
    parts = [terms(rows) for rows in forms.values()]
    weighting = {"seg": 1, "label_to_gmm": 1}
    for name, column in weighting.items():
        if name not in whole:
            continue
        weights = [float(part[column]) for part in parts]
        expected = sum(float(p[0][name]) * w for p, w in zip(parts, weights, strict=True))
        torch.testing.assert_close(
            float(whole[name]), expected / sum(weights), rtol=1e-5, atol=1e-6
        )
