"""AGMMSegmenter and the OEM callback: training steps, sampling, mixtures and resuming."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from agmm_lightning import AGMMSegmenter
from agmm_lightning.data import SyntheticDataModule


def tiny_data(**kwargs):
    args = dict(num_train=8, num_val=4, num_test=4, image_size=32, crop_size=32, batch_size=4)
    return SyntheticDataModule(**(args | kwargs))


def tiny_model(**kwargs):
    args = dict(num_classes=6, arch="Unet", encoder="tu-test_resnet", warmup_steps=1)
    return AGMMSegmenter(**(args | kwargs))


def trainer(tmp_path, **kwargs):
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    return pl.Trainer(**(args | kwargs))


def test_mixtures_change_after_training_steps_and_stay_finite(tmp_path):
    model = tiny_model(mixture_count=2)
    before = {k: v.clone() for k, v in model.mixtures.state_dict().items()}
    trainer(tmp_path, max_steps=3).fit(model, tiny_data())
    after = model.mixtures.state_dict()
    assert after["initialized"].any()
    for name in ("means", "variances", "weights"):
        assert torch.isfinite(after[name]).all()
        assert not torch.equal(after[name], before[name])
    assert "train_pseudo_coverage" in trainer_metrics(tmp_path, model)


def trainer_metrics(tmp_path, model):
    run = trainer(tmp_path, max_steps=1)
    run.fit(model, tiny_data())
    return run.callback_metrics


class StopAfterEpochs(pl.Callback):
    """Interrupt a run at the end of an epoch, as a crash or a time limit would."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def test_resume_restores_the_mixtures_exactly(tmp_path):
    def fit(root, callbacks=(), ckpt_path=None):
        pl.seed_everything(0)
        model = tiny_model(mixture_count=2, oem_momentum=0.5)
        run = trainer(root, max_epochs=3, enable_checkpointing=True, callbacks=list(callbacks))
        run.fit(model, tiny_data(augment=False), ckpt_path=ckpt_path)
        return model, run

    straight, _ = fit(tmp_path / "straight")
    interrupted, first = fit(tmp_path / "interrupted", [StopAfterEpochs(2)])
    assert first.current_epoch == 2
    assert not torch.equal(interrupted.mixtures.means, straight.mixtures.means)
    checkpoint = first.checkpoint_callback.best_model_path
    resumed, _ = fit(tmp_path / "resumed", ckpt_path=checkpoint)
    for name, value in straight.mixtures.state_dict().items():
        torch.testing.assert_close(resumed.mixtures.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert straight.mixtures.initialized.any()


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
    batch = {"target": target, "image_classes": torch.ones(2, 6)}
    samples, labels, images, allowed = model._labelled_samples(batch, features, target)
    upsampled = F.interpolate(embeddings, size=(32, 40), mode="bilinear", align_corners=False)
    expected = torch.stack([upsampled[0, :, 3, 5], upsampled[1, :, 0, 0], upsampled[1, :, 30, 39]])
    torch.testing.assert_close(samples, expected)
    assert labels.tolist() == [1, 2, 4] and images.tolist() == [0, 1, 1] and allowed.all()
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
    """More labelled pixels than max_labelled_samples: a subset, each read at its own pixel."""
    model = tiny_model(max_labelled_samples=50)
    features = torch.randn(3, model.embedding_head.in_channels, 8, 8)
    embeddings = embedding_map(model, features)
    target = torch.randint(6, (3, 16, 16))
    batch = {"target": target, "image_classes": torch.ones(3, 6)}
    with torch.no_grad():
        samples, labels, images, _ = model._labelled_samples(batch, features, target)
    assert samples.shape == (50, 64) and set(images.tolist()) == {0, 1, 2}
    upsampled = F.interpolate(embeddings, size=(16, 16), mode="bilinear", align_corners=False)
    matches = (samples[:, :, None, None] - upsampled[images]).abs().amax(1) < 1e-5  # [n, H, W]
    assert matches.flatten(1).any(1).all()
    pixel = matches.flatten(1).float().argmax(1)
    assert torch.equal(target[images, pixel // 16, pixel % 16], labels)


@pytest.mark.parametrize("method", ["agmm", "cvpr", "baseline"])
def test_a_crop_without_labels_keeps_the_loss_finite(method):
    model = tiny_model(method=method, warmup_steps=0)
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "target": torch.full((2, 32, 32), 6),
        "image_classes": torch.zeros(2, 6),
    }
    batch["target"][:, :, 20:] = 255
    losses, _ = model.compute_losses(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_label_values_are_rejected():
    model = tiny_model()
    batch = {"image": torch.randn(1, 3, 32, 32), "target": torch.full((1, 32, 32), 9)}
    with pytest.raises(ValueError, match="target values"):
        model.compute_losses(batch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "oem"}, r"method must be one of \['agmm', 'cvpr', 'baseline'\], got 'oem'"),
        ({"prior": "flat"}, r"prior must be one of \['prediction', 'uniform'\]"),
        ({"pseudo_mode": "argmax"}, r"pseudo_mode must be one of \['soft', 'hard'\]"),
        ({"optimizer": "adam"}, r"optimizer must be one of \['sgd', 'adamw'\], got 'adam'"),
        ({"hard_fraction": 0.0}, r"hard_fraction must be in \(0, 1\], got 0.0"),
        ({"adaptation": 0.0}, "adaptation must be None or > 0, got 0.0"),
    ],
)
def test_bad_arguments_are_rejected_when_the_model_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_forward_crops_padding_back_for_any_size():
    model = tiny_model(arch="DeepLabV3Plus").eval()
    logits, features = model(torch.randn(1, 3, 37, 45))
    assert logits.shape == (1, 6, 37, 45)
    assert features.shape[-2:] == (10, 12)


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
            _, output = model.compute_losses(batch)
        posteriors.append(output["posterior"])
        stats.append(output["mixture_stats"])
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
        losses[method, weight], _ = model.compute_losses(batch)
    cvpr, half, off = losses["cvpr", 1.0], losses["agmm", 0.5], losses["agmm", 0.0]
    for name in kernel_terms:
        assert cvpr[name] > 0
        torch.testing.assert_close(half[name], 0.5 * cvpr[name])
        assert name not in off
    # The kernel terms train the decoder features themselves, not only the embedding head.
    model = tiny_model(lambda_kernel=1.0)
    loss, _ = model.compute_losses(batch)
    loss["label_to_gmm"].backward()
    assert model.model.decoder.blocks[-1].conv1[0].weight.grad.abs().sum() > 0
    assert model.embedding_head.weight.grad is None
