"""Tests of weak-label simulation and rasterisation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from agmm_lightning import weak_labels as wl
from agmm_lightning.errors import InputError

NUM_CLASSES = 5
VOID = 255


def blob_mask(height: int = 375, width: int = 500) -> np.ndarray:
    """A VOC-like mask: background 0, a few shapes of classes 1..4 and a void outline."""
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (120, 120), 70, 1, -1)
    cv2.rectangle(mask, (250, 40), (450, 160), 2, -1)
    cv2.ellipse(mask, (300, 280), (150, 60), 20, 0, 360, 3, -1)
    cv2.fillPoly(mask, [np.array([[30, 360], [90, 220], [160, 350]], np.int32)], 4)
    cv2.circle(mask, (440, 330), 25, 1, -1)
    cv2.circle(mask, (300, 280), 20, 2, -1)
    cv2.ellipse(mask, (300, 280), (150, 60), 20, 0, 360, VOID, 3)
    return mask


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return blob_mask()


def segments(mask: np.ndarray, min_area: int = 1) -> list[tuple[int, np.ndarray]]:
    """(class, full-size boolean segment) for every 8-connected segment, via SciPy."""
    out = []
    for cls in np.unique(mask):
        if cls == VOID:
            continue
        labels, count = ndimage.label(mask == cls, structure=np.ones((3, 3)))
        for index in range(1, count + 1):
            segment = labels == index
            if segment.sum() >= min_area:
                out.append((int(cls), segment))
    return out


def boundary_distance(mask: np.ndarray, cls: int) -> np.ndarray:
    """Distance to the nearest pixel of another class/void, the frame counting as boundary."""
    padded = np.pad(mask == cls, 1)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_segment", [1, 3])
def test_points_inside_their_segment_and_away_from_boundary(mask, per_segment):
    points = wl.sample_points(
        mask, np.random.default_rng(0), points_per_segment=per_segment, num_classes=NUM_CLASSES
    )
    segs = segments(mask)
    assert points.dtype == np.float32 and points.shape == (len(segs) * per_segment, 3)
    xs, ys, classes = points[:, 0].astype(int), points[:, 1].astype(int), points[:, 2].astype(int)
    assert np.array_equal(points[:, :2], np.round(points[:, :2]))
    assert np.array_equal(mask[ys, xs], classes)
    assert not np.any(mask[ys, xs] == VOID)
    # Every segment receives exactly per_segment clicks, each in its interior.
    for cls, segment in segs:
        hits = segment[ys, xs] & (classes == cls)
        assert hits.sum() == per_segment
        distance = boundary_distance(mask, cls)
        limit = 0.5 * distance[segment].max()
        assert np.all(distance[ys[hits], xs[hits]] >= limit - 1e-4)


def test_points_distinct_within_segment(mask):
    points = wl.sample_points(mask, np.random.default_rng(1), points_per_segment=4)
    assert len(np.unique(points[:, :2], axis=0)) == len(points)


def test_points_reproducible_and_seed_dependent(mask):
    a = wl.sample_points(mask, np.random.default_rng(7), points_per_segment=2)
    b = wl.sample_points(mask, np.random.default_rng(7), points_per_segment=2)
    c = wl.sample_points(mask, np.random.default_rng(8), points_per_segment=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_points_min_area_and_tiny_segments():
    mask = np.zeros((20, 20), np.uint8)
    mask[2, 2] = 1  # one-pixel segment: its only pixel must be chosen (with replacement)
    mask[10:15, 10:15] = 2
    points = wl.sample_points(mask, np.random.default_rng(0), points_per_segment=2)
    assert np.array_equal(points[points[:, 2] == 1], [[2, 2, 1], [2, 2, 1]])
    points = wl.sample_points(mask, np.random.default_rng(0), min_area=2)
    assert set(points[:, 2].astype(int)) == {0, 2}


def test_points_never_on_void():
    mask = np.full((30, 30), VOID, np.uint8)
    mask[5:25, 5:25] = 3
    points = wl.sample_points(mask, np.random.default_rng(0), points_per_segment=5)
    assert set(points[:, 2].astype(int)) == {3}
    assert np.all(mask[points[:, 1].astype(int), points[:, 0].astype(int)] == 3)


# --------------------------------------------------------------------------------------------
# Rasterisation of points
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("radius", "area"), [(0, 1), (1, 5), (2, 13)])
def test_rasterize_point_is_euclidean_disc(radius, area):
    canvas = wl.rasterize_points(np.array([[10.0, 12.0, 2]]), (30, 25), NUM_CLASSES, radius=radius)
    assert canvas.dtype == np.uint8 and canvas.shape == (30, 25)
    ys, xs = np.nonzero(canvas == 2)
    assert len(ys) == area
    assert np.all((xs - 10) ** 2 + (ys - 12) ** 2 <= radius**2)
    assert np.all(canvas[canvas != 2] == NUM_CLASSES)


def test_rasterize_points_rounds_clips_and_drops():
    points = np.array([[4.6, 0.2, 1], [0.0, 0.0, 3], [-3.0, 5.0, 4], [7.0, 99.0, 4]])
    canvas = wl.rasterize_points(points, (8, 8), NUM_CLASSES, radius=1)
    assert canvas[0, 5] == 1 and canvas[1, 5] == 1  # (4.6, 0.2) rounds to column 5, row 0
    assert canvas[0, 0] == 3 and canvas[0, 1] == 3 and canvas[1, 0] == 3
    assert (canvas == 3).sum() == 3  # the corner disc is clipped to the canvas
    assert not np.any(canvas == 4)  # centres outside the canvas are dropped


def test_rasterize_points_roundtrip(mask):
    points = wl.sample_points(mask, np.random.default_rng(0), points_per_segment=2)
    canvas = wl.rasterize_points(points, mask.shape, NUM_CLASSES)
    assert np.array_equal(wl.tags_from_target(canvas, NUM_CLASSES), wl.tags_from_mask(mask, 5))
    # A click more than 1 px from its boundary has its whole radius-1 disc inside the segment.
    xs, ys, classes = points.astype(int).T
    deep = np.array(
        [boundary_distance(mask, c)[y, x] > 1 for x, y, c in zip(xs, ys, classes, strict=True)]
    )
    assert deep.mean() > 0.8
    canvas = wl.rasterize_points(points[deep], mask.shape, NUM_CLASSES)
    labelled = canvas < NUM_CLASSES
    assert np.array_equal(canvas[labelled], mask[labelled])


# --------------------------------------------------------------------------------------------
# Scribbles
# --------------------------------------------------------------------------------------------


def test_scribbles_own_class_and_every_segment(mask):
    target = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, min_area=16)
    assert target.dtype == np.uint8 and target.shape == mask.shape
    labelled = target < NUM_CLASSES
    assert np.array_equal(target[labelled], mask[labelled])
    assert np.all(target[~labelled] == NUM_CLASSES)  # C elsewhere, void included
    assert np.all(target[mask == VOID] == NUM_CLASSES)
    for cls, segment in segments(mask, min_area=16):
        assert np.any(target[segment] == cls)
    # A sparse label: thin strokes, far from dense.
    assert labelled.mean() < 0.15


def test_scribbles_skip_small_segments_and_cover_tiny_ones():
    mask = np.zeros((60, 60), np.uint8)
    mask[5:8, 5:8] = 1  # 9 px: below min_area
    mask[30:32, 30:32] = 2  # 2x2 square: thinning removes it, a dot must remain
    target = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, min_area=4)
    assert np.any(target == 1) and np.any(target == 2)
    target = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, min_area=10)
    assert not np.any(target == 1) and not np.any(target == 2) and np.any(target == 0)


def test_scribbles_on_thin_structures_stay_in_their_class():
    mask = np.zeros((30, 60), np.uint8)
    mask[10, 5:55] = 1  # a 1-px wire: a width-5 brush would spill into the background
    mask[15:17, 5:55] = 2  # a 2-px strip
    target = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, width=5)
    labelled = target < NUM_CLASSES
    assert np.array_equal(target[labelled], mask[labelled])
    assert np.any(target == 1) and np.any(target == 2) and np.any(target == 0)


def test_scribble_of_bar_is_centred_and_trimmed():
    mask = np.zeros((41, 201), np.uint8)
    mask[10:31, 20:181] = 1  # 21 x 161 bar: skeleton is (mostly) its centre line
    kwargs = {"width": 1, "trim_jitter": 0.0, "min_area": 16}
    full = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, trim=0.0, **kwargs)
    trimmed = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, trim=0.4, **kwargs)
    ys, xs = np.nonzero(trimmed == 1)
    assert abs(np.median(ys) - 20) <= 1  # along the medial axis
    # End layers are peeled while at most 40 % is removed: about 60 % of the skeleton remains.
    assert 0.6 * (full == 1).sum() <= (trimmed == 1).sum() <= 0.6 * (full == 1).sum() + 10
    assert np.all(full[trimmed == 1] == 1)  # trimming only removes pixels at the ends
    centre = (full == 1) & (np.abs(np.arange(201) - 100) < 20)[None, :]
    assert np.all(trimmed[centre] == 1)  # the interior part is kept


def test_scribble_width():
    mask = np.zeros((41, 201), np.uint8)
    mask[10:31, 20:181] = 1
    kwargs = {"trim": 0.0, "min_area": 16}
    thin = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, width=1, **kwargs)
    thick = wl.simulate_scribbles(mask, np.random.default_rng(0), NUM_CLASSES, width=3, **kwargs)
    assert (thin[:, 100] == 1).sum() == 1 and (thick[:, 100] == 1).sum() == 3
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    brushed = cv2.dilate((thin == 1).astype(np.uint8), cross) > 0
    assert np.array_equal(thick == 1, brushed & (mask == 1))


def test_scribbles_reproducible(mask):
    a = wl.simulate_scribbles(mask, np.random.default_rng(3), NUM_CLASSES)
    b = wl.simulate_scribbles(mask, np.random.default_rng(3), NUM_CLASSES)
    c = wl.simulate_scribbles(mask, np.random.default_rng(4), NUM_CLASSES)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # per-segment trims differ


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def in_full_square(indicator: np.ndarray, size: int) -> np.ndarray:
    """Pixels lying in some size x size square (inside the image) made only of indicator pixels."""
    kernel = np.ones((size, size), np.uint8)
    edge = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0}
    # Erode with the anchor at the top-left: squares by their top-left corner; dilate with the
    # anchor at the bottom-right: every pixel of those squares.
    corners = cv2.erode(indicator.astype(np.uint8), kernel, anchor=(0, 0), **edge)
    return cv2.dilate(corners, kernel, anchor=(size - 1, size - 1), **edge) > 0


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_blocks_inside_single_class_regions_and_cover_fraction(mask, fraction):
    target = wl.simulate_blocks(
        mask,
        np.random.default_rng(0),
        NUM_CLASSES,
        fraction=fraction,
        block_size=20,
        min_block_size=5,
    )
    labelled = target < NUM_CLASSES
    assert np.array_equal(target[labelled], mask[labelled])
    assert fraction <= labelled.mean() <= fraction + 400 / mask.size  # at most one block over
    # Every labelled pixel lies in a square of side 20, 10 or 5 labelled with one class.
    covered = np.zeros_like(labelled)
    for size in (20, 10, 5):
        for cls in range(NUM_CLASSES):
            covered |= in_full_square(target == cls, size)
    assert np.array_equal(covered, labelled)


def test_blocks_explicit_size_and_void():
    mask = np.full((100, 100), VOID, np.uint8)
    mask[:, :50] = 1
    mask[:, 50:] = 2
    mask[40:60, :] = VOID
    target = wl.simulate_blocks(
        mask, np.random.default_rng(0), NUM_CLASSES, fraction=0.2, block_size=10, min_block_size=10
    )
    labelled = target < NUM_CLASSES
    assert labelled.sum() % 100 == 0 and labelled.mean() >= 0.2
    assert not np.any(labelled[mask == VOID])
    # No block straddles the class border at column 50.
    covered = in_full_square(target == 1, 10) | in_full_square(target == 2, 10)
    assert np.array_equal(covered, labelled)
    assert np.array_equal(target[labelled], mask[labelled])


def test_every_segment_gets_a_block_so_the_tags_are_complete():
    # Random blocks of side 10 reach 10% in the two large regions long before the side is
    # halved: only the first pass, one block per segment, reaches the small and thin ones.
    mask = np.zeros((100, 100), np.uint8)
    mask[10:60, 10:60] = 1
    mask[70:76, 70:76] = 2
    mask[85:91, 10:16] = 2
    mask[65:95, 40:43] = 3  # 3 px wide: only blocks of side 2 fit
    target = wl.simulate_blocks(
        mask, np.random.default_rng(0), NUM_CLASSES, fraction=0.1, block_size=10, min_block_size=2
    )
    for cls, segment in segments(mask):
        assert np.any(target[segment] == cls), f"a segment of class {cls} has no block"
    labelled = target < NUM_CLASSES
    assert np.array_equal(target[labelled], mask[labelled])
    assert 0.1 <= labelled.mean() <= 0.1 + 100 / mask.size


def test_blocks_reproducible_and_zero_fraction(mask):
    a = wl.simulate_blocks(mask, np.random.default_rng(5), NUM_CLASSES)
    b = wl.simulate_blocks(mask, np.random.default_rng(5), NUM_CLASSES)
    c = wl.simulate_blocks(mask, np.random.default_rng(6), NUM_CLASSES)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    empty = wl.simulate_blocks(mask, np.random.default_rng(5), NUM_CLASSES, fraction=0.0)
    assert np.all(empty == NUM_CLASSES)


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def test_boxes_enclose_segments_exactly(mask):
    boxes = wl.boxes_from_mask(mask, NUM_CLASSES)
    assert boxes.dtype == np.float32 and boxes.shape[1] == 5
    expected = []
    for cls, segment in segments(mask):
        if cls == 0:
            continue
        ys, xs = np.nonzero(segment)
        expected.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, cls))
    assert sorted(map(tuple, boxes.astype(int).tolist())) == sorted(expected)


def test_boxes_min_area_and_background_choice():
    mask = np.zeros((20, 20), np.uint8)
    mask[1:3, 1:3] = 1
    mask[10:18, 5:9] = 2
    assert wl.boxes_from_mask(mask, NUM_CLASSES, min_area=5).tolist() == [[5, 10, 9, 18, 2]]
    # With no background class, class 0 gets its (frame-sized) box too.
    boxes = wl.boxes_from_mask(mask, NUM_CLASSES, background=NUM_CLASSES)
    assert [0, 0, 20, 20, 0] in boxes.tolist()


def test_boxes_from_instances():
    mask = np.zeros((30, 30), np.uint8)
    instances = np.zeros((30, 30), np.uint8)
    mask[2:10, 2:10] = 1
    mask[5:20, 12:28] = 1  # two touching objects of the same class ...
    instances[2:10, 2:10] = 1
    instances[5:20, 12:28] = 2  # ... told apart by the instance map
    mask[25, 0:3] = VOID
    instances[25, 0:3] = VOID
    mask[22:28, 22:28] = 3
    instances[22:28, 22:28] = 4
    mask[22, 22] = 2  # a stray pixel of another class: the majority class wins
    boxes = wl.boxes_from_mask(mask, NUM_CLASSES, instances=instances)
    assert boxes.tolist() == [[2, 2, 10, 10, 1], [12, 5, 28, 20, 1], [22, 22, 28, 28, 3]]


# --------------------------------------------------------------------------------------------
# Box rasterisation
# --------------------------------------------------------------------------------------------


def test_rasterize_boxes_background_union_and_core():
    boxes = np.array([[2, 2, 12, 12, 1], [8, 8, 20, 16, 2], [30, 30, 50, 50, 3]], np.float32)
    target, allowed = wl.rasterize_boxes(boxes, (20, 25), NUM_CLASSES, core_fraction=0.4)
    assert target.dtype == np.uint8 and allowed.dtype == np.bool_
    assert allowed.shape == (NUM_CLASSES, 20, 25)
    inside = np.zeros((20, 25), bool)
    inside[2:12, 2:12] = True
    inside[8:16, 8:20] = True
    assert np.all(target[~inside] == 0)  # outside every box: labelled background
    assert np.all(allowed[0])  # background allowed everywhere
    assert np.array_equal(allowed[1], np.pad(np.ones((10, 10), bool), ((2, 8), (2, 13))))
    assert allowed[1, 9, 9] and allowed[2, 9, 9]  # overlap: union
    assert not allowed[3].any() and not allowed[4].any()  # the off-canvas box is clipped away
    # Cores: 40 % of each side, centred; box 1's core [5:9, 5:9] overlaps box 2 at [8, 8].
    assert np.all(target[5:8, 5:9] == 1) and np.all(target[8, 5:8] == 1)
    assert target[8, 8] == NUM_CLASSES
    # Box 2's core [10:13, 11:16] overlaps box 1 at column 11, rows 10 and 11: box 2 is the
    # smaller one (96 against 100 pixels), so it keeps them.
    assert np.all(target[10:13, 11:16] == 2)
    core = (target == 1) | (target == 2)
    assert core.sum() == (16 - 1) + 15
    assert np.all(target[inside & ~core] == NUM_CLASSES)


def test_rasterize_boxes_without_core_and_fractional_edges():
    target, allowed = wl.rasterize_boxes(
        np.array([[1.5, 2.2, 4.1, 5.0, 2]]), (8, 8), NUM_CLASSES, background=0
    )
    expected = np.zeros((8, 8), bool)
    expected[2:5, 1:5] = True  # edges snapped outwards
    assert np.array_equal(target == NUM_CLASSES, expected)
    assert np.array_equal(allowed[2], expected)
    empty, allowed = wl.rasterize_boxes(np.zeros((0, 5)), (8, 8), NUM_CLASSES)
    assert np.all(empty == 0) and allowed[0].all() and allowed.sum() == 64


def test_boxes_pipeline_allows_ground_truth(mask):
    boxes = wl.boxes_from_mask(mask, NUM_CLASSES)
    target, allowed = wl.rasterize_boxes(boxes, mask.shape, NUM_CLASSES, core_fraction=0.2)
    valid = mask != VOID
    ys, xs = np.nonzero(valid)
    assert np.all(allowed[mask[ys, xs], ys, xs])  # the true class is always allowed
    labelled = target < NUM_CLASSES
    assert np.mean(target[labelled & valid] == mask[labelled & valid]) > 0.99


# --------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------


def test_tags():
    mask = np.array([[0, 2, VOID], [2, 2, VOID]], np.uint8)
    assert wl.tags_from_mask(mask, 4).tolist() == [1, 0, 1, 0]
    assert wl.tags_from_mask(mask, 4).dtype == np.float32
    target = np.array([[4, 3, VOID], [4, 1, 1]], np.int64)
    tags = wl.tags_from_target(target, 4)
    assert tags.dtype == np.float32 and tags.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="0..4"):
        wl.tags_from_target(np.array([[5]], np.uint8), 4)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, r: wl.sample_points(m.astype(np.float32), r), "integer dtype"),
        (lambda m, r: wl.sample_points(m[None], r), "2-D"),
        (lambda m, r: wl.sample_points(m, r, num_classes=3), r"0\.\.2 or 255.*\[3, 4\]"),
        (lambda m, r: wl.simulate_scribbles(m, r, 4), r"values \[4\]"),
        (lambda m, r: wl.simulate_blocks(m, r, 4), r"values \[4\]"),
        (lambda m, r: wl.boxes_from_mask(m.astype(bool), 5), "integer dtype"),
        (lambda m, r: wl.tags_from_mask(m, 2), r"0\.\.1 or 255"),
        (lambda m, r: wl.simulate_blocks(m, r, 5, fraction=1.5), "fraction"),
        (lambda m, r: wl.simulate_scribbles(m, r, 5, trim=1.0), "trim"),
        (lambda m, r: wl.simulate_blocks(m, r, 255), "num_classes"),
        (lambda m, r: wl.rasterize_points(np.zeros((2, 2)), (4, 4), 5), r"\[N, 3\]"),
        (lambda m, r: wl.rasterize_points(np.array([[1, 1, 5]]), (4, 4), 5), "0..4"),
        (lambda m, r: wl.rasterize_boxes(np.zeros((1, 4)), (4, 4), 5), r"\[N, 5\]"),
        (lambda m, r: wl.rasterize_boxes(np.array([[0, 0, 1, 1, 7]]), (4, 4), 5), "0..4"),
        (lambda m, r: wl.rasterize_polylines([(6, np.zeros((2, 2)))], (4, 4), 5), "0..4"),
        (lambda m, r: wl.boxes_from_mask(m, 5, instances=m[:10]), "shape"),
    ],
)
def test_bad_input(mask, call, match):
    with pytest.raises(ValueError, match=match):
        call(mask, np.random.default_rng(0))


def test_the_package_imports_neither_torch_nor_lightning():
    for module in Path(wl.__file__).parent.glob("*.py"):
        imports = [
            line
            for line in module.read_text().splitlines()
            if line.startswith(("import ", "from "))
        ]
        packages = {line.split()[1].split(".")[0] for line in imports}
        assert not packages & {"torch", "lightning"}, module.name


def test_a_mix_of_forms_is_checked_naming_the_option() -> None:
    assert wl.form_mix("point") is None
    assert wl.form_mix({"point": 0.6, "box": 0.3, "full": 0.1}) == {
        "point": 0.6,
        "box": 0.3,
        "full": 0.1,
    }
    for bad, message in (
        ("polygon", r"weak_label must be one of .*'polygon'"),
        ({"point": 0.5, "polygon": 0.5}, r"weak_label names unknown form\(s\) \['polygon'\]"),
        ({"point": 0.6, "box": 0.3}, r"weak_label: the fractions .* sum to 0.9; they must sum"),
        ({"point": 1.5, "box": -0.5}, r"weak_label: the fraction of 'point' must be in 0..1"),
        ({"point": "half", "box": 0.5}, r"weak_label: the fraction of 'point' must be a number"),
        ({}, "weak_label must be one of"),
    ):
        with pytest.raises(InputError, match=message):
            wl.check_form(bad)
    with pytest.warns(UserWarning, match="box_core_fraction=0"):
        wl.SimulationOptions().check({"point": 0.5, "box": 0.5})


def test_forms_are_dealt_out_by_the_fractions_from_the_seed_and_names_alone() -> None:
    names = [f"img{i}" for i in range(10)]
    mix = {"point": 0.6, "box": 0.3, "full": 0.1}
    forms = wl.assign_forms(names, mix, seed=0)
    assert sorted(forms) == sorted(names)
    assert Counter(forms.values()) == {"point": 6, "box": 3, "full": 1}
    # Neither the order of the names nor that of the mix changes anything; the seed does.
    assert wl.assign_forms(names[::-1], dict(reversed(mix.items())), seed=0) == forms
    assert wl.assign_forms(names, mix, seed=2) != forms
    # Counts that do not divide evenly round to the nearest, and cover every image.
    odd = wl.assign_forms([f"x{i}" for i in range(7)], {"point": 0.5, "image": 0.5}, seed=3)
    assert sorted(Counter(odd.values()).values()) == [3, 4]
    many = wl.assign_forms([f"y{i}" for i in range(1000)], mix, seed=0)
    assert Counter(many.values()) == {"point": 600, "box": 300, "full": 100}
