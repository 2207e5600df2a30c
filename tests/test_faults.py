"""Faults a long run must survive, and options that cannot work refused before it starts."""

import warnings
from functools import partial

import helpers
import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_segmenter

from agmm_lightning.agmm.losses import partial_cross_entropy

tiny_data = partial(helpers.tiny_data, batch_size=2, augment=False)
quiet_trainer = partial(helpers.tiny_trainer, limit_val_batches=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 16, "tile_stride": 20}, r"tile_stride must be in 1..tile_size=16"),
        ({"tile_stride": 8}, "tile_stride=8 needs tile_size"),
        ({"tile_size": 0}, "tile_size must be None"),
        ({"test_scales": ()}, "test_scales must be one or more positive scales"),
        ({"test_scales": (1.0, -0.5)}, "test_scales must be one or more positive scales"),
    ],
)
def test_inference_options_that_cannot_cover_an_image_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_segmenter(**kwargs)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("cvpr", {"hard_fraction": 0.5}, r"hard_fraction=0.5 \(read by baseline and agmm only\)"),
        ("baseline", {"mixture_count": 4}, r"mixture_count=4 \(read by agmm only\)"),
        ("cvpr", {"lambda_gmm": 0.0}, r"lambda_gmm=0.0 \(read by agmm only\)"),
    ],
)
def test_options_a_method_does_not_use_are_warned(method, kwargs, message):
    with pytest.warns(UserWarning, match=rf"method='{method}' does not use {message}"):
        tiny_segmenter(method=method, **kwargs)


def test_the_baseline_uses_hard_example_mining():
    batch = next(iter(tiny_data(weak_label="full").train_dataloader()))
    losses = {}
    for fraction in (1.0, 0.25):
        torch.manual_seed(0)
        model = tiny_segmenter(method="baseline", hard_fraction=fraction).model
        step, logits = model.losses(batch)
        losses[fraction] = step.terms["seg"]
        expected = partial_cross_entropy(logits, batch["target"], hard_fraction=fraction)
        torch.testing.assert_close(losses[fraction], expected)
    assert losses[0.25] > losses[1.0]


def test_one_refit_per_optimizer_step_under_gradient_accumulation(tmp_path):
    """Two micro-batches, one step: the mixtures are fitted once to both batches' statistics."""
    data = tiny_data()
    first, second = list(data.train_dataloader())[:2]
    torch.manual_seed(0)
    model = tiny_segmenter(lr=0.0, warmup_steps=100, mixture_count=2)
    torch.manual_seed(0)
    reference = tiny_segmenter(lr=0.0, warmup_steps=100, mixture_count=2).train()
    quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=2).fit(model, data)
    with torch.no_grad():
        stats = [reference.model.losses(batch)[0].stats for batch in (first, second)]
    expected = reference.model.mixtures
    expected.update(stats[0] + stats[1])
    assert expected.initialized.any()
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(model.model.mixtures.state_dict()[name], value, msg=name)


class PoisonBatch(pl.Callback):
    """Turn the images of one training batch into NaN, as a diverging forward pass would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.step:
            batch["image"].fill_(float("nan"))


@pytest.mark.parametrize("method", ["agmm", "baseline"])
def test_a_nan_batch_is_skipped_and_training_goes_on(tmp_path, method):
    model = tiny_segmenter(method=method, **({"warmup_steps": 1} if method == "agmm" else {}))
    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[PoisonBatch(step=2)])
    with pytest.warns(UserWarning, match="step 2: the loss or its gradients were NaN or inf"):
        trainer.fit(model, tiny_data())
    assert trainer.global_step == 4 and model.skipped_steps == 1
    for name, value in model.state_dict().items():
        assert value.is_floating_point() is False or torch.isfinite(value).all(), name
    if method == "agmm":
        assert int(model.skipped_refits) == 1
        assert model.model.mixtures.initialized.any()
        assert float(trainer.callback_metrics["mixture_skipped_refits"]) == 1.0
    # The model still predicts: BatchNorm statistics spoilt by the NaN batch were restarted.
    model.eval()
    with torch.no_grad():
        logits, _ = model(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(logits).all()


def test_skipped_refits_are_warned_at_the_end_of_the_epoch(tmp_path):
    model = tiny_segmenter(warmup_steps=1)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[PoisonBatch(step=1)])
    with pytest.warns(UserWarning, match=r"1 mixture refit\(s\) in epoch 0 were skipped"):
        trainer.fit(model, tiny_data())


def test_training_crops_that_would_be_padded_are_warned_before_training(tmp_path):
    """A crop that is not a multiple of the output stride gets a padding band in every step."""
    stride = tiny_segmenter().model.network.encoder.output_stride
    with pytest.warns(UserWarning, match=rf"crop_size={stride + 8} is not a multiple .* {stride}"):
        quiet_trainer(tmp_path, max_steps=1).fit(
            tiny_segmenter(), tiny_data(image_size=2 * stride, crop_size=stride + 8)
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not a multiple of the encoder's output stride")
        quiet_trainer(tmp_path, max_steps=1).fit(
            tiny_segmenter(), tiny_data(image_size=2 * stride, crop_size=stride)
        )
