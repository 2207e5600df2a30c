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

from agmm_lightning.data.base import WeakLabelForm
from agmm_lightning.data.files import (
    FileDataModule,
    ImageRecord,
    LabelDecoder,
    WeakLabelReader,
    index_files,
    match_images,
    require_directory,
)
from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import VOID, cityscapes_labelids_to_target

__all__ = [
    "CITYSCAPES_CLASSES",
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
        batch_size: Training images per batch.
        crop_size: Side of the square training crop, in pixels.
        **kwargs: Options every dataset shares (``simulate``, ``unlabeled_value``, ``cam_dir``,
            ``points_per_segment``, ``block_fraction``, ``box_core_fraction``, ``num_workers``,
            ``seed``, ``augment``, ``predict_split``): see :class:`FileDataModule`.

    Raises:
        ValueError: If an option is out of range.
    """

    layout = "leftImg8bit/<split>/<city>/ and gtFine/<split>/<city>/"
    mask_fix = (
        "Masks must be gtFine *_gtFine_labelTrainIds.png (0..18, 255 = ignore) or "
        "*_gtFine_labelIds.png files."
    )

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelForm = "block",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        clicks_dir: str = "20clicks",
        block_dir: str = "train/sparse_label/block10",
        batch_size: int = 8,
        crop_size: int = 769,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root, weak_label=weak_label, batch_size=batch_size, crop_size=crop_size, **kwargs
        )
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.clicks_dir = clicks_dir
        self.block_dir = block_dir

    @property
    def num_classes(self) -> int:
        """19 train classes."""
        return len(CITYSCAPES_CLASSES)

    @property
    def class_names(self) -> list[str]:
        """The class names in trainId order."""
        return list(CITYSCAPES_CLASSES)

    def mask_decoder(self) -> LabelDecoder:
        """Return the gtFine decoder: trainIds as stored, labelIds mapped (:func:`cityscapes_mask`).

        Returns:
            The decoder.
        """
        return cityscapes_mask

    def find_images(self) -> dict[str, Path]:
        """Index ``leftImg8bit/`` (every split and city).

        Returns:
            ``stem -> image file``.

        Raises:
            FileNotFoundError: If ``leftImg8bit/`` does not exist.
        """
        folder = require_directory(
            self.root / "leftImg8bit", "root", f"leftImg8bit/<split>/<city>/<stem>{IMAGE_SUFFIX}"
        )
        return index_files(folder, (IMAGE_SUFFIX,), recursive=True)

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """List ``leftImg8bit/<split>/`` and pair each image with its gtFine mask.

        Args:
            split: "train", "val" or "test" (``val_split`` when ``test_split`` is None).

        Returns:
            The split's records.

        Raises:
            FileNotFoundError: If the split's folder does not exist.
            ValueError: If it holds no image.
        """
        if split == "test" and self.split_names["test"] is None:
            split = "val"
        folder_name = str(self.split_names[split])
        option = f"{split}_split"
        folder = require_directory(
            self.root / "leftImg8bit" / folder_name, option, f"<city>/<stem>{IMAGE_SUFFIX} images"
        )
        images = index_files(folder, (IMAGE_SUFFIX,), recursive=True)
        if not images:
            raise InputError(
                f"{folder}: no *{IMAGE_SUFFIX} image in its city folders; expected the "
                f"{split} images. Check `{option}`."
            )
        gt_folder = self.root / "gtFine" / folder_name
        masks = index_files(gt_folder, (TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX), recursive=True)
        return match_images(
            list(images),
            images,
            source=f"{folder} (`{option}`)",
            expected_image=lambda stem: folder / f"{stem}{IMAGE_SUFFIX}",
            mask_path=lambda stem: masks.get(
                stem, gt_folder / images[stem].parent.name / f"{stem}{TRAIN_IDS_SUFFIX}"
            ),
        )

    def native_weak_labels(
        self, form: WeakLabelForm, names: Sequence[str]
    ) -> WeakLabelReader | None:
        """Read ``clicks_dir`` ("point") or ``block_dir`` ("block").

        Args:
            form: The weak-label form.
            names: The training stems.

        Returns:
            The reader.

        Raises:
            ValueError: For forms without files ("scribble", "box").
        """
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
