"""ADE20K scene parsing (ADEChallengeData2016, 150 classes).

Layout (``root`` = ``ADEChallengeData2016``)::

    images/{training,validation}/<stem>.jpg
    annotations/{training,validation}/<stem>.png    0 = "other" -> void, k -> class k - 1
    train/sparse_label/block{10,20,50}/<stem>.png   Tree-Energy-Loss blocks, same raw encoding
                                                    (0 = not annotated -> unlabelled)
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

__all__ = ["ADE20K_CLASSES", "ADE20KDataModule", "reduce_zero_label"]

ADE20K_CLASSES: tuple[str, ...] = tuple(
    name.replace(" ", "_")
    for name in (
        "wall",
        "building",
        "sky",
        "floor",
        "tree",
        "ceiling",
        "road",
        "bed",
        "windowpane",
        "grass",
        "cabinet",
        "sidewalk",
        "person",
        "earth",
        "door",
        "table",
        "mountain",
        "plant",
        "curtain",
        "chair",
        "car",
        "water",
        "painting",
        "sofa",
        "shelf",
        "house",
        "sea",
        "mirror",
        "rug",
        "field",
        "armchair",
        "seat",
        "fence",
        "desk",
        "rock",
        "wardrobe",
        "lamp",
        "bathtub",
        "railing",
        "cushion",
        "base",
        "box",
        "column",
        "signboard",
        "chest of drawers",
        "counter",
        "sand",
        "sink",
        "skyscraper",
        "fireplace",
        "refrigerator",
        "grandstand",
        "path",
        "stairs",
        "runway",
        "case",
        "pool table",
        "pillow",
        "screen door",
        "stairway",
        "river",
        "bridge",
        "bookcase",
        "blind",
        "coffee table",
        "toilet",
        "flower",
        "book",
        "hill",
        "bench",
        "countertop",
        "stove",
        "palm",
        "kitchen island",
        "computer",
        "swivel chair",
        "boat",
        "bar",
        "arcade machine",
        "hovel",
        "bus",
        "towel",
        "light",
        "truck",
        "tower",
        "chandelier",
        "awning",
        "streetlight",
        "booth",
        "television receiver",
        "airplane",
        "dirt track",
        "apparel",
        "pole",
        "land",
        "bannister",
        "escalator",
        "ottoman",
        "bottle",
        "buffet",
        "poster",
        "stage",
        "van",
        "ship",
        "fountain",
        "conveyer belt",
        "canopy",
        "washer",
        "plaything",
        "swimming pool",
        "stool",
        "barrel",
        "basket",
        "waterfall",
        "tent",
        "bag",
        "minibike",
        "cradle",
        "oven",
        "ball",
        "food",
        "step",
        "tank",
        "trade name",
        "microwave",
        "pot",
        "animal",
        "bicycle",
        "lake",
        "dishwasher",
        "screen",
        "blanket",
        "sculpture",
        "hood",
        "sconce",
        "vase",
        "traffic light",
        "tray",
        "ashcan",
        "fan",
        "pier",
        "crt screen",
        "plate",
        "monitor",
        "bulletin board",
        "shower",
        "radiator",
        "glass",
        "clock",
        "flag",
    )  # fmt: skip
)
"""The 150 ADE20K class names in class order (spaces replaced by underscores)."""


def reduce_zero_label(raw: np.ndarray, path: Path, *, zero_value: int) -> np.ndarray:
    """Decode ADE20K's raw labels: 0 -> ``zero_value``, k -> k - 1.

    Args:
        raw: The PNG's values (0..150).
        path: Its file (unused).
        zero_value: What 0 ("other", or "not annotated" in block files) becomes: 255 (void) in
            masks, C (unlabelled) in weak labels.

    Returns:
        The decoded map (values above 150 stay out of range for the caller's check).
    """
    del path
    return np.where(raw == 0, zero_value, raw.astype(np.int64) - 1)


class ADE20KDataModule(FileDataModule):
    """ADE20K with block labels, or simulated ones (see the module docstring).

    Args:
        root: The ``ADEChallengeData2016`` folder; other paths are relative to it.
        weak_label: Form of the training label (METHOD §4): "block" reads ``block_dir``,
            "image" ``cam_dir`` and the masks' tags; other forms need ``simulate``.
        train_split: Training folder under ``images/`` and ``annotations/``.
        val_split: Validation folder.
        test_split: Test folder; None evaluates on ``val_split``.
        block_dir: Folder of block PNGs in the raw encoding.
        **kwargs: Options of :class:`~agmm_lightning.data.files.FileDataModule`.
    """

    classes = ADE20K_CLASSES
    layout = "images/{training,validation}/ and annotations/{training,validation}/"
    mask_fix = "Annotations must be raw ADE20K PNGs (0 = other, 1..150 = classes)."

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelOption = "block",
        train_split: str = "training",
        val_split: str = "validation",
        test_split: str | None = None,
        block_dir: str = "train/sparse_label/block10",
        **kwargs: Any,
    ) -> None:
        splits = {"train": train_split, "val": val_split, "test": test_split}
        super().__init__(root, splits=splits, weak_label=weak_label, **kwargs)
        self.block_dir = block_dir

    def mask_decoder(self) -> LabelDecoder:
        """Reduce zero label: 0 -> void, k -> k - 1."""
        return partial(reduce_zero_label, zero_value=VOID)

    def find_images(self) -> dict[str, Path]:
        """Index ``images/<split>/`` for every configured split."""
        folder = require_directory(self.root / "images", "root", "images/<split>/<stem>.jpg")
        index: dict[str, Path] = {}
        for name in self.splits.values():
            if name is not None:
                index.update(index_files(folder / name, (".jpg",)))
        return index

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """``images/<split>/`` paired with ``annotations/<split>/``."""
        name = str(self.splits[split])
        images = folder_split(
            self.root / "images" / name, ".jpg", split=split, option=f"{split}_split"
        )
        annotations = self.root / "annotations" / name
        return [
            ImageRecord(stem, path, annotations / f"{stem}.png") for stem, path in images.items()
        ]

    def native_weak_labels(
        self, form: WeakLabelForm, names: Sequence[str]
    ) -> WeakLabelReader | None:
        """Read ``block_dir`` ("block")."""
        if form == "block":
            return self.png_weak_labels(
                self.path(self.block_dir),
                "block_dir",
                names,
                decode=partial(reduce_zero_label, zero_value=self.num_classes),
                fix="Block labels must use the raw ADE20K encoding (0 = not annotated, 1..150).",
            )
        return super().native_weak_labels(form, names)
