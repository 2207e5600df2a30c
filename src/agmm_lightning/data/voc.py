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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agmm_lightning.data.base import WeakLabel, WeakLabelForm
from agmm_lightning.data.files import (
    FileDataModule,
    ImageRecord,
    LabelFiles,
    MaskTags,
    PointWeakLabels,
    TableTags,
    TagReader,
    WeakLabelReader,
    clip_boxes,
    index_files,
    index_label_files,
    match_images,
    read_id_list,
    read_onehot_tags,
    require_directory,
    require_entries,
    require_file,
)
from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import (
    VOC_CLASSES,
    rasterize_polylines,
    read_scribblesup_xml,
    read_voc_annotation,
    read_voc_points,
)

__all__ = ["VOCDataModule", "read_click_files"]

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
        require_entries(names, clicks, known, path, option)
        classes = np.concatenate([rows[:, 2] for rows in clicks.values()] or [np.zeros(0)])
        if ((classes < 0) | (classes >= len(VOC_CLASSES))).any():
            raise InputError(
                f"{path}: click classes {np.unique(classes).astype(int).tolist()[:8]} are out of "
                f"range; expected 0..{len(VOC_CLASSES) - 1}. Check `{option}`."
            )
        for name in names:
            merged[name].append(clicks[name])
    return {name: np.concatenate(rows) for name, rows in merged.items()}


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
class AnnotationBoxWeakLabels:
    """Boxes from VOC ``Annotations/<id>.xml`` (outside every box = background).

    Attributes:
        files: The annotation folder.
        include_difficult: Keep objects flagged difficult.
        needs_mask: Always False.
    """

    files: LabelFiles
    include_difficult: bool = True
    needs_mask: bool = field(default=False, init=False)

    def __call__(
        self, record: ImageRecord, shape: tuple[int, int], mask: np.ndarray | None
    ) -> WeakLabel:
        """Return the boxes of an image, clipped to it (a ``WeakLabelReader``)."""
        del mask
        path = self.files.path(record.name)
        boxes = read_voc_annotation(path, VOC_CLASSES, include_difficult=self.include_difficult)
        return WeakLabel(boxes=clip_boxes(boxes, shape, path))


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
        batch_size: Training images per batch.
        crop_size: Side of the square training crop, in pixels.
        **kwargs: Options every dataset shares (``simulate``, ``unlabeled_value``, ``cam_dir``,
            ``points_per_segment``, ``block_fraction``, ``box_core_fraction``, ``num_workers``,
            ``seed``, ``augment``, ``predict_split``): see :class:`FileDataModule`.

    Raises:
        ValueError: If an option is out of range.
    """

    layout = "the VOC2012 folders JPEGImages/, SegmentationClassAug/ and ImageSets/"
    mask_fix = (
        "Point `mask_dir` at VOC class-index PNGs (SegmentationClassAug or SegmentationClass)."
    )

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelForm = "point",
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
        batch_size: int = 16,
        crop_size: int = 321,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root, weak_label=weak_label, batch_size=batch_size, crop_size=crop_size, **kwargs
        )
        if tags_source not in ("annotations", "masks", "onehot"):
            raise InputError(
                f"tags_source must be 'annotations', 'masks' or 'onehot', got {tags_source!r}."
            )
        self.mask_dir = mask_dir
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.points_file = points_file
        self.background_points_file = background_points_file
        self.scribble_dir = scribble_dir
        self.weak_dir = weak_dir
        self.tags_source = tags_source
        self.tags_file = tags_file
        self.include_difficult = include_difficult

    @property
    def num_classes(self) -> int:
        """21: background and the 20 VOC classes."""
        return len(VOC_CLASSES)

    @property
    def class_names(self) -> list[str]:
        """The VOC class names, background first."""
        return list(VOC_CLASSES)

    def masks_folder(self) -> Path:
        """Return ``mask_dir``, or ``SegmentationClassAug`` / ``SegmentationClass`` (auto).

        Returns:
            The folder of the dense masks (it may not exist).
        """
        if self.mask_dir is not None:
            return self.path(self.mask_dir)
        augmented = self.root / "SegmentationClassAug"
        plain = self.root / "SegmentationClass"
        return plain if plain.is_dir() and not augmented.is_dir() else augmented

    def find_images(self) -> dict[str, Path]:
        """Index ``JPEGImages/``.

        Returns:
            ``id -> image file``.

        Raises:
            FileNotFoundError: If ``JPEGImages/`` does not exist.
        """
        folder = require_directory(self.root / "JPEGImages", "root", "JPEGImages/<id>.jpg")
        return index_files(folder, (".jpg",))

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """Read a split list and pair each id with its image and mask.

        Args:
            split: "train", "val" or "test" (``val_list`` when ``test_list`` is None).

        Returns:
            The split's records.
        """
        if split == "test" and self.lists["test"] is None:
            split = "val"
        option = f"{split}_list"
        path = self.path(str(self.lists[split]))
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
        """Read ``weak_dir``, else the form's distributed files (JSON, XML, Annotations).

        Args:
            form: "point", "scribble", "block" or "box".
            names: The training ids.

        Returns:
            The reader.

        Raises:
            ValueError: For "block" without ``weak_dir``.
        """
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
            return AnnotationBoxWeakLabels(files, self.include_difficult)
        return super().native_weak_labels(form, names)

    def image_tags(self, names: Sequence[str]) -> TagReader:
        """Tags from ``Annotations/``, the masks or ``tags_file`` (``tags_source``).

        Args:
            names: The training ids.

        Returns:
            The tag reader.
        """
        if self.tags_source == "masks":
            return MaskTags(self.num_classes)
        if self.tags_source == "onehot":
            path = self.path(self.tags_file)
            table = read_onehot_tags(path, self.num_classes, "tags_file")
            require_entries(names, table, self.image_index(), path, "tags_file")
            return TableTags(table)
        return AnnotationTags(self._label_files("Annotations", "root", names))

    def _label_files(self, folder: str, option: str, names: Sequence[str]) -> LabelFiles:
        """Index a folder of ``<id>.xml`` files against the images."""
        return index_label_files(
            self.path(folder), (".xml",), option=option, known=self.image_index(), needed=names
        )
