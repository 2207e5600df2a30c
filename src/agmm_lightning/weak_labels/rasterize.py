"""Weak labels drawn on a canvas: clicks, boxes and polylines, and the classes a label holds."""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from agmm_lightning.weak_labels.labelmaps import (
    check_label_map,
    check_num_classes,
    check_shape,
    disc_offsets,
)

__all__ = [
    "points_from_target",
    "rasterize_boxes",
    "rasterize_points",
    "rasterize_polylines",
    "tags_from_mask",
    "tags_from_target",
]


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
    num_classes = check_num_classes(num_classes)
    height, width = check_shape(shape)
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
    dy, dx = disc_offsets(radius)
    py = ys[:, None] + dy[None, :]
    px = xs[:, None] + dx[None, :]
    keep = (py >= 0) & (py < height) & (px >= 0) & (px < width)
    labels = np.broadcast_to(classes[:, None], py.shape)
    # Fancy assignment writes in order, so the last click wins where discs overlap.
    canvas[py[keep], px[keep]] = labels[keep]
    return canvas


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
    when positive), labelled with the box class wherever the smallest box covering the pixel has
    that class: a box nested in another class's box keeps a core of its own, and where boxes of
    different classes of equal size overlap, neither labels it.
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
    num_classes = check_num_classes(num_classes)
    height, width = check_shape(shape)
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
    x0, y0, x1, y1, classes = x0[live], y0[live], x1[live], y1[live], classes[live]
    # The class of the smallest box covering each pixel (-1 where boxes of different classes tie
    # for it): boxes drawn largest first.
    area = (x1 - x0) * (y1 - y0)
    smallest = np.full((height, width), -1, dtype=np.int64)
    smallest_area = np.full((height, width), -1, dtype=np.int64)
    for i in np.argsort(-area, kind="stable"):
        region = (slice(y0[i], y1[i]), slice(x0[i], x1[i]))
        target[region] = num_classes
        allowed[classes[i], region[0], region[1]] = True
        tie = (smallest_area[region] == area[i]) & (smallest[region] != classes[i])
        smallest[region] = np.where(tie, -1, classes[i])
        smallest_area[region] = area[i]
    allowed[background] = True
    if core_fraction > 0:
        for bx0, by0, bx1, by1, cls in zip(x0, y0, x1, y1, classes, strict=True):
            core_w = max(1, round((bx1 - bx0) * core_fraction))
            core_h = max(1, round((by1 - by0) * core_fraction))
            cx0 = bx0 + (bx1 - bx0 - core_w) // 2
            cy0 = by0 + (by1 - by0 - core_h) // 2
            region = (slice(cy0, cy0 + core_h), slice(cx0, cx0 + core_w))
            target[region][smallest[region] == cls] = cls
    return target, allowed


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
    num_classes = check_num_classes(num_classes)
    height, canvas_width = check_shape(shape)
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
    num_classes = check_num_classes(num_classes)
    return _classes_below(check_label_map(mask, num_classes), num_classes)


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
    num_classes = check_num_classes(num_classes)
    target = check_label_map(target, num_classes, name="target", max_value=num_classes + 1)
    return _classes_below(target, num_classes)


def _classes_below(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 [C] multi-hot of the values below C in a label map."""
    values = labels[labels < num_classes].astype(np.int64)
    return (np.bincount(values, minlength=num_classes) > 0).astype(np.float32)


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
    for cls in np.flatnonzero(tags_from_target(target, num_classes)):
        count, _, _, centroids = cv2.connectedComponentsWithStats(
            (target == cls).astype(np.uint8), connectivity=8
        )
        xy = centroids[1:count]
        rows.append(np.column_stack([xy, np.full(len(xy), cls)]))
    if not rows:
        return np.zeros((0, 3), np.float32)
    return np.concatenate(rows).astype(np.float32)
