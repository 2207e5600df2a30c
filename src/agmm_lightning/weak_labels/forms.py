"""The weak-label forms (METHOD §4), one image's weak label, and its simulation from a mask."""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, cast, get_args

import numpy as np

from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import simulate
from agmm_lightning.weak_labels.rasterize import rasterize_boxes, tags_from_mask, tags_from_target

__all__ = [
    "SimulationOptions",
    "WeakLabel",
    "WeakLabelForm",
    "WeakLabelOption",
    "assign_forms",
    "check_form",
    "form_mix",
    "simulate_weak_label",
    "weak_label_rng",
]

WeakLabelForm = Literal["full", "point", "scribble", "block", "box", "image"]


WeakLabelOption = WeakLabelForm | dict[WeakLabelForm, float]
"""The ``weak_label`` option: one form for every image, or a mix ``form -> fraction``."""

_FORMS = get_args(WeakLabelForm)
_MIX_EXAMPLE = "{point: 0.6, box: 0.3, full: 0.1}"
_FORM_STREAM = zlib.crc32(b"weak_label form")
"""Tags the generator that deals the forms of a mix out, apart from every image's own."""


def check_form(form: object) -> None:
    """Raise an InputError unless ``form`` is a weak-label form or a mix of them.

    A mix maps forms to fractions of the images, each in 0..1, summing to 1.
    """
    form_mix(form)


def form_mix(weak_label: object) -> dict[WeakLabelForm, float] | None:
    """The checked mix of a ``weak_label`` option, or None for a single form.

    Args:
        weak_label: A form, or a mapping ``form -> fraction`` of the images.

    Returns:
        The mix (forms in the order given), or None when ``weak_label`` is one form.

    Raises:
        InputError: Naming ``weak_label``, if a form is unknown, a fraction is not a number in
            0..1, or the fractions do not sum to 1.
    """
    expected = f"one of {_FORMS} or a mix of them with fractions summing to 1, e.g. {_MIX_EXAMPLE}"
    if isinstance(weak_label, str):
        if weak_label not in _FORMS:
            raise InputError(f"weak_label must be {expected}; got {weak_label!r}.")
        return None
    if not isinstance(weak_label, Mapping) or not weak_label:
        raise InputError(f"weak_label must be {expected}; got {weak_label!r}.")
    unknown = [form for form in weak_label if form not in _FORMS]
    if unknown:
        raise InputError(
            f"weak_label names unknown form(s) {unknown} in {dict(weak_label)}; expected forms "
            f"from {_FORMS}, e.g. {_MIX_EXAMPLE}."
        )
    fractions = {}
    for form, fraction in weak_label.items():
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise InputError(
                f"weak_label: the fraction of {form!r} must be a number in 0..1, got {fraction!r}."
            )
        if not 0 <= fraction <= 1 or not math.isfinite(fraction):
            raise InputError(
                f"weak_label: the fraction of {form!r} must be in 0..1, got {fraction}."
            )
        fractions[cast(WeakLabelForm, form)] = float(fraction)
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise InputError(
            f"weak_label: the fractions of {dict(weak_label)} sum to {total:g}; they must sum to "
            f"1, e.g. {_MIX_EXAMPLE}."
        )
    return fractions


def assign_forms(
    names: Iterable[str], mix: Mapping[WeakLabelForm, float], seed: int
) -> dict[str, WeakLabelForm]:
    """Deal the forms of a mix out to the images of a split.

    The names are sorted and shuffled by a generator of ``seed`` alone (a stream of its own, apart
    from :func:`weak_label_rng`'s); the first ``round(fraction * n)`` of the shuffled names take
    the first form, and so on (largest remainders round, so the counts sum to ``n`` and each is
    within one image of its fraction). The forms depend only on the seed and the split's set of
    names: not on their order, the epoch or the DataLoader workers.

    Args:
        names: The split's image names.
        mix: ``form -> fraction`` (see :func:`form_mix`).
        seed: The experiment's data seed.

    Returns:
        ``name -> form``.
    """
    ordered = sorted(set(names))
    count = len(ordered)
    forms = sorted(mix)  # the order the option was written in changes nothing
    exact = [mix[form] * count for form in forms]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(forms)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    dealt = [form for form, n in zip(forms, counts, strict=True) for _ in range(n)]
    order = np.random.default_rng([seed, _FORM_STREAM, 0]).permutation(count)
    return {ordered[position]: form for position, form in zip(order, dealt, strict=True)}


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

    def check(self, form: object) -> None:
        """Raise an InputError unless the options are in range; warn about core-less boxes.

        Args:
            form: The ``weak_label`` option: a form or a mix (checked too).
        """
        mix = form_mix(form)
        boxes = "box" in mix if mix is not None else form == "box"
        if boxes and self.box_core_fraction == 0:
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
