"""AGMMSegmenter, the Lightning task: training steps, the refit, resuming, metrics, schedule."""

import dataclasses
import inspect
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_data, tiny_segmenter, tiny_trainer
from torchmetrics.functional.classification import multiclass_jaccard_index

from agmm_lightning import AGMMSegmenter, CAMClassifier
from agmm_lightning.agmm import OEMOptions
from agmm_lightning.errors import InputError
from agmm_lightning.tasks.base import OptimizerOptions

# The GMM terms start after one step, so that a few steps exercise all of them.
tiny_model = partial(tiny_segmenter, warmup_steps=1)
trainer = partial(tiny_trainer, limit_val_batches=0)


def test_mixtures_change_after_training_steps_and_stay_finite(tmp_path):
    model = tiny_model(mixture_count=2)
    mixtures = model.model.mixtures
    before = {k: v.clone() for k, v in mixtures.state_dict().items()}
    run = trainer(tmp_path, max_steps=3)
    run.fit(model, tiny_data())
    after = mixtures.state_dict()
    assert after["initialized"].any()
    for name in ("means", "variances", "weights"):
        assert torch.isfinite(after[name]).all()
        assert not torch.equal(after[name], before[name])
    assert "train_pseudo_coverage" in run.callback_metrics


def test_teacher_and_student_are_scored_per_class_against_the_dense_masks(tmp_path):
    """The GMM's labels (teacher) and the network's prediction (student) on the same training
    crops, and the precision of the pixels the pseudo loss supervised."""
    model = tiny_model(confidence=0.0)
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, tiny_data())
    metrics = run.callback_metrics
    for who in ("pseudo", "student"):
        per_class = torch.stack([metrics[f"train_{who}_iou_{name}"] for name in model.class_names])
        assert per_class.shape == (6,)
        assert 0 <= per_class.min() <= metrics[f"train_{who}_miou"] <= per_class.max() <= 1
    assert 0 <= metrics["train_pseudo_precision"] <= 1
    assert 0 < metrics["train_pseudo_coverage"] <= 1


def test_the_student_is_scored_on_training_crops_by_every_method(tmp_path):
    run = trainer(tmp_path, max_epochs=1)
    run.fit(tiny_model(method="cvpr"), tiny_data())
    assert 0 <= run.callback_metrics["train_student_miou"] <= 1


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
        return model.model.mixtures, run

    straight, _ = fit(tmp_path / "straight")
    interrupted, first = fit(tmp_path / "interrupted", [StopAfterEpochs(2)])
    assert first.current_epoch == 2
    assert not torch.equal(interrupted.means, straight.means)
    checkpoint = first.checkpoint_callback.best_model_path
    resumed, _ = fit(tmp_path / "resumed", ckpt_path=checkpoint)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert straight.initialized.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "oem"}, r"method must be one of \['agmm', 'cvpr', 'baseline'\], got 'oem'"),
        ({"prior": "flat"}, r"prior must be one of \['prediction', 'uniform'\]"),
        (
            {"pseudo_mode": "argmax"},
            r"pseudo_mode must be one of \['agree', 'soft', 'hard', 'surer'\]",
        ),
        ({"optimizer": "adam"}, r"optimizer must be one of \['sgd', 'adamw'\], got 'adam'"),
        ({"hard_fraction": 0.0}, r"hard_fraction must be in \(0, 1\], got 0.0"),
        ({"adaptation": 0.0}, "adaptation must be None or > 0, got 0.0"),
        ({"fit_confidence": 1.5}, "confidence and fit_confidence in \\[0, 1\\]; got 1, 0.9, 1.5"),
        ({"unlabelled_mass": -1.0}, "unlabelled_mass must be None or >= 0, got -1.0"),
        ({"arch": "NotANet"}, "arch='NotANet' is not an smp architecture; choose one of"),
        ({"encoder": "not_an_encoder"}, "encoder='not_an_encoder' is neither an smp encoder"),
    ],
)
def test_bad_arguments_are_rejected_when_the_model_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_per_class_iou_is_logged_by_name_from_the_whole_split(tmp_path):
    data = tiny_data()
    model = tiny_model()
    (metrics,) = trainer(tmp_path, limit_val_batches=None).validate(model, data, verbose=False)
    model.eval()
    predictions, masks = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            predictions.append(model.predict_logits(batch["image"]).argmax(1))
            masks.append(batch["mask"])
    prediction, mask = torch.cat(predictions), torch.cat(masks)
    expected = multiclass_jaccard_index(prediction, mask, 6, average="none", ignore_index=255)
    for name, iou in zip(data.class_names, expected.tolist(), strict=True):
        assert metrics[f"val_iou_{name}"] == pytest.approx(iou, abs=1e-6), name
    miou = multiclass_jaccard_index(prediction, mask, 6, average="macro", ignore_index=255)
    assert metrics["val_miou"] == pytest.approx(float(miou), abs=1e-6)


def test_the_learning_rate_follows_the_poly_schedule_and_is_checkpointed(tmp_path):
    model = tiny_model(lr=0.1, backbone_lr_multiplier=0.5, poly_power=0.9)
    run = trainer(tmp_path, max_steps=6, enable_checkpointing=True)
    rates = []

    class RecordRates(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    run.callbacks.append(RecordRates())
    run.fit(model, tiny_data(num_train=24))
    total = run.estimated_stepping_batches
    for step, (encoder, heads) in enumerate(rates):
        factor = (1 - step / total) ** 0.9
        assert heads == pytest.approx(0.1 * factor) and encoder == pytest.approx(0.05 * factor)
    checkpoint = torch.load(run.checkpoint_callback.best_model_path, weights_only=False)
    assert checkpoint["lr_schedulers"][0]["total_iters"] == total


def test_oem_options_have_one_home_that_the_segmenter_follows():
    """OEMOptions holds each OEM option's default and documentation; the segmenter's flat init
    arguments (the CLI's --model.<name>) must agree with it and reach the model unchanged."""
    parameters = inspect.signature(AGMMSegmenter.__init__).parameters
    defaults = OEMOptions()
    for field in dataclasses.fields(OEMOptions):
        assert parameters[field.name].default == getattr(defaults, field.name), field.name
        assert parameters[field.name].annotation == field.type, field.name
    assert OEMOptions.documentation() in (AGMMSegmenter.__doc__ or "")
    changed = {"mixture_count": 3, "pseudo_mode": "agree", "unlabelled_mass": 1.0}
    assert tiny_segmenter(**changed).model.oem == OEMOptions(**changed)
    with pytest.raises(InputError, match="oem_momentum must be in"):
        OEMOptions(oem_momentum=1.0)


@pytest.mark.parametrize("task", [AGMMSegmenter, CAMClassifier])
def test_optimizer_defaults_have_one_home(task):
    """Every task's optimizer arguments default to OptimizerOptions' values."""
    parameters = inspect.signature(task.__init__).parameters
    for field in dataclasses.fields(OptimizerOptions):
        assert parameters[field.name].default == getattr(OptimizerOptions(), field.name), field.name


def test_fused_reaches_the_model_and_the_baseline_warns_that_it_has_no_pixel_terms():
    """``fused`` is a plain init argument (the CLI's --model.init_args.fused)."""
    assert tiny_segmenter().model.fused == "auto"
    assert tiny_segmenter(method="cvpr", fused="eager").model.fused == "eager"
    with pytest.warns(UserWarning, match=r"fused='compile' \(read by cvpr and agmm only\)"):
        assert tiny_segmenter(method="baseline", fused="compile").model.fused == "compile"
    with pytest.raises(InputError, match="fused"):
        tiny_segmenter(fused="jit")


@pytest.mark.parametrize("method", ["baseline", "cvpr", "agmm"])
def test_every_method_trains_on_batches_of_mixed_forms(tmp_path, method):
    mix = {"point": 0.25, "box": 0.25, "image": 0.25, "full": 0.25}
    data = tiny_data(weak_label=mix, box_core_fraction=0.3)
    model = tiny_model(method=method)
    run = trainer(tmp_path, max_steps=3)
    run.fit(model, data)
    assert run.global_step == 3
    assert torch.isfinite(run.callback_metrics["train_loss"])


def test_mixed_forms_log_teacher_and_student_per_form(tmp_path):
    """A mix of point and box images: the GMM labels' and the network's mIoU on the training
    crops are logged for each form's images."""
    model = tiny_model()
    data = tiny_data(weak_label={"point": 0.5, "box": 0.5}, box_core_fraction=0.3)
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(model, data)
    logged = fit.callback_metrics
    for who in ("pseudo", "student"):
        for form in ("point", "box"):
            assert 0 <= float(logged[f"train_{who}_miou_{form}"]) <= 1
    assert float(logged["train_pseudo_miou_point"]) != float(logged["train_pseudo_miou_box"])
