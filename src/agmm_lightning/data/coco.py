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

from agmm_lightning.data.files import FileDataModule, folder_split, match_images
from agmm_lightning.data.io import index_files, read_id_list
from agmm_lightning.data.readers import ImageRecord, MaskTags, TagReader
from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import WeakLabelOption

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
        **kwargs: Options of :class:`~agmm_lightning.data.files.FileDataModule`.
    """

    classes = COCO_CLASSES
    layout = "train2014/, val2014/ and SegmentationClass/{train2014,val2014}/"
    mask_fix = "Point `mask_dir` at COCO class-index PNGs (0..80, 255 = void) in split folders."

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelOption = "image",
        train_split: str = "train2014",
        val_split: str = "val2014",
        test_split: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        mask_dir: str = "SegmentationClass",
        tags_source: Literal["masks", "onehot"] = "masks",
        tags_file: str = "cls_labels_onehot.npy",
        **kwargs: Any,
    ) -> None:
        splits = {"train": train_split, "val": val_split, "test": test_split}
        super().__init__(root, splits=splits, weak_label=weak_label, **kwargs)
        if tags_source not in ("masks", "onehot"):
            raise InputError(f"tags_source must be 'masks' or 'onehot', got {tags_source!r}.")
        if test_list is not None and test_split is None:
            raise InputError(
                f"test_list={test_list!r} needs test_split, the folder of its images; without "
                "test_split the test stage evaluates val_split (with val_list)."
            )
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.mask_dir = mask_dir
        self.tags_source = tags_source
        self.tags_file = tags_file

    def find_images(self) -> dict[str, Path]:
        """Index the image folder of every configured split."""
        index: dict[str, Path] = {}
        for name in self.splits.values():
            if name is not None:
                index.update(index_files(self.root / name, (".jpg",)))
        return index

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """The ids of a split's list (or its whole folder), paired with image and mask."""
        name = str(self.splits[split])
        folder = self.root / name
        masks = self.path(self.mask_dir) / name
        list_file = self.lists[split]
        if list_file is None:
            images = folder_split(folder, ".jpg", split=split, option=f"{split}_split")
            return [ImageRecord(stem, path, masks / f"{stem}.png") for stem, path in images.items()]
        path, option = self.path(list_file), f"{split}_list"
        return match_images(
            read_id_list(path, option),
            self.image_index(),
            source=f"{path} (`{option}`)",
            expected_image=lambda stem: folder / f"{stem}.jpg",
            mask_path=lambda stem: masks / f"{stem}.png",
        )

    def image_tags(self, names: Sequence[str]) -> TagReader:
        """Tags from the masks or ``tags_file`` (``tags_source``)."""
        if self.tags_source == "masks":
            return MaskTags(self.num_classes)
        return self.table_tags(self.tags_file, names)
