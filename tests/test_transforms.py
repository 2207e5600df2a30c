"""Augmentation pipelines, sample assembly and DataLoader worker seeding."""

from __future__ import annotations

from functools import partial
from typing import Any

import albumentations as A
import numpy as np
import pytest
import torch
from helpers import tiny_data, tiny_trainer
from torch.utils.data import DataLoader, Dataset

from agmm_lightning.data.transforms import (
    build_eval_sample,
    build_train_sample,
    eval_transform,
    reseed_transform,
    seed_worker,
    train_transform,
)
from agmm_lightning.weak_labels import WeakLabel

C = 4


def _scene(height: int = 40, width: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """An image with a class-2 rectangle and a class-3 rectangle on background 0."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[5:20, 5:20] = 2
    mask[25:38, 30:48] = 3
    return image, mask


def _identity_geometry(crop_size: int, **kwargs: Any) -> A.Compose:
    return train_transform(crop_size, (1.0, 1.0), flip_probability=0.0, seed=0, **kwargs)


def test_crop_padding_is_void_in_target_mask_and_allowed() -> None:
    image, mask = _scene()
    transform = _identity_geometry(64)
    boxes = np.array([[5, 5, 20, 20, 2], [30, 25, 48, 38, 3]], np.float32)
    sample = build_train_sample(
        transform, image, C, name="a", label=WeakLabel(boxes=boxes), mask=mask
    )
    padding = sample["mask"] == 255
    assert sample["image"].shape == (3, 64, 64)
    assert int(padding.sum()) == 64 * 64 - 40 * 50
    assert torch.equal(sample["target"] == 255, padding)
    assert not sample["allowed"][:, padding].any()
    inside = ~padding
    assert sample["allowed"][0][inside].all()  # background is allowed everywhere inside


def test_points_are_rasterised_after_a_half_scale() -> None:
    image, mask = _scene(64, 64)
    points = np.array([[12.0, 12.0, 2], [40.0, 31.0, 3]], np.float32)
    transform = train_transform(32, (0.5, 0.5), flip_probability=0.0, seed=0)
    sample = build_train_sample(
        transform, image, C, name="a", label=WeakLabel(points=points), mask=mask
    )
    target = sample["target"]
    for cls in (2, 3):
        labelled = target == cls
        assert int(labelled.sum()) == 5  # radius-1 disc, not shrunk away by the rescale
        assert (sample["mask"][labelled] == cls).all()
    assert set(target.unique().tolist()) == {2, 3, C}


def test_horizontal_flip_moves_points_with_the_image() -> None:
    image, mask = _scene(48, 48)
    points = np.array([[10.0, 10.0, 2]], np.float32)
    transform = train_transform(48, (1.0, 1.0), flip_probability=1.0, seed=0)
    sample = build_train_sample(
        transform, image, C, name="a", label=WeakLabel(points=points), mask=mask
    )
    ys, xs = torch.nonzero(sample["target"] == 2, as_tuple=True)
    assert xs.float().mean().item() == pytest.approx(48 - 1 - 10)
    assert ys.float().mean().item() == pytest.approx(10)
    assert torch.equal(sample["mask"], torch.from_numpy(mask[:, ::-1].astype(np.int64)))


def test_mask_interpolation_is_nearest() -> None:
    image, mask = _scene()
    transform = train_transform(48, (1.37, 1.37), seed=0)
    target = np.where(mask == 0, C, mask).astype(np.uint8)
    sample = build_train_sample(
        transform, image, C, name="a", label=WeakLabel(target=target), mask=mask
    )
    assert set(sample["mask"].unique().tolist()) <= {0, 2, 3, 255}
    assert set(sample["target"].unique().tolist()) <= {2, 3, C, 255}


def test_image_classes_come_from_the_whole_image() -> None:
    image, mask = _scene()
    points = np.array([[10.0, 10.0, 2], [40.0, 30.0, 3], [25.0, 2.0, 0]], np.float32)
    transform = train_transform(8, (1.0, 1.0), seed=0)
    sample = build_train_sample(transform, image, C, name="a", label=WeakLabel(points=points))
    assert sample["image_classes"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert (sample["target"] < C).sum() < 15  # at most one disc fits in an 8-px crop


def test_box_image_classes_include_background_around_boxes() -> None:
    image, _ = _scene()
    boxes = np.array([[5, 5, 20, 20, 2]], np.float32)
    sample = build_train_sample(
        _identity_geometry(16), image, C, name="a", label=WeakLabel(boxes=boxes)
    )
    assert sample["image_classes"].tolist() == [1.0, 0.0, 1.0, 0.0]
    full = np.array([[0, 0, 50, 40, 3]], np.float32)
    sample = build_train_sample(
        _identity_geometry(16), image, C, name="a", label=WeakLabel(boxes=full)
    )
    assert sample["image_classes"].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_given_tags_override_the_weak_label_classes() -> None:
    image, mask = _scene()
    tags = np.array([1, 1, 0, 0], np.float32)
    target = np.full(mask.shape, C, np.uint8)
    label = WeakLabel(target=target, tags=tags)
    sample = build_train_sample(_identity_geometry(16), image, C, name="a", label=label)
    assert sample["image_classes"].tolist() == tags.tolist()
    assert set(sample["target"].unique().tolist()) == {C}


def test_exactly_one_weak_label_form_is_required() -> None:
    image, mask = _scene()
    transform = _identity_geometry(16)
    with pytest.raises(ValueError, match="exactly one"):
        WeakLabel()
    with pytest.raises(ValueError, match="exactly one"):
        WeakLabel(target=mask, points=np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        build_train_sample(transform, image, C, name="a", label=WeakLabel(target=mask[:10]))
    with pytest.raises(ValueError, match="uint8"):
        image = image.astype(np.float32)
        build_train_sample(transform, image, C, name="a", label=WeakLabel(target=mask))


def test_eval_sample_keeps_full_resolution() -> None:
    image, mask = _scene()
    sample = build_eval_sample(eval_transform(), image, name="a", mask=mask)
    assert sample["image"].shape == (3, 40, 50)
    assert sample["image"].dtype == torch.float32
    assert torch.equal(sample["mask"], torch.from_numpy(mask.astype(np.int64)))
    assert set(build_eval_sample(eval_transform(), image, name="a")) == {"image", "name"}


def test_invalid_pipeline_arguments_raise() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        train_transform(0)
    with pytest.raises(ValueError, match="scale_range"):
        train_transform(8, (2.0, 1.0))


def test_reseeded_transforms_draw_independently() -> None:
    # Compose(seed=...) gives each transform its own generator with the same seed, so both
    # flips would always fire together; one shared generator decorrelates them.
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)], save_applied_params=True)
    reseed_transform(pipeline, 0)
    image = np.zeros((2, 2, 3), np.uint8)
    applied = [len(pipeline(image=image)["applied_transforms"]) for _ in range(32)]
    assert 1 in applied


def test_same_seed_same_augmentation() -> None:
    image, mask = _scene()
    target = np.where(mask == 0, C, mask).astype(np.uint8)
    first, second = (
        build_train_sample(
            train_transform(24, seed=5), image, C, name="a", label=WeakLabel(target=target)
        )
        for _ in range(2)
    )
    other = build_train_sample(
        train_transform(24, seed=6), image, C, name="a", label=WeakLabel(target=target)
    )
    assert torch.equal(first["image"], second["image"])
    assert not torch.equal(first["image"], other["image"])


class _SameImage(Dataset[torch.Tensor]):
    """Every index is the same image: any difference between items is augmentation."""

    def __init__(self) -> None:
        self.image, self.mask = _scene()
        self.transform = train_transform(24, seed=0)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        target = np.where(self.mask == 0, C, self.mask).astype(np.uint8)
        sample = build_train_sample(
            self.transform, self.image, C, name="a", label=WeakLabel(target=target)
        )
        return sample["image"]


def _epochs(seed: int, epochs: int = 2, rank: int = 0, context: str | None = None) -> list:
    loader = DataLoader(
        _SameImage(),
        batch_size=1,
        num_workers=2,
        worker_init_fn=partial(seed_worker, rank=rank),
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=context,
    )
    return [torch.cat(list(loader)) for _ in range(epochs)]


def test_ranks_get_their_own_augmentations_under_the_spawn_start_method() -> None:
    """Spawned workers have no process group: the rank comes from the loader's owner."""
    (rank_zero,) = _epochs(seed=0, epochs=1, context="spawn")
    (rank_one,) = _epochs(seed=0, epochs=1, rank=1, context="spawn")
    assert not torch.equal(rank_zero, rank_one)
    assert torch.equal(rank_zero, _epochs(seed=0, epochs=1)[0])  # spawn or fork: the same stream


def test_the_datamodule_seeds_its_workers_with_the_trainers_rank(tmp_path) -> None:
    data = tiny_data(num_train=4, num_val=2, batch_size=2)
    trainer = tiny_trainer(tmp_path)
    data.trainer = trainer
    for loader in (data.train_dataloader(), data.val_dataloader()):
        assert loader.worker_init_fn.func is seed_worker
        assert loader.worker_init_fn.keywords == {"rank": trainer.global_rank}


def test_workers_and_epochs_get_different_augmentations() -> None:
    first_epoch, second_epoch = _epochs(seed=0)
    # Items 0 and 1 come from workers 0 and 1; without reseeding they would be identical copies.
    assert not torch.equal(first_epoch[0], first_epoch[1])
    assert not torch.equal(first_epoch, second_epoch)
    assert torch.equal(first_epoch, _epochs(seed=0, epochs=1)[0])
