"""Reading a dataset's files, with errors that name the file, what was expected and the fix.

Image and label readers, folder listings and split lists, JSON and pickled tables. Every error is
an :class:`~agmm_lightning.errors.InputError` (a missing file a
:class:`~agmm_lightning.errors.MissingInputError`) naming the file and the option that points at
it.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image

from agmm_lightning.errors import InputError, MissingInputError
from agmm_lightning.targets import VOID

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageHeader",
    "LabelDecoder",
    "check_channels",
    "check_label_values",
    "check_same_size",
    "clip_boxes",
    "existing_files",
    "image_header",
    "image_pixels",
    "image_size",
    "index_files",
    "label_size",
    "read_class_index_png",
    "read_id_list",
    "read_json",
    "read_onehot_tags",
    "read_pickled_table",
    "read_image",
    "require_directory",
    "require_file",
    "unlabeled_to_target",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
"""File endings of images, in order of preference when one stem has several."""

_INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_SIXTEEN_BIT_MAX = 65535
_MODE_CHANNELS = {
    **{mode: 1 for mode in ("1", "L", *_SIXTEEN_BIT_MODES)},
    **{mode: 2 for mode in ("LA", "La")},
    **{mode: 3 for mode in ("P", "RGB", "YCbCr", "LAB", "HSV", "CMYK", "RGBX")},
    **{mode: 4 for mode in ("PA", "RGBA", "RGBa")},
}
"""Channels of each PIL mode as read (palettes are colours; CMYK JPEGs become RGB)."""
_CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_CHANNEL_NAMES = {1: "a grey", 2: "a grey + alpha", 3: "a colour", 4: "an RGBA"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

LabelDecoder = Callable[[np.ndarray, Path], np.ndarray]
"""Maps the raw values of a label PNG (and its path, for encodings chosen by file name) to
class indices: a dense mask (255 void) or a target map (C unlabelled, 255 void)."""


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
    return _require(path, path.is_dir(), "directory", option, expected)


def require_file(path: Path, option: str, expected: str) -> Path:
    """Return ``path`` if it is a file, else raise naming the option that sets it (as above)."""
    return _require(path, path.is_file(), "file", option, expected)


def _require(path: Path, exists: bool, kind: str, option: str, expected: str) -> Path:
    if not exists:
        raise MissingInputError(
            f"{path}: {kind} not found; expected {expected}. Check the `{option}` option."
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

    Only the first whitespace-separated token of a line is used (the second may name its label
    file); a folder in front and an image file ending are removed from it. Blank lines are
    skipped. A line whose second token is not a file name (an id with a space) is refused.

    Args:
        path: The list file.
        option: The DataModule option that names the list.

    Returns:
        The ids, in file order.

    Raises:
        FileNotFoundError: If the list does not exist.
        ValueError: If it lists no id, or an id with a space.
    """
    require_file(path, option, "a split list with one image id per line")
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) > 1 and not os.path.splitext(tokens[1])[1]:
            raise InputError(
                f"{path}, line {number}: {line.strip()!r} is not one id: ids cannot hold spaces "
                "(a second word may only name a label file). Rename the image, or list it "
                "without the space."
            )
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


def _open_image(path: Path) -> Image.Image:
    """Open an image file lazily, or raise naming it."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise MissingInputError(f"{path}: file not found.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(
            f"{path}: not a readable image ({error}); expected a JPEG or PNG file."
        ) from error


def read_image(path: Path, in_channels: int = 3) -> np.ndarray:
    """Read an image at its full bit depth as ``in_channels`` channels (:func:`image_pixels`).

    16-bit colour PNGs, which Pillow would cut to 8 bits, are decoded by OpenCV.

    Args:
        path: Image file.
        in_channels: The channels the network takes.

    Returns:
        [H,W,in_channels] pixels: uint8 for an 8-bit file, float32 in 0..1 for a 16-bit one.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be decoded, or its channels do not fit ``in_channels`` (the
            message names the file, what was expected and the fix).
    """
    with _open_image(path) as image:
        try:
            if _is_deep_colour_png(image, path):
                return _deep_colour_pixels(path, in_channels)
            return image_pixels(image, in_channels, path)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(
                f"{path}: the image is corrupt ({error}); expected a complete JPEG or PNG file."
            ) from error


def image_pixels(image: Image.Image, in_channels: int = 3, source: object = "image") -> np.ndarray:
    """The pixels of a decoded image: the one rule for bit depth and channels.

    8-bit images stay uint8 (0..255, divided by 255 at normalisation); 16-bit grey images (PIL
    modes ``I;16`` and ``I``) become float32 values divided by 65535: every image enters the
    network as 0..1 of its format's full range, whatever its depth. With ``in_channels=3`` every
    image is converted to RGB as it always was (grey repeated, palettes expanded, alpha dropped;
    16-bit grey repeated at full depth); otherwise the image must have exactly ``in_channels``
    channels: grey 1, grey + alpha 2, RGB or palette 3, RGBA 4.

    Args:
        image: A PIL image.
        in_channels: The channels the network takes.
        source: The file or object, named in messages.

    Returns:
        [H,W,in_channels] uint8, or float32 in 0..1 for a 16-bit image.

    Raises:
        InputError: If the mode is not an image's, 16-bit values are out of 0..65535, or the
            channels do not fit ``in_channels``.
    """
    channels = _mode_channels(image.mode, source)
    check_channels(channels, in_channels, source)
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT_MAX):
            raise InputError(
                f"{source}: values {values.min()}..{values.max()} do not fit 16 bits; expected "
                "8-bit or 16-bit images. Save it as a 16-bit PNG."
            )
        grey = (values.astype(np.float32) / np.float32(_SIXTEEN_BIT_MAX))[..., None]
        return np.repeat(grey, 3, axis=2) if in_channels == 3 else grey
    if in_channels == 3:
        return np.array(image.convert("RGB"))
    pixels = np.array(image.convert(_CHANNEL_MODES[channels]))
    return pixels.reshape(*pixels.shape[:2], channels)


def check_channels(channels: int, in_channels: int, source: object) -> None:
    """Raise unless an image of ``channels`` channels can enter a network of ``in_channels``.

    With ``in_channels=3`` every image can: it is converted to RGB (see :func:`image_pixels`).

    Raises:
        InputError: Naming the image, the channels it has and those expected, and the fix.
    """
    if in_channels == 3 or channels == in_channels:
        return
    raise InputError(
        f"{source}: {_CHANNEL_NAMES.get(channels, 'an')} image of {channels} channel(s), but "
        f"in_channels={in_channels}: expected {in_channels}-channel images. Set the data's "
        f"`in_channels: {channels}` (the model takes it from the data), or convert the images to "
        f"{in_channels} channel(s)."
    )


class ImageHeader(NamedTuple):
    """What an image file's header says: its size, channels (as read) and bits per channel."""

    height: int
    width: int
    channels: int
    bits: int


def image_header(path: Path) -> ImageHeader:
    """Read an image's size, channels and bit depth from its header, without decoding pixels.

    Args:
        path: Image file.

    Returns:
        The header (channels as :func:`image_pixels` counts them; 8 or 16 bits).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not an image, or of a mode no reader here takes.
    """
    with _open_image(path) as image:
        width, height = image.size
        channels = _mode_channels(image.mode, path)
        deep = image.mode in _SIXTEEN_BIT_MODES or _is_deep_colour_png(image, path)
    return ImageHeader(height, width, channels, 16 if deep else 8)


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


def _mode_channels(mode: str, source: object) -> int:
    """The channels of a PIL mode as :func:`image_pixels` reads it, or raise naming the file."""
    if mode not in _MODE_CHANNELS:
        raise InputError(
            f"{source}: images of PIL mode {mode!r} are not read; expected 8-bit grey, grey + "
            "alpha, palette, RGB or RGBA, or 16-bit grey or colour. Convert it to such a PNG."
        )
    return _MODE_CHANNELS[mode]


def _png_depth(path: Path) -> tuple[int, int] | None:
    """A PNG's bit depth and colour type from its IHDR chunk; None if it is not a PNG."""
    with path.open("rb") as file:
        head = file.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _is_deep_colour_png(image: Image.Image, path: Path) -> bool:
    """Whether a file is a PNG of 16-bit colour channels, which Pillow reads cut to 8 bits.

    Raises:
        InputError: For 16-bit grey + alpha, which neither Pillow nor OpenCV reads whole.
    """
    if image.format != "PNG" or image.mode not in ("RGB", "RGBA", "LA"):
        return False
    depth = _png_depth(path)
    if depth is None or depth[0] != 16:
        return False
    if image.mode == "LA":
        raise InputError(
            f"{path}: 16-bit grey + alpha PNGs are not read at full depth; save it without the "
            "alpha channel (16-bit grey) or as 16-bit RGBA."
        )
    return True


def _deep_colour_pixels(path: Path, in_channels: int) -> np.ndarray:
    """A 16-bit RGB(A) PNG as float32 0..1 (OpenCV reads it whole, in BGR(A) order)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if bgr is None or bgr.ndim != 3 or bgr.dtype != np.uint16:
        raise InputError(f"{path}: the 16-bit colour PNG is corrupt; expected a complete PNG.")
    channels = bgr.shape[2]
    check_channels(channels, in_channels, path)
    kept = 3 if in_channels == 3 else channels
    rgb = bgr[..., [2, 1, 0, 3][:kept]]
    return rgb.astype(np.float32) / np.float32(_SIXTEEN_BIT_MAX)


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
    stored_void: int = VOID,
) -> np.ndarray:
    """Return a decoded label map as uint8, or raise if it holds values out of range.

    Args:
        values: The decoded map.
        raw: The values stored in the file (named in the message).
        num_classes: C.
        path: Its file, for the message.
        unlabeled: Whether C (unlabelled) is allowed: True for target maps, False for masks.
        fix: What to do about bad values, for the message.
        stored_void: The value the file marks void with (the masks' ``ignore_index``), for the
            message.

    Returns:
        The map as uint8.

    Raises:
        ValueError: If a value is negative, or >= C (> C for targets) and not 255.
    """
    limit = num_classes + 1 if unlabeled else num_classes
    bad = ((values < 0) | (values >= limit)) & (values != VOID)
    if bad.any():
        shown = np.unique(raw[bad])[:8].tolist()
        void = f"{VOID}" if stored_void == VOID else f"{stored_void} (void, `ignore_index`)"
        raise InputError(
            f"{path}: stored values {shown} are out of range (after decoding, expected "
            f"0..{limit - 1} or {void}). {fix}"
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
