"""Checks and connected components of label maps: what every simulator and rasteriser shares."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import cv2
import numpy as np

from agmm_lightning.targets import VOID


def check_num_classes(num_classes: int) -> int:
    """Return C as an int, or raise: C is stored in uint8 maps as "unlabelled", so C < 255."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if not 1 <= num_classes < VOID:
        raise ValueError(f"num_classes must be in 1..{VOID - 1}, got {num_classes}")
    return int(num_classes)


def check_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Return a canvas shape as ``(height, width)`` ints, or raise unless both are positive."""
    if len(shape) != 2 or min(int(s) for s in shape) < 1:
        raise ValueError(f"shape must be (height, width) with positive sizes, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def check_label_map(
    array: np.ndarray, num_classes: int | None, *, name: str = "mask", max_value: int | None = None
) -> np.ndarray:
    """Validate an integer HxW label map whose values are < ``max_value`` or void.

    Args:
        array: The map to check.
        num_classes: Number of classes C, or None to accept any non-negative value.
        name: What the map is called in error messages.
        max_value: Exclusive upper bound of the non-void values (defaults to ``num_classes``).

    Returns:
        The map as a NumPy array.

    Raises:
        ValueError: If it is not a 2-D integer array or holds out-of-range values.

    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {array.shape}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype (uint8/int64), got {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    bound = max_value if max_value is not None else num_classes
    if bound is None:
        bad = array < 0
        expected = f"non-negative values or {VOID} (void)"
    else:
        bad = ((array < 0) | (array >= bound)) & (array != VOID)
        expected = f"values in 0..{bound - 1} or {VOID} (void)"
    if bad.any():
        shown = np.unique(array[bad])[:8].tolist()
        raise ValueError(f"{name} must hold {expected}, got values {shown}")
    return array


def present_values(mask: np.ndarray) -> np.ndarray:
    """The values of a label map other than void, in increasing order."""
    values = np.unique(mask)
    return values[values != VOID]


def disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) within Euclidean distance ``radius`` of the origin."""
    r = int(np.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy**2 + dx**2 <= radius**2 + 1e-9
    return dy[keep], dx[keep]


def disc_kernel(radius: float) -> np.ndarray:
    """uint8 0/1 kernel of the pixels within distance ``radius`` of its centre (a brush)."""
    r = int(np.floor(radius))
    kernel = np.zeros((2 * r + 1, 2 * r + 1), dtype=np.uint8)
    dy, dx = disc_offsets(radius)
    kernel[dy + r, dx + r] = 1
    return kernel


def class_components(
    mask: np.ndarray, connectivity: int, classes: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(class, indicator, labels, stats)`` per class, classes in increasing order.

    ``indicator`` is the uint8 0/1 class map, ``labels`` the int32 map of its connected segments
    (0 = other pixels) and ``stats`` OpenCV's ``[count, 5]`` rows ``(x, y, w, h, area)``.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    for cls in present_values(mask) if classes is None else classes:
        indicator = (mask == cls).astype(np.uint8)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            indicator, connectivity=connectivity, ltype=cv2.CV_32S
        )
        yield int(cls), indicator, labels, stats


def segment_crops(
    mask: np.ndarray, connectivity: int, min_area: int
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Yield ``(class, y0, x0, component)`` for every connected segment of every class.

    ``component`` is the boolean mask of the segment cropped to its bounding box, whose top-left
    corner is ``(y0, x0)``. Classes come in increasing order, segments in OpenCV's raster order.
    """
    for cls, _, labels, stats in class_components(mask, connectivity):
        for index in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_area):
            if index == 0:
                continue
            x, y, w, h, _ = (int(v) for v in stats[index])
            yield cls, y, x, labels[y : y + h, x : x + w] == index


def inner_distance(indicator: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each pixel of a 0/1 map to the nearest 0 pixel or the frame.

    The map is padded with one 0 pixel so that the image frame also counts as a boundary (a click
    on the frame is as uninformative as one on an object edge).
    """
    padded = np.pad(indicator.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance[1:-1, 1:-1]
