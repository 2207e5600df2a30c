"""The embedded synthetic dataset and the base DataModule machinery."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from agmm_lightning.data import AGMMDataModule, SyntheticDataModule
from agmm_lightning.data.synthetic import SHAPE_NAMES, render_scene
from agmm_lightning.weak_labels import simulate_weak_label, tags_from_mask, weak_label_rng

FORMS = ("full", "point", "scribble", "block", "box", "image")


def _module(**kwargs: Any) -> SyntheticDataModule:
    options: dict[str, Any] = {"num_train": 8, "num_val": 2, "num_test": 2, "batch_size": 4}
    options.update(kwargs)
    return SyntheticDataModule(**options)


def _first_batch(module: SyntheticDataModule) -> dict[str, Any]:
    module.setup("fit")
    return next(iter(module.train_dataloader()))


def test_scenes_are_seeded() -> None:
    image, mask = render_scene(np.random.default_rng([0, 0, 3]), 96, 6)
    again, mask_again = render_scene(np.random.default_rng([0, 0, 3]), 96, 6)
    other, _ = render_scene(np.random.default_rng([0, 0, 4]), 96, 6)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert mask.shape == (96, 96) and set(np.unique(mask)) <= set(range(6))
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    assert not np.array_equal(image, other)


def test_dataset_images_and_weak_labels_are_reproducible() -> None:
    first, second = (_module(seed=1).build_dataset("train") for _ in range(2))
    name, image, mask = first.load(2)
    assert name == "train_00002"
    _, image_again, mask_again = second.load(2)
    assert np.array_equal(image, image_again) and np.array_equal(mask, mask_again)
    points = first.weak_label(name, mask).points
    assert points is not None and len(points) > 0
    assert np.array_equal(points, second.weak_label(name, mask).points)
    assert not np.array_equal(image, first.load(3)[1])
    assert not np.array_equal(image, _module(seed=2).build_dataset("train").load(2)[1])


def test_colour_is_a_strong_cue_to_the_class_but_not_a_decisive_one() -> None:
    pixels, labels = [], []
    for index in range(30):
        image, mask = render_scene(np.random.default_rng([7, 0, index]), 96, 6)
        pixels.append(image.reshape(-1, 3).astype(np.float64))
        labels.append(mask.reshape(-1))
    colours, classes = np.concatenate(pixels), np.concatenate(labels)
    means = np.stack([colours[classes == c].mean(0) for c in range(6)])
    # A nearest-mean colour classifier among the 5 shapes beats chance (0.2) by far, because each
    # class has its hue band, but is not always right: bands touch, textures mix two colours.
    foreground = classes > 0
    distances = np.linalg.norm(colours[foreground, None] - means[None, 1:], axis=-1)
    accuracy = np.mean(distances.argmin(1) + 1 == classes[foreground])
    assert 0.6 < accuracy < 0.95


@pytest.mark.parametrize("form", FORMS)
def test_train_batch_contract(form: str) -> None:
    batch = _first_batch(_module(weak_label=form))
    expected = {"image", "target", "image_classes", "mask", "name"}
    assert set(batch) == expected | ({"allowed"} if form == "box" else set())
    assert batch["image"].shape == (4, 3, 96, 96) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (4, 96, 96) and batch["target"].dtype == torch.int64
    assert batch["mask"].shape == (4, 96, 96) and batch["mask"].dtype == torch.int64
    assert batch["image_classes"].shape == (4, 6)
    assert batch["image_classes"].dtype == torch.float32
    assert len(batch["name"]) == 4 and all(isinstance(n, str) for n in batch["name"])
    assert set(batch["target"].unique().tolist()) <= set(range(7)) | {255}
    if form == "box":
        assert batch["allowed"].shape == (4, 6, 96, 96) and batch["allowed"].dtype == torch.bool


@pytest.mark.parametrize("form", ["full", "point", "scribble", "block", "box"])
def test_weak_labels_stay_aligned_with_the_dense_mask(form: str) -> None:
    batch = _first_batch(_module(weak_label=form, batch_size=8))
    target, mask = batch["target"], batch["mask"]
    labelled = target < 6
    agreement = (target[labelled] == mask[labelled]).float().mean().item()
    if form == "point":
        # A 3-px disc may spill over a thin segment, and nearest downscaling of the mask drops
        # thin parts; the clicks themselves follow the geometry (see test_transforms).
        assert agreement > 0.85
    else:
        assert agreement == 1.0
    if form == "full":
        assert torch.equal(target, mask)


def test_simulation_options_reach_the_training_labels() -> None:
    without_core = _first_batch(_module(weak_label="box", batch_size=8))["target"]
    assert set(without_core.unique().tolist()) <= {0, 6, 255}
    batch = _first_batch(_module(weak_label="box", batch_size=8, box_core_fraction=0.3))
    core = (batch["target"] > 0) & (batch["target"] < 6)
    assert core.any()
    assert batch["allowed"].gather(1, batch["target"].clamp(max=5)[:, None])[:, 0][core].all()
    # Mostly right; a ring's centre or an occluded centre is not its box's class.
    assert (batch["target"][core] == batch["mask"][core]).float().mean() > 0.6
    coverage = [
        (_first_batch(_module(weak_label="block", block_fraction=f))["target"] < 6).float().mean()
        for f in (0.05, 0.3)
    ]
    assert coverage[1] > 2 * coverage[0]


def test_boxes_without_a_labelled_core_warn() -> None:
    with pytest.warns(UserWarning, match="box_core_fraction=0"):
        _module(weak_label="box")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _module(weak_label="box", box_core_fraction=0.3)
        _module(weak_label="point")


def test_image_form_gives_tags_and_an_unlabelled_target() -> None:
    module = _module(weak_label="image", crop_size=24)
    batch = _first_batch(module)
    assert set(batch["target"].unique().tolist()) <= {6, 255}
    dataset = module.datasets["train"]
    for name, tags in zip(batch["name"], batch["image_classes"], strict=True):
        _, _, mask = dataset.load(int(name.split("_")[1]))
        assert tags.tolist() == tags_from_mask(mask, 6).tolist()


def test_image_classes_describe_the_whole_image_not_the_crop() -> None:
    module = _module(crop_size=24, batch_size=8)
    batch = _first_batch(module)
    dataset = module.datasets["train"]
    for name, classes in zip(batch["name"], batch["image_classes"], strict=True):
        _, _, mask = dataset.load(int(name.split("_")[1]))
        points = dataset.weak_label(name, mask).points
        assert points is not None
        expected = np.zeros(6, np.float32)
        expected[points[:, 2].astype(int)] = 1
        assert classes.tolist() == expected.tolist()
    crop_classes = torch.stack([(batch["target"] == c).flatten(1).any(1) for c in range(6)], 1)
    assert (batch["image_classes"].bool() & ~crop_classes).any()


def test_crop_padding_is_void() -> None:
    batch = _first_batch(_module(weak_label="full", crop_size=200))  # larger than 2 x 96
    padding = batch["mask"] == 255
    assert padding.any() and torch.equal(batch["target"] == 255, padding)
    box = _first_batch(_module(weak_label="box", crop_size=200))
    padding = box["mask"] == 255
    assert torch.equal(box["target"] == 255, padding)
    assert not box["allowed"].permute(1, 0, 2, 3)[:, padding].any()


@pytest.mark.parametrize(
    ("split", "keys"), [("val", {"image", "mask", "name"}), ("predict", {"image", "name"})]
)
def test_eval_batches_are_full_images(split: str, keys: set[str]) -> None:
    module = _module(batch_size=2)
    module.setup("validate" if split == "val" else "predict")
    loader = module.val_dataloader() if split == "val" else module.predict_dataloader()
    batch = next(iter(loader))
    assert set(batch) == keys
    assert batch["image"].shape == (2, 3, 96, 96)
    assert batch["name"] == [f"{'val' if split == 'val' else 'test'}_0000{i}" for i in (0, 1)]
    if split == "val":
        assert batch["mask"].dtype == torch.int64
        assert set(batch["mask"].unique().tolist()) <= set(range(6))


def test_workers_epochs_and_seeds() -> None:
    module = _module(num_workers=2, crop_size=48)
    module.setup("fit")
    loader = module.train_dataloader()
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
        epochs.append(list(loader))
    images = [
        {
            name: image
            for batch in epoch
            for name, image in zip(batch["name"], batch["image"], strict=True)
        }
        for epoch in epochs
    ]
    assert images[0].keys() == images[1].keys()
    assert all(not torch.equal(images[0][name], images[1][name]) for name in images[0])
    first = epochs[0][0]
    again = _first_batch(_module(num_workers=2, crop_size=48))
    assert again["name"] == first["name"] and torch.equal(again["image"], first["image"])
    assert torch.equal(again["target"], first["target"])
    other = _first_batch(_module(num_workers=2, crop_size=48, seed=1))
    assert not torch.equal(other["image"], first["image"])


def test_module_metadata_and_validation() -> None:
    module = _module(num_classes=4)
    assert isinstance(module, AGMMDataModule)
    assert module.num_classes == 4
    assert module.class_names == ["background", *SHAPE_NAMES[:3]]
    assert module.hparams["num_train"] == 8 and module.hparams["weak_label"] == "point"
    with pytest.raises(ValueError, match="num_classes"):
        _module(num_classes=len(SHAPE_NAMES) + 2)
    with pytest.raises(ValueError, match="weak_label"):
        _module(weak_label="polygon")
    with pytest.raises(ValueError, match="box_core_fraction"):
        _module(box_core_fraction=1.5)
    with pytest.raises(ValueError, match="points_per_segment"):
        _module(points_per_segment=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        _module(num_train=2).train_dataloader()


def test_simulated_full_label_keeps_void() -> None:
    mask = np.array([[0, 1], [255, 2]], np.uint8)
    label = simulate_weak_label(mask, "full", 3, weak_label_rng(0, "a"))
    assert label.target is not None
    assert label.target.tolist() == [[0, 1], [255, 2]]
