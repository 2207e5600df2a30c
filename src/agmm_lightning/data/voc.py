"""PASCAL VOC 2012 with the SBD augmentation (21 classes, 0 = background, 255 = void).

Layout (``root`` = ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png   palette PNGs of the 10,582 train_aug images (+ val); some
                                    distributions call it SegmentationClass
    SegmentationClass/<id>.png      VOC's own masks (train/val only)
    Annotations/<id>.xml            boxes and tags
    ImageSets/Segmentation/train_aug.txt, val.txt   lines "<id>" or "JPEGImages/<id>.jpg ..."

Weak labels as distributed: "What's the point" clicks as redistributed by the Tree-Energy-Loss
authors (``voc_whats_the_point.json`` + ``voc_whats_the_point_bg_from_scribbles.json``),
ScribbleSup XML files (one per image), boxes from ``Annotations/``, tags from ``Annotations/``,
the masks or ``cls_labels_onehot.npy``, and ready-made PNG folders (``weak_dir``) whose
unlabelled value is 255 or 21.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agmm_lightning.data.files import FileDataModule, match_images
from agmm_lightning.data.io import (
    index_files,
    read_id_list,
    require_directory,
    require_file,
)
from agmm_lightning.data.readers import (
    BoxWeakLabels,
    ImageRecord,
    LabelFiles,
    MaskTags,
    PointWeakLabels,
    TagReader,
    WeakLabelReader,
    require_entries,
)
from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import (
    WeakLabel,
    WeakLabelForm,
    WeakLabelOption,
    rasterize_polylines,
)

__all__ = [
    "VOC_CLASSES",
    "VOC_SCRIBBLE_ALIASES",
    "VOCDataModule",
    "read_click_files",
    "read_scribblesup_xml",
    "read_voc_annotation",
    "read_voc_points",
]

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""PASCAL VOC class names, index = class id (0 = background)."""

VOC_SCRIBBLE_ALIASES: dict[str, str] = {
    "plane": "aeroplane",
    "airplane": "aeroplane",
    "bike": "bicycle",
    "table": "diningtable",
    "dining table": "diningtable",
    "motorcycle": "motorbike",
    "motor bike": "motorbike",
    "plant": "pottedplant",
    "potted plant": "pottedplant",
    "monitor": "tvmonitor",
    "tv": "tvmonitor",
    "tv monitor": "tvmonitor",
    "bg": "background",
}
"""ScribbleSup short tag names -> VOC class names (lower case; exact VOC names need no alias)."""


def read_voc_points(path: str | Path) -> dict[str, np.ndarray]:
    """Read a "What's the point" / Tree-Energy-Loss VOC click file.

    The file is a JSON object ``id -> [{"x": float, "y": float, "cls": int, "rank": int}, ...]``
    (``rank`` is optional and ignored; foreground files use ``cls`` 1..20, background files 0).

    Args:
        path: JSON file.

    Returns:
        ``id -> float32 [N, 3]`` rows ``(x, y, cls)``.

    Raises:
        ValueError: On unreadable JSON or entries of the wrong layout (the message names the file).

    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a JSON object id -> list of clicks, got {type(data).__name__}"
        )
    points: dict[str, np.ndarray] = {}
    for image_id, clicks in data.items():
        if not isinstance(clicks, list):
            raise InputError(
                f"{path}: entry {image_id!r} must be a list of clicks, got {type(clicks).__name__}"
            )
        rows = []
        for click in clicks:
            try:
                rows.append((float(click["x"]), float(click["y"]), float(click["cls"])))
            except (TypeError, KeyError, ValueError) as error:
                raise InputError(
                    f"{path}: click {click!r} of {image_id!r} must be an object with numeric "
                    f'"x", "y" and "cls"'
                ) from error
        points[str(image_id)] = np.asarray(rows, dtype=np.float32).reshape(-1, 3)
    return points


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as error:
        raise InputError(f"{path}: not valid XML ({error})") from error


def _xml_number(element: ET.Element, tag: str, path: Path) -> float:
    child = element.find(tag)
    try:
        return float(child.text)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError) as error:
        raise InputError(f"{path}: expected a number in <{tag}> of <{element.tag}>") from error


def _class_index(name: str, class_names: Sequence[str], aliases: dict[str, str], path: Path) -> int:
    lookup = {n.strip().lower(): i for i, n in enumerate(class_names)}
    key = " ".join(name.strip().lower().split())
    key = key if key in lookup else aliases.get(key, key)
    if key not in lookup:
        raise InputError(
            f"{path}: unknown class tag {name!r}; expected one of {list(class_names)} "
            f"or an alias in {sorted(aliases)}"
        )
    return lookup[key]


def read_scribblesup_xml(
    path: str | Path, class_names: Sequence[str]
) -> tuple[tuple[int, int], list[tuple[int, np.ndarray]]]:
    """Read one ScribbleSup annotation file.

    Layout: ``<annotation><size><width/><height/></size><polygon><tag>name</tag><point><X/><Y/>
    </point>...</polygon>...</annotation>``. Tags are matched case-insensitively against
    ``class_names``, then through :data:`VOC_SCRIBBLE_ALIASES` (``plane``, ``bike``, ``table``,
    ``plant``, ``monitor``, ...). Polygons without points are skipped.

    Args:
        path: XML file.
        class_names: Class names, index = class id (e.g. :data:`VOC_CLASSES`).

    Returns:
        ``((height, width), [(class, float32 [P, 2] xy), ...])``.

    Raises:
        ValueError: On malformed XML, a missing size or an unknown tag (naming the file and tag).

    """
    path = Path(path)
    root = _parse_xml(path)
    size = root.find("size")
    if size is None:
        raise InputError(f"{path}: expected <size><width/><height/></size> in <{root.tag}>")
    shape = (int(_xml_number(size, "height", path)), int(_xml_number(size, "width", path)))
    polylines: list[tuple[int, np.ndarray]] = []
    for polygon in root.iter("polygon"):
        tag = polygon.findtext("tag")
        if tag is None:
            raise InputError(f"{path}: <polygon> without a <tag>")
        cls = _class_index(tag, class_names, VOC_SCRIBBLE_ALIASES, path)
        xy = [
            (_xml_number(point, "X", path), _xml_number(point, "Y", path))
            for point in polygon.iter("point")
        ]
        if xy:
            polylines.append((cls, np.asarray(xy, dtype=np.float32)))
    return shape, polylines


def read_voc_annotation(
    path: str | Path, class_names: Sequence[str], *, include_difficult: bool = True
) -> np.ndarray:
    """Read the boxes of a PASCAL VOC ``Annotations/<id>.xml`` file.

    VOC boxes are 1-based and inclusive; they are returned 0-based with exclusive far edges
    (``x0 = xmin - 1``, ``x1 = xmax``).

    Args:
        path: XML file.
        class_names: Class names, index = class id (e.g. :data:`VOC_CLASSES`, background at 0).
        include_difficult: Whether objects flagged ``<difficult>1</difficult>`` are kept.

    Returns:
        float32 [N, 5] rows ``(x0, y0, x1, y1, class)``.

    Raises:
        ValueError: On malformed XML, a missing box or an unknown class (naming the file).

    """
    path = Path(path)
    root = _parse_xml(path)
    rows = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name is None:
            raise InputError(f"{path}: <object> without a <name>")
        cls = _class_index(name, class_names, {}, path)
        if not include_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise InputError(f"{path}: object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (
            _xml_number(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        rows.append((xmin - 1, ymin - 1, xmax, ymax, cls))
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


SCRIBBLE_WIDTH = 3
"""Width in pixels of rasterised ScribbleSup strokes."""


def read_click_files(
    sources: Sequence[tuple[Path, str]], names: Sequence[str], known: Iterable[str]
) -> dict[str, np.ndarray]:
    """Read and merge VOC click files (foreground, then background clicks), checking them.

    Args:
        sources: ``(JSON file, option that names it)`` pairs, files in the "What's the point"
            layout (see :func:`~agmm_lightning.weak_labels.read_voc_points`).
        names: The training ids, each of which needs an entry in every file.
        known: Every image id of the dataset.

    Returns:
        ``id -> float32 [N,3]`` rows ``(x, y, class)``, clicks of later files last.

    Raises:
        FileNotFoundError: If a file does not exist.
        ValueError: If a file is malformed, holds a class outside 0..20, an id without an
            image, or lacks a training id.
    """
    known = set(known)
    merged: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for path, option in sources:
        require_file(path, option, "a JSON dict id -> [{x, y, cls}, ...] of clicks")
        clicks = read_voc_points(path)
        require_entries(
            names, clicks, known, place=partial(_entry, path), kind="click entry", option=option
        )
        classes = np.concatenate([rows[:, 2] for rows in clicks.values()] or [np.zeros(0)])
        if ((classes < 0) | (classes >= len(VOC_CLASSES))).any():
            raise InputError(
                f"{path}: click classes {np.unique(classes).astype(int).tolist()[:8]} are out of "
                f"range; expected 0..{len(VOC_CLASSES) - 1}. Check `{option}`."
            )
        for name in names:
            merged[name].append(clicks[name])
    return {name: np.concatenate(rows) for name, rows in merged.items()}


def _entry(path: Path, name: str) -> str:
    return f"{path} [{name!r}]"


@dataclass(frozen=True)
class ScribbleWeakLabels:
    """ScribbleSup scribbles: one XML per image, rasterised as 3-px polylines.

    Attributes:
        files: The XML folder.
        needs_mask: Always False.
    """

    files: LabelFiles
    needs_mask: bool = field(default=False, init=False)

    def __call__(
        self, record: ImageRecord, shape: tuple[int, int], mask: np.ndarray | None
    ) -> WeakLabel:
        """Return the rasterised scribbles of an image.

        Args:
            record: The image.
            shape: Its ``(height, width)``.
            mask: Unused.

        Returns:
            The weak label (a target map).

        Raises:
            ValueError: If the XML is malformed, names an unknown class or another image size.
        """
        del mask
        path = self.files.path(record.name)
        size, polylines = read_scribblesup_xml(path, VOC_CLASSES)
        if size != tuple(shape):
            raise InputError(
                f"{path}: <size> is {size[1]}x{size[0]} (WxH) but its image {record.image} is "
                f"{shape[1]}x{shape[0]}; expected the scribbles of this image. Check "
                f"`{self.files.option}`."
            )
        target = rasterize_polylines(polylines, shape, len(VOC_CLASSES), width=SCRIBBLE_WIDTH)
        return WeakLabel(target=target)


@dataclass(frozen=True)
class AnnotationTags:
    """Tags = background plus the classes of the objects in ``Annotations/<id>.xml``.

    Attributes:
        files: The annotation folder.
        needs_mask: Always False.
    """

    files: LabelFiles
    needs_mask: bool = field(default=False, init=False)

    def __call__(self, name: str, mask: np.ndarray | None) -> np.ndarray:
        """Return the tags of image ``name`` (a ``TagReader``)."""
        del mask
        boxes = read_voc_annotation(self.files.path(name), VOC_CLASSES)
        tags = np.zeros(len(VOC_CLASSES), np.float32)
        tags[0] = 1.0
        tags[boxes[:, 4].astype(np.int64)] = 1.0
        return tags


class VOCDataModule(FileDataModule):
    """PASCAL VOC 2012 (+SBD) with real or simulated weak labels (see the module docstring).

    Args:
        root: The ``VOC2012`` folder; other paths are relative to it unless absolute.
        weak_label: Form of the training label (METHOD §4). "point" reads ``points_file`` (+
            ``background_points_file``), "scribble" ``scribble_dir``, "box" ``Annotations/``,
            "image" ``cam_dir`` and tags from ``tags_source``; "block" needs ``weak_dir`` or
            ``simulate``.
        mask_dir: Folder of the dense masks; None uses ``SegmentationClassAug`` if it exists,
            else ``SegmentationClass``.
        train_list: Training split list.
        val_list: Validation split list.
        test_list: Test split list; None evaluates on ``val_list``.
        points_file: Foreground clicks (JSON).
        background_points_file: Background clicks (JSON); None uses foreground clicks only.
        scribble_dir: Folder of ScribbleSup ``<id>.xml`` files.
        weak_dir: Folder of ready-made ``<id>.png`` weak labels of the chosen form; it replaces
            the files above.
        tags_source: Where image-level tags come from: "annotations" (``Annotations/``),
            "masks" or "onehot" (``tags_file``).
        tags_file: NumPy dict id -> 20 floats (no background) for ``tags_source="onehot"``.
        include_difficult: Keep boxes of objects flagged difficult.
        **kwargs: Options of :class:`~agmm_lightning.data.files.FileDataModule`.
    """

    classes = VOC_CLASSES
    layout = "the VOC2012 folders JPEGImages/, SegmentationClassAug/ and ImageSets/"
    mask_fix = (
        "Point `mask_dir` at VOC class-index PNGs (SegmentationClassAug or SegmentationClass)."
    )

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelOption = "point",
        mask_dir: str | None = None,
        train_list: str = "ImageSets/Segmentation/train_aug.txt",
        val_list: str = "ImageSets/Segmentation/val.txt",
        test_list: str | None = None,
        points_file: str = "voc_whats_the_point.json",
        background_points_file: str | None = "voc_whats_the_point_bg_from_scribbles.json",
        scribble_dir: str = "scribble_annotation/pascal_2012",
        weak_dir: str | None = None,
        tags_source: Literal["annotations", "masks", "onehot"] = "annotations",
        tags_file: str = "cls_labels_onehot.npy",
        include_difficult: bool = True,
        **kwargs: Any,
    ) -> None:
        splits = {"train": train_list, "val": val_list, "test": test_list}
        super().__init__(root, splits=splits, weak_label=weak_label, **kwargs)
        if tags_source not in ("annotations", "masks", "onehot"):
            raise InputError(
                f"tags_source must be 'annotations', 'masks' or 'onehot', got {tags_source!r}."
            )
        self.mask_dir = mask_dir
        self.points_file = points_file
        self.background_points_file = background_points_file
        self.scribble_dir = scribble_dir
        self.weak_dir = weak_dir
        self.tags_source = tags_source
        self.tags_file = tags_file
        self.include_difficult = include_difficult

    def masks_folder(self) -> Path:
        """Return ``mask_dir``, or ``SegmentationClassAug`` / ``SegmentationClass`` (auto)."""
        if self.mask_dir is not None:
            return self.path(self.mask_dir)
        augmented = self.root / "SegmentationClassAug"
        plain = self.root / "SegmentationClass"
        return plain if plain.is_dir() and not augmented.is_dir() else augmented

    def find_images(self) -> dict[str, Path]:
        """Index ``JPEGImages/``."""
        folder = require_directory(self.root / "JPEGImages", "root", "JPEGImages/<id>.jpg")
        return index_files(folder, (".jpg",))

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """Read a split list and pair each id with its image and mask."""
        option = f"{split}_list"
        path = self.path(str(self.splits[split]))
        masks = self.masks_folder()
        return match_images(
            read_id_list(path, option),
            self.image_index(),
            source=f"{path} (`{option}`)",
            expected_image=lambda name: self.root / "JPEGImages" / f"{name}.jpg",
            mask_path=lambda name: masks / f"{name}.png",
        )

    def native_weak_labels(
        self, form: WeakLabelForm, names: Sequence[str]
    ) -> WeakLabelReader | None:
        """Read ``weak_dir``, else the form's distributed files (JSON, XML, Annotations)."""
        if self.weak_dir is not None:
            return self.png_weak_labels(
                self.path(self.weak_dir), "weak_dir", names, as_points=form == "point"
            )
        if form == "point":
            sources = [(self.path(self.points_file), "points_file")]
            if self.background_points_file is not None:
                sources.append((self.path(self.background_points_file), "background_points_file"))
            return PointWeakLabels(read_click_files(sources, names, self.image_index()))
        if form == "scribble":
            return ScribbleWeakLabels(self._label_files(self.scribble_dir, "scribble_dir", names))
        if form == "box":
            files = self._label_files("Annotations", "root", names)
            read = partial(
                read_voc_annotation,
                class_names=VOC_CLASSES,
                include_difficult=self.include_difficult,
            )
            return BoxWeakLabels(files, read)
        return super().native_weak_labels(form, names)

    def image_tags(self, names: Sequence[str]) -> TagReader:
        """Tags from ``Annotations/``, the masks or ``tags_file`` (``tags_source``)."""
        if self.tags_source == "masks":
            return MaskTags(self.num_classes)
        if self.tags_source == "onehot":
            return self.table_tags(self.tags_file, names)
        return AnnotationTags(self._label_files("Annotations", "root", names))

    def _label_files(self, folder: str, option: str, names: Sequence[str]) -> LabelFiles:
        """Index a folder of ``<id>.xml`` files against the images."""
        return self.label_files(self.path(folder), option, names, suffixes=(".xml",))
