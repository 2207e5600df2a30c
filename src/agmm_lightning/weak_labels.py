"""Weak labels: simulation from dense masks, parsers of distributed formats, rasterisers.

Conventions (METHOD §1): a *target map* holds ``0..C-1`` for labelled pixels, ``C`` for unlabelled
ones and ``255`` for void. Dense masks hold ``0..C-1`` and ``255`` (void). Simulated weak labels
put ``C`` wherever nothing was annotated, void pixels of the dense mask included (annotators simply
did not click there); ``255`` in a target map is left to the crop padding of the transforms.

All randomness goes through a :class:`numpy.random.Generator`, so simulations are reproducible.
Pure NumPy / OpenCV: no torch here.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from agmm_lightning.errors import InputError

__all__ = [
    "CITYSCAPES_LABELID_TO_TRAINID",
    "VOC_CLASSES",
    "VOC_SCRIBBLE_ALIASES",
    "VOID",
    "boxes_from_mask",
    "cityscapes_labelids_to_target",
    "rasterize_boxes",
    "rasterize_points",
    "rasterize_polylines",
    "read_scribblesup_xml",
    "read_voc_annotation",
    "read_voc_points",
    "sample_points",
    "simulate_blocks",
    "simulate_scribbles",
    "tags_from_mask",
    "tags_from_target",
]

VOID = 255
"""Void / ignore value of dense masks and target maps."""

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""PASCAL VOC class names, index = class id (0 = background)."""

VOC_SCRIBBLE_ALIASES: dict[str, str] = {
    "plane": "aeroplane",
    "airplane": "aeroplane",
    "bike": "bicycle",
    "table": "diningtable",
    "dining table": "diningtable",
    "motorcycle": "motorbike",
    "motor bike": "motorbike",
    "plant": "pottedplant",
    "potted plant": "pottedplant",
    "monitor": "tvmonitor",
    "tv": "tvmonitor",
    "tv monitor": "tvmonitor",
    "bg": "background",
}
"""ScribbleSup short tag names -> VOC class names (lower case; exact VOC names need no alias)."""


def _cityscapes_lut() -> np.ndarray:
    lut = np.full(256, VOID, dtype=np.uint8)
    label_ids = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    lut[list(label_ids)] = np.arange(len(label_ids), dtype=np.uint8)
    lut.flags.writeable = False
    return lut


CITYSCAPES_LABELID_TO_TRAINID: np.ndarray = _cityscapes_lut()
"""uint8 [256] lookup table: Cityscapes labelId -> trainId (0..18), 255 for every other id."""


# --------------------------------------------------------------------------------------------
# Validation and shared helpers
# --------------------------------------------------------------------------------------------


def _check_num_classes(num_classes: int) -> int:
    # C itself is stored in uint8 target maps as "unlabelled" and must differ from void (255).
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if not 1 <= num_classes < VOID:
        raise ValueError(f"num_classes must be in 1..{VOID - 1}, got {num_classes}")
    return int(num_classes)


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2 or min(int(s) for s in shape) < 1:
        raise ValueError(f"shape must be (height, width) with positive sizes, got {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _check_label_map(
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


def _present_classes(mask: np.ndarray) -> np.ndarray:
    values = np.unique(mask)
    return values[values != VOID]


def _disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) within Euclidean distance ``radius`` of the origin."""
    r = int(np.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy**2 + dx**2 <= radius**2 + 1e-9
    return dy[keep], dx[keep]


def _disc_kernel(radius: float) -> np.ndarray:
    r = int(np.floor(radius))
    kernel = np.zeros((2 * r + 1, 2 * r + 1), dtype=np.uint8)
    dy, dx = _disc_offsets(radius)
    kernel[dy + r, dx + r] = 1
    return kernel


def _components(
    mask: np.ndarray, connectivity: int, classes: Iterable[int] | None = None
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(class, indicator, labels, stats)`` per class, classes in increasing order.

    ``indicator`` is the uint8 0/1 class map, ``labels`` the int32 map of its connected segments
    (0 = other pixels) and ``stats`` OpenCV's ``[count, 5]`` rows ``(x, y, w, h, area)``.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    for cls in _present_classes(mask) if classes is None else classes:
        indicator = (mask == cls).astype(np.uint8)
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            indicator, connectivity=connectivity, ltype=cv2.CV_32S
        )
        yield int(cls), indicator, labels, stats


def _segments(
    mask: np.ndarray, connectivity: int, min_area: int
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Yield ``(class, y0, x0, component)`` for every connected segment of every class.

    ``component`` is the boolean mask of the segment cropped to its bounding box, whose top-left
    corner is ``(y0, x0)``. Classes come in increasing order, segments in OpenCV's raster order.
    """
    for cls, _, labels, stats in _components(mask, connectivity):
        for index in np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_area):
            if index == 0:
                continue
            x, y, w, h, _ = (int(v) for v in stats[index])
            yield cls, y, x, labels[y : y + h, x : x + w] == index


def _inner_distance(indicator: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each pixel of a 0/1 map to the nearest 0 pixel or the frame.

    The map is padded with one 0 pixel so that the image frame also counts as a boundary (a click
    on the frame is as uninformative as one on an object edge).
    """
    padded = np.pad(indicator.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance[1:-1, 1:-1]


def _neighbour_offsets(width: int) -> np.ndarray:
    """Flat-index offsets of the 8 neighbours, bit order of the codes (north, then clockwise)."""
    return np.array([-width, -width + 1, 1, width + 1, width, width - 1, -1, -width - 1])


def _neighbour_codes(flat: np.ndarray, pixels: np.ndarray, width: int) -> np.ndarray:
    """8-bit codes of the 8 neighbours (bit 0 = north, then clockwise) of some pixels.

    Args:
        flat: Flattened uint8 0/1 image with a zero border (so every neighbour index is valid).
        pixels: Flat indices of the pixels to code.
        width: Row length of the image.

    Returns:
        uint8 codes, one per pixel.
    """
    code = np.zeros(len(pixels), dtype=np.uint8)
    for bit, offset in enumerate(_neighbour_offsets(width)):
        code |= flat[pixels + offset] << np.uint8(bit)
    return code


def _neighbour_luts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables over neighbour codes: Zhang-Suen deletion (two passes) and end points."""
    codes = np.arange(256)
    bits = (codes[:, None] >> np.arange(8)) & 1  # columns: N, NE, E, SE, S, SW, W, NW
    north, east, south, west = bits[:, 0], bits[:, 2], bits[:, 4], bits[:, 6]
    count = bits.sum(1)
    cyclic = np.concatenate([bits, bits[:, :1]], axis=1)
    transitions = ((cyclic[:, :-1] == 0) & (cyclic[:, 1:] == 1)).sum(1)
    deletable = (count >= 2) & (count <= 6) & (transitions == 1)
    first = deletable & (north * east * south == 0) & (east * south * west == 0)
    second = deletable & (north * east * west == 0) & (north * south * west == 0)
    # An end point has one neighbour, or two touching ones (a 1-px corner at a line end);
    # isolated pixels are ends too, so a fully pruned path disappears.
    end = (count <= 1) | ((count == 2) & (transitions == 1))
    return first, second, end


_ZS_FIRST, _ZS_SECOND, _END_POINT = _neighbour_luts()


def _thin(binary: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a 0/1 image (one-pixel-wide 8-connected skeleton).

    Equivalent to applying both sub-iterations to the whole image until nothing changes, but only
    the contour is examined: a deletable pixel always touches the background, so the candidates
    are the foreground pixels with a background neighbour, updated with the foreground neighbours
    of each sub-iteration's deletions. The cost is about linear in the area instead of
    area x thickness.
    """
    image = np.pad(binary.astype(np.uint8), 1)
    width = image.shape[1]
    flat = image.reshape(-1)
    interior = cv2.erode(image, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT)
    active = np.flatnonzero(image > interior)
    queued = np.zeros(flat.shape, dtype=bool)  # membership of the contour set
    queued[active] = True
    stamp = np.zeros(flat.shape, dtype=np.int64)  # scratch for linear-time de-duplication
    step, idle = 0, 0
    # Stop after two consecutive sub-iterations without deletions: a full pass changes nothing.
    while idle < 2 and len(active):
        lut = _ZS_FIRST if step % 2 == 0 else _ZS_SECOND
        delete = lut[_neighbour_codes(flat, active, width)]
        step += 1
        if not delete.any():
            idle += 1
            continue
        idle = 0
        deleted = active[delete]
        flat[deleted] = 0
        # Foreground neighbours of the deleted pixels join the contour.
        around = (deleted[:, None] + _neighbour_offsets(width)[None, :]).reshape(-1)
        around = around[(flat[around] == 1) & ~queued[around]]
        stamp[around] = np.arange(len(around))
        around = around[stamp[around] == np.arange(len(around))]
        queued[around] = True
        active = np.concatenate([active[~delete], around])
    return image[1:-1, 1:-1]


def _prune(skeleton: np.ndarray, budget: float) -> np.ndarray:
    """Remove end points layer by layer while at most ``budget`` pixels have been removed."""
    image = np.pad(skeleton.astype(np.uint8), 1)
    width = image.shape[1]
    flat = image.reshape(-1)
    pixels = np.flatnonzero(flat)
    removed = 0
    while len(pixels):
        ends = _END_POINT[_neighbour_codes(flat, pixels, width)]
        count = int(ends.sum())
        if count == 0 or removed + count > budget:
            break
        flat[pixels[ends]] = 0
        pixels = pixels[~ends]
        removed += count
    return image[1:-1, 1:-1]


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


def _distinct_offsets(rng: np.random.Generator, sizes: np.ndarray, count: int) -> np.ndarray:
    """Draw ``count`` uniform offsets in ``[0, size)`` per row, distinct where ``size >= count``.

    Rows too small for distinct draws are sampled with replacement. Vectorised over rows; the
    loop runs over the ``count`` draws only.
    """
    sizes = sizes.astype(np.int64)
    distinct = sizes >= count
    chosen = np.zeros((len(sizes), 0), dtype=np.int64)
    for draw in range(count):
        # Draw a rank among the still unchosen offsets, then skip past the chosen ones (in
        # increasing order) to turn the rank into an offset.
        pool = np.where(distinct, sizes - draw, sizes)
        offset = np.minimum((rng.random(len(sizes)) * pool).astype(np.int64), pool - 1)
        for taken in np.sort(chosen, axis=1).T:
            offset += distinct & (offset >= taken)
        chosen = np.concatenate([chosen, offset[:, None]], axis=1)
    return chosen


def sample_points(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    points_per_segment: int = 1,
    num_classes: int | None = None,
    min_area: int = 1,
    interior: float = 0.5,
    connectivity: int = 8,
) -> np.ndarray:
    """Simulate clicks: ``points_per_segment`` per connected segment of each class.

    Clicks are drawn uniformly among the segment's interior pixels: those whose Euclidean distance
    to the nearest pixel of another class or void (or beyond the image frame), i.e. to the
    segment's boundary, is at least ``interior`` times the segment's largest such distance. Void
    (255) is never sampled.

    Args:
        mask: Dense integer mask [H, W] with classes ``0..C-1`` and 255 for void.
        rng: Random generator.
        points_per_segment: Clicks per segment (drawn without replacement where possible).
        num_classes: C, used to validate ``mask``; None accepts any class value.
        min_area: Segments with fewer pixels get no click.
        interior: Fraction of the segment's maximal inner distance a click must reach.
        connectivity: Pixel connectivity of segments (4 or 8).

    Returns:
        float32 [N, 3] rows ``(x, y, class)``, x = column and y = row in pixels, ordered by class,
        then segment; N = number of segments with at least ``min_area`` pixels times
        ``points_per_segment``.

    Raises:
        ValueError: On a malformed mask or invalid options.

    """
    if num_classes is not None:
        _check_num_classes(num_classes)
    mask = _check_label_map(mask, num_classes)
    if points_per_segment < 1:
        raise ValueError(f"points_per_segment must be >= 1, got {points_per_segment}")
    if not 0.0 <= interior <= 1.0:
        raise ValueError(f"interior must be in [0, 1], got {interior}")
    rows: list[np.ndarray] = []
    for cls, indicator, labels, stats in _components(mask, connectivity):
        keep = stats[:, cv2.CC_STAT_AREA] >= max(min_area, 1)
        keep[0] = False
        if not keep.any():
            continue
        # Segments of one class are never adjacent, so the distance to the nearest pixel of
        # another class is the distance to the segment's boundary.
        distance = _inner_distance(indicator)
        peak = np.zeros(len(stats), dtype=np.float32)
        np.maximum.at(peak, labels.reshape(-1), distance.reshape(-1))
        candidates = np.flatnonzero(
            keep[labels] & (distance >= interior * peak[labels]) & (labels > 0)
        )
        owners = labels.reshape(-1)[candidates]
        # Group the candidates by segment; a stable sort of small integers is a linear radix sort.
        small = owners.astype(np.uint16) if len(stats) <= 1 << 16 else owners
        candidates = candidates[np.argsort(small, kind="stable")]
        counts = np.bincount(owners, minlength=len(stats))
        starts = np.cumsum(counts) - counts
        segments = np.flatnonzero(keep)
        offsets = _distinct_offsets(rng, counts[segments], points_per_segment)
        picks = candidates[starts[segments, None] + offsets]
        ys, xs = np.divmod(picks.reshape(-1), mask.shape[1])
        rows.append(np.stack([xs, ys, np.full(len(xs), cls)], axis=1))
    if not rows:
        return np.zeros((0, 3), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)


def rasterize_points(
    points: np.ndarray, shape: tuple[int, int], num_classes: int, *, radius: int = 1
) -> np.ndarray:
    """Draws each click as a disc on a canvas of "unlabelled".

    The disc of radius r is the set of pixels within Euclidean distance <= r of the rounded click
    position: radius 0 is one pixel, radius 1 the 5-pixel cross (3-px diameter), radius 2 13 pixels.
    Coordinates are rounded half up; clicks whose centre lies outside the canvas are dropped and
    discs are clipped to it. Later rows overwrite earlier ones where discs overlap.

    Args:
        points: [N, 3] rows ``(x, y, class)``.
        shape: Canvas ``(height, width)``.
        num_classes: C; the canvas holds C (unlabelled) where no disc is drawn.
        radius: Disc radius in pixels (>= 0).

    Returns:
        uint8 [H, W] target map.

    Raises:
        ValueError: On malformed points, classes outside ``0..C-1`` or a negative radius.

    """
    num_classes = _check_num_classes(num_classes)
    height, width = _check_shape(shape)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be an [N, 3] array of (x, y, class), got {points.shape}")
    canvas = np.full((height, width), num_classes, dtype=np.uint8)
    if len(points) == 0:
        return canvas
    classes = points[:, 2]
    if not np.all((classes >= 0) & (classes < num_classes) & (classes == np.round(classes))):
        raise ValueError(
            f"point classes must be integers in 0..{num_classes - 1}, "
            f"got {np.unique(classes).tolist()[:8]}"
        )
    xs = np.floor(points[:, 0] + 0.5).astype(np.int64)
    ys = np.floor(points[:, 1] + 0.5).astype(np.int64)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    xs, ys, classes = xs[inside], ys[inside], classes[inside].astype(np.uint8)
    dy, dx = _disc_offsets(radius)
    py = ys[:, None] + dy[None, :]
    px = xs[:, None] + dx[None, :]
    keep = (py >= 0) & (py < height) & (px >= 0) & (px < width)
    labels = np.broadcast_to(classes[:, None], py.shape)
    # Fancy assignment writes in order, so the last click wins where discs overlap.
    canvas[py[keep], px[keep]] = labels[keep]
    return canvas


# --------------------------------------------------------------------------------------------
# Scribbles
# --------------------------------------------------------------------------------------------


def simulate_scribbles(
    mask: np.ndarray,
    rng: np.random.Generator,
    num_classes: int,
    *,
    width: int = 3,
    trim: float = 0.2,
    min_area: int = 16,
    trim_jitter: float = 0.5,
    connectivity: int = 8,
) -> np.ndarray:
    """Simulate scribbles: a trimmed skeleton of every connected segment, background included.

    Each segment is thinned (Zhang-Suen) to a one-pixel skeleton; end points are then peeled off
    layer by layer while at most ``trim`` (randomly jittered per segment) of the skeleton's
    pixels are removed, which keeps the interior part of the strokes. The result is drawn with a
    disc brush of diameter ``width`` and clipped to the segment, so a scribble never labels a
    pixel of another class. A segment whose skeleton vanishes gets a dot at its most interior
    pixel.

    Args:
        mask: Dense integer mask [H, W] with classes ``0..C-1`` and 255 for void.
        rng: Random generator (draws the per-segment trim).
        num_classes: C.
        width: Stroke width in pixels (brush = pixels within ``(width - 1) / 2`` of the skeleton).
        trim: Fraction of each skeleton's length removed at its ends, in [0, 1).
        min_area: Segments with fewer pixels get no scribble.
        trim_jitter: Relative jitter of ``trim``: each segment uses
            ``trim * uniform(1 - trim_jitter, 1 + trim_jitter)``, clipped to [0, 0.95].
        connectivity: Pixel connectivity of segments (4 or 8).

    Returns:
        uint8 [H, W] target map (C where nothing is scribbled).

    Raises:
        ValueError: On a malformed mask or invalid options.

    """
    num_classes = _check_num_classes(num_classes)
    mask = _check_label_map(mask, num_classes)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    if not 0.0 <= trim_jitter <= 1.0:
        raise ValueError(f"trim_jitter must be in [0, 1], got {trim_jitter}")
    brush = _disc_kernel((width - 1) / 2)
    target = np.full(mask.shape, num_classes, dtype=np.uint8)
    for cls, y0, x0, component in _segments(mask, connectivity, max(min_area, 1)):
        skeleton = _thin(component)
        fraction = min(max(trim * rng.uniform(1 - trim_jitter, 1 + trim_jitter), 0.0), 0.95)
        skeleton = _prune(skeleton, fraction * cv2.countNonZero(skeleton))
        if not skeleton.any():
            distance = _inner_distance(component)
            skeleton[np.unravel_index(np.argmax(distance), distance.shape)] = 1
        # The crop is the segment's bounding box, so clipping to it loses nothing of the stroke
        # that the clip to the segment would keep.
        stroke = cv2.dilate(skeleton, brush).astype(bool) & component
        h, w = component.shape
        target[y0 : y0 + h, x0 : x0 + w][stroke] = cls
    return target


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _window_sums(integral: np.ndarray, size: int) -> np.ndarray:
    """Sum over every ``size`` x ``size`` window (indexed by top-left corner) of a SAT."""
    return (
        integral[size:, size:]
        - integral[:-size, size:]
        - integral[size:, :-size]
        + integral[:-size, :-size]
    )


def simulate_blocks(
    mask: np.ndarray,
    rng: np.random.Generator,
    num_classes: int,
    *,
    fraction: float = 0.1,
    block_size: int | None = None,
    min_block_size: int | None = None,
) -> np.ndarray:
    """Simulate block labels: squares lying entirely inside single-class regions.

    Sides run from ``block_size`` down to ``min_block_size`` by halving. First every connected
    segment (8-connectivity) gets one block, in random order while the budget lasts: the largest
    side that gives every segment one within ``fraction`` of the image, or a smaller one where the
    segment is too thin for it. The classes in the blocks are then the classes in the image, as
    the absent-class loss assumes (METHOD §4: t = classes in blocks); a segment too small for a
    block of ``min_block_size`` gets none. Then blocks are placed one at a time at uniformly random
    free positions (single-class windows, checked with per-class summed-area tables, that overlap
    no earlier block), halving the side when no position is left, until at least ``fraction`` of
    the pixels are labelled. Coverage falls short only if the mask is too fragmented or void.

    Args:
        mask: Dense integer mask [H, W] with classes ``0..C-1`` and 255 for void.
        rng: Random generator.
        num_classes: C.
        fraction: Target fraction of labelled pixels, in [0, 1].
        block_size: Side of the first blocks; default ``round(sqrt(H * W) / 20)`` (22 px for
            500x375), never more than ``sqrt(fraction * H * W)`` so one block cannot overshoot.
        min_block_size: Smallest side used when halving; default ``max(1, block_size // 4)``.

    Returns:
        uint8 [H, W] target map (C outside blocks).

    Raises:
        ValueError: On a malformed mask or invalid options.

    """
    num_classes = _check_num_classes(num_classes)
    mask = _check_label_map(mask, num_classes)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    height, width = mask.shape
    target = np.full(mask.shape, num_classes, dtype=np.uint8)
    goal = fraction * height * width
    if goal <= 0:
        return target
    if block_size is None:
        block_size = max(1, round(np.sqrt(height * width) / 20))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    size = max(1, min(block_size, int(np.sqrt(goal)), height, width))
    if min_block_size is None:
        min_block_size = max(1, size // 4)
    if min_block_size < 1:
        raise ValueError(f"min_block_size must be >= 1, got {min_block_size}")
    sides = [size]
    while sides[-1] > min_block_size:
        sides.append(max(min_block_size, sides[-1] // 2))

    blocks = _Blocks(mask, target)
    _block_per_segment(blocks, sides, goal, rng)
    for side in sides:
        if blocks.covered >= goal:
            break
        _random_blocks(blocks, side, goal, rng)
    return target


def _block_per_segment(
    blocks: _Blocks, sides: list[int], goal: float, rng: np.random.Generator
) -> None:
    """One block in every segment, in random order while the budget lasts.

    The first side is the largest that gives every segment one within ``goal``; a segment with no
    room for it gets the next side that fits.
    """
    segments, count = blocks.segments, blocks.segment_count
    first = next((i for i, side in enumerate(sides) if count * side * side <= goal), len(sides) - 1)
    served = np.zeros(count + 1, dtype=bool)
    served[0] = True  # void
    for side in sides[first:]:
        ys, xs = np.nonzero(blocks.free_corners(side))
        owner = segments[ys, xs]
        shuffled = rng.permutation(np.flatnonzero(~served[owner]))
        _, pick = np.unique(owner[shuffled], return_index=True)  # one random corner per segment
        for corner in shuffled[pick][rng.permutation(len(pick))]:
            if blocks.covered >= goal:
                return
            blocks.place(int(ys[corner]), int(xs[corner]), side)
            served[owner[corner]] = True


def _random_blocks(blocks: _Blocks, side: int, goal: float, rng: np.random.Generator) -> None:
    """Blocks of ``side`` at uniformly random free positions until ``goal`` or no room is left."""
    valid = blocks.free_corners(side)
    valid_flat = valid.reshape(-1)
    order = rng.permutation(np.flatnonzero(valid_flat))
    cursor, step = 0, 256
    while blocks.covered < goal and cursor < len(order):
        # Scan the shuffled candidates in chunks: one vectorised lookup skips every corner
        # invalidated by blocks placed since the shuffle.
        chunk = order[cursor : cursor + step]
        still_valid = valid_flat[chunk]
        if not still_valid.any():
            cursor += len(chunk)
            continue
        hit = int(np.argmax(still_valid))
        cursor += hit + 1
        y, x = divmod(int(chunk[hit]), valid.shape[1])
        blocks.place(y, x, side)
        valid[max(0, y - side + 1) : y + side, max(0, x - side + 1) : x + side] = False


class _Blocks:
    """Blocks placed so far in a target map, and where a new one may go.

    Also numbers the connected segments (8-connectivity) of every class: ``segments`` is an
    int32 map of them from 1 (0 = void), ``segment_count`` their number.
    """

    def __init__(self, mask: np.ndarray, target: np.ndarray) -> None:
        self.mask, self.target = mask, target
        self.labelled = np.zeros(mask.shape, dtype=np.uint8)
        self.covered = 0
        self.class_integrals = []
        self.segments = np.zeros(mask.shape, dtype=np.int32)
        self.segment_count = 0
        for _, indicator, labels, stats in _components(mask, 8):
            self.class_integrals.append(cv2.integral(indicator, sdepth=cv2.CV_32S))
            inside = labels > 0
            self.segments[inside] = labels[inside] + self.segment_count
            self.segment_count += len(stats) - 1

    def free_corners(self, side: int) -> np.ndarray:
        """Top-left corners of ``side`` windows of one class that overlap no block."""
        free = _window_sums(cv2.integral(self.labelled, sdepth=cv2.CV_32S), side) == 0
        single_class = np.zeros_like(free)
        for integral in self.class_integrals:
            single_class |= _window_sums(integral, side) == side * side
        return single_class & free

    def place(self, y: int, x: int, side: int) -> None:
        """Label the ``side`` square at top-left ``(y, x)`` with its class."""
        self.target[y : y + side, x : x + side] = self.mask[y, x]
        self.labelled[y : y + side, x : x + side] = 1
        self.covered += side * side


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def boxes_from_mask(
    mask: np.ndarray,
    num_classes: int,
    *,
    instances: np.ndarray | None = None,
    background: int = 0,
    min_area: int = 1,
    connectivity: int = 8,
) -> np.ndarray:
    """Bounding boxes of instances, or of connected segments of every foreground class.

    With ``instances`` (a VOC ``SegmentationObject``-style id map: 0 = no instance, 255 = void),
    each instance id gives one box, of the majority non-void class of its pixels. Without it,
    each connected segment of every class other than ``background`` and void gives one box.

    Args:
        mask: Dense integer mask [H, W] with classes ``0..C-1`` and 255 for void.
        num_classes: C.
        instances: Optional integer instance-id map [H, W].
        background: Class that gets no boxes (pass a value >= C when there is none).
        min_area: Instances / segments with fewer pixels get no box.
        connectivity: Pixel connectivity of segments (4 or 8) when no instance map is given.

    Returns:
        float32 [N, 5] rows ``(x0, y0, x1, y1, class)`` with exclusive ``x1``/``y1`` pixel edges,
        ordered by class then segment (or by instance id).

    Raises:
        ValueError: On malformed maps.

    """
    num_classes = _check_num_classes(num_classes)
    mask = _check_label_map(mask, num_classes)
    if instances is None:
        classes = [c for c in _present_classes(mask) if c != background]
        rows: list[np.ndarray] = []
        for cls, _, _, stats in _components(mask, connectivity, classes):
            stats = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= max(min_area, 1)]
            x, y, w, h = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
            rows.append(np.stack([x, y, x + w, y + h, np.full(len(x), cls)], axis=1))
        return np.concatenate(rows or [np.zeros((0, 5))]).astype(np.float32)

    instances = _check_label_map(instances, None, name="instances")
    if instances.shape != mask.shape:
        raise ValueError(
            f"instances must have the mask's shape {mask.shape}, got {instances.shape}"
        )
    inside = (instances != 0) & (instances != VOID)
    ys, xs = np.nonzero(inside)
    ids, owner = np.unique(instances[ys, xs], return_inverse=True)
    count = len(ids)
    area = np.bincount(owner, minlength=count)
    x0, y0 = np.full(count, mask.shape[1]), np.full(count, mask.shape[0])
    x1, y1 = np.zeros(count, np.int64), np.zeros(count, np.int64)
    np.minimum.at(x0, owner, xs)
    np.minimum.at(y0, owner, ys)
    np.maximum.at(x1, owner, xs + 1)
    np.maximum.at(y1, owner, ys + 1)
    # Majority non-void class of each instance, from a joint (instance, class) histogram.
    pixel_classes = mask[ys, xs].astype(np.int64)
    labelled = pixel_classes != VOID
    votes = np.bincount(
        owner[labelled] * num_classes + pixel_classes[labelled], minlength=count * num_classes
    ).reshape(count, num_classes)
    cls = votes.argmax(1)
    keep = (area >= max(min_area, 1)) & (votes.max(1) > 0) & (cls != background)
    boxes = np.stack([x0, y0, x1, y1, cls], axis=1)[keep]
    return boxes.astype(np.float32).reshape(-1, 5)


def _check_boxes(boxes: np.ndarray, num_classes: int) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(
            f"boxes must be an [N, 5] array of (x0, y0, x1, y1, class), got {boxes.shape}"
        )
    classes = boxes[:, 4]
    if not np.all((classes >= 0) & (classes < num_classes) & (classes == np.round(classes))):
        raise ValueError(
            f"box classes must be integers in 0..{num_classes - 1}, "
            f"got {np.unique(classes).tolist()[:8]}"
        )
    return boxes


def rasterize_boxes(
    boxes: np.ndarray,
    shape: tuple[int, int],
    num_classes: int,
    *,
    background: int = 0,
    core_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Box supervision as a target map and an allowed-class map (METHOD §4).

    Pixels outside every box are labelled ``background``; pixels inside a box are unlabelled (C),
    except the box's central core (``core_fraction`` of its width and height, at least one pixel
    when positive), labelled with the box class wherever no box of a different class covers it.
    Box edges are snapped outwards to whole pixels (``floor(x0)``, ``ceil(x1)``) and clipped to the
    canvas; empty boxes are ignored.

    Args:
        boxes: [N, 5] rows ``(x0, y0, x1, y1, class)``, exclusive ``x1``/``y1``.
        shape: Canvas ``(height, width)``.
        num_classes: C.
        background: Background class.
        core_fraction: Relative size of the labelled core, in [0, 1].

    Returns:
        ``(target, allowed)``: uint8 [H, W] target map and bool [C, H, W] map of the classes each
        pixel may take: ``background`` everywhere, plus the class of every box covering it.

    Raises:
        ValueError: On malformed boxes or options.

    """
    num_classes = _check_num_classes(num_classes)
    height, width = _check_shape(shape)
    if not 0 <= background < num_classes:
        raise ValueError(f"background must be in 0..{num_classes - 1}, got {background}")
    if not 0.0 <= core_fraction <= 1.0:
        raise ValueError(f"core_fraction must be in [0, 1], got {core_fraction}")
    boxes = _check_boxes(boxes, num_classes)
    target = np.full((height, width), background, dtype=np.uint8)
    allowed = np.zeros((num_classes, height, width), dtype=bool)

    x0 = np.clip(np.floor(boxes[:, 0]), 0, width).astype(np.int64)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, height).astype(np.int64)
    x1 = np.clip(np.ceil(boxes[:, 2]), 0, width).astype(np.int64)
    y1 = np.clip(np.ceil(boxes[:, 3]), 0, height).astype(np.int64)
    classes = boxes[:, 4].astype(np.int64)
    live = (x1 > x0) & (y1 > y0)
    for bx0, by0, bx1, by1, cls in zip(
        x0[live], y0[live], x1[live], y1[live], classes[live], strict=True
    ):
        target[by0:by1, bx0:bx1] = num_classes
        allowed[cls, by0:by1, bx0:bx1] = True
    # Number of distinct box classes covering each pixel decides whether a core is unambiguous.
    box_classes = allowed.sum(0)
    allowed[background] = True
    if core_fraction > 0:
        for bx0, by0, bx1, by1, cls in zip(
            x0[live], y0[live], x1[live], y1[live], classes[live], strict=True
        ):
            core_w = max(1, round((bx1 - bx0) * core_fraction))
            core_h = max(1, round((by1 - by0) * core_fraction))
            cx0 = bx0 + (bx1 - bx0 - core_w) // 2
            cy0 = by0 + (by1 - by0 - core_h) // 2
            region = (slice(cy0, cy0 + core_h), slice(cx0, cx0 + core_w))
            target[region][box_classes[region] == 1] = cls
    return target, allowed


# --------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------


def tags_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot vector of the classes present in a dense mask (void ignored).

    Args:
        mask: Dense integer mask [H, W] with classes ``0..C-1`` and 255 for void.
        num_classes: C.

    Returns:
        float32 [C].

    Raises:
        ValueError: On a malformed mask.

    """
    num_classes = _check_num_classes(num_classes)
    mask = _check_label_map(mask, num_classes)
    values = mask[mask != VOID].astype(np.int64)
    return (np.bincount(values, minlength=num_classes)[:num_classes] > 0).astype(np.float32)


def tags_from_target(target: np.ndarray, num_classes: int) -> np.ndarray:
    """Multi-hot vector of the classes labelled (values < C) in a target map.

    Args:
        target: Integer target map [H, W] with ``0..C-1``, C (unlabelled) and 255 (void).
        num_classes: C.

    Returns:
        float32 [C].

    Raises:
        ValueError: On a malformed target map.

    """
    num_classes = _check_num_classes(num_classes)
    target = _check_label_map(target, num_classes, name="target", max_value=num_classes + 1)
    values = target[target < num_classes].astype(np.int64)
    return (np.bincount(values, minlength=num_classes) > 0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Parsers of distributed formats and their rasterisers
# --------------------------------------------------------------------------------------------


def read_voc_points(path: str | Path) -> dict[str, np.ndarray]:
    """Read a "What's the point" / Tree-Energy-Loss VOC click file.

    The file is a JSON object ``id -> [{"x": float, "y": float, "cls": int, "rank": int}, ...]``
    (``rank`` is optional and ignored; foreground files use ``cls`` 1..20, background files 0).

    Args:
        path: JSON file.

    Returns:
        ``id -> float32 [N, 3]`` rows ``(x, y, cls)``.

    Raises:
        ValueError: On unreadable JSON or entries of the wrong layout (the message names the file).

    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: expected a JSON object id -> list of clicks, got {type(data).__name__}"
        )
    points: dict[str, np.ndarray] = {}
    for image_id, clicks in data.items():
        if not isinstance(clicks, list):
            raise InputError(
                f"{path}: entry {image_id!r} must be a list of clicks, got {type(clicks).__name__}"
            )
        rows = []
        for click in clicks:
            try:
                rows.append((float(click["x"]), float(click["y"]), float(click["cls"])))
            except (TypeError, KeyError, ValueError) as error:
                raise InputError(
                    f"{path}: click {click!r} of {image_id!r} must be an object with numeric "
                    f'"x", "y" and "cls"'
                ) from error
        points[str(image_id)] = np.asarray(rows, dtype=np.float32).reshape(-1, 3)
    return points


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as error:
        raise InputError(f"{path}: not valid XML ({error})") from error


def _xml_number(element: ET.Element, tag: str, path: Path) -> float:
    child = element.find(tag)
    try:
        return float(child.text)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, ValueError) as error:
        raise InputError(f"{path}: expected a number in <{tag}> of <{element.tag}>") from error


def _class_index(name: str, class_names: Sequence[str], aliases: dict[str, str], path: Path) -> int:
    lookup = {n.strip().lower(): i for i, n in enumerate(class_names)}
    key = " ".join(name.strip().lower().split())
    key = key if key in lookup else aliases.get(key, key)
    if key not in lookup:
        raise InputError(
            f"{path}: unknown class tag {name!r}; expected one of {list(class_names)} "
            f"or an alias in {sorted(aliases)}"
        )
    return lookup[key]


def read_scribblesup_xml(
    path: str | Path, class_names: Sequence[str]
) -> tuple[tuple[int, int], list[tuple[int, np.ndarray]]]:
    """Read one ScribbleSup annotation file.

    Layout: ``<annotation><size><width/><height/></size><polygon><tag>name</tag><point><X/><Y/>
    </point>...</polygon>...</annotation>``. Tags are matched case-insensitively against
    ``class_names``, then through :data:`VOC_SCRIBBLE_ALIASES` (``plane``, ``bike``, ``table``,
    ``plant``, ``monitor``, ...). Polygons without points are skipped.

    Args:
        path: XML file.
        class_names: Class names, index = class id (e.g. :data:`VOC_CLASSES`).

    Returns:
        ``((height, width), [(class, float32 [P, 2] xy), ...])``.

    Raises:
        ValueError: On malformed XML, a missing size or an unknown tag (naming the file and tag).

    """
    path = Path(path)
    root = _parse_xml(path)
    size = root.find("size")
    if size is None:
        raise InputError(f"{path}: expected <size><width/><height/></size> in <{root.tag}>")
    shape = (int(_xml_number(size, "height", path)), int(_xml_number(size, "width", path)))
    polylines: list[tuple[int, np.ndarray]] = []
    for polygon in root.iter("polygon"):
        tag = polygon.findtext("tag")
        if tag is None:
            raise InputError(f"{path}: <polygon> without a <tag>")
        cls = _class_index(tag, class_names, VOC_SCRIBBLE_ALIASES, path)
        xy = [
            (_xml_number(point, "X", path), _xml_number(point, "Y", path))
            for point in polygon.iter("point")
        ]
        if xy:
            polylines.append((cls, np.asarray(xy, dtype=np.float32)))
    return shape, polylines


def rasterize_polylines(
    polylines: Iterable[tuple[int, np.ndarray]],
    shape: tuple[int, int],
    num_classes: int,
    *,
    width: int = 3,
) -> np.ndarray:
    """Draws each ``(class, xy)`` polyline with ``width`` on a canvas of "unlabelled".

    Lines use ``cv2.polylines`` (8-connected, no anti-aliasing, coordinates rounded); a polyline of
    a single point is drawn as a dot: the disc of radius ``(width - 1) / 2`` (as in
    :func:`rasterize_points`). Later polylines overwrite earlier ones.

    Args:
        polylines: ``(class, [P, 2] xy)`` pairs.
        shape: Canvas ``(height, width)``.
        num_classes: C.
        width: Line thickness in pixels.

    Returns:
        uint8 [H, W] target map.

    Raises:
        ValueError: On malformed polylines or classes outside ``0..C-1``.

    """
    num_classes = _check_num_classes(num_classes)
    height, canvas_width = _check_shape(shape)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    canvas = np.full((height, canvas_width), num_classes, dtype=np.uint8)
    for cls, xy in polylines:
        if not 0 <= int(cls) < num_classes:
            raise ValueError(f"polyline class must be in 0..{num_classes - 1}, got {cls}")
        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"polyline points must be a [P, 2] xy array, got {xy.shape}")
        if len(xy) == 0:
            continue
        if len(xy) == 1:
            dot = np.array([[xy[0, 0], xy[0, 1], cls]])
            drawn = rasterize_points(
                dot, (height, canvas_width), num_classes, radius=(width - 1) // 2
            )
            canvas[drawn != num_classes] = cls
            continue
        pts = np.floor(xy + 0.5).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(
            canvas, [pts], isClosed=False, color=int(cls), thickness=width, lineType=cv2.LINE_8
        )
    return canvas


def read_voc_annotation(
    path: str | Path, class_names: Sequence[str], *, include_difficult: bool = True
) -> np.ndarray:
    """Read the boxes of a PASCAL VOC ``Annotations/<id>.xml`` file.

    VOC boxes are 1-based and inclusive; they are returned 0-based with exclusive far edges
    (``x0 = xmin - 1``, ``x1 = xmax``).

    Args:
        path: XML file.
        class_names: Class names, index = class id (e.g. :data:`VOC_CLASSES`, background at 0).
        include_difficult: Whether objects flagged ``<difficult>1</difficult>`` are kept.

    Returns:
        float32 [N, 5] rows ``(x0, y0, x1, y1, class)``.

    Raises:
        ValueError: On malformed XML, a missing box or an unknown class (naming the file).

    """
    path = Path(path)
    root = _parse_xml(path)
    rows = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if name is None:
            raise InputError(f"{path}: <object> without a <name>")
        cls = _class_index(name, class_names, {}, path)
        if not include_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise InputError(f"{path}: object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (
            _xml_number(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")
        )
        rows.append((xmin - 1, ymin - 1, xmax, ymax, cls))
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


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
