"""Datasets read from disk: file helpers with clear errors, weak-label readers, the shared base.

Every error names the file it could not use, what was expected there and the DataModule option
that fixes it. Cheap checks run when a split's dataset is built (folders, split lists, that each
listed id has an image and, where needed, a mask or a weak-label file, and that no weak-label
file belongs to an unknown id); per-file checks run when a sample is loaded (decoding, sizes,
label values).

A concrete DataModule (VOC, Cityscapes, ...) lists the images of each split as
:class:`ImageRecord` s, says how its masks are encoded, and builds the reader of its own
weak-label files; :class:`FileDataModule` does the rest: image-level labels from CAM folders,
simulation from dense masks, mask checks and the :class:`FileDataset` of each split.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import compress
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, cast

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from agmm_lightning.data.base import (
    STAGE_SPLITS,
    AGMMDataModule,
    Mode,
    PredictSplit,
    Split,
    WeakLabel,
    WeakLabelDataset,
    WeakLabelForm,
    check_simulation_options,
)
from agmm_lightning.data.transforms import build_eval_sample
from agmm_lightning.errors import InputError, MissingInputError
from agmm_lightning.weak_labels import VOID, tags_from_mask

__all__ = [
    "FileDataModule",
    "FileDataset",
    "IMAGE_SUFFIXES",
    "ImageLevelWeakLabels",
    "ImageRecord",
    "LabelDecoder",
    "LabelFiles",
    "MaskTags",
    "PointWeakLabels",
    "RasterWeakLabels",
    "TableTags",
    "TagReader",
    "WeakLabelReader",
    "check_label_values",
    "check_same_size",
    "clip_boxes",
    "existing_files",
    "identity_mask",
    "image_size",
    "index_files",
    "index_label_files",
    "label_size",
    "match_images",
    "points_from_target",
    "read_class_index_png",
    "read_id_list",
    "read_json",
    "read_label_file",
    "read_onehot_tags",
    "read_pickled_table",
    "read_rgb_image",
    "require_directory",
    "require_entries",
    "require_file",
    "unlabeled_to_target",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
"""File endings of images, in order of preference when one stem has several."""

_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")

LabelDecoder = Callable[[np.ndarray, Path], np.ndarray]
"""Maps the raw values of a label PNG (and its path, for encodings chosen by file name) to
class indices: a dense mask (255 void) or a target map (C unlabelled, 255 void)."""


# --------------------------------------------------------------------------------------------
# Files, folders and lists
# --------------------------------------------------------------------------------------------


def require_directory(path: Path, option: str, expected: str) -> Path:
    """Return ``path`` if it is a directory, else raise naming the option that sets it.

    Args:
        path: The directory.
        option: The DataModule option that points at it (e.g. ``"root"``).
        expected: What the directory should hold, for the message.

    Returns:
        ``path``.

    Raises:
        FileNotFoundError: If ``path`` is not a directory.
    """
    if not path.is_dir():
        raise MissingInputError(
            f"{path}: directory not found; expected {expected}. Check the `{option}` option."
        )
    return path


def require_file(path: Path, option: str, expected: str) -> Path:
    """Return ``path`` if it is a file, else raise naming the option that sets it.

    Args:
        path: The file.
        option: The DataModule option that points at it.
        expected: What the file should hold, for the message.

    Returns:
        ``path``.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
    """
    if not path.is_file():
        raise MissingInputError(
            f"{path}: file not found; expected {expected}. Check the `{option}` option."
        )
    return path


def index_files(
    directory: Path, suffixes: Sequence[str], *, recursive: bool = False
) -> dict[str, Path]:
    """Map each image id to its file: the files of ``directory`` ending in one of ``suffixes``.

    The id is the file name without the matching suffix. When an id has files with several
    suffixes, the earliest suffix in ``suffixes`` wins.

    Args:
        directory: Folder to list (missing folders give an empty index).
        suffixes: Accepted file endings (e.g. ``(".png",)`` or ``("_leftImg8bit.png",)``).
        recursive: Also list sub-folders (e.g. Cityscapes' city folders).

    Returns:
        ``id -> path``, sorted by id.
    """
    found: dict[str, dict[int, Path]] = {}
    for folder, _, names in os.walk(directory) if recursive else _top_level(directory):
        for name in names:
            for rank, suffix in enumerate(suffixes):
                if name.endswith(suffix) and len(name) > len(suffix):
                    found.setdefault(name[: -len(suffix)], {})[rank] = Path(folder) / name
                    break
    return {stem: paths[min(paths)] for stem, paths in sorted(found.items())}


def _top_level(directory: Path) -> Iterable[tuple[str, list[str], list[str]]]:
    """``os.walk``'s first entry only (nothing if the folder does not exist)."""
    if directory.is_dir():
        yield str(directory), [], [entry.name for entry in os.scandir(directory)]


def existing_files(paths: Sequence[Path]) -> list[bool]:
    """Whether each path exists, with one directory listing per parent folder.

    Args:
        paths: Files to look for.

    Returns:
        One flag per path.
    """
    listings: dict[Path, set[str]] = {}
    for parent in {path.parent for path in paths}:
        listings[parent] = set(os.listdir(parent)) if parent.is_dir() else set()
    return [path.name in listings[path.parent] for path in paths]


def read_id_list(path: Path, option: str) -> list[str]:
    """Read a split list: one image per line, as ``<id>`` or ``<dir>/<id>.jpg [<dir>/<id>.png]``.

    Only the first whitespace-separated token of a line is used; a folder in front and an image
    file ending are removed from it. Blank lines are skipped.

    Args:
        path: The list file.
        option: The DataModule option that names the list.

    Returns:
        The ids, in file order.

    Raises:
        FileNotFoundError: If the list does not exist.
        ValueError: If it lists no id.
    """
    require_file(path, option, "a split list with one image id per line")
    ids = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        if not tokens:
            continue
        name = PurePosixPath(tokens[0]).name
        stem, suffix = os.path.splitext(name)
        ids.append(stem if suffix.lower() in IMAGE_SUFFIXES else name)
    if not ids:
        raise InputError(
            f"{path}: the split list is empty; expected one image id per line. Fill it or point "
            f"`{option}` at another list."
        )
    return ids


def read_json(path: Path, option: str, expected: str) -> Any:
    """Read a JSON file, naming it and its option on failure.

    Args:
        path: The file.
        option: The DataModule option that names it.
        expected: What the file should hold, for the message.

    Returns:
        The parsed content.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not valid JSON.
    """
    require_file(path, option, expected)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}); expected {expected}.") from error


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


def match_images(
    names: Sequence[str],
    images: Mapping[str, Path],
    *,
    source: str,
    expected_image: Callable[[str], Path],
    mask_path: Callable[[str], Path | None],
) -> list[ImageRecord]:
    """Pair the ids of a split with their image files, failing on the first ids without one.

    Args:
        names: The split's ids.
        images: Every image of the dataset, ``id -> path`` (see :func:`index_files`).
        source: Where the ids come from (a list file and its option), for the message.
        expected_image: Where the image of an id should be, for the message.
        mask_path: Where the dense mask of an id is, or None.

    Returns:
        One record per id, in order.

    Raises:
        FileNotFoundError: If some id has no image.
    """
    missing = [name for name in names if name not in images]
    if missing:
        raise MissingInputError(
            f"{source} names {len(missing)} image(s) that do not exist, e.g. "
            f"{expected_image(missing[0])} (ids {missing[:5]}). Remove them from the list, or "
            "check the `root` option."
        )
    return [ImageRecord(name, images[name], mask_path(name)) for name in names]


# --------------------------------------------------------------------------------------------
# Images and label PNGs
# --------------------------------------------------------------------------------------------


def _open_image(path: Path) -> Image.Image:
    """Open an image file lazily, or raise naming it."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise MissingInputError(f"{path}: file not found.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(
            f"{path}: not a readable image ({error}); expected a JPEG or PNG file. Replace it, "
            "or remove its id from the split."
        ) from error


def read_rgb_image(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB [H,W,3] (grey and palette images are converted).

    Args:
        path: Image file.

    Returns:
        The pixels.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be decoded (the message names it).
    """
    with _open_image(path) as image:
        try:
            return np.array(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(
                f"{path}: the image is corrupt ({error}); expected a complete JPEG or PNG file. "
                "Replace it, or remove its id from the split."
            ) from error


def image_size(path: Path) -> tuple[int, int]:
    """Read an image's ``(height, width)`` from its header, without decoding the pixels.

    Args:
        path: Image file.

    Returns:
        ``(height, width)``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not an image.
    """
    with _open_image(path) as image:
        width, height = image.size
    return height, width


def _open_label(path: Path) -> Image.Image:
    """Open a label PNG lazily, checking from its header that it holds class indices."""
    image = _open_image(path)
    if image.mode not in _INDEX_MODES:
        image.close()
        raise InputError(
            f"{path}: expected a single-channel class-index PNG (palette or greyscale), got "
            f"mode {image.mode!r}. Convert colour-coded labels to class indices."
        )
    return image


def label_size(path: Path) -> tuple[int, int]:
    """Read a label PNG's ``(height, width)`` from its header, checking it holds class indices.

    Args:
        path: Label file (palette, greyscale or 16-bit PNG).

    Returns:
        ``(height, width)``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not an image or holds colours instead of indices.
    """
    with _open_label(path) as image:
        width, height = image.size
    return height, width


def read_class_index_png(path: Path) -> np.ndarray:
    """Read the values of a single-channel label PNG (palette indices for mode "P").

    Args:
        path: Label file (palette, greyscale or 16-bit PNG).

    Returns:
        Integer array [H,W] of the stored values (not colours).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be decoded or holds colours instead of indices.
    """
    with _open_label(path) as image:
        try:
            return np.array(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(f"{path}: the label PNG is corrupt ({error}). Replace it.") from error


def check_same_size(
    label: tuple[int, ...], shape: tuple[int, int], path: Path, image: Path
) -> None:
    """Raise unless a label map has its image's size.

    Args:
        label: The label map's ``(height, width)``.
        shape: The image's ``(height, width)``.
        path: The label's file.
        image: The image's file.

    Raises:
        ValueError: If the sizes differ (the message names both files).
    """
    if tuple(label) != tuple(shape):
        raise InputError(
            f"{path}: size {label[1]}x{label[0]} (WxH) differs from its image "
            f"{image} ({shape[1]}x{shape[0]}); expected labels of the image's size. Replace the "
            "file, or check that the label folder belongs to these images."
        )


def check_label_values(
    values: np.ndarray,
    raw: np.ndarray,
    num_classes: int,
    path: Path,
    *,
    unlabeled: bool,
    fix: str,
) -> np.ndarray:
    """Return a decoded label map as uint8, or raise if it holds values out of range.

    Args:
        values: The decoded map.
        raw: The values stored in the file (named in the message).
        num_classes: C.
        path: Its file, for the message.
        unlabeled: Whether C (unlabelled) is allowed: True for target maps, False for masks.
        fix: What to do about bad values, for the message.

    Returns:
        The map as uint8.

    Raises:
        ValueError: If a value is negative, or >= C (> C for targets) and not 255.
    """
    limit = num_classes + 1 if unlabeled else num_classes
    bad = ((values < 0) | (values >= limit)) & (values != VOID)
    if bad.any():
        shown = np.unique(raw[bad])[:8].tolist()
        raise InputError(
            f"{path}: stored values {shown} are out of range (after decoding, expected "
            f"0..{limit - 1} or {VOID}). {fix}"
        )
    return values.astype(np.uint8)


def unlabeled_to_target(
    raw: np.ndarray, path: Path, *, num_classes: int, unlabeled_value: int | None
) -> np.ndarray:
    """Decode a ready-made weak-label PNG: class indices plus one "unlabelled" value.

    With ``unlabeled_value`` None, a file holding the value C uses C for unlabelled (the CVPR
    code's convention; 255 then stays void); otherwise 255 is unlabelled (the Tree-Energy-Loss
    convention, where void cannot be told apart). The choice is made per file.

    Args:
        raw: The PNG's values.
        path: Its file (unused; part of the :data:`LabelDecoder` signature).
        num_classes: C.
        unlabeled_value: The value meaning "unlabelled", or None to detect it.

    Returns:
        The target map, with C where unlabelled (still to be range-checked).
    """
    del path
    if unlabeled_value is None:
        unlabeled_value = num_classes if (raw == num_classes).any() else VOID
    return np.where(raw == unlabeled_value, num_classes, raw)


def points_from_target(target: np.ndarray, num_classes: int) -> np.ndarray:
    """Turn a rasterised point label into clicks: one per connected blob of one class.

    Clicks are carried through augmentation as coordinates and re-drawn afterwards, so a click
    stays visible when the image shrinks (a raster click would vanish under nearest resizing).

    Args:
        target: Target map [H,W] (0..C-1 labelled, C unlabelled, 255 void).
        num_classes: C.

    Returns:
        float32 [N,3] rows ``(x, y, class)`` at the blobs' centroids.
    """
    rows = []
    for cls in np.unique(target[target < num_classes]):
        count, _, _, centroids = cv2.connectedComponentsWithStats(
            (target == cls).astype(np.uint8), connectivity=8
        )
        xy = centroids[1:count]
        rows.append(np.column_stack([xy, np.full(len(xy), cls)]))
    if not rows:
        return np.zeros((0, 3), np.float32)
    return np.concatenate(rows).astype(np.float32)


def clip_boxes(boxes: np.ndarray, shape: tuple[int, int], path: Path) -> np.ndarray:
    """Clip boxes to their image, with a warning counting those that stuck out.

    Boxes left empty by the clipping (lying outside the image) are dropped.

    Args:
        boxes: float32 [N,5] rows ``(x0, y0, x1, y1, class)`` with exclusive far edges.
        shape: The image's ``(height, width)``.
        path: The file the boxes come from, named in the warning.

    Returns:
        float32 [M,5] boxes inside the image, M <= N.
    """
    height, width = shape
    corners = np.clip(boxes[:, :4], 0, np.array([width, height, width, height], np.float32))
    outside = int((corners != boxes[:, :4]).any(1).sum())
    clipped = np.column_stack([corners, boxes[:, 4]]).astype(np.float32)
    kept = clipped[(clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])]
    if outside:
        warnings.warn(
            f"{path}: {outside} of {len(boxes)} box(es) extend beyond the {width}x{height} (WxH) "
            f"image; clipped to it ({len(boxes) - len(kept)} left empty and dropped).",
            stacklevel=2,
        )
    return kept


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds NumPy arrays and plain Python containers, and nothing else.

    A pickle names the functions that rebuild its objects, so a crafted ``.npy`` file read with
    ``np.load(allow_pickle=True)`` can run any code; this one admits only the array builders.
    """

    _ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed array builder, refuse anything else."""
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it would call {module}.{name}, which is not an array")


def read_pickled_table(path: Path) -> object:
    """Read the object a ``.npy`` file pickled (``np.save`` of a dict), admitting only arrays.

    Args:
        path: The ``.npy`` file.

    Returns:
        The object: what ``np.load(path, allow_pickle=True).item()`` would return.

    Raises:
        ValueError: If the file is not a ``.npy`` file of one pickled object, or its pickle would
            build anything but NumPy arrays, numbers, strings and containers.
    """
    with path.open("rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(file)
            if dtype != np.dtype(object) or shape != ():
                raise InputError(
                    f"{path}: holds a {dtype} array of shape {shape}; expected a saved dict "
                    "(np.save(path, {id: tags}))."
                )
            table = _ArrayUnpickler(file).load()
        except (ValueError, EOFError, pickle.UnpicklingError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(
                f"{path}: not a NumPy file holding a dict of arrays ({error}); expected "
                "np.save(path, {id: tags})."
            ) from error
    return table.item() if isinstance(table, np.ndarray) else table


def read_onehot_tags(path: Path, num_classes: int, option: str) -> dict[str, np.ndarray]:
    """Read a ``cls_labels_onehot.npy`` dict of image tags (id -> C - 1 floats, no background).

    Background is added as present in every image, as image-level WSSS assumes.

    Args:
        path: The ``.npy`` file (a pickled dict, as the WSSS repositories save it).
        num_classes: C, background included.
        option: The DataModule option that names the file.

    Returns:
        ``id -> float32 [C]`` multi-hot tags.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a dict of vectors of C - 1 values.
    """
    require_file(path, option, "a NumPy dict id -> multi-hot foreground tags")
    table = read_pickled_table(path)
    if not isinstance(table, dict):
        raise InputError(f"{path}: expected a dict id -> tags, got {type(table).__name__}.")
    tags = {}
    for name, vector in table.items():
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.size != num_classes - 1:
            raise InputError(
                f"{path}: tags of {name!r} have {vector.size} values; expected {num_classes - 1} "
                "(one per foreground class, background excluded)."
            )
        tags[str(name)] = np.concatenate([[1.0], (vector > 0).astype(np.float32)])
    return tags


# --------------------------------------------------------------------------------------------
# Weak-label readers
# --------------------------------------------------------------------------------------------


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
    unknown = sorted(set(paths) - set(known))
    if unknown:
        raise InputError(
            f"{paths[unknown[0]]}: weak label for id {unknown[0]!r}, which has no image "
            f"({len(unknown)} such file(s) in {directory}); expected file names <id>{suffix} of "
            f"the dataset's images. Remove them, or point `{option}` at this dataset's labels."
        )
    missing = [name for name in needed if name not in paths]
    if missing:
        raise MissingInputError(
            f"{directory / (missing[0] + suffix)}: weak-label file not found ({len(missing)} "
            f"training image(s) have none, e.g. {missing[:5]}). Add them, point `{option}` at a "
            "complete folder, or set `simulate: true` to derive labels from the dense masks."
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


def require_entries(
    names: Iterable[str], table: Mapping[str, Any], known: Iterable[str], path: Path, option: str
) -> None:
    """Check that a per-image table (JSON clicks, tags) covers the split and only known images.

    Args:
        names: The ids that need an entry (the training split).
        table: The table, by id.
        known: Every image id of the dataset.
        path: The table's file.
        option: The DataModule option that names it.

    Raises:
        ValueError: If an entry has no image, or a needed id has no entry.
    """
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise InputError(
            f"{path}: entries for {len(unknown)} id(s) without an image, e.g. {unknown[:5]}; "
            f"expected ids of the dataset's images. Point `{option}` at this dataset's file."
        )
    missing = [name for name in names if name not in table]
    if missing:
        raise InputError(
            f"{path}: no entry for {len(missing)} training image(s), e.g. {missing[:5]}. Point "
            f"`{option}` at a complete file, or set `simulate: true`."
        )


# --------------------------------------------------------------------------------------------
# Dataset and DataModule
# --------------------------------------------------------------------------------------------


class FileDataset(WeakLabelDataset):
    """A split of images (and dense masks) on disk, with weak labels from a reader or simulated.

    Args:
        records: The split's images.
        num_classes: C.
        decode_mask: Raw mask values -> class indices (255 void).
        mask_fix: What to do about out-of-range mask values, for the message.
        weak_labels: Reader of the training weak labels; None simulates them from the masks.
        mode: Sample mode (see :class:`WeakLabelDataset`).
        transform: The albumentations pipeline.
        weak_label: Form of the training label.
        seed: Seed of the weak-label simulation.
        points_per_segment: Clicks per connected segment for simulated points.
        block_fraction: Fraction of the image covered by simulated blocks.
        box_core_fraction: Central fraction of each box labelled with its class.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        num_classes: int,
        *,
        decode_mask: LabelDecoder,
        mask_fix: str,
        weak_labels: WeakLabelReader | None,
        mode: Mode,
        transform: A.BaseCompose,
        weak_label: WeakLabelForm = "point",
        seed: int = 0,
        points_per_segment: int = 1,
        block_fraction: float = 0.1,
        box_core_fraction: float = 0.0,
    ) -> None:
        super().__init__(
            num_classes,
            mode=mode,
            transform=transform,
            weak_label=weak_label,
            seed=seed,
            points_per_segment=points_per_segment,
            block_fraction=block_fraction,
            box_core_fraction=box_core_fraction,
        )
        self.records = list(records)
        self.records_by_name = {record.name: record for record in self.records}
        self.decode_mask = decode_mask
        self.mask_fix = mask_fix
        self.weak_labels = weak_labels
        # Batches must share their keys: when only some images have a mask, the others get an
        # all-void one (ignored by every metric) instead of none.
        self.void_missing_masks = any(record.mask is not None for record in self.records)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return the sample of image ``index``; a file that fails to decode does not end the run.

        The header check at ``setup`` finds most bad files; one whose pixels are corrupt behind a
        good header is found only here. A training sample is then replaced by the next good one
        and an evaluation sample by an all-void one (left out of the metrics), with a warning
        naming the file.
        """
        try:
            return super().__getitem__(index)
        except InputError as error:
            if self.mode == "train":
                return self._replace_training_sample(index, error)
            if self.mode == "eval":
                return self._void_sample(index, error)
            raise

    def _replace_training_sample(self, index: int, error: InputError) -> dict[str, Any]:
        warnings.warn(f"{error} Training goes on with the next image instead.", stacklevel=2)
        for offset in range(1, len(self)):
            try:
                return super().__getitem__((index + offset) % len(self))
            except InputError:
                continue
        raise InputError(f"No training image of the split can be read; the first: {error}")

    def _void_sample(self, index: int, error: InputError) -> dict[str, Any]:
        record = self.records[index]
        height, width = image_size(record.image)
        warnings.warn(f"{error} The image is left out of the metrics.", stacklevel=2)
        image = np.zeros((height, width, 3), np.uint8)
        void = np.full((height, width), VOID, np.uint8)
        return build_eval_sample(self.transform, image, name=record.name, mask=void)

    def load(self, index: int) -> tuple[str, np.ndarray, np.ndarray | None]:
        """Read image ``index`` and, except for prediction, its dense mask.

        Args:
            index: Position in the split.

        Returns:
            The image id, uint8 RGB [H,W,3] and the mask [H,W] (255 void; all void for an image
            without one in a split where others have one) or None.

        Raises:
            FileNotFoundError: If a file is missing.
            ValueError: If a file is corrupt, the mask's size differs from the image's or it
                holds values out of range.
        """
        record = self.records[index]
        image = read_rgb_image(record.image)
        if self.mode == "predict" or (record.mask is None and not self.void_missing_masks):
            return record.name, image, None
        if record.mask is None:
            return record.name, image, np.full(image.shape[:2], VOID, np.uint8)
        raw = read_class_index_png(record.mask)
        check_same_size(raw.shape, image.shape[:2], record.mask, record.image)
        mask = check_label_values(
            self.decode_mask(raw, record.mask),
            raw,
            self.num_classes,
            record.mask,
            unlabeled=False,
            fix=self.mask_fix,
        )
        return record.name, image, mask

    def weak_label(self, name: str, mask: np.ndarray | None) -> WeakLabel:
        """Return the training weak label of an image: read by the reader, else simulated.

        Args:
            name: The image id.
            mask: Its dense mask, or None.

        Returns:
            The weak label.
        """
        if self.weak_labels is None:
            return super().weak_label(name, mask)
        record = self.records_by_name[name]
        shape = mask.shape if mask is not None else image_size(record.image)
        return self.weak_labels(record, (shape[0], shape[1]), mask)


def identity_mask(raw: np.ndarray, path: Path) -> np.ndarray:
    """Masks stored as class indices with 255 void (the :data:`LabelDecoder` of most datasets).

    Args:
        raw: The PNG's values.
        path: Its file (unused).

    Returns:
        ``raw``.
    """
    del path
    return raw


class FileDataModule(AGMMDataModule):
    """Base of the DataModules that read a dataset in its distributed layout.

    Subclasses implement :meth:`find_images`, :meth:`split_records`, :attr:`num_classes` and
    :attr:`class_names`, and override :meth:`native_weak_labels` (their own weak-label files),
    :meth:`image_tags`, :meth:`mask_decoder` and :attr:`layout` / :attr:`mask_fix` (messages).

    Args:
        root: The dataset's folder.
        weak_label: Form of the training label (METHOD §4).
        simulate: Derive the weak label from the dense masks (seeded) instead of reading files.
        unlabeled_value: Value marking unlabelled pixels in ready-made weak-label and CAM PNGs;
            None detects it per file (C if the file holds C, else 255).
        cam_dir: Folder of CAM pseudo-label PNGs for ``weak_label="image"`` (relative to
            ``root`` unless absolute); None trains on tags alone.
        points_per_segment: Clicks per connected segment for simulated points.
        block_fraction: Fraction of the image covered by simulated blocks.
        box_core_fraction: Central fraction of each box labelled with its class.
        batch_size: Training images per batch.
        crop_size: Side of the square training crop, in pixels.
        num_workers: DataLoader worker processes.
        seed: Seed of shuffling, augmentation and weak-label simulation.
        augment: Random scale, flip and colour jitter of training crops.
        predict_split: Images of ``predict``: "test", or "train" with their tags (the CAM
            stage; see :class:`~agmm_lightning.data.base.AGMMDataModule`).

    Raises:
        ValueError: If an option is out of range.
    """

    layout = "the dataset's images and labels"
    """What ``root`` should hold, for error messages."""

    mask_fix = "Check that the masks hold class indices (255 = void)."
    """What to do about out-of-range mask values, for error messages."""

    def __init__(
        self,
        root: str,
        *,
        weak_label: WeakLabelForm,
        batch_size: int,
        crop_size: int,
        simulate: bool = False,
        unlabeled_value: int | None = None,
        cam_dir: str | None = None,
        points_per_segment: int = 1,
        block_fraction: float = 0.1,
        box_core_fraction: float = 0.0,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = True,
        predict_split: PredictSplit = "test",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            crop_size=crop_size,
            num_workers=num_workers,
            seed=seed,
            weak_label=weak_label,
            augment=augment,
            predict_split=predict_split,
        )
        if unlabeled_value is not None and not 0 <= unlabeled_value <= VOID:
            raise InputError(f"unlabeled_value must be None or in 0..255, got {unlabeled_value}.")
        check_simulation_options(weak_label, points_per_segment, block_fraction, box_core_fraction)
        self.root = Path(root)
        self.simulate = simulate
        self.unlabeled_value = unlabeled_value
        self.cam_dir = cam_dir
        self.points_per_segment = points_per_segment
        self.block_fraction = block_fraction
        self.box_core_fraction = box_core_fraction
        self._image_index: dict[str, Path] | None = None
        self._checked_splits: set[Split] = set()

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def find_images(self) -> dict[str, Path]:
        """List every image of the dataset (all splits).

        Returns:
            ``id -> image file``.
        """

    @abstractmethod
    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """List the images of a split, with the paths of their dense masks.

        Args:
            split: "train", "val" or "test" (prediction uses the test images).

        Returns:
            The split's records (mask files may not exist for training images).

        Raises:
            FileNotFoundError: If a folder or list is missing or a listed image does not exist.
            ValueError: If the split is empty.
        """

    def native_weak_labels(
        self, form: WeakLabelForm, names: Sequence[str]
    ) -> WeakLabelReader | None:
        """Return the reader of the dataset's own files of a weak-label form.

        Called for every form but "full" and "image" when ``simulate`` is False.

        Args:
            form: The weak-label form.
            names: The training ids.

        Returns:
            The reader, or None to simulate the form from the dense masks.

        Raises:
            ValueError: If the dataset has no files of this form (the default).
        """
        del names
        raise InputError(
            f"{type(self).__name__} has no {form!r} label files to read; set `simulate: true` "
            "to derive them from the dense masks."
        )

    def image_tags(self, names: Sequence[str]) -> TagReader | None:
        """Return where the tags of ``weak_label="image"`` come from (default: the masks).

        Args:
            names: The training ids.

        Returns:
            The tag reader, or None to take the classes of the CAM pseudo labels.
        """
        del names
        return MaskTags(self.num_classes)

    def cam_folder(self) -> Path | None:
        """Return the folder of CAM pseudo labels for ``weak_label="image"`` (default: ``cam_dir``).

        Returns:
            The folder, or None to train on tags alone.
        """
        return None if self.cam_dir is None else self.path(self.cam_dir)

    def mask_decoder(self) -> LabelDecoder:
        """Return how mask PNG values map to class indices with 255 void (default: as stored).

        Returns:
            A picklable decoder (a module-level function or a ``functools.partial`` of one), as
            DataLoader workers may receive a pickled copy of the dataset.
        """
        return identity_mask

    # -------------------------------------------------------------------- shared logic
    def image_index(self) -> dict[str, Path]:
        """Return every image of the dataset, ``id -> file`` (listed once, then cached).

        Raises:
            FileNotFoundError: If ``root`` does not exist.
        """
        if self._image_index is None:
            require_directory(self.root, "root", self.layout)
            self._image_index = self.find_images()
        return self._image_index

    def path(self, option_value: str) -> Path:
        """Resolve a path option: relative to ``root`` unless absolute.

        Args:
            option_value: The option's value.

        Returns:
            The path.
        """
        return self.root / option_value

    def png_weak_labels(
        self,
        directory: Path,
        option: str,
        names: Sequence[str],
        *,
        suffixes: Sequence[str] = (".png",),
        decode: LabelDecoder | None = None,
        as_points: bool = False,
        fix: str = "Set `unlabeled_value` to the value that marks unlabelled pixels.",
    ) -> RasterWeakLabels:
        """Build the reader of a folder of weak-label PNGs (checked against the images).

        Args:
            directory: The folder.
            option: The option that names it.
            names: The training ids.
            suffixes: Accepted file endings after the image id.
            decode: Raw values -> target; default: class indices plus ``unlabeled_value``.
            as_points: Read the rasters as clicks.
            fix: What to do about out-of-range values, for the message.

        Returns:
            The reader.
        """
        files = index_label_files(
            directory, suffixes, option=option, known=self.image_index(), needed=names
        )
        if decode is None:
            if self.unlabeled_value is not None and self.unlabeled_value < self.num_classes:
                raise InputError(
                    f"unlabeled_value={self.unlabeled_value} is a class index; expected "
                    f"{self.num_classes} (C), 255 or None (detect)."
                )
            decode = partial(
                unlabeled_to_target,
                num_classes=self.num_classes,
                unlabeled_value=self.unlabeled_value,
            )
        return RasterWeakLabels(files, self.num_classes, decode, as_points=as_points, fix=fix)

    def setup(self, stage: str) -> None:
        """Build the stage's datasets and read the headers of every file they use.

        A missing or unreadable file, or a label whose size differs from its image, fails here,
        in seconds, rather than when the DataLoader reaches it, and all such files are listed
        together. ``agmm check-data`` decodes every file for a full check.

        Args:
            stage: "fit", "validate", "test" or "predict".

        Raises:
            InputError: Listing the files that cannot be used.
        """
        from agmm_lightning.data.checks import read_headers, summarize

        super().setup(stage)
        rank_zero = self.trainer is None or self.trainer.is_global_zero
        for split in STAGE_SPLITS[stage]:
            if split in self._checked_splits:
                continue
            dataset = self._dataset(split)
            problems = read_headers(cast(FileDataset, dataset), split, progress=rank_zero)
            if problems:
                raise InputError(
                    f"{summarize(problems, f'the {split} split')}\nReplace or remove them; "
                    "`agmm check-data --config <your config>` decodes every file and lists all "
                    "that fail."
                )
            self._checked_splits.add(split)

    def build_dataset(self, split: Split) -> FileDataset:
        """Build the dataset of one split, checking its folders, lists and label files.

        Args:
            split: "train", "val", "test" or "predict" (the ``predict_split`` images: the test
                images without masks, or the training images with their tags).

        Returns:
            The split's dataset.

        Raises:
            FileNotFoundError: If a folder, list, image, needed mask or weak-label file is
                missing.
            ValueError: If a split is empty or a weak-label file belongs to no image.
        """
        self.image_index()
        records = self.split_records(self.predict_split if split == "predict" else split)
        mode = self.mode(split)
        labelled = mode in ("train", "tagged")
        weak_labels = self._train_weak_labels(records) if labelled else None
        masks_needed = mode == "eval" or (
            labelled and (weak_labels is None or weak_labels.needs_mask)
        )
        return FileDataset(
            self._attach_masks(records, split, required=masks_needed),
            self.num_classes,
            decode_mask=self.mask_decoder(),
            mask_fix=self.mask_fix,
            weak_labels=weak_labels,
            mode=mode,
            transform=self.transform(split),
            weak_label=self.weak_label,
            seed=self.seed,
            points_per_segment=self.points_per_segment,
            block_fraction=self.block_fraction,
            box_core_fraction=self.box_core_fraction,
        )

    def _train_weak_labels(self, records: Sequence[ImageRecord]) -> WeakLabelReader | None:
        """The reader of the training weak labels, or None to simulate them from the masks."""
        if self.weak_label == "full" or self.simulate:
            return None
        names = [record.name for record in records]
        if self.weak_label == "image":
            folder = self.cam_folder()
            cam = None if folder is None else self.png_weak_labels(folder, "cam_dir", names)
            return ImageLevelWeakLabels(self.image_tags(names), cam, self.num_classes)
        return self.native_weak_labels(self.weak_label, names)

    def _attach_masks(
        self, records: Sequence[ImageRecord], split: Split, *, required: bool
    ) -> list[ImageRecord]:
        """Drop mask paths that do not exist, or raise if the split needs them."""
        candidates = [record.mask for record in records if record.mask is not None]
        present = set(compress(candidates, existing_files(candidates)))
        missing = [record for record in records if record.mask not in present]
        if missing and required:
            mask = missing[0].mask
            example = f"{mask}" if mask is not None else f"the dense mask of {missing[0].image}"
            if mask is not None and not mask.parent.is_dir():
                example = f"{mask.parent}: directory not found, so {example}"
            why = "evaluation" if self.mode(split) == "eval" else f"weak_label={self.weak_label!r}"
            raise MissingInputError(
                f"{example}: dense mask not found ({len(missing)} {split} image(s) have none); "
                f"{why} needs the dense masks. {self.mask_fix}"
            )
        return [
            record if record.mask in present else replace(record, mask=None) for record in records
        ]
