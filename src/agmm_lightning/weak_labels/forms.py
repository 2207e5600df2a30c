"""The weak-label forms (METHOD §4), one image's weak label, and its simulation from a mask."""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import simulate
from agmm_lightning.weak_labels.rasterize import rasterize_boxes, tags_from_mask, tags_from_target

__all__ = [
    "SimulationOptions",
    "WeakLabel",
    "WeakLabelForm",
    "check_form",
    "simulate_weak_label",
    "weak_label_rng",
]

WeakLabelForm = Literal["full", "point", "scribble", "block", "box", "image"]


def check_form(form: str) -> None:
    """Raise an InputError unless ``form`` is a weak-label form."""
    if form not in get_args(WeakLabelForm):
        raise InputError(f"weak_label must be one of {get_args(WeakLabelForm)}, got {form!r}.")


@dataclass(frozen=True)
class WeakLabel:
    """One image's weak label, in the form the augmentation carries it.

    Exactly one of ``target``, ``points`` and ``boxes`` is set.

    Attributes:
        target: Raster [H,W] (0..C-1 labelled, C unlabelled, 255 void).
        points: Clicks, float32 [N,3] rows of (x, y, class).
        boxes: Boxes, float32 [N,5] rows of (x0, y0, x1, y1, class).
        tags: Classes known present, float32 [C]; None derives them from the label itself.
    """

    target: np.ndarray | None = None
    points: np.ndarray | None = None
    boxes: np.ndarray | None = None
    tags: np.ndarray | None = None

    def __post_init__(self) -> None:
        given = [form for form in ("target", "points", "boxes") if getattr(self, form) is not None]
        if len(given) != 1:
            raise ValueError(
                f"A weak label is exactly one of target, points or boxes; got {given or 'none'}."
            )

    def classes(self, shape: tuple[int, int], num_classes: int) -> np.ndarray:
        """The classes the label says the whole image holds (METHOD §1: ``t``), float32 [C].

        The tags when given; else the classes labelled in the raster, clicked, or boxed (boxes add
        the background class when some pixel lies outside every box).

        Args:
            shape: The image's ``(height, width)``.
            num_classes: C.
        """
        if self.tags is not None:
            return self.tags
        if self.target is not None:
            return tags_from_target(self.target, num_classes)
        classes = np.zeros(num_classes, np.float32)
        if self.points is not None:
            classes[self.points[:, 2].astype(np.int64)] = 1.0
            return classes
        assert self.boxes is not None
        classes[self.boxes[:, 4].astype(np.int64)] = 1.0
        box_target, _ = rasterize_boxes(self.boxes, shape, num_classes)
        return np.maximum(classes, tags_from_target(box_target, num_classes))


@dataclass(frozen=True)
class SimulationOptions:
    """How weak labels are simulated from dense masks, and how boxes are read.

    Attributes:
        points_per_segment: Clicks per connected segment for the "point" form.
        block_fraction: Fraction of the image covered by blocks for the "block" form.
        box_core_fraction: Central fraction of each box labelled with its class.
    """

    points_per_segment: int = 1
    block_fraction: float = 0.1
    box_core_fraction: float = 0.0

    def check(self, form: WeakLabelForm) -> None:
        """Raise an InputError unless the options are in range; warn about core-less boxes."""
        if form == "box" and self.box_core_fraction == 0:
            warnings.warn(
                "weak_label='box' with box_core_fraction=0 labels no pixel of any box class (only "
                "the background outside the boxes), so nothing can teach a box class: the AGMM "
                "mixtures of those classes never start. Set box_core_fraction > 0 (e.g. 0.3).",
                stacklevel=4,
            )
        if self.points_per_segment < 1:
            raise InputError(f"points_per_segment must be >= 1, got {self.points_per_segment}.")
        if not 0 < self.block_fraction <= 1 or not 0 <= self.box_core_fraction <= 1:
            raise InputError(
                "Expected 0 < block_fraction <= 1 and 0 <= box_core_fraction <= 1, got "
                f"{self.block_fraction} and {self.box_core_fraction}."
            )


def weak_label_rng(seed: int, name: str) -> np.random.Generator:
    """Return the generator that simulates the weak label of image ``name``.

    Args:
        seed: The experiment's data seed.
        name: The image's identifier (stable across split files, unlike its index).

    Returns:
        A generator that depends only on ``(seed, name)``.
    """
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def simulate_weak_label(
    mask: np.ndarray,
    form: WeakLabelForm,
    num_classes: int,
    rng: np.random.Generator,
    options: SimulationOptions | None = None,
) -> WeakLabel:
    """Simulate a weak label of the given form from a dense mask (METHOD §4).

    Void pixels of the mask become unlabelled (C), as in every simulated form: in a target map
    255 is left to crop padding.

    Args:
        mask: Dense class-index mask [H,W] (255 void).
        form: The weak-label form. "image" gives tags and an all-unlabelled target (the CAM
            pseudo labels of METHOD §5 replace that target in the second stage).
        num_classes: Number of classes C.
        rng: Generator for the random parts of the simulation.
        options: Clicks per segment and block fraction (defaults when None).

    Returns:
        The simulated weak label.

    Raises:
        ValueError: If ``form`` is not a known weak-label form.
    """
    options = options or SimulationOptions()
    check_form(form)
    if form == "full":
        # Dense supervision has no unlabelled pixels: the dataset's "don't care" stays void.
        return WeakLabel(target=mask.astype(np.uint8))
    if form == "point":
        points = simulate.sample_points(
            mask, rng, points_per_segment=options.points_per_segment, num_classes=num_classes
        )
        return WeakLabel(points=points)
    if form == "scribble":
        return WeakLabel(target=simulate.simulate_scribbles(mask, rng, num_classes))
    if form == "block":
        target = simulate.simulate_blocks(mask, rng, num_classes, fraction=options.block_fraction)
        return WeakLabel(target=target)
    if form == "box":
        return WeakLabel(boxes=simulate.boxes_from_mask(mask, num_classes))
    unlabelled = np.full(mask.shape, num_classes, np.uint8)
    return WeakLabel(target=unlabelled, tags=tags_from_mask(mask, num_classes))
