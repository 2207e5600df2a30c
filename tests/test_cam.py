"""Stage 1 of image-level supervision: CAMClassifier, its pseudo labels and the two-stage flow."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import helpers
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import TINY_ENCODER, copy_fixture, tiny_classifier, tiny_trainer
from PIL import Image

from agmm_lightning import CAMClassifier
from agmm_lightning.callbacks import PredictionWriter
from agmm_lightning.cam import CAMModel, cam_pseudo_labels, normalize_cams
from agmm_lightning.cli import main
from agmm_lightning.data import VOCDataModule
from agmm_lightning.encoders import build_encoder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
VOC_CLASSES = 21

pytestmark = pytest.mark.filterwarnings("ignore:No positive samples found in target")


tiny_data = partial(helpers.tiny_data, num_train=4, num_val=2, batch_size=2, weak_label="image")


# --------------------------------------------------------------------------------------------
# The pure-torch model: no Trainer, no LightningModule
# --------------------------------------------------------------------------------------------


def test_the_cam_model_runs_without_lightning() -> None:
    torch.manual_seed(0)
    model = CAMModel(build_encoder(TINY_ENCODER, None, output_stride=16), 6, cam_scales=(1.0,))
    assert not any(isinstance(module, pl.LightningModule) for module in model.modules())
    images = torch.randn(2, 3, 32, 48)
    tags = model.foreground_tags(torch.tensor([[1.0, 0, 1, 0, 0, 1], [1.0, 0, 0, 0, 0, 0]]))
    assert tags.tolist() == [[0, 1, 0, 0, 1], [0, 0, 0, 0, 0]]
    loss, logits = model.loss(images, tags)
    assert logits.shape == (2, 5) and loss.ndim == 0
    loss.backward()
    assert model.classifier.weight.grad is not None
    with torch.no_grad():
        labels = model.pseudo_labels(model.class_activation_maps(images, tags))
    assert labels.shape == (2, 32, 48) and labels.dtype == torch.long
    # Background, unlabelled (C = 6) and each image's own tags only.
    assert set(labels[0].unique().tolist()) <= {0, 2, 5, 6}
    assert (labels[1] == 0).all()


def test_the_task_trains_the_model_it_holds() -> None:
    task = tiny_classifier(background_index=3, foreground_threshold=0.5)
    assert isinstance(task.model, CAMModel)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task(images), task.model(images))
    grouped = [p for group in task.parameter_groups() for p in group["params"]]
    assert {id(p) for p in grouped} == {id(p) for p in task.model.parameters()}


def test_checkpoints_from_before_the_model_split_load(tmp_path: Path) -> None:
    trained = tiny_classifier()
    assert all(key.startswith("model.") for key in trained.state_dict())
    # The task held the encoder and the classifier itself: encoder.*, classifier.weight.
    old_keys = {k.removeprefix("model."): v for k, v in trained.state_dict().items()}
    assert "classifier.weight" in old_keys
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": old_keys,
            "hyper_parameters": dict(trained.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    restored = CAMClassifier.load_from_checkpoint(path)
    for key, tensor in trained.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], tensor, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# CAMs and thresholds
# --------------------------------------------------------------------------------------------


def test_cams_are_masked_by_the_tags() -> None:
    model = tiny_classifier(cam_scales=(1.0, 0.5), cam_flip=True).model.eval()
    images = torch.randn(2, 3, 32, 48)
    tags = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    with torch.no_grad():
        cams = model.class_activation_maps(images, tags)
    assert cams.shape == (2, 5, 32, 48)
    absent = tags == 0
    assert (cams[absent] == 0).all()
    assert cams.min() >= 0 and cams.max() <= 1
    # No tag at all: background everywhere.
    assert (model.pseudo_labels(cams)[1] == 0).all()


def test_normalisation_is_min_max_per_class_and_image() -> None:
    cams = torch.stack([torch.linspace(2, 6, 12).view(3, 4), torch.full((3, 4), 3.0)])[None]
    normalized = normalize_cams(cams, torch.tensor([[1.0, 1.0]]))
    assert normalized[0, 0].min() == 0 and normalized[0, 0].max() == pytest.approx(1, abs=1e-4)
    assert (normalized[0, 1] == 0).all()  # a constant map carries no location


def test_thresholds_give_foreground_background_and_unlabelled_bands() -> None:
    # Two maps (classes 1 and 3) over five pixels; the strongest decides.
    cams = torch.tensor([[[0.9, 0.7, 0.5, 0.25, 0.1], [0.2, 0.1, 0.6, 0.0, 0.05]]])[..., None]
    labels = partial(
        cam_pseudo_labels,
        cams,
        torch.tensor([1, 3]),
        background_index=0,
        unlabeled=6,
        background_threshold=0.25,
    )
    assert labels(foreground_threshold=0.7).flatten().tolist() == [1, 6, 6, 0, 0]
    assert labels(foreground_threshold=0.25).flatten().tolist() == [1, 1, 3, 0, 0]


def test_background_index_other_than_zero() -> None:
    model = tiny_classifier(num_classes=4, background_index=3).model
    assert model.foreground_classes.tolist() == [0, 1, 2]
    cams = torch.tensor([[[[0.9]], [[0.1]], [[0.0]]], [[[0.1]], [[0.2]], [[0.0]]]])
    assert model.pseudo_labels(cams).flatten().tolist() == [0, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"background_index": 6}, "background_index must be in 0..5"),
        ({"foreground_threshold": 0.2}, "background_threshold <= foreground_threshold"),
        ({"cam_scales": ()}, "cam_scales"),
        ({"encoder": "not_an_encoder"}, "encoder='not_an_encoder' is neither an smp encoder"),
        ({"encoder_weights": "typo.pth"}, "'typo.pth' is neither 'imagenet', None, nor an"),
        ({"optimizer": "adam"}, r"optimizer must be one of \['sgd', 'adamw'\], got 'adam'"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_classifier(**kwargs)


def test_tags_of_the_wrong_length_are_rejected() -> None:
    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"image_classes of shape \[B, 6\]"):
        model.training_step(
            {"image": torch.randn(2, 3, 32, 32), "image_classes": torch.ones(2, 5)}, 0
        )


def test_predict_without_tags_says_how_to_get_them() -> None:
    batch = {"image": torch.randn(1, 3, 32, 32), "name": ["a"]}
    with pytest.raises(ValueError, match="predict_split='train'"):
        tiny_classifier().predict_step(batch, 0)


# --------------------------------------------------------------------------------------------
# Training, validation and prediction
# --------------------------------------------------------------------------------------------


def test_fit_logs_classification_and_cam_label_quality(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(tiny_classifier(), tiny_data())
    logged = set(trainer.callback_metrics)
    expected = {"train_loss", "train_map", "train_f1", "val_loss", "val_map", "val_f1"}
    expected |= {"val_cam_miou", "val_pseudo_miou", "val_pseudo_coverage"}
    assert expected <= logged


def test_predict_writes_pseudo_labels_of_the_training_scenes(tmp_path: Path) -> None:
    model = tiny_classifier(output_dir=str(tmp_path / "cams"), foreground_threshold=0.5)
    data = tiny_data(predict_split="train")
    trainer = tiny_trainer(tmp_path, callbacks=[PredictionWriter()])
    trainer.predict(model, data, return_predictions=False)
    files = sorted((tmp_path / "cams").glob("*.png"))
    assert [path.stem for path in files] == [f"train_{i:05d}" for i in range(4)]
    data.setup("predict")
    for path, sample in zip(files, data.datasets["predict"], strict=True):  # type: ignore[arg-type]
        labels = np.array(Image.open(path))
        assert labels.dtype == np.uint8 and labels.shape == (32, 32)
        tagged = set(np.flatnonzero(sample["image_classes"].numpy()).tolist())
        # Only background, unlabelled (C = 6) and the image's own tags.
        assert set(np.unique(labels).tolist()) <= tagged | {0, 6}
    quality = model.pseudo_label_quality
    assert set(quality) == {"cam_miou", "pseudo_miou", "pseudo_coverage"}
    assert 0 <= quality["pseudo_coverage"] <= 1


def test_predict_split_train_needs_image_labels() -> None:
    with pytest.raises(ValueError, match="weak_label='image'"):
        tiny_data(weak_label="point", predict_split="train")


# --------------------------------------------------------------------------------------------
# The two stages through the command line, on the VOC fixtures
# --------------------------------------------------------------------------------------------


def test_two_stage_cli_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cams = tmp_path / "cams"

    def cli(*args: str) -> None:
        quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
        main([*args, f"--trainer.default_root_dir={tmp_path}", *quiet])

    stage_one = ["--config", "tests/conf/voc_cam.yaml", f"--model.init_args.output_dir={cams}"]
    cli("fit", *stage_one, "--trainer.fast_dev_run=true")
    # fast_dev_run saves no checkpoint: one step and a checkpoint for predict.
    cli("fit", *stage_one, "--trainer.max_steps=1")
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    cli("predict", *stage_one, f"--ckpt_path={checkpoint}")

    ids = ["2007_000032", "2007_000039", "2008_000008"]
    assert sorted(path.stem for path in cams.glob("*.png")) == ids
    for name in ids:
        written = Image.open(cams / f"{name}.png")
        assert written.mode == "P" and written.size == (56, 40)
        assert max(written.getdata()) <= VOC_CLASSES
    # Stage 2 reads them back unchanged as its target maps (unlabelled = C).
    dataset = VOCDataModule(str(DATA / "voc"), weak_label="image", cam_dir=str(cams))
    train = dataset.build_dataset("train")
    name, _, mask = train.load(0)
    target = train.weak_label(name, mask).target
    assert np.array_equal(target, np.array(Image.open(cams / f"{name}.png")))

    stage_two = ["--config", "tests/conf/voc_image.yaml", f"--data.init_args.cam_dir={cams}"]
    cli("fit", *stage_two, "--trainer.fast_dev_run=true")


# --------------------------------------------------------------------------------------------
# Bad inputs of the image-level form: clear errors naming the file
# --------------------------------------------------------------------------------------------


def test_tag_vectors_of_the_wrong_length_name_the_file(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    table = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item()
    table["2007_000032"] = np.zeros(19, np.float32)
    np.save(root / "cls_labels_onehot.npy", table)  # type: ignore[arg-type]
    data = VOCDataModule(str(root), weak_label="image", tags_source="onehot")
    with pytest.raises(ValueError, match=r"cls_labels_onehot\.npy: tags of '2007_000032' have 19"):
        data.build_dataset("train")


def test_a_cam_folder_missing_ids_names_the_file(tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    cams.mkdir()
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(cams / "2007_000032.png")
    data = VOCDataModule(str(DATA / "voc"), weak_label="image", cam_dir=str(cams))
    with pytest.raises(
        FileNotFoundError, match=r"cams/2007_000039\.png: weak-label file not found"
    ):
        data.build_dataset("train")


def test_a_cam_label_of_another_size_names_the_file(tmp_path: Path) -> None:
    cams = tmp_path / "cams"
    cams.mkdir()
    for name in ("2007_000032", "2007_000039", "2008_000008"):
        Image.fromarray(np.zeros((20, 28), np.uint8)).save(cams / f"{name}.png")
    data = VOCDataModule(str(DATA / "voc"), weak_label="image", cam_dir=str(cams))
    with pytest.raises(ValueError, match=r"cams/2007_000032\.png: size 28x20"):
        data.setup("fit")
