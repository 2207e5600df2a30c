"""Cityscapes (19 train classes as trainIds, 255 = ignore).

Layout (``root``)::

    leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val}/<city>/<stem>_gtFine_labelTrainIds.png   (or only _gtFine_labelIds.png,
                                                                  mapped with the official table)
    20clicks/, 50clicks/, 100clicks/   flat folders of click PNGs named like the gtFine files,
                                       in trainIds with 19 (or 255) = unlabelled
    train/sparse_label/block{10,20,50}/<stem>_leftImg8bit.png   Tree-Energy-Loss blocks, in
                                                                 labelIds (0 = not annotated)

Validation images are 1024x2048: evaluate them with the model's sliding window (``tile_size``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agmm_lightning.data.files import FileDataModule, folder_split
from agmm_lightning.data.io import LabelDecoder, index_files, require_directory
from agmm_lightning.data.readers import ImageRecord, WeakLabelReader
from agmm_lightning.targets import VOID
from agmm_lightning.weak_labels import WeakLabelForm, WeakLabelOption

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELID_TO_TRAINID",
    "cityscapes_labelids_to_target",
    "CityscapesDataModule",
    "cityscapes_block_target",
    "cityscapes_mask",
]

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
"""Cityscapes class names in trainId order."""

IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"


def _cityscapes_lut() -> np.ndarray:
    lut = np.full(256, VOID, dtype=np.uint8)
    label_ids = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    lut[list(label_ids)] = np.arange(len(label_ids), dtype=np.uint8)
    lut.flags.writeable = False
    return lut


CITYSCAPES_LABELID_TO_TRAINID: np.ndarray = _cityscapes_lut()
"""uint8 [256] lookup table: Cityscapes labelId -> trainId (0..18), 255 for every other id."""


def cityscapes_labelids_to_target(label_ids: np.ndarray, *, unlabeled: int = 19) -> np.ndarray:
    """Map Cityscapes labelIds to trainIds (0..18), every other id to ``unlabeled``.

    Use the default (19 = C) for the Tree-Energy-Loss block and click files, whose id 0 means "not
    annotated"; pass ``unlabeled=255`` to turn dense ``_gtFine_labelIds`` masks into void-marked
    masks.

    Args:
        label_ids: Integer array of labelIds (any shape).
        unlabeled: Value given to ids without a trainId, in 0..255.

    Returns:
        uint8 array of the same shape.

    Raises:
        ValueError: On a non-integer array or an out-of-range ``unlabeled``.

    """
    label_ids = np.asarray(label_ids)
    if label_ids.dtype == np.bool_ or not np.issubdtype(label_ids.dtype, np.integer):
        raise ValueError(f"label_ids must have an integer dtype, got {label_ids.dtype}")
    if not 0 <= unlabeled <= VOID:
        raise ValueError(f"unlabeled must be in 0..{VOID}, got {unlabeled}")
    lut = CITYSCAPES_LABELID_TO_TRAINID.copy()
    lut[lut == VOID] = unlabeled
    in_range = (label_ids >= 0) & (label_ids <= VOID)
    return np.where(in_range, lut[np.clip(label_ids, 0, VOID)], np.uint8(unlabeled)).astype(
        np.uint8
    )


def cityscapes_mask(raw: np.ndarray, path: Path) -> np.ndarray:
    """Decode a gtFine mask: trainIds as stored, labelIds mapped (by the file's name).

    Args:
        raw: The PNG's values.
        path: Its file; names ending in ``_gtFine_labelIds.png`` hold labelIds.

    Returns:
        trainIds 0..18 with 255 ignore.
    """
    if path.name.endswith(LABEL_IDS_SUFFIX):
        return cityscapes_labelids_to_target(raw, unlabeled=VOID)
    return raw


def cityscapes_block_target(raw: np.ndarray, path: Path, *, num_classes: int) -> np.ndarray:
    """Decode a Tree-Energy-Loss block label: labelIds, every id without a trainId unlabelled.

    Args:
        raw: The PNG's labelIds.
        path: Its file (unused).
        num_classes: C (19), the unlabelled value.

    Returns:
        The target map.
    """
    del path
    return cityscapes_labelids_to_target(raw, unlabeled=num_classes)


class CityscapesDataModule(FileDataModule):
    """Cityscapes with click or block labels, or simulated ones (see the module docstring).

    Args:
        root: The Cityscapes folder; other paths are relative to it unless absolute.
        weak_label: Form of the training label (METHOD §4): "point" reads ``clicks_dir``,
            "block" ``block_dir``, "image" ``cam_dir`` and the masks' tags; "scribble" and
            "box" need ``simulate``.
        train_split: Training folder under ``leftImg8bit/`` and ``gtFine/``.
        val_split: Validation folder.
        test_split: Test folder; None evaluates on ``val_split``.
        clicks_dir: Flat folder of click PNGs (``20clicks``, ``50clicks`` or ``100clicks``).
        block_dir: Folder of block PNGs in labelIds.
        **kwargs: Options of :class:`~agmm_lightning.data.files.FileDataModule`.
    """

    classes = CITYSCAPES_CLASSES
    layout = "leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/"
    mask_fix = (
        "Masks must be gtFine *_gtFine_labelTrainIds.png (0..18, 255 = ignore) or "
        "*_gtFine_labelIds.png files."
    )

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelOption = "block",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        clicks_dir: str = "20clicks",
        block_dir: str = "train/sparse_label/block10",
        **kwargs: Any,
    ) -> None:
        splits = {"train": train_split, "val": val_split, "test": test_split}
        super().__init__(root, splits=splits, weak_label=weak_label, **kwargs)
        self.clicks_dir = clicks_dir
        self.block_dir = block_dir

    def mask_decoder(self) -> LabelDecoder:
        """The gtFine decoder: trainIds as stored, labelIds mapped (:func:`cityscapes_mask`)."""
        return cityscapes_mask

    def find_images(self) -> dict[str, Path]:
        """Index ``leftImg8bit/`` (every split and city)."""
        folder = require_directory(
            self.root / "leftImg8bit", "root", f"leftImg8bit/<split>/<city>/<stem>{IMAGE_SUFFIX}"
        )
        return index_files(folder, (IMAGE_SUFFIX,), recursive=True)

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """``leftImg8bit/<split>/<city>/`` paired with the gtFine masks."""
        name = str(self.splits[split])
        images = folder_split(
            self.root / "leftImg8bit" / name,
            IMAGE_SUFFIX,
            split=split,
            option=f"{split}_split",
            recursive=True,
        )
        gt = self.root / "gtFine" / name
        masks = index_files(gt, (TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX), recursive=True)
        return [
            ImageRecord(
                stem, path, masks.get(stem, gt / path.parent.name / f"{stem}{TRAIN_IDS_SUFFIX}")
            )
            for stem, path in images.items()
        ]

    def native_weak_labels(
        self, form: WeakLabelForm, names: Sequence[str]
    ) -> WeakLabelReader | None:
        """Read ``clicks_dir`` ("point") or ``block_dir`` ("block")."""
        if form == "point":
            return self.png_weak_labels(
                self.path(self.clicks_dir),
                "clicks_dir",
                names,
                suffixes=(TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX, IMAGE_SUFFIX),
                as_points=True,
            )
        if form == "block":
            return self.png_weak_labels(
                self.path(self.block_dir),
                "block_dir",
                names,
                suffixes=(IMAGE_SUFFIX,),
                decode=partial(cityscapes_block_target, num_classes=self.num_classes),
                fix="Block labels must hold Cityscapes labelIds (0..33).",
            )
        return super().native_weak_labels(form, names)
