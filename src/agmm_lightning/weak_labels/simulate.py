"""Weak labels simulated from dense masks (METHOD §4): clicks, scribbles, blocks and boxes.

Simulated labels put ``C`` wherever nothing was annotated, void pixels of the dense mask included
(annotators simply did not click there); ``255`` in a target map is left to the crop padding of
the transforms. All randomness goes through a :class:`numpy.random.Generator`, so a simulation is
reproducible.
"""

from __future__ import annotations

import cv2
import numpy as np

from agmm_lightning.targets import VOID
from agmm_lightning.weak_labels.labelmaps import (
    check_label_map,
    check_num_classes,
    class_components,
    disc_kernel,
    inner_distance,
    present_values,
    segment_crops,
)

__all__ = ["boxes_from_mask", "sample_points", "simulate_blocks", "simulate_scribbles"]


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
        check_num_classes(num_classes)
    mask = check_label_map(mask, num_classes)
    if points_per_segment < 1:
        raise ValueError(f"points_per_segment must be >= 1, got {points_per_segment}")
    if not 0.0 <= interior <= 1.0:
        raise ValueError(f"interior must be in [0, 1], got {interior}")
    rows: list[np.ndarray] = []
    for cls, indicator, labels, stats in class_components(mask, connectivity):
        keep = stats[:, cv2.CC_STAT_AREA] >= max(min_area, 1)
        keep[0] = False
        if not keep.any():
            continue
        # Segments of one class are never adjacent, so the distance to the nearest pixel of
        # another class is the distance to the segment's boundary.
        distance = inner_distance(indicator)
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


# Scribbles


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
    num_classes = check_num_classes(num_classes)
    mask = check_label_map(mask, num_classes)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    if not 0.0 <= trim_jitter <= 1.0:
        raise ValueError(f"trim_jitter must be in [0, 1], got {trim_jitter}")
    brush = disc_kernel((width - 1) / 2)
    target = np.full(mask.shape, num_classes, dtype=np.uint8)
    for cls, y0, x0, component in segment_crops(mask, connectivity, max(min_area, 1)):
        skeleton = _thin(component)
        fraction = min(max(trim * rng.uniform(1 - trim_jitter, 1 + trim_jitter), 0.0), 0.95)
        skeleton = _prune(skeleton, fraction * cv2.countNonZero(skeleton))
        if not skeleton.any():
            distance = inner_distance(component)
            skeleton[np.unravel_index(np.argmax(distance), distance.shape)] = 1
        # The crop is the segment's bounding box, so clipping to it loses nothing of the stroke
        # that the clip to the segment would keep.
        stroke = cv2.dilate(skeleton, brush).astype(bool) & component
        h, w = component.shape
        target[y0 : y0 + h, x0 : x0 + w][stroke] = cls
    return target


# Blocks


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
    num_classes = check_num_classes(num_classes)
    mask = check_label_map(mask, num_classes)
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
        for _, indicator, labels, stats in class_components(mask, 8):
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


# Boxes


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
    num_classes = check_num_classes(num_classes)
    mask = check_label_map(mask, num_classes)
    if instances is None:
        classes = [c for c in present_values(mask) if c != background]
        rows: list[np.ndarray] = []
        for cls, _, _, stats in class_components(mask, connectivity, classes):
            stats = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= max(min_area, 1)]
            x, y, w, h = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
            rows.append(np.stack([x, y, x + w, y + h, np.full(len(x), cls)], axis=1))
        return np.concatenate(rows or [np.zeros((0, 5))]).astype(np.float32)

    instances = check_label_map(instances, None, name="instances")
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
