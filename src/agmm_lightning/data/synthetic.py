"""Embedded default dataset: procedurally generated, seeded scenes of textured shapes.

Every scene is rendered on the fly from ``(seed, split, index)``; nothing is stored on disk.
Objects of several shape classes (disc, square, triangle, ring, bar, ...) lie on a blotchy,
weakly saturated background and occlude each other. A class has three cues: its shape, its hue
band (neighbouring bands touch, so colour alone is often but not always right), and a texture kind
(horizontal or vertical stripes, checkerboard, dots, ...) chosen to survive the training
augmentation: flips and a fourfold scale jitter change neither the kind nor the class. Illumination
gradients and noise complete the scene. Dense labels teach a network the classes within minutes on
a CPU, while a click per object leaves most of each shape unlabelled: the gap the weakly-supervised
losses are there to close.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np

from agmm_lightning.data.base import AGMMDataModule, Split, WeakLabelDataset
from agmm_lightning.data.transforms import eval_transform
from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import WeakLabelOption

__all__ = ["SHAPE_NAMES", "SyntheticDataModule", "SyntheticDataset", "render_scene"]

Polygon = tuple[np.ndarray, int]
"""A polygon [P,2] of (x, y) around the origin and its fill value (1 = shape, 0 = hole)."""


def _ellipse(radius_x: float, radius_y: float, vertices: int = 48) -> np.ndarray:
    angles = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)
    return np.stack([radius_x * np.cos(angles), radius_y * np.sin(angles)], axis=1)


def _rectangle(half_width: float, half_height: float) -> np.ndarray:
    return np.array(
        [
            [-half_width, -half_height],
            [half_width, -half_height],
            [half_width, half_height],
            [-half_width, half_height],
        ]
    )


def _disc(rng: np.random.Generator, radius: float) -> list[Polygon]:
    return [(_ellipse(radius, radius * rng.uniform(0.7, 1.0)), 1)]


def _square(rng: np.random.Generator, radius: float) -> list[Polygon]:
    half = 0.85 * radius
    return [(_rectangle(half, half * rng.uniform(0.75, 1.0)), 1)]


def _triangle(rng: np.random.Generator, radius: float) -> list[Polygon]:
    angles = np.pi / 2 + 2 * np.pi / 3 * np.arange(3) + rng.uniform(-0.2, 0.2, 3)
    radii = radius * rng.uniform(0.85, 1.15, 3)
    return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), 1)]


def _ring(rng: np.random.Generator, radius: float) -> list[Polygon]:
    inner = radius * rng.uniform(0.45, 0.6)
    return [(_ellipse(radius, radius), 1), (_ellipse(inner, inner), 0)]


def _bar(rng: np.random.Generator, radius: float) -> list[Polygon]:
    return [(_rectangle(1.2 * radius, radius * rng.uniform(0.2, 0.3)), 1)]


def _blob(rng: np.random.Generator, radius: float) -> list[Polygon]:
    angles = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
    harmonics = np.arange(2, 5)[:, None]
    amplitudes = rng.uniform(0.0, 0.18, (3, 1))
    phases = rng.uniform(0.0, 2 * np.pi, (3, 1))
    radii = radius * (1 + (amplitudes * np.cos(harmonics * angles + phases)).sum(0))
    return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), 1)]


def _star(rng: np.random.Generator, radius: float) -> list[Polygon]:
    angles = np.pi / 2 + np.pi / 5 * np.arange(10)
    radii = np.where(np.arange(10) % 2 == 0, radius, radius * rng.uniform(0.4, 0.5))
    return [(np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), 1)]


def _cross(rng: np.random.Generator, radius: float) -> list[Polygon]:
    half_width = radius * rng.uniform(0.22, 0.32)
    return [(_rectangle(radius, half_width), 1), (_rectangle(half_width, radius), 1)]


_SHAPES: dict[str, Callable[[np.random.Generator, float], list[Polygon]]] = {
    "disc": _disc,
    "square": _square,
    "triangle": _triangle,
    "ring": _ring,
    "bar": _bar,
    "blob": _blob,
    "star": _star,
    "cross": _cross,
}
SHAPE_NAMES: tuple[str, ...] = tuple(_SHAPES)
"""Foreground class names in class order (class i + 1); class 0 is the background."""

_SUBPIXEL_BITS = 4
_SPLIT_CODES: dict[Split, int] = {"train": 0, "val": 1, "test": 2, "predict": 2}


def _draw_shape(polygons: list[Polygon], angle: float, center: np.ndarray, size: int) -> np.ndarray:
    """Rasterise a shape's polygons, rotated by ``angle`` and moved to ``center``, as bool [S,S]."""
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    canvas = np.zeros((size, size), np.uint8)
    for polygon, value in polygons:
        vertices = polygon @ rotation.T + center
        fixed = np.round(vertices * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(canvas, [fixed], color=value, shift=_SUBPIXEL_BITS)
    return canvas.astype(bool)


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """RGB colours in [0,1] of OpenCV HSV triples (hue 0..180, saturation and value 0..255)."""
    hsv = np.stack([hue % 180, saturation, value], axis=1).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32) / 255


def _class_colors(rng: np.random.Generator, cls: int, num_classes: int) -> np.ndarray:
    """Two RGB colours of an instance: hues in the class's band, as wide as the class spacing.

    Class 0, the background, draws weakly saturated colours of any hue.
    """
    if cls == 0:
        return _hsv_to_rgb(rng.uniform(0, 180, 2), rng.uniform(0, 70, 2), rng.uniform(90, 230, 2))
    spacing = 180 / (num_classes - 1)
    hue = spacing * (cls - 1) + rng.uniform(-0.5, 0.5) * spacing + rng.uniform(-6, 6, 2)
    return _hsv_to_rgb(hue, rng.uniform(110, 240, 2), rng.uniform(100, 240, 2))


def _texture(rng: np.random.Generator, grid: np.ndarray, cls: int, scale: float) -> np.ndarray:
    """A [0,1] texture of the class's kind with a random period and phase over a grid [2,S,S].

    The kinds are unchanged by horizontal flips, and their periods (4-8 px at 96 px) overlap
    across classes, so a rescaled texture still shows its class by kind alone.
    """
    y, x = grid
    period = scale * rng.uniform(4.0, 8.0)
    u = 2 * np.pi * (x / period + rng.uniform(0, 1))
    v = 2 * np.pi * (y / period + rng.uniform(0, 1))
    kinds = (
        lambda: np.sin(v),  # horizontal stripes
        lambda: np.sin(u),  # vertical stripes
        lambda: np.sign(np.sin(u) * np.sin(v)) * 0.9,  # checkerboard
        lambda: 2.0 * ((np.cos(u) * np.cos(v)) > 0.5) - 1,  # dots
        lambda: np.sin(u + v) * np.sin(u - v),  # diagonal cross-hatch
        lambda: np.sin(np.hypot(x - x.mean(), y - y.mean()) * 2 * np.pi / period),  # rings
        lambda: np.sin(u) * np.sin(v),  # soft grid
        lambda: np.zeros_like(x),  # plain
    )
    return (0.5 + 0.5 * kinds[(cls - 1) % len(kinds)]()).astype(np.float32)


def _paint(colors: np.ndarray, pattern: np.ndarray, weight: float) -> np.ndarray:
    """Blend two RGB colours with a [0,1] pattern of the given strength, float32 [S,S,3]."""
    blend = weight * pattern[..., None]
    return colors[0] * (1 - blend) + colors[1] * blend


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, blotchy random texture, as float32 [S,S] in [0,1]."""
    coarse = rng.uniform(0, 1, (6, 6)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)


def _illumination(rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """A random linear illumination ramp (gain in about [0.65, 1.35]) over a grid, [S,S,1]."""
    y, x = grid
    size = x.shape[0]
    direction = rng.uniform(0, 2 * np.pi)
    ramp = ((x - size / 2) * np.cos(direction) + (y - size / 2) * np.sin(direction)) / size
    return (1 + rng.uniform(0.2, 0.7) * ramp)[..., None].astype(np.float32)


def render_scene(
    rng: np.random.Generator, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene of occluding textured shapes and its dense ground truth.

    Args:
        rng: Generator that decides everything in the scene.
        image_size: Side of the square scene, in pixels.
        num_classes: Number of classes C (background + ``C - 1`` shape classes).

    Returns:
        The uint8 RGB image [S,S,3] and the uint8 class-index mask [S,S] (no void).

    Raises:
        ValueError: If ``image_size`` < 16 or ``num_classes`` is not in 2..``len(SHAPE_NAMES) + 1``.
    """
    _check_scene_args(image_size, num_classes)
    grid = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    scale = image_size / 96
    background = _class_colors(rng, 0, num_classes)
    image = _paint(background, _background(rng, image_size), rng.uniform(0.3, 0.8))
    mask = np.zeros((image_size, image_size), np.uint8)
    for _ in range(rng.integers(3, 7)):
        cls = int(rng.integers(1, num_classes))
        radius = image_size * rng.uniform(0.09, 0.26)
        polygons = _SHAPES[SHAPE_NAMES[cls - 1]](rng, radius)
        center = rng.uniform(0.1, 0.9, 2) * image_size
        region = _draw_shape(polygons, rng.uniform(0, 2 * np.pi), center, image_size)
        colors = _class_colors(rng, cls, num_classes)
        texture = _paint(colors, _texture(rng, grid, cls, scale), rng.uniform(0.6, 1.0))
        image[region] = texture[region]
        mask[region] = cls
    image = image * _illumination(rng, grid) + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def _check_scene_args(image_size: int, num_classes: int) -> None:
    """Raise a ValueError unless the scene size and class count are supported."""
    if image_size < 16:
        raise InputError(f"image_size must be at least 16 pixels, got {image_size}.")
    if not 2 <= num_classes <= len(SHAPE_NAMES) + 1:
        raise InputError(
            f"num_classes must be in 2..{len(SHAPE_NAMES) + 1} (background + shapes "
            f"{SHAPE_NAMES}), got {num_classes}."
        )


class SyntheticDataset(WeakLabelDataset):
    """One split of synthetic scenes, rendered on the fly from ``(seed, split, index)``.

    Args:
        split: Which split; "predict" renders the test scenes.
        length: Number of scenes.
        image_size: Side of each square scene, in pixels.
        num_classes: Number of classes C.
        **kwargs: ``mode``, ``transform``, ``weak_label``, ``seed`` (of the scenes too) and
            ``simulation``: see :class:`~agmm_lightning.data.base.WeakLabelDataset`.

    Raises:
        ValueError: If ``length`` is negative or the scene arguments are unsupported.
    """

    def __init__(
        self, split: Split, length: int, image_size: int, num_classes: int, **kwargs: Any
    ) -> None:
        if length < 0:
            raise InputError(f"length must be >= 0, got {length}.")
        _check_scene_args(image_size, num_classes)
        super().__init__(num_classes, **kwargs)
        self.split = split
        self.length = length
        self.image_size = image_size

    def __len__(self) -> int:
        """Return the number of scenes."""
        return self.length

    def image_names(self) -> list[str]:
        """The scenes' names, without rendering them."""
        return [self._name(index) for index in range(self.length)]

    def _name(self, index: int) -> str:
        prefix = "test" if self.split == "predict" else self.split
        return f"{prefix}_{index:05d}"

    def load(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        """Render scene ``index``.

        Args:
            index: Position in the split.

        Returns:
            Its name (``<split>_<index>``), RGB image and dense mask.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes.")
        code = _SPLIT_CODES[self.split]
        rng = np.random.default_rng([self.seed, code, index])
        image, mask = render_scene(rng, self.image_size, self.num_classes)
        return self._name(index), image, mask


class SyntheticDataModule(AGMMDataModule):
    """The embedded default dataset: seeded synthetic scenes with simulated weak labels.

    Args:
        num_train: Number of training scenes.
        num_val: Number of validation scenes.
        num_test: Number of test scenes (also used for prediction, see ``predict_split``).
        image_size: Side of each square scene, in pixels.
        num_classes: Number of classes: background + ``num_classes - 1`` shapes, at most
            ``len(SHAPE_NAMES) + 1``.
        weak_label: Form of the training label, or a mix ``form -> fraction`` (see
            :class:`~agmm_lightning.data.base.AGMMDataModule`).
        batch_size: Training (and evaluation) images per batch.
        crop_size: Side of the square training crop, in pixels.
        **kwargs: ``num_workers``, ``seed`` (of the scenes too), ``augment``, ``predict_split``,
            ``points_per_segment``, ``block_fraction``, ``box_core_fraction``, ``mean`` and
            ``std`` (``"auto"`` renders the training scenes once): see
            :class:`~agmm_lightning.data.base.AGMMDataModule`. The scenes are RGB:
            ``in_channels`` is 3.

    Raises:
        ValueError: If a count is negative, the scene arguments are unsupported or
            ``in_channels`` is not 3.
    """

    def __init__(
        self,
        num_train: int = 200,
        num_val: int = 50,
        num_test: int = 50,
        image_size: int = 96,
        num_classes: int = 6,
        weak_label: WeakLabelOption = "point",
        batch_size: int = 8,
        crop_size: int = 96,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            batch_size=batch_size, crop_size=crop_size, weak_label=weak_label, **kwargs
        )
        if self.in_channels != 3:
            raise InputError(
                f"SyntheticDataModule renders RGB scenes: in_channels must be 3, got "
                f"{self.in_channels}."
            )
        if min(num_train, num_val, num_test) < 0:
            raise InputError(
                "Scene counts must be >= 0, got "
                f"num_train={num_train}, num_val={num_val}, num_test={num_test}."
            )
        _check_scene_args(image_size, num_classes)
        self.lengths: dict[Split, int] = {
            "train": num_train,
            "val": num_val,
            "test": num_test,
            "predict": num_test,
        }
        self.image_size = image_size
        self._num_classes = num_classes

    @property
    def class_names(self) -> list[str]:
        """``background`` followed by the shape names in class order."""
        return ["background", *SHAPE_NAMES[: self._num_classes - 1]]

    @property
    def eval_batch_size(self) -> int:
        """All scenes share one size, so evaluation batches like training."""
        return self.batch_size

    def training_images(self) -> Iterator[np.ndarray]:
        """The training scenes' images, rendered, for ``mean``/``std`` ``"auto"``."""
        scenes = SyntheticDataset(
            "train",
            self.lengths["train"],
            self.image_size,
            self._num_classes,
            mode="predict",
            transform=eval_transform(),
            seed=self.seed,
        )
        for index in range(len(scenes)):
            yield scenes.load(index)[1]

    def build_dataset(self, split: Split) -> SyntheticDataset:
        """Build the synthetic dataset of one split.

        Args:
            split: "train", "val", "test" or "predict" (the ``predict_split`` scenes).

        Returns:
            The split's dataset.
        """
        scenes: Split = self.predict_split if split == "predict" else split
        return SyntheticDataset(
            scenes,
            self.lengths[scenes],
            self.image_size,
            self._num_classes,
            mode=self.mode(split),
            transform=self.transform(split),
            weak_label=self.weak_label,
            seed=self.seed,
            simulation=self.simulation,
        )
