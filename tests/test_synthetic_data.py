"""The embedded synthetic dataset and the base DataModule machinery."""

from __future__ import annotations

import warnings
from collections import Counter
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


MIX = {"point": 0.5, "box": 0.25, "image": 0.125, "full": 0.125}


def _forms_seen(module: SyntheticDataModule, epochs: int = 2) -> list[dict[str, str]]:
    """``name -> form`` of the training samples of each epoch, as the batches carry them."""
    module.setup("fit")
    loader = module.train_dataloader()
    seen = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        seen.append(
            {
                name: form
                for batch in loader
                for name, form in zip(batch["name"], batch["form"], strict=True)
            }
        )
    return seen


def test_a_mix_gives_each_image_its_form_by_the_fractions_the_same_every_time() -> None:
    kwargs: dict[str, Any] = {"weak_label": MIX, "box_core_fraction": 0.3, "crop_size": 32}
    seen = _forms_seen(_module(**kwargs))
    assert len(seen[0]) == 8 and seen[0] == seen[1]
    assert Counter(seen[0].values()) == {"point": 4, "box": 2, "image": 1, "full": 1}
    assert _forms_seen(_module(**kwargs, num_workers=2), epochs=1)[0] == seen[0]
    other_seed = _forms_seen(_module(**kwargs, seed=1), epochs=1)[0]
    assert other_seed != seen[0]


def test_each_image_of_a_mix_has_the_label_of_its_form() -> None:
    module = _module(weak_label=MIX, box_core_fraction=0.3)
    module.setup("fit")
    dataset = module.datasets["train"]
    for index in range(len(dataset)):
        name, _, mask = dataset.load(index)
        form = dataset.form(name)
        alone = _module(weak_label=form, box_core_fraction=0.3)
        alone.setup("fit")
        expected = alone.datasets["train"].weak_label(name, mask)
        label = dataset.weak_label(name, mask)
        for field in ("target", "points", "boxes", "tags"):
            mine, theirs = getattr(label, field), getattr(expected, field)
            assert (mine is None) == (theirs is None), (form, field)
            assert mine is None or np.array_equal(mine, theirs), (form, field)


def test_a_batch_of_mixed_forms_collates_with_form_and_allowed() -> None:
    batch = _first_batch(_module(weak_label=MIX, box_core_fraction=0.3, batch_size=8))
    assert set(batch) == {"image", "target", "image_classes", "mask", "name", "form", "allowed"}
    assert sorted(batch["form"]) == ["box", "box", "full", "image", *["point"] * 4]
    assert batch["allowed"].shape == (8, 6, 96, 96) and batch["allowed"].dtype == torch.bool
    for i, form in enumerate(batch["form"]):
        target, allowed, classes = (
            batch["target"][i],
            batch["allowed"][i],
            batch["image_classes"][i],
        )
        if form == "box":  # a box class is allowed in its box only
            assert not allowed.all(dim=(1, 2))[classes > 0].all()
        else:  # the image classes, everywhere: what the losses assume without the map
            assert torch.equal(allowed, (classes > 0)[:, None, None].expand_as(allowed))
        if form == "image":
            assert set(target.unique().tolist()) <= {6, 255} and classes.sum() > 0
        if form == "full":
            assert torch.equal(target, batch["mask"][i])
        if form == "point":
            assert 0 < (target < 6).float().mean() < 0.2


def test_a_single_form_keeps_its_samples_and_a_bad_mix_is_refused() -> None:
    assert "form" not in _first_batch(_module(weak_label="point"))
    assert "allowed" not in _first_batch(_module(weak_label="full"))
    with pytest.raises(ValueError, match=r"weak_label: the fractions .* sum to 0.8"):
        _module(weak_label={"point": 0.5, "box": 0.3})
    with pytest.raises(ValueError, match=r"weak_label names unknown form\(s\) \['polygon'\]"):
        _module(weak_label={"point": 0.5, "polygon": 0.5})
    with pytest.raises(ValueError, match="predict_split='train'"):
        _module(weak_label={"image": 0.5, "point": 0.5}, predict_split="train")
