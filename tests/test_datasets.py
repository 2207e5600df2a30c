"""The file-backed DataModules on the tiny fixtures of tests/data (real on-disk layouts)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import copy_fixture
from PIL import Image

from agmm_lightning.data import (
    ADE20KDataModule,
    CityscapesDataModule,
    COCODataModule,
    FolderDataModule,
    VOCDataModule,
)
from agmm_lightning.data.checks import decode_all
from agmm_lightning.data.cityscapes import CITYSCAPES_LABELID_TO_TRAINID
from agmm_lightning.data.files import FileDataModule, FileDataset
from agmm_lightning.data.transforms import train_transform
from agmm_lightning.data.voc import VOC_CLASSES, read_scribblesup_xml
from agmm_lightning.weak_labels import rasterize_boxes, rasterize_points, rasterize_polylines

DATA = Path(__file__).parent / "data"
VOID = 255
MODULES: dict[str, type[FileDataModule]] = {
    "folder": FolderDataModule,
    "voc": VOCDataModule,
    "cityscapes": CityscapesDataModule,
    "ade20k": ADE20KDataModule,
    "coco": COCODataModule,
}


def module(dataset: str, root: Path | None = None, **kwargs: Any) -> FileDataModule:
    options: dict[str, Any] = {"batch_size": 2, "crop_size": 32, "augment": False}
    options.update(kwargs)
    return MODULES[dataset](root=str(root or DATA / dataset), **options)


def train_set(dataset: str, root: Path | None = None, **kwargs: Any) -> FileDataset:
    return module(dataset, root, **kwargs).build_dataset("train")


def png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def as_raster(dataset: FileDataset, index: int) -> tuple[str, np.ndarray, np.ndarray | None]:
    """An image's weak label as a full-resolution target map, before any augmentation."""
    name, image, mask = dataset.load(index)
    label = dataset.weak_label(name, mask)
    shape, classes = image.shape[:2], dataset.num_classes
    if label.points is not None:
        return name, rasterize_points(label.points, shape, classes), mask
    if label.boxes is not None:
        return name, rasterize_boxes(label.boxes, shape, classes)[0], mask
    assert label.target is not None
    return name, label.target, mask


# --------------------------------------------------------------------------------------------
# Expected weak labels, computed from the files independently of the loaders
# --------------------------------------------------------------------------------------------


def unlabeled_png(folder: str, unlabeled: int, classes: int) -> Callable[[str], np.ndarray]:
    def expected(name: str) -> np.ndarray:
        raw = png(DATA / folder / f"{name}.png")
        return np.where(raw == unlabeled, classes, raw)

    return expected


def voc_json_points(name: str) -> np.ndarray:
    rows = []
    for file in ("voc_whats_the_point.json", "voc_whats_the_point_bg_from_scribbles.json"):
        clicks = json.loads((DATA / "voc" / file).read_text())[name]
        rows += [(c["x"], c["y"], c["cls"]) for c in clicks]
    return rasterize_points(np.array(rows, np.float32), (40, 56), 21)


def voc_scribbles(name: str) -> np.ndarray:
    path = DATA / "voc" / "scribble_annotation" / "pascal_2012" / f"{name}.xml"
    shape, polylines = read_scribblesup_xml(path, VOC_CLASSES)
    return rasterize_polylines(polylines, shape, 21, width=3)


def folder_boxes(name: str) -> np.ndarray:
    entries = json.loads((DATA / "folder" / "weak" / "box" / f"{name}.json").read_text())
    boxes = np.array([[*e["box"], e["label"]] for e in entries], np.float32)
    return rasterize_boxes(boxes, (40, 56), 3)[0]


def cityscapes_clicks(name: str) -> np.ndarray:
    raw = png(DATA / "cityscapes" / "20clicks" / f"{name}_gtFine_labelTrainIds.png")
    ys, xs = np.nonzero(raw != 19)
    return rasterize_points(np.column_stack([xs, ys, raw[ys, xs]]), raw.shape, 19)


def cityscapes_blocks(name: str) -> np.ndarray:
    path = DATA / "cityscapes" / "train" / "sparse_label" / "block10" / f"{name}_leftImg8bit.png"
    train_ids = CITYSCAPES_LABELID_TO_TRAINID[png(path)]
    return np.where(train_ids == VOID, 19, train_ids)


def ade_blocks(name: str) -> np.ndarray:
    raw = png(DATA / "ade20k" / "train" / "sparse_label" / "block10" / f"{name}.png").astype(int)
    return np.where(raw == 0, 150, raw - 1)


FILE_CASES: dict[str, tuple[str, dict[str, Any], Callable[[str], np.ndarray]]] = {
    "folder-point-C": ("folder", {"weak_label": "point"}, unlabeled_png("folder/weak/point", 3, 3)),
    "folder-scribble": (
        "folder",
        {"weak_label": "scribble"},
        unlabeled_png("folder/weak/scribble", VOID, 3),
    ),
    "folder-block": (
        "folder",
        {"weak_label": "block"},
        unlabeled_png("folder/weak/block", VOID, 3),
    ),
    "folder-box-json": ("folder", {"weak_label": "box"}, folder_boxes),
    "folder-image-cam": (
        "folder",
        {"weak_label": "image"},
        unlabeled_png("folder/weak/image", VOID, 3),
    ),
    "voc-point-json": ("voc", {"weak_label": "point"}, voc_json_points),
    "voc-point-png-255": (
        "voc",
        {"weak_label": "point", "weak_dir": "point"},
        unlabeled_png("voc/point", VOID, 21),
    ),
    "voc-scribble-xml": ("voc", {"weak_label": "scribble"}, voc_scribbles),
    "cityscapes-clicks": ("cityscapes", {"weak_label": "point"}, cityscapes_clicks),
    "cityscapes-blocks": ("cityscapes", {"weak_label": "block"}, cityscapes_blocks),
    "ade20k-blocks": ("ade20k", {"weak_label": "block"}, ade_blocks),
}


@pytest.mark.parametrize("case", FILE_CASES)
def test_labelled_pixels_agree_with_the_files(case: str) -> None:
    dataset_name, options, expected = FILE_CASES[case]
    dataset = train_set(dataset_name, **options)
    classes = dataset.num_classes
    for index in range(len(dataset)):
        name, target, _ = as_raster(dataset, index)
        assert np.array_equal(target, expected(name)), name
        # Unlabelled is C after loading, whatever the file's convention; 255 only pads crops.
        assert set(np.unique(target).tolist()) <= set(range(classes + 1))
        assert (target < classes).any()


def test_scribbles_and_clicks_lie_on_their_classes() -> None:
    for options in ({"weak_label": "scribble"}, {"weak_label": "point"}):
        dataset = train_set("voc", **options)
        for index in range(len(dataset)):
            _, target, mask = as_raster(dataset, index)
            assert mask is not None
            labelled = (target < 21) & (mask != VOID)
            assert np.array_equal(target[labelled], mask[labelled])


def test_full_supervision_is_the_dense_mask() -> None:
    dataset = train_set("cityscapes", weak_label="full")
    for index in range(len(dataset)):
        _, target, mask = as_raster(dataset, index)
        assert mask is not None
        assert np.array_equal(target, mask)


def test_unlabeled_value_option_overrides_detection() -> None:
    detected = train_set("voc", weak_label="scribble", weak_dir="point")
    explicit = train_set("voc", weak_label="scribble", weak_dir="point", unlabeled_value=255)
    as_void = train_set("voc", weak_label="scribble", weak_dir="point", unlabeled_value=21)
    for index in range(len(detected)):
        _, first, _ = as_raster(detected, index)
        _, second, _ = as_raster(explicit, index)
        _, third, _ = as_raster(as_void, index)
        assert np.array_equal(first, second)
        assert not (first == VOID).any() and (first == 21).any()
        # Read as the CVPR convention, the file's 255 stays void: excluded from every loss.
        assert np.array_equal(third == VOID, first == 21)
    with pytest.raises(ValueError, match="unlabeled_value"):
        train_set("voc", weak_label="point", weak_dir="point", unlabeled_value=3)


def test_simulation_replaces_the_files() -> None:
    for dataset_name, form in (("voc", "block"), ("cityscapes", "scribble"), ("coco", "point")):
        dataset = train_set(dataset_name, weak_label=form, simulate=True)
        assert dataset.weak_labels is None
        name, target, mask = as_raster(dataset, 0)
        assert mask is not None and (target < dataset.num_classes).any()
        _, again, _ = as_raster(dataset, 0)
        assert np.array_equal(target, again)


def test_folder_simulates_forms_without_a_weak_folder(tmp_path: Path) -> None:
    root = copy_fixture("folder", tmp_path)
    shutil.rmtree(root / "weak" / "scribble")
    dataset = train_set("folder", root, weak_label="scribble")
    assert dataset.weak_labels is None
    assert (as_raster(dataset, 0)[1] < 3).any()


def test_forms_without_files_ask_for_simulation() -> None:
    for dataset_name, form in (("cityscapes", "box"), ("ade20k", "point"), ("voc", "block")):
        with pytest.raises(ValueError, match="simulate: true"):
            train_set(dataset_name, weak_label=form)


# --------------------------------------------------------------------------------------------
# Tags, boxes and image-level labels
# --------------------------------------------------------------------------------------------


def test_voc_tags_from_annotations_masks_and_onehot() -> None:
    expected = {
        "2007_000032": {0, 1, 15},
        "2007_000039": {0, 20},
        "2008_000008": {0, 13, 15},
    }
    for source in ("annotations", "masks", "onehot"):
        dataset = train_set("voc", weak_label="image", tags_source=source)
        for index in range(len(dataset)):
            name, image, mask = dataset.load(index)
            label = dataset.weak_label(name, mask)
            assert label.tags is not None and label.target is not None
            assert set(np.flatnonzero(label.tags).tolist()) == expected[name], source
            # Without CAM pseudo labels every pixel is unlabelled.
            assert (label.target == 21).all() and label.target.shape == image.shape[:2]


class RunsCode:
    """A pickled object that would run a shell command when unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_a_tags_table_that_would_run_code_is_refused(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    table = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item()
    table["2007_000032"] = RunsCode()
    np.save(root / "cls_labels_onehot.npy", table)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cls_labels_onehot\.npy: .*posix\.system.* not an array"):
        train_set("voc", root, weak_label="image", tags_source="onehot")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_coco_tags_from_masks_and_onehot() -> None:
    expected = {"COCO_train2014_000000000009": {0, 1, 17}, "COCO_train2014_000000000025": {0, 3}}
    for source in ("masks", "onehot"):
        batch = next(
            iter(module("coco", weak_label="image", tags_source=source).train_dataloader())
        )
        for name, tags in zip(batch["name"], batch["image_classes"], strict=True):
            assert set(torch.nonzero(tags).flatten().tolist()) == expected[name]
        assert (batch["target"] == 81).all()


def test_coco_test_list_without_test_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="test_list='test.txt' needs test_split"):
        module("coco", test_list="test.txt")


def test_image_form_reads_cam_pseudo_labels(tmp_path: Path) -> None:
    root = copy_fixture("coco", tmp_path)
    cams = root / "cams"
    cams.mkdir()
    for path in (root / "SegmentationClass" / "train2014").glob("*.png"):
        raw = png(path)
        Image.fromarray(np.where(raw == 0, 81, raw).astype(np.uint8)).save(cams / path.name)
    dataset = train_set("coco", root, weak_label="image", cam_dir="cams")
    name, target, mask = as_raster(dataset, 0)
    assert mask is not None
    assert np.array_equal(target, np.where(mask == 0, 81, mask))
    assert dataset.weak_label(name, mask).tags is not None


@pytest.mark.parametrize(("dataset_name", "options"), [("voc", {}), ("folder", {})])
def test_boxes_give_an_allowed_map(dataset_name: str, options: dict[str, Any]) -> None:
    crop = 64
    dm = module(dataset_name, weak_label="box", crop_size=crop, **options)
    dataset = dm.build_dataset("train")
    classes = dataset.num_classes
    top, left = (crop - 40) // 2, (crop - 56) // 2
    for index in range(len(dataset)):
        name, image, mask = dataset.load(index)
        boxes = dataset.weak_label(name, mask).boxes
        assert boxes is not None and len(boxes) > 0
        sample = dataset[index]
        target, allowed = sample["target"].numpy(), sample["allowed"].numpy()
        inner = (slice(top, top + 40), slice(left, left + 56))
        inside = np.zeros((40, 56), bool)
        for x0, y0, x1, y1, cls in boxes.astype(int):
            assert allowed[cls][inner][y0:y1, x0:x1].all()
            inside[y0:y1, x0:x1] = True
        assert (target[inner][inside] == classes).all()
        assert (target[inner][~inside] == 0).all()
        assert allowed[0][inner].all()
        assert (target == VOID).sum() == crop * crop - 40 * 56
        assert not allowed[:, target == VOID].any()


def test_voc_boxes_follow_the_annotations_and_difficult_flag() -> None:
    every = train_set("voc", weak_label="box")
    easy = train_set("voc", weak_label="box", include_difficult=False)
    index = [record.name for record in every.records].index("2008_000008")
    name, _, mask = every.load(index)
    boxes = every.weak_label(name, mask).boxes
    assert boxes is not None
    # <bndbox> 7 11 34 36 (1-based, inclusive) -> pixel edges 6 10 34 36.
    assert boxes.tolist() == [[6, 10, 34, 36, 13], [38, 4, 50, 30, 15]]
    easy_boxes = easy.weak_label(name, mask).boxes
    assert easy_boxes is not None and easy_boxes.tolist() == [[6, 10, 34, 36, 13]]


def test_box_core_fraction_labels_box_centres() -> None:
    dataset = train_set("folder", weak_label="box", crop_size=64, box_core_fraction=0.5)
    target = dataset[0]["target"]
    assert {1, 2} <= set(target.unique().tolist())


# --------------------------------------------------------------------------------------------
# Batches: padding, dense masks, full-resolution validation, rescaled clicks
# --------------------------------------------------------------------------------------------

SIZES = {"folder": (40, 56), "voc": (40, 56), "cityscapes": (32, 64), "ade20k": (40, 56)}
SIZES["coco"] = (40, 56)
PADDING_CASES = [
    ("folder", "point"),
    ("voc", "scribble"),
    ("voc", "point"),
    ("cityscapes", "block"),
    ("ade20k", "full"),
    ("coco", "image"),
]


@pytest.mark.parametrize(("dataset_name", "form"), PADDING_CASES)
def test_training_batches_pad_with_void_and_carry_the_dense_mask(
    dataset_name: str, form: str
) -> None:
    crop = 96
    dm = module(dataset_name, weak_label=form, crop_size=crop)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    height, width = SIZES[dataset_name]
    padding = crop * crop - height * width
    assert batch["image"].shape == (2, 3, crop, crop)
    assert batch["mask"].shape == (2, crop, crop) and batch["mask"].dtype == torch.int64
    for target, mask in zip(batch["target"], batch["mask"], strict=True):
        # Padding is void; dense labels also keep the dataset's own void pixels.
        if form == "full":
            assert torch.equal(target, mask)
        else:
            assert (target == VOID).sum() == padding
        assert (mask == VOID).sum() >= padding
        assert ((target == VOID) <= (mask == VOID)).all()


@pytest.mark.parametrize("dataset_name", list(MODULES))
def test_validation_is_at_full_resolution(dataset_name: str) -> None:
    dm = module(dataset_name, weak_label="full")
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert loader.batch_size == 1
    batch = next(iter(loader))
    height, width = SIZES[dataset_name]
    assert batch["image"].shape == (1, 3, height, width)
    assert batch["mask"].shape == (1, height, width)
    values = set(batch["mask"].unique().tolist())
    assert values <= set(range(dm.num_classes)) | {VOID} and len(values) > 1


def test_validation_masks_are_decoded() -> None:
    city = module("cityscapes", weak_label="full").build_dataset("val")
    _, _, mask = city.load(0)
    raw = png(next((DATA / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png")))
    assert mask is not None and np.array_equal(mask, CITYSCAPES_LABELID_TO_TRAINID[raw])
    ade = module("ade20k", weak_label="full").build_dataset("val")
    _, _, mask = ade.load(0)
    raw = png(DATA / "ade20k" / "annotations" / "validation" / "ADE_val_00000001.png")
    assert mask is not None and np.array_equal(mask, np.where(raw == 0, VOID, raw - 1))
    voc = module("voc", weak_label="full").build_dataset("val")
    _, _, mask = voc.load(0)
    assert mask is not None and set(np.unique(mask).tolist()) == {0, 1, VOID}


@pytest.mark.parametrize(("dataset_name", "options"), [("voc", {}), ("cityscapes", {})])
def test_clicks_survive_half_scale(dataset_name: str, options: dict[str, Any]) -> None:
    dataset = train_set(dataset_name, weak_label="point", **options)
    dataset.transform = train_transform(
        64, (0.5, 0.5), flip_probability=0.0, color_jitter=0.0, seed=0
    )
    for index in range(len(dataset)):
        name, _, mask = dataset.load(index)
        points = dataset.weak_label(name, mask).points
        assert points is not None
        target = dataset[index]["target"]
        labelled = set(target[target < dataset.num_classes].unique().tolist())
        assert labelled == set(points[:, 2].astype(int).tolist())
        assert (target < dataset.num_classes).sum() >= len(points)


def test_a_crop_without_labelled_pixels_is_normal() -> None:
    dm = module("voc", weak_label="point", crop_size=3, augment=True)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["target"].shape == (2, 3, 3)


def test_cityscapes_maps_label_ids_when_train_ids_are_missing(tmp_path: Path) -> None:
    root = copy_fixture("cityscapes", tmp_path)
    reference = train_set("cityscapes", weak_label="full")
    for path in root.rglob("*_gtFine_labelTrainIds.png"):
        if "gtFine" in path.parts:
            path.unlink()
    mapped = train_set("cityscapes", root, weak_label="full")
    for index in range(len(reference)):
        assert np.array_equal(reference.load(index)[2], mapped.load(index)[2])


def test_training_images_without_a_mask_get_a_void_one(tmp_path: Path) -> None:
    # VOC's own SegmentationClass covers only part of train_aug.
    root = copy_fixture("voc", tmp_path)
    (root / "SegmentationClassAug" / "2007_000039.png").unlink()
    dm = module("voc", root, weak_label="point", batch_size=3, crop_size=64)
    batch = next(iter(dm.train_dataloader()))
    missing = batch["name"].index("2007_000039")
    assert (batch["mask"][missing] == VOID).all()
    assert (batch["mask"][1 - min(missing, 1)] != VOID).any()
    with pytest.raises(FileNotFoundError, match="2007_000039.png"):
        module("voc", root, weak_label="full").build_dataset("train")


def test_voc_reads_a_segmentationclass_folder(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    (root / "SegmentationClassAug").rename(root / "SegmentationClass")
    dataset = module("voc", root, weak_label="full").build_dataset("val")
    assert dataset.records[0].mask == root / "SegmentationClass" / "2007_000033.png"
    assert dataset.load(0)[2] is not None


def test_both_list_formats_and_test_fallbacks(tmp_path: Path) -> None:
    voc = module("voc", weak_label="point", train_list="ImageSets/Segmentation/train.txt")
    assert [r.name for r in voc.build_dataset("train").records] == ["2007_000032", "2007_000039"]
    assert [r.name for r in module("voc").build_dataset("train").records] == [
        "2007_000032",
        "2007_000039",
        "2008_000008",
    ]
    assert [r.name for r in module("voc").build_dataset("test").records] == ["2007_000033"]
    root = copy_fixture("folder", tmp_path)
    (root / "splits" / "test.txt").unlink()
    test = module("folder", root, weak_label="full").build_dataset("test")
    assert [r.name for r in test.records] == ["d"]
    predict = module("folder", root).build_dataset("predict")
    assert "mask" not in predict[0]


def test_grey_images_are_converted_to_rgb() -> None:
    dataset = train_set("folder", weak_label="full")
    index = [record.name for record in dataset.records].index("c")
    image = dataset.load(index)[1]
    assert image.shape == (40, 56, 3)
    assert np.array_equal(image[..., 0], image[..., 2])


def test_datasets_pickle_for_worker_processes() -> None:
    for dataset_name, form in (("voc", "point"), ("cityscapes", "block"), ("ade20k", "block")):
        dataset = train_set(dataset_name, weak_label=form)
        clone = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(clone[0]["target"], dataset[0]["target"])


def test_folder_class_names_and_count() -> None:
    dm = module("folder")
    assert dm.num_classes == 3 and dm.class_names == ["background", "disc", "square"]
    with pytest.raises(ValueError, match="classes.txt"):
        module("folder", num_classes=4)


# --------------------------------------------------------------------------------------------
# Bad input: every error names the file, what was expected and the option
# --------------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "VOC2012"
    with pytest.raises(FileNotFoundError, match="root") as error:
        module("voc", missing).setup("fit")
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="root"):
        module("folder", missing)
    with pytest.raises(FileNotFoundError, match="num_classes") as error:
        module("folder", tmp_path)
    assert str(tmp_path / "classes.txt") in str(error.value)


@pytest.mark.parametrize(
    ("dataset_name", "folder", "option"),
    [
        ("voc", "JPEGImages", "root"),
        ("cityscapes", "leftImg8bit/val", "val_split"),
        ("ade20k", "images/validation", "val_split"),
        ("coco", "val2014", "val_split"),
        ("folder", "images", "root"),
    ],
)
def test_missing_sub_folder(tmp_path: Path, dataset_name: str, folder: str, option: str) -> None:
    root = copy_fixture(dataset_name, tmp_path)
    shutil.rmtree(root / folder)
    with pytest.raises(FileNotFoundError, match=option) as error:
        module(dataset_name, root, weak_label="full").setup("fit")
    assert str(root / folder) in str(error.value)


def test_missing_mask_folder(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    shutil.rmtree(root / "SegmentationClassAug")
    with pytest.raises(FileNotFoundError, match="mask_dir") as error:
        module("voc", root, weak_label="point").build_dataset("val")
    assert "SegmentationClassAug" in str(error.value)


def test_listed_id_without_image(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    val = root / "ImageSets" / "Segmentation" / "val.txt"
    val.write_text(val.read_text() + "2099_000001\n")
    with pytest.raises(FileNotFoundError, match="val_list") as error:
        module("voc", root).build_dataset("val")
    assert str(val) in str(error.value) and "2099_000001.jpg" in str(error.value)


def test_empty_split(tmp_path: Path) -> None:
    root = copy_fixture("folder", tmp_path)
    (root / "splits" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match="val_split") as error:
        module("folder", root).build_dataset("val")
    assert str(root / "splits" / "val.txt") in str(error.value)


def test_mask_of_another_size(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    path = root / "SegmentationClassAug" / "2007_000033.png"
    Image.open(path).resize((28, 20)).save(path)
    with pytest.raises(ValueError, match="differs from its image") as error:
        module("voc", root).setup("validate")
    assert str(path) in str(error.value) and "2007_000033.jpg" in str(error.value)


@pytest.mark.parametrize(
    ("dataset_name", "mask"),
    [
        ("voc", "SegmentationClassAug/2007_000033.png"),
        ("ade20k", "annotations/validation/ADE_val_00000001.png"),
        ("folder", "masks/d.png"),
    ],
)
def test_mask_values_out_of_range(tmp_path: Path, dataset_name: str, mask: str) -> None:
    root = copy_fixture(dataset_name, tmp_path)
    path = root / mask
    raw = png(path)
    raw[0, 0] = 200
    Image.fromarray(raw).save(path)
    dataset = module(dataset_name, root).build_dataset("val")
    (problem,) = decode_all(dataset, "val")
    assert "out of range" in problem and str(path) in problem and "200" in problem
    with pytest.warns(UserWarning, match="out of range.*left out of the metrics"):
        assert (dataset[0]["mask"] == VOID).all()


def test_weak_label_file_for_unknown_id(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    shutil.copy(root / "point" / "2007_000032.png", root / "point" / "2099_000001.png")
    with pytest.raises(ValueError, match="weak_dir") as error:
        train_set("voc", root, weak_label="point", weak_dir="point")
    assert str(root / "point" / "2099_000001.png") in str(error.value)
    points = root / "voc_whats_the_point.json"
    clicks = json.loads(points.read_text())
    clicks["2099_000001"] = []
    points.write_text(json.dumps(clicks))
    with pytest.raises(ValueError, match="2099_000001") as error:
        train_set("voc", root, weak_label="point")
    assert str(points) in str(error.value)


def test_training_image_without_weak_label(tmp_path: Path) -> None:
    root = copy_fixture("cityscapes", tmp_path)
    clicks = next((root / "20clicks").glob("*.png"))
    clicks.unlink()
    with pytest.raises(FileNotFoundError, match="clicks_dir") as error:
        train_set("cityscapes", root, weak_label="point")
    assert "20clicks" in str(error.value) and "simulate" in str(error.value)


def test_weak_label_of_another_size(tmp_path: Path) -> None:
    root = copy_fixture("ade20k", tmp_path)
    path = root / "train" / "sparse_label" / "block10" / "ADE_train_00000001.png"
    Image.open(path).resize((10, 10)).save(path)
    with pytest.raises(ValueError, match="differs from its image") as error:
        module("ade20k", root, weak_label="block").setup("fit")
    assert str(path) in str(error.value)


def test_corrupt_image(tmp_path: Path) -> None:
    root = copy_fixture("voc", tmp_path)
    path = root / "JPEGImages" / "2007_000033.jpg"
    path.write_bytes(path.read_bytes()[:200])
    dataset = module("voc", root).build_dataset("val")
    with pytest.raises(ValueError, match="corrupt|not a readable image") as error:
        dataset[0]
    assert str(path) in str(error.value)


def test_colour_masks_are_rejected(tmp_path: Path) -> None:
    root = copy_fixture("folder", tmp_path)
    path = root / "masks" / "d.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(ValueError, match="class-index PNG") as error:
        module("folder", root).setup("validate")
    assert str(path) in str(error.value)


# --------------------------------------------------------------------------------------------
# Mixed forms: a forms manifest, or a mix dealt out over the folder's images
# --------------------------------------------------------------------------------------------


def _same_label(mine: Any, theirs: Any) -> bool:
    return all(
        (getattr(mine, field) is None) == (getattr(theirs, field) is None)
        and (
            getattr(mine, field) is None
            or np.array_equal(getattr(mine, field), getattr(theirs, field))
        )
        for field in ("target", "points", "boxes", "tags")
    )


@pytest.mark.parametrize("source", ["manifest", "mix"])
def test_folder_reads_each_image_in_its_own_form(tmp_path: Path, source: str) -> None:
    root = copy_fixture("folder", tmp_path)
    options: dict[str, Any] = {"crop_size": 16, "batch_size": 3}
    if source == "manifest":
        (root / "splits" / "train_forms.txt").write_text("a point\nb box\n\nc full\n")
        expected = {"a": "point", "b": "box", "c": "full"}
    else:
        options["weak_label"] = {"point": 1 / 3, "scribble": 1 / 3, "image": 1 / 3}
    data = module("folder", root, **options)
    data.setup("fit")
    dataset = data.datasets["train"]
    assert isinstance(dataset, FileDataset)
    forms = {name: dataset.form(name) for name in dataset.image_names()}
    if source == "manifest":
        assert forms == expected
    else:
        assert sorted(forms.values()) == ["image", "point", "scribble"]
    for index in range(len(dataset)):
        name, _, mask = dataset.load(index)
        alone = train_set("folder", root, weak_label=forms[name])
        assert _same_label(dataset.weak_label(name, mask), alone.weak_label(name, mask)), name
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch["form"]) == sorted(forms.values())
    assert batch["allowed"].shape == (3, 3, 16, 16)
