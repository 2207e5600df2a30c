"""Readers of ready-made weak labels and image tags: one object per source, one call per image.

A DataModule builds the reader of its files once per split (checking the folder against the
split's ids); the dataset calls it for each training image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agmm_lightning.data.io import (
    LabelDecoder,
    check_label_values,
    check_same_size,
    clip_boxes,
    index_files,
    read_class_index_png,
    require_directory,
)
from agmm_lightning.errors import InputError, MissingInputError
from agmm_lightning.weak_labels import WeakLabel, points_from_target, tags_from_mask

__all__ = [
    "MixedWeakLabels",
    "BoxWeakLabels",
    "ImageLevelWeakLabels",
    "ImageRecord",
    "LabelFiles",
    "MaskTags",
    "PointWeakLabels",
    "RasterWeakLabels",
    "TableTags",
    "TagReader",
    "WeakLabelReader",
    "index_label_files",
    "read_label_file",
    "require_entries",
]


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split and where its dense mask is (or would be).

    Attributes:
        name: The image id (file stem), unique in the dataset.
        image: The image file.
        mask: The dense mask file (it may not exist for training images), or None when the
            dataset has no masks at all.
    """

    name: str
    image: Path
    mask: Path | None


class WeakLabelReader(Protocol):
    """Reads the weak label of one training image."""

    @property
    def needs_mask(self) -> bool:
        """Whether the reader uses the image's dense mask."""
        ...

    def __call__(
        self, record: ImageRecord, shape: tuple[int, int], mask: np.ndarray | None
    ) -> WeakLabel:
        """Return the weak label of an image of size ``shape`` (dense ``mask`` or None)."""
        ...


class TagReader(Protocol):
    """Reads the image-level tags of one training image."""

    @property
    def needs_mask(self) -> bool:
        """Whether the tags come from the image's dense mask."""
        ...

    def __call__(self, name: str, mask: np.ndarray | None) -> np.ndarray:
        """Return float32 [C] multi-hot tags of image ``name``."""
        ...


@dataclass(frozen=True)
class LabelFiles:
    """The per-image label files of one folder, by image id.

    Attributes:
        directory: The folder.
        paths: ``id -> file``.
        option: The DataModule option that names the folder.
    """

    directory: Path
    paths: Mapping[str, Path]
    option: str

    def path(self, name: str) -> Path:
        """Return the label file of image ``name``.

        Args:
            name: Image id.

        Returns:
            Its file.

        Raises:
            FileNotFoundError: If the folder has none.
        """
        if name not in self.paths:
            raise MissingInputError(
                f"{self.directory}: no label file for image {name!r}. Add it, point "
                f"`{self.option}` at a complete folder, or set `simulate: true`."
            )
        return self.paths[name]


def index_label_files(
    directory: Path,
    suffixes: Sequence[str],
    *,
    option: str,
    known: Iterable[str],
    needed: Iterable[str],
) -> LabelFiles:
    """Index a folder of per-image weak-label files and check it against the dataset's images.

    Args:
        directory: The folder.
        suffixes: Accepted file endings after the image id (e.g. ``(".png",)`` or
            ``("_leftImg8bit.png",)``); the first one is named in messages.
        option: The DataModule option that names the folder.
        known: Every image id of the dataset.
        needed: The ids that need a label (the training split).

    Returns:
        The indexed files.

    Raises:
        FileNotFoundError: If the folder is missing or lacks the file of a needed id.
        ValueError: If it holds a file of an id without an image.
    """
    suffix = suffixes[0]
    require_directory(directory, option, f"one <id>{suffix} weak-label file per training image")
    paths = index_files(directory, suffixes)
    require_entries(
        needed,
        paths,
        known,
        place=lambda name: str(paths.get(name, directory / f"{name}{suffix}")),
        kind="weak-label file",
        option=option,
    )
    return LabelFiles(directory, paths, option)


def read_label_file(
    files: LabelFiles,
    record: ImageRecord,
    shape: tuple[int, int],
    decode: LabelDecoder,
    num_classes: int,
    *,
    fix: str,
) -> np.ndarray:
    """Read, size-check, decode and range-check the weak-label PNG of one image.

    Args:
        files: The label folder.
        record: The image.
        shape: The image's ``(height, width)``.
        decode: Raw values -> target map (C unlabelled).
        num_classes: C.
        fix: What to do about out-of-range values, for the message.

    Returns:
        uint8 target map [H,W].

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is corrupt, of another size or holds values out of range.
    """
    path = files.path(record.name)
    raw = read_class_index_png(path)
    check_same_size(raw.shape, shape, path, record.image)
    return check_label_values(decode(raw, path), raw, num_classes, path, unlabeled=True, fix=fix)


@dataclass(frozen=True)
class RasterWeakLabels:
    """Weak labels stored as one PNG per image (ready-made point/scribble/block/box rasters).

    Attributes:
        files: The label folder.
        num_classes: C.
        decode: Raw values -> target map (C unlabelled).
        as_points: Turn blobs into clicks (for point labels, see :func:`points_from_target`).
        fix: What to do about out-of-range values, for the message.
        needs_mask: Always False.
    """

    files: LabelFiles
    num_classes: int
    decode: LabelDecoder
    as_points: bool = False
    fix: str = "Set `unlabeled_value` to the value that marks unlabelled pixels."
    needs_mask: bool = field(default=False, init=False)

    def read_target(self, record: ImageRecord, shape: tuple[int, int]) -> np.ndarray:
        """Return the target map [H,W] of an image.

        Args:
            record: The image.
            shape: Its ``(height, width)``.

        Returns:
            uint8 target map (C unlabelled).
        """
        return read_label_file(
            self.files, record, shape, self.decode, self.num_classes, fix=self.fix
        )

    def __call__(
        self, record: ImageRecord, shape: tuple[int, int], mask: np.ndarray | None
    ) -> WeakLabel:
        """Return the weak label of an image (see :class:`WeakLabelReader`)."""
        del mask
        target = self.read_target(record, shape)
        if self.as_points:
            return WeakLabel(points=points_from_target(target, self.num_classes))
        return WeakLabel(target=target)


@dataclass(frozen=True)
class BoxWeakLabels:
    """Boxes read from one file per image (a JSON list, a VOC annotation, ...).

    Attributes:
        files: The box files.
        read: Reads a file's float32 [N,5] rows ``(x0, y0, x1, y1, class)``, exclusive far edges
            (a module-level function or its ``functools.partial``: workers pickle the reader).
        needs_mask: Always False.
    """

    files: LabelFiles
    read: Callable[[Path], np.ndarray]
    needs_mask: bool = field(default=False, init=False)

    def __call__(
        self, record: ImageRecord, shape: tuple[int, int], mask: np.ndarray | None
    ) -> WeakLabel:
        """Return the boxes of an image, clipped to it (see :class:`WeakLabelReader`)."""
        del mask
        path = self.files.path(record.name)
        return WeakLabel(boxes=clip_boxes(self.read(path), shape, path))


@dataclass(frozen=True)
class PointWeakLabels:
    """Clicks read beforehand from click files (e.g. the VOC "What's the point" JSON).

    Attributes:
        clicks: ``id -> float32 [N,3]`` rows ``(x, y, class)``.
        needs_mask: Always False.
    """

    clicks: Mapping[str, np.ndarray]
    needs_mask: bool = field(default=False, init=False)

    def __call__(
        self, record: ImageRecord, shape: tuple[int, int], mask: np.ndarray | None
    ) -> WeakLabel:
        """Return the clicks of an image (see :class:`WeakLabelReader`)."""
        del shape, mask
        return WeakLabel(points=self.clicks[record.name])


@dataclass(frozen=True)
class MaskTags:
    """Tags = the classes present in the dense mask.

    Attributes:
        num_classes: C.
        needs_mask: Always True.
    """

    num_classes: int
    needs_mask: bool = field(default=True, init=False)

    def __call__(self, name: str, mask: np.ndarray | None) -> np.ndarray:
        """Return the tags of image ``name`` (see :class:`TagReader`)."""
        if mask is None:
            raise InputError(f"Image {name!r} has no dense mask to take its tags from.")
        return tags_from_mask(mask, self.num_classes)


@dataclass(frozen=True)
class TableTags:
    """Tags looked up in a table read beforehand (e.g. ``cls_labels_onehot.npy``).

    Attributes:
        table: ``id -> float32 [C]``.
        needs_mask: Always False.
    """

    table: Mapping[str, np.ndarray]
    needs_mask: bool = field(default=False, init=False)

    def __call__(self, name: str, mask: np.ndarray | None) -> np.ndarray:
        """Return the tags of image ``name`` (see :class:`TagReader`)."""
        del mask
        return self.table[name]


@dataclass(frozen=True)
class ImageLevelWeakLabels:
    """Image-level supervision: tags, plus CAM pseudo labels when a CAM folder is given.

    Without CAM pseudo labels every pixel is unlabelled (METHOD §5: the CAM stage fills them).

    Attributes:
        tags: Where the tags come from; None takes the classes of the CAM pseudo labels.
        cam: The CAM pseudo-label folder, or None.
        num_classes: C.
    """

    tags: TagReader | None
    cam: RasterWeakLabels | None
    num_classes: int

    @property
    def needs_mask(self) -> bool:
        """Whether the tags come from the dense mask."""
        return self.tags is not None and self.tags.needs_mask

    def __call__(
        self, record: ImageRecord, shape: tuple[int, int], mask: np.ndarray | None
    ) -> WeakLabel:
        """Return the weak label of an image (see :class:`WeakLabelReader`)."""
        if self.cam is None:
            target = np.full(shape, self.num_classes, np.uint8)
        else:
            target = self.cam.read_target(record, shape)
        tags = None if self.tags is None else self.tags(record.name, mask)
        return WeakLabel(target=target, tags=tags)


@dataclass(frozen=True)
class MixedWeakLabels:
    """The weak labels of a split of mixed forms: each image's read by the reader of its form.

    Attributes:
        forms: ``image id -> form``.
        readers: ``form -> reader``, or None where the form is simulated from the dense mask.
    """

    forms: Mapping[str, str]
    readers: Mapping[str, WeakLabelReader | None]

    def reader(self, name: str) -> WeakLabelReader | None:
        """The reader of image ``name``'s form (None: simulate it from the dense mask)."""
        return self.readers[self.forms[name]]

    def needs_mask(self, name: str) -> bool:
        """Whether the weak label of image ``name`` comes from (or uses) its dense mask."""
        reader = self.reader(name)
        return reader is None or reader.needs_mask


def require_entries(
    needed: Iterable[str],
    entries: Mapping[str, Any],
    known: Iterable[str],
    *,
    place: Callable[[str], str],
    kind: str,
    option: str,
) -> None:
    """Check that per-image entries (label files, clicks, tags) cover the split, no more.

    Args:
        needed: The ids that need an entry (the training split).
        entries: The entries, by id.
        known: Every image id of the dataset.
        place: Where the entry of an id is (or would be), for messages.
        kind: What an entry is, for messages.
        option: The DataModule option that names the entries' file or folder.

    Raises:
        FileNotFoundError: If a needed id has no entry.
        ValueError: If an entry belongs to an id without an image.
    """
    unknown = sorted(set(entries) - set(known))
    if unknown:
        raise InputError(
            f"{place(unknown[0])}: {kind} of id {unknown[0]!r}, which has no image ({len(unknown)} "
            f"such, e.g. {unknown[:5]}); expected the dataset's image ids. Remove them, or point "
            f"`{option}` at this dataset's labels."
        )
    missing = [name for name in needed if name not in entries]
    if missing:
        raise MissingInputError(
            f"{place(missing[0])}: {kind} not found ({len(missing)} training image(s) have none, "
            f"e.g. {missing[:5]}). Add them, point `{option}` at a complete set, or set "
            "`simulate: true` to derive labels from the dense masks."
        )
