"""Box supervision end to end: the allowed map from the files through the model's losses."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import copy_fixture, tiny_network

from agmm_lightning.agmm import AGMMModel, OEMOptions
from agmm_lightning.agmm.losses import absent_class_loss
from agmm_lightning.data import FolderDataModule, VOCDataModule
from agmm_lightning.data.transforms import build_train_sample, train_transform
from agmm_lightning.losses import cvpr_agmm_losses
from agmm_lightning.targets import VOID, posterior_labels, upsample_posterior
from agmm_lightning.weak_labels import WeakLabel

DATA = Path(__file__).parent / "data"
VOC_CLASSES = 21


def voc_box_batch(root: Path = DATA / "voc", **kwargs: Any) -> dict[str, Any]:
    """The three VOC fixture images with their boxes, padded (void) into 64x64 crops."""
    options: dict[str, Any] = {"batch_size": 3, "crop_size": 64, "augment": False}
    data = VOCDataModule(str(root), weak_label="box", **(options | kwargs))
    return next(iter(data.train_dataloader()))


def initialised_model(arch: str = "Unet") -> AGMMModel:
    """A tiny model whose mixtures already hold every class (as after some training)."""
    options = OEMOptions(
        embed_dim=8, warmup_steps=0, confidence=0.0, fit_confidence=0.0, unlabelled_mass=None
    )
    model = AGMMModel(tiny_network(arch, VOC_CLASSES), VOC_CLASSES, "agmm", options).eval()
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(4 * VOC_CLASSES, 8, generator=generator), dim=1)
    weights = F.one_hot(torch.arange(4 * VOC_CLASSES) % VOC_CLASSES, VOC_CLASSES).float()
    model.mixtures.update(model.mixtures.sufficient_statistics(features, weights))
    assert model.mixtures.initialized.all()
    return model


def raster(boxes: list[list[float]], core_fraction: float = 0.0) -> dict[str, Any]:
    """Rasterise boxes on a 32x32 canvas through the training pipeline (no augmentation)."""
    transform = train_transform(32, (1.0, 1.0), flip_probability=0, color_jitter=0, seed=0)
    image = np.zeros((32, 32, 3), np.uint8)
    return build_train_sample(
        transform,
        image,
        6,
        name="boxes",
        label=WeakLabel(boxes=np.array(boxes, np.float32)),
        box_core_fraction=core_fraction,
    )


# --------------------------------------------------------------------------------------------
# The allowed map through the module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["Unet", "FPN"])  # decoder features at full and 1/4 size
def test_posterior_is_zero_outside_the_allowed_map(arch: str) -> None:
    batch = voc_box_batch()
    with torch.no_grad():
        step, _ = initialised_model(arch=arch).losses(batch)
    allowed = batch["allowed"]
    posterior = upsample_posterior(step.posterior, allowed.shape[-2:], allowed)
    assert posterior.shape == allowed.shape
    assert (posterior[~allowed] == 0).all()
    inside_image = batch["target"] != VOID
    assert torch.allclose(posterior.sum(1)[inside_image], torch.ones(()))
    pseudo = posterior_labels(posterior)
    assert (pseudo[~inside_image] == VOID).all()
    assert allowed.gather(1, pseudo.clamp(max=VOC_CLASSES - 1)[:, None])[:, 0][inside_image].all()


def test_a_pixel_outside_every_box_is_background() -> None:
    batch = voc_box_batch()
    outside = (batch["target"] != VOID) & ~batch["allowed"][:, 1:].any(1)
    assert outside.any()
    assert (batch["target"][outside] == 0).all()
    with torch.no_grad():
        step, _ = initialised_model().losses(batch)
    posterior = upsample_posterior(step.posterior, outside.shape[-2:], batch["allowed"])
    assert (posterior[:, 0][outside] == 1).all()
    assert (posterior_labels(posterior)[outside] == 0).all()


def test_fitting_set_stays_inside_the_allowed_map() -> None:
    # A 16x16 box of class 2 and an 8x8 box of class 5; outside them, labelled background.
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    allowed = torch.zeros(1, VOC_CLASSES, 32, 32, dtype=torch.bool)
    allowed[:, 0] = True
    for cls, rows, cols in ((2, slice(8, 24), slice(8, 24)), (5, slice(0, 8), slice(24, 32))):
        target[:, rows, cols] = VOC_CLASSES
        allowed[:, cls, rows, cols] = True
    image_classes = torch.zeros(1, VOC_CLASSES)
    image_classes[:, [0, 2, 5]] = 1
    batch = {
        "image": torch.randn(1, 3, 32, 32),
        "target": target,
        "allowed": allowed,
        "image_classes": image_classes,
    }
    with torch.no_grad():
        step, _ = initialised_model().losses(batch)
    # The Unet's features are at label resolution: one feature per pixel, weights <= 1.
    fitted = step.stats.weight.sum(1)
    assert fitted[0] > 0 and fitted[2] <= 16 * 16 and fitted[5] <= 8 * 8
    others = [c for c in range(VOC_CLASSES) if c not in (0, 2, 5)]
    assert (fitted[others] == 0).all()


def test_absent_loss_is_per_pixel() -> None:
    batch = voc_box_batch()
    model = initialised_model()
    with torch.no_grad():
        step, logits = model.losses(batch)
    per_pixel = absent_class_loss(logits, batch["allowed"], batch["target"])
    per_image = absent_class_loss(logits, batch["image_classes"], batch["target"])
    assert torch.allclose(step.terms["absent"], per_pixel)
    # Outside its box, a tagged class is forbidden too: the per-pixel loss is larger.
    assert per_pixel > per_image


def test_the_labelled_box_core_initialises_the_box_classes() -> None:
    batch = voc_box_batch(box_core_fraction=0.5)
    labelled = set(batch["target"].unique().tolist()) - {VOC_CLASSES, VOID}
    assert {1, 13, 15, 20} <= labelled
    model = initialised_model()
    model.mixtures.initialized.zero_()
    with torch.no_grad():
        step, _ = model.losses(batch)
    model.mixtures.update(step.stats)
    assert model.mixtures.initialized[[0, 1, 13, 15, 20]].all()


# --------------------------------------------------------------------------------------------
# Overlapping boxes
# --------------------------------------------------------------------------------------------


def test_overlapping_boxes_of_different_classes_allow_both_and_label_no_core() -> None:
    sample = raster([[0, 0, 20, 20, 1], [10, 10, 30, 30, 2]], core_fraction=1.0)
    target, allowed = sample["target"], sample["allowed"]
    overlap = (slice(10, 20), slice(10, 20))
    assert (target[overlap] == 6).all()
    assert allowed[:, 10:20, 10:20].all(dim=(1, 2)).tolist() == [1, 1, 1, 0, 0, 0]
    assert (target[0:10, 0:20] == 1).all() and (target[20:30, 10:30] == 2).all()
    assert (target[:, 30:] == 0).all() and not allowed[1:, :, 30:].any()


def test_a_box_inside_another_class_box_gets_a_core_of_its_own_class() -> None:
    """A structure nested in another class's box (a bottle on a table) gets labelled pixels of
    its own class, so its mixture can start; the outer box keeps its core around it."""
    sample = raster([[0, 0, 30, 30, 1], [12, 12, 18, 18, 2]], core_fraction=0.5)
    target, allowed = sample["target"], sample["allowed"]
    assert (target == 2).sum() == 3 * 3 and (target[13:16, 13:16] == 2).all()
    assert (target == 1).sum() > 0 and not (target[12:18, 12:18] == 1).any()
    assert allowed[2, 12:18, 12:18].all() and allowed[1, 12:18, 12:18].all()
    assert set(np.flatnonzero(sample["image_classes"].numpy()).tolist()) == {0, 1, 2}


def test_overlapping_boxes_of_one_class_keep_its_core() -> None:
    sample = raster([[0, 0, 20, 20, 3], [10, 10, 30, 30, 3]], core_fraction=1.0)
    assert (sample["target"][10:20, 10:20] == 3).all()
    assert set(np.flatnonzero(sample["image_classes"].numpy()).tolist()) == {0, 3}


# --------------------------------------------------------------------------------------------
# Bad box files: clipped with a warning, or a clear error naming the file
# --------------------------------------------------------------------------------------------


def test_boxes_outside_the_image_are_clipped_with_a_warning(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    annotation = root / "Annotations" / "2007_000032.xml"
    text = annotation.read_text()
    # The aeroplane reaches past the right edge (width 56); the person lies beyond it.
    text = text.replace("<xmax>30</xmax>", "<xmax>70</xmax>", 1)
    text = text.replace("<xmin>37</xmin>", "<xmin>60</xmin>").replace(
        "<xmax>48</xmax>", "<xmax>66</xmax>"
    )
    annotation.write_text(text)
    data = VOCDataModule(str(root), weak_label="box", batch_size=1, crop_size=64, augment=False)
    dataset = data.build_dataset("train")
    name, _, mask = dataset.load(0)
    with pytest.warns(
        UserWarning, match=r"2007_000032\.xml: 2 of 2 box\(es\) extend beyond the 56x40"
    ):
        boxes = dataset.weak_label(name, mask).boxes
    assert boxes is not None and boxes.tolist() == [[4, 6, 56, 22, 1]]
    with pytest.warns(UserWarning, match="1 left empty and dropped"):
        sample = dataset[0]
    assert not sample["allowed"][15].any()


def test_a_box_of_an_unknown_class_names_the_file(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    annotation = root / "Annotations" / "2007_000032.xml"
    annotation.write_text(annotation.read_text().replace("aeroplane", "unicorn"))
    dataset = VOCDataModule(str(root), weak_label="box").build_dataset("train")
    with pytest.warns(UserWarning, match=r"2007_000032\.xml: unknown class tag 'unicorn'"):
        dataset[0]


def test_a_box_label_out_of_range_names_the_file(tmp_path: Path) -> None:
    root = copy_fixture("folder", tmp_path)
    (root / "weak" / "box" / "a.json").write_text(json.dumps([{"label": 9, "box": [0, 0, 4, 4]}]))
    dataset = FolderDataModule(str(root), weak_label="box").build_dataset("train")
    with pytest.warns(UserWarning, match=r"a\.json: box label 9 is out of range"):
        dataset[0]


def test_the_agreement_gated_refit_takes_only_cells_the_network_agrees_with() -> None:
    """With pseudo_mode='agree' the unlabelled fitting mass shrinks to the cells whose GMM label
    the network predicts too; the soft mode takes every confident unlabelled cell."""
    batch = voc_box_batch(box_core_fraction=0.5)
    model = initialised_model()
    with torch.no_grad():
        soft, _ = model.losses(batch)
        model.oem = replace(model.oem, pseudo_mode="agree")
        agree, _ = model.losses(batch)
    soft_mass, agree_mass = soft.stats.weight.sum(), agree.stats.weight.sum()
    assert agree_mass < soft_mass


def test_the_allowed_map_of_a_non_box_image_in_a_mixed_batch_changes_no_cvpr_loss() -> None:
    """Mixed batches give every image ``allowed``: for a non-box image, its image classes at
    every pixel, void included, which the CVPR terms read exactly as no map at all (an all-True
    map would drop the tags, a void-False one would make every class a box class)."""
    torch.manual_seed(0)
    classes = 4
    features, logits = torch.randn(2, 8, 8, 8), torch.randn(2, classes, 16, 16)
    target = torch.full((2, 16, 16), classes)
    target[:, 2:5, 2:5], target[:, 10:12, 10:12], target[:, :, 14:] = 1, 0, VOID
    image_classes = torch.tensor([[1.0, 1.0, 0.0, 1.0]] * 2)
    label = WeakLabel(points=np.array([[3, 3, 1], [10, 10, 0]], np.float32), tags=None)
    sample = build_train_sample(
        train_transform(16, (1.0, 1.0), flip_probability=0, color_jitter=0, seed=0),
        np.zeros((12, 12, 3), np.uint8),  # padded to 16: void at the borders
        classes,
        name="a",
        label=label,
        form="point",
    )
    assert sample["form"] == "point" and (sample["target"] == VOID).any()
    assert torch.equal(
        sample["allowed"], (sample["image_classes"] > 0)[:, None, None].expand(-1, 16, 16)
    )
    allowed = (image_classes > 0)[:, :, None, None].expand(2, classes, 16, 16)
    plain = cvpr_agmm_losses(features, logits, target, classes, image_classes)
    mapped = cvpr_agmm_losses(features, logits, target, classes, image_classes, allowed=allowed)
    for term in plain:
        torch.testing.assert_close(mapped[term], plain[term], rtol=0, atol=0)
