"""MS COCO 2014 in the weakly-supervised segmentation convention (81 classes, 0 = background).

Layout (``root``)::

    train2014/COCO_train2014_<n>.jpg, val2014/COCO_val2014_<n>.jpg
    SegmentationClass/{train2014,val2014}/COCO_*.png   VOC-style class-index PNGs (255 = void)
    cls_labels_onehot.npy                              optional tags: id -> 80 floats
    optional split lists (e.g. the usual 82,081 / 40,137-image lists), "<id>" per line

The main weak form is image-level: tags from the masks or ``cls_labels_onehot.npy``, plus CAM
pseudo labels (``cam_dir``) once the CAM stage has written them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from agmm_lightning.data.base import WeakLabelForm
from agmm_lightning.data.files import (
    FileDataModule,
    ImageRecord,
    MaskTags,
    TableTags,
    TagReader,
    index_files,
    match_images,
    read_id_list,
    read_onehot_tags,
    require_directory,
    require_entries,
)
from agmm_lightning.errors import InputError

__all__ = ["COCO_CLASSES", "COCODataModule"]

COCO_CLASSES: tuple[str, ...] = tuple(
    name.replace(" ", "_")
    for name in (
        "background",
        "person",
        "bicycle",
        "car",
        "motorcycle",
        "airplane",
        "bus",
        "train",
        "truck",
        "boat",
        "traffic light",
        "fire hydrant",
        "stop sign",
        "parking meter",
        "bench",
        "bird",
        "cat",
        "dog",
        "horse",
        "sheep",
        "cow",
        "elephant",
        "bear",
        "zebra",
        "giraffe",
        "backpack",
        "umbrella",
        "handbag",
        "tie",
        "suitcase",
        "frisbee",
        "skis",
        "snowboard",
        "sports ball",
        "kite",
        "baseball bat",
        "baseball glove",
        "skateboard",
        "surfboard",
        "tennis racket",
        "bottle",
        "wine glass",
        "cup",
        "fork",
        "knife",
        "spoon",
        "bowl",
        "banana",
        "apple",
        "sandwich",
        "orange",
        "broccoli",
        "carrot",
        "hot dog",
        "pizza",
        "donut",
        "cake",
        "chair",
        "couch",
        "potted plant",
        "bed",
        "dining table",
        "toilet",
        "tv",
        "laptop",
        "mouse",
        "remote",
        "keyboard",
        "cell phone",
        "microwave",
        "oven",
        "toaster",
        "sink",
        "refrigerator",
        "book",
        "clock",
        "vase",
        "scissors",
        "teddy bear",
        "hair drier",
        "toothbrush",
    )  # fmt: skip
)
"""Background and the 80 COCO thing classes in WSSS index order (spaces -> underscores)."""


class COCODataModule(FileDataModule):
    """COCO 2014 for image-level (or simulated) weak labels (see the module docstring).

    Args:
        root: The COCO folder; other paths are relative to it unless absolute.
        weak_label: Form of the training label (METHOD §4): "image" reads the tags
            (``tags_source``) and ``cam_dir``; other forms but "full" need ``simulate``.
        train_split: Training image folder (and sub-folder of ``mask_dir``).
        val_split: Validation image folder.
        test_split: Test image folder; None evaluates on ``val_split``.
        train_list: Training id list; None takes every image of ``train_split``.
        val_list: Validation id list; None takes every image of ``val_split``.
        test_list: Test id list (only with ``test_split``); None takes every image of the test
            folder.
        mask_dir: Folder of the class-index masks, one sub-folder per split.
        tags_source: Where image-level tags come from: "masks" or "onehot" (``tags_file``).
        tags_file: NumPy dict id -> 80 floats (no background) for ``tags_source="onehot"``.
        batch_size: Training images per batch.
        crop_size: Side of the square training crop, in pixels.
        **kwargs: Options every dataset shares (``simulate``, ``unlabeled_value``, ``cam_dir``,
            ``points_per_segment``, ``block_fraction``, ``box_core_fraction``, ``num_workers``,
            ``seed``, ``augment``, ``predict_split``): see :class:`FileDataModule`.

    Raises:
        ValueError: If an option is out of range.
    """

    layout = "train2014/, val2014/ and SegmentationClass/{train2014,val2014}/"
    mask_fix = "Point `mask_dir` at COCO class-index PNGs (0..80, 255 = void) in split folders."

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelForm = "image",
        train_split: str = "train2014",
        val_split: str = "val2014",
        test_split: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        mask_dir: str = "SegmentationClass",
        tags_source: Literal["masks", "onehot"] = "masks",
        tags_file: str = "cls_labels_onehot.npy",
        batch_size: int = 16,
        crop_size: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root, weak_label=weak_label, batch_size=batch_size, crop_size=crop_size, **kwargs
        )
        if tags_source not in ("masks", "onehot"):
            raise InputError(f"tags_source must be 'masks' or 'onehot', got {tags_source!r}.")
        if test_list is not None and test_split is None:
            raise InputError(
                f"test_list={test_list!r} needs test_split, the folder of its images; without "
                "test_split the test stage evaluates val_split (with val_list)."
            )
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.mask_dir = mask_dir
        self.tags_source = tags_source
        self.tags_file = tags_file

    @property
    def num_classes(self) -> int:
        """81: background and the 80 COCO classes."""
        return len(COCO_CLASSES)

    @property
    def class_names(self) -> list[str]:
        """The class names, background first."""
        return list(COCO_CLASSES)

    def find_images(self) -> dict[str, Path]:
        """Index the image folder of every configured split.

        Returns:
            ``id -> image file``.
        """
        index: dict[str, Path] = {}
        for name in self.split_names.values():
            if name is not None:
                index.update(index_files(self.root / name, (".jpg",)))
        return index

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """Read a split's list (or list its folder) and pair each id with image and mask.

        Args:
            split: "train", "val" or "test" (the validation split when ``test_split`` is None).

        Returns:
            The split's records.

        Raises:
            FileNotFoundError: If the split's folder or list does not exist.
            ValueError: If the split is empty.
        """
        if split == "test" and self.split_names["test"] is None:
            split = "val"
        folder_name = str(self.split_names[split])
        folder = require_directory(
            self.root / folder_name, f"{split}_split", f"the {split} images COCO_*.jpg"
        )
        list_option = f"{split}_list"
        list_file = self.lists[split]
        if list_file is None:
            names = list(index_files(folder, (".jpg",)))
            source = f"{folder} (`{split}_split`)"
            if not names:
                raise InputError(
                    f"{folder}: no .jpg image; expected the {split} images. Check "
                    f"`{split}_split`, or give `{list_option}`."
                )
        else:
            path = self.path(list_file)
            names = read_id_list(path, list_option)
            source = f"{path} (`{list_option}`)"
        masks = self.path(self.mask_dir) / folder_name
        return match_images(
            names,
            self.image_index(),
            source=source,
            expected_image=lambda name: folder / f"{name}.jpg",
            mask_path=lambda name: masks / f"{name}.png",
        )

    def image_tags(self, names: Sequence[str]) -> TagReader:
        """Tags from the masks or ``tags_file`` (``tags_source``).

        Args:
            names: The training ids.

        Returns:
            The tag reader.
        """
        if self.tags_source == "masks":
            return MaskTags(self.num_classes)
        path = self.path(self.tags_file)
        table = read_onehot_tags(path, self.num_classes, "tags_file")
        require_entries(names, table, self.image_index(), path, "tags_file")
        return TableTags(table)
