"""Write the tiny dataset fixtures of tests/data/<dataset>/ in the datasets' real layouts.

Deterministic: running it again rewrites identical files. A few tiny images per dataset (a few
KB in all), with every weak-label file kind the loaders read:

- folder/: images (PNG, grey PNG, JPEG), masks, splits, classes.txt, weak/{point,scribble,block,
  image}/*.png and weak/box/*.json;
- voc/: JPEGImages, palette SegmentationClassAug, Annotations XML, ImageSets lists in both line
  formats, cls_labels_onehot.npy, "What's the point" JSON (+ background clicks), ScribbleSup XML
  and a ready-made point PNG folder with 255 = unlabelled;
- cityscapes/: leftImg8bit, gtFine trainIds and labelIds (labelIds only for val), 20clicks and
  train/sparse_label/block10 in labelIds;
- ade20k/: images, raw annotations (0 = other) and train/sparse_label/block10 blocks;
- coco/: train2014/val2014 JPEGs, SegmentationClass PNGs and cls_labels_onehot.npy.

Usage: ``python tests/data/make_fixtures.py`` (from anywhere).
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from agmm_lightning.data.cityscapes import CITYSCAPES_LABELID_TO_TRAINID
from agmm_lightning.data.voc import VOC_CLASSES
from agmm_lightning.weak_labels import rasterize_points

HERE = Path(__file__).resolve().parent
VOID = 255

# A shape is (class, kind, x0, y0, x1, y1): a "rect" or an "ellipse" inscribed in the box.
Shape = tuple[int, str, int, int, int, int]


def render_mask(shape: tuple[int, int], background: int, shapes: Sequence[Shape]) -> np.ndarray:
    """Class-index mask of ``shapes`` drawn in order over ``background``."""
    height, width = shape
    mask = np.full(shape, background, np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    for cls, kind, x0, y0, x1, y1 in shapes:
        if kind == "rect":
            inside = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
        else:
            cx, cy, rx, ry = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            inside = ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1
        mask[inside] = cls
    return mask


def render_image(mask: np.ndarray, seed: int) -> np.ndarray:
    """A smooth RGB image whose colours follow the mask (one colour per class, plus a ramp)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, (256, 3))
    ramp = np.linspace(-25, 25, mask.shape[1])[None, :, None]
    return np.clip(palette[mask] + ramp, 0, 255).astype(np.uint8)


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat PIL palette."""
    index = np.arange(256)
    palette = np.zeros((256, 3), np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8).reshape(-1).tolist()


def save_png(path: Path, array: np.ndarray, *, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
    image.save(path, optimize=True)


def save_jpeg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=80)


def save_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def save_xml(path: Path, root: ET.Element) -> None:
    ET.indent(root)
    save_text(path, ET.tostring(root, encoding="unicode") + "\n")


def save_tags(path: Path, tags: dict[str, np.ndarray]) -> None:
    np.save(path, np.array(tags, dtype=object), allow_pickle=True)


def save_blocks(
    root: Path, name: str, mask: np.ndarray, blocks: Sequence[tuple[slice, slice]]
) -> None:
    """Write train/sparse_label/block10/<name>: ``mask`` inside ``blocks``, 0 (none) elsewhere."""
    labels = np.zeros_like(mask)
    for block in blocks:
        labels[block] = mask[block]
    save_png(root / "train" / "sparse_label" / "block10" / name, labels)


def void_boundaries(mask: np.ndarray) -> np.ndarray:
    """VOC-style masks: a 1-px void ring where classes meet."""
    kernel = np.ones((3, 3), np.uint8)
    edges = cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)
    return np.where(edges & (mask != 0), VOID, mask).astype(np.uint8)


def centroid(mask: np.ndarray, cls: int) -> tuple[float, float]:
    rows, cols = np.nonzero(mask == cls)
    return float(np.round(cols.mean())), float(np.round(rows.mean()))


def sub(element: ET.Element, tag: str, text: object | None = None) -> ET.Element:
    child = ET.SubElement(element, tag)
    if text is not None:
        child.text = str(text)
    return child


# --------------------------------------------------------------------------------------------
# Generic folder
# --------------------------------------------------------------------------------------------

FOLDER_SHAPE = (40, 56)
FOLDER_SCENES: dict[str, list[Shape]] = {
    "a": [(1, "ellipse", 6, 6, 24, 24), (2, "rect", 32, 14, 50, 34)],
    "b": [(2, "rect", 4, 20, 20, 36), (1, "ellipse", 28, 4, 52, 28)],
    "c": [(1, "ellipse", 16, 8, 40, 32)],
    "d": [(2, "rect", 10, 10, 30, 30), (1, "ellipse", 34, 18, 50, 34)],
}


def make_folder(root: Path) -> None:
    for index, (stem, shapes) in enumerate(FOLDER_SCENES.items()):
        mask = render_mask(FOLDER_SHAPE, 0, shapes)
        image = render_image(mask, index)
        if stem == "c":
            save_png(root / "images" / f"{stem}.png", image.mean(2).astype(np.uint8))
        elif stem == "d":
            save_jpeg(root / "images" / f"{stem}.jpg", image)
        else:
            save_png(root / "images" / f"{stem}.png", image)
        save_png(root / "masks" / f"{stem}.png", mask)
    save_text(root / "classes.txt", "background\ndisc\nsquare\n")
    save_text(root / "splits" / "train.txt", "a\nb\nc\n")
    save_text(root / "splits" / "val.txt", "d\n")
    save_text(root / "splits" / "test.txt", "d\n")
    num_classes = 3
    for stem in ("a", "b", "c"):
        shapes = FOLDER_SCENES[stem]
        mask = render_mask(FOLDER_SHAPE, 0, shapes)
        clicks = [(*centroid(mask, cls), cls) for cls, *_ in shapes] + [(2.0, 37.0, 0)]
        # Points use the CVPR convention (C = unlabelled), the other rasters 255.
        points = rasterize_points(np.array(clicks, np.float32), FOLDER_SHAPE, num_classes)
        save_png(root / "weak" / "point" / f"{stem}.png", points)
        scribble = np.full(FOLDER_SHAPE, VOID, np.uint8)
        for cls, _, x0, y0, x1, y1 in shapes:
            row = (y0 + y1) // 2
            scribble[row - 1 : row + 2, x0 + 3 : x1 - 3] = cls
        scribble[1:4, 2:-2] = 0
        save_png(root / "weak" / "scribble" / f"{stem}.png", scribble)
        block = np.full(FOLDER_SHAPE, VOID, np.uint8)
        block[0:6, 0:6] = 0
        for cls, _, x0, y0, x1, y1 in shapes:
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            block[cy - 2 : cy + 2, cx - 2 : cx + 2] = cls
        save_png(root / "weak" / "block" / f"{stem}.png", block)
        boxes = [{"label": cls, "box": [x0, y0, x1, y1]} for cls, _, x0, y0, x1, y1 in shapes]
        save_text(root / "weak" / "box" / f"{stem}.json", json.dumps(boxes) + "\n")
        cam = np.where(cv2.erode(mask, np.ones((5, 5), np.uint8)) == mask, mask, VOID)
        save_png(root / "weak" / "image" / f"{stem}.png", cam.astype(np.uint8))


# --------------------------------------------------------------------------------------------
# PASCAL VOC
# --------------------------------------------------------------------------------------------

VOC_SHAPE = (40, 56)
VOC_SCENES: dict[str, list[Shape]] = {
    "2007_000032": [(1, "ellipse", 4, 6, 30, 22), (15, "rect", 36, 12, 48, 36)],
    "2007_000039": [(20, "rect", 10, 8, 40, 30)],
    "2008_000008": [(13, "ellipse", 6, 10, 34, 36), (15, "rect", 38, 4, 50, 30)],
    "2007_000033": [(1, "ellipse", 8, 6, 48, 30)],
}
VOC_TRAIN = ("2007_000032", "2007_000039", "2008_000008")
VOC_VAL = ("2007_000033",)
SCRIBBLE_TAGS = {0: "background", 1: "plane", 13: "horse", 15: "person", 20: "monitor"}


def voc_annotation(image_id: str, mask: np.ndarray, shapes: Sequence[Shape]) -> ET.Element:
    root = ET.Element("annotation")
    sub(root, "folder", "VOC2012")
    sub(root, "filename", f"{image_id}.jpg")
    size = sub(root, "size")
    sub(size, "width", mask.shape[1])
    sub(size, "height", mask.shape[0])
    sub(size, "depth", 3)
    for index, (cls, *_) in enumerate(shapes):
        rows, cols = np.nonzero(mask == cls)
        obj = sub(root, "object")
        sub(obj, "name", VOC_CLASSES[cls])
        sub(obj, "pose", "Unspecified")
        sub(obj, "truncated", 0)
        sub(obj, "difficult", int(image_id == "2008_000008" and index == 1))
        box = sub(obj, "bndbox")
        for tag, value in (("xmin", cols.min()), ("ymin", rows.min())):
            sub(box, tag, int(value) + 1)
        for tag, value in (("xmax", cols.max()), ("ymax", rows.max())):
            sub(box, tag, int(value) + 1)
    return root


def scribble_xml(mask: np.ndarray, shapes: Sequence[Shape]) -> ET.Element:
    root = ET.Element("annotation")
    size = sub(root, "size")
    sub(size, "width", mask.shape[1])
    sub(size, "height", mask.shape[0])
    strokes = [(0, [(2, 1), (mask.shape[1] - 3, 1)])]
    for cls, _, x0, y0, x1, y1 in shapes:
        row = (y0 + y1) // 2
        strokes.append((cls, [(x0 + 4, row), ((x0 + x1) // 2, row + 1), (x1 - 4, row)]))
    for cls, points in strokes:
        polygon = sub(root, "polygon")
        sub(polygon, "tag", SCRIBBLE_TAGS[cls])
        for x, y in points:
            point = sub(polygon, "point")
            sub(point, "X", x)
            sub(point, "Y", y)
    return root


def make_voc(root: Path) -> None:
    palette = voc_palette()
    foreground: dict[str, list[dict[str, float]]] = {}
    background: dict[str, list[dict[str, float]]] = {}
    tags: dict[str, np.ndarray] = {}
    for index, (image_id, shapes) in enumerate(VOC_SCENES.items()):
        mask = render_mask(VOC_SHAPE, 0, shapes)
        save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", render_image(mask, 10 + index))
        save_png(
            root / "SegmentationClassAug" / f"{image_id}.png",
            void_boundaries(mask),
            palette=palette,
        )
        save_xml(root / "Annotations" / f"{image_id}.xml", voc_annotation(image_id, mask, shapes))
        onehot = np.zeros(20, np.float32)
        onehot[[cls - 1 for cls, *_ in shapes]] = 1
        tags[image_id] = onehot
        if image_id not in VOC_TRAIN:
            continue
        clicks = [(*centroid(mask, cls), cls) for cls, *_ in shapes]
        foreground[image_id] = [{"x": x, "y": y, "cls": cls, "rank": 1} for x, y, cls in clicks]
        background[image_id] = [{"x": 2.0, "y": 37.0, "cls": 0, "rank": 1}]
        save_xml(
            root / "scribble_annotation" / "pascal_2012" / f"{image_id}.xml",
            scribble_xml(mask, shapes),
        )
        rows = np.array(clicks + [(2.0, 37.0, 0)], np.float32)
        points = rasterize_points(rows, VOC_SHAPE, len(VOC_CLASSES))
        save_png(root / "point" / f"{image_id}.png", np.where(points == 21, VOID, points))
    lists = root / "ImageSets" / "Segmentation"
    save_text(
        lists / "train_aug.txt",
        "".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in VOC_TRAIN),
    )
    save_text(lists / "train.txt", "".join(f"{i}\n" for i in VOC_TRAIN[:2]))
    save_text(lists / "val.txt", "".join(f"{i}\n" for i in VOC_VAL))
    save_tags(root / "cls_labels_onehot.npy", tags)
    save_text(root / "voc_whats_the_point.json", json.dumps(foreground) + "\n")
    save_text(root / "voc_whats_the_point_bg_from_scribbles.json", json.dumps(background) + "\n")


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------

CITYSCAPES_SHAPE = (32, 64)
# labelIds: 7 road, 11 building, 21 vegetation, 23 sky, 24 person, 26 car, 1 ego vehicle (void).
CITYSCAPES_SCENES: dict[tuple[str, str, str], list[Shape]] = {
    ("train", "aachen", "aachen_000000_000019"): [
        (23, "rect", 0, 0, 64, 10),
        (11, "rect", 0, 10, 40, 20),
        (21, "rect", 40, 10, 64, 20),
        (26, "rect", 10, 16, 30, 26),
        (1, "rect", 0, 29, 64, 32),
    ],
    ("train", "aachen", "aachen_000001_000019"): [
        (23, "rect", 0, 0, 64, 8),
        (11, "rect", 0, 8, 64, 18),
        (24, "rect", 44, 12, 50, 26),
    ],
    ("val", "frankfurt", "frankfurt_000000_000294"): [
        (23, "rect", 0, 0, 64, 12),
        (26, "rect", 20, 14, 44, 24),
        (1, "rect", 0, 30, 64, 32),
    ],
}


def make_cityscapes(root: Path) -> None:
    for index, ((split, city, stem), shapes) in enumerate(CITYSCAPES_SCENES.items()):
        label_ids = render_mask(CITYSCAPES_SHAPE, 7, shapes)
        train_ids = CITYSCAPES_LABELID_TO_TRAINID[label_ids]
        save_png(
            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
            render_image(label_ids, 20 + index),
        )
        gt = root / "gtFine" / split / city
        save_png(gt / f"{stem}_gtFine_labelIds.png", label_ids)
        if split != "train":
            continue
        save_png(gt / f"{stem}_gtFine_labelTrainIds.png", train_ids)
        # Clicks are single pixels, in trainIds with 19 = unlabelled.
        clicks = np.full(CITYSCAPES_SHAPE, 19, np.uint8)
        for label_id, _, x0, y0, x1, y1 in shapes:
            if CITYSCAPES_LABELID_TO_TRAINID[label_id] != VOID:
                clicks[(y0 + y1) // 2, (x0 + x1) // 2] = CITYSCAPES_LABELID_TO_TRAINID[label_id]
        save_png(root / "20clicks" / f"{stem}_gtFine_labelTrainIds.png", clicks)
        blocks = [np.s_[2:6, 4:12], np.s_[20:28, 40:48], np.s_[29:32, 0:6]]
        save_blocks(root, f"{stem}_leftImg8bit.png", label_ids, blocks)


# --------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------

ADE_SHAPE = (40, 56)
# Raw values: 1 wall, 3 sky, 4 floor, 5 tree, 13 person, 20 car; 0 = other.
ADE_SCENES: dict[tuple[str, str], list[Shape]] = {
    ("training", "ADE_train_00000001"): [
        (3, "rect", 0, 0, 56, 12),
        (5, "ellipse", 4, 6, 24, 30),
        (13, "rect", 32, 14, 42, 38),
        (0, "rect", 48, 30, 56, 40),
    ],
    ("training", "ADE_train_00000002"): [
        (1, "rect", 0, 0, 56, 26),
        (20, "rect", 12, 18, 40, 32),
    ],
    ("validation", "ADE_val_00000001"): [
        (3, "rect", 0, 0, 56, 14),
        (13, "ellipse", 20, 10, 36, 36),
        (0, "rect", 0, 34, 10, 40),
    ],
}


def make_ade20k(root: Path) -> None:
    for index, ((split, stem), shapes) in enumerate(ADE_SCENES.items()):
        raw = render_mask(ADE_SHAPE, 4, shapes)
        save_jpeg(root / "images" / split / f"{stem}.jpg", render_image(raw, 30 + index))
        save_png(root / "annotations" / split / f"{stem}.png", raw)
        if split != "training":
            continue
        save_blocks(root, f"{stem}.png", raw, [np.s_[1:5, 1:9], np.s_[30:36, 20:28]])


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------

COCO_SHAPE = (40, 56)
# Classes: 1 person, 3 car, 17 cat, 62 chair.
COCO_SCENES: dict[tuple[str, str], list[Shape]] = {
    ("train2014", "COCO_train2014_000000000009"): [
        (1, "rect", 6, 6, 20, 34),
        (17, "ellipse", 26, 14, 50, 34),
    ],
    ("train2014", "COCO_train2014_000000000025"): [(3, "rect", 8, 12, 44, 30)],
    ("val2014", "COCO_val2014_000000000042"): [
        (62, "rect", 10, 10, 26, 30),
        (1, "ellipse", 30, 6, 50, 36),
    ],
}


def make_coco(root: Path) -> None:
    tags: dict[str, np.ndarray] = {}
    for index, ((split, stem), shapes) in enumerate(COCO_SCENES.items()):
        mask = render_mask(COCO_SHAPE, 0, shapes)
        save_jpeg(root / split / f"{stem}.jpg", render_image(mask, 40 + index))
        save_png(root / "SegmentationClass" / split / f"{stem}.png", void_boundaries(mask))
        onehot = np.zeros(80, np.float32)
        onehot[[cls - 1 for cls, *_ in shapes]] = 1
        tags[stem] = onehot
    save_tags(root / "cls_labels_onehot.npy", tags)


def main() -> None:
    makers = {
        "folder": make_folder,
        "voc": make_voc,
        "cityscapes": make_cityscapes,
        "ade20k": make_ade20k,
        "coco": make_coco,
    }
    for name, make in makers.items():
        root = HERE / name
        shutil.rmtree(root, ignore_errors=True)
        make(root)


if __name__ == "__main__":
    main()
