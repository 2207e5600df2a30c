"""Augmentation pipelines, worker seeding and sample assembly (albumentations 2.0.8).

Images enter as [H,W,C] uint8 (8-bit files) or float32 in 0..1 (16-bit files; see
:mod:`agmm_lightning.data.pixels`) and leave normalised per channel. Three-channel images get
colour jitter; other channel counts brightness and contrast jitter only (saturation and hue need
colours).

Weak labels are carried through geometry in the form they were given: rasters (full, scribble,
block, image) as masks with nearest interpolation, clicks as keypoints and boxes as bounding
boxes. Clicks and boxes are rasterised *after* the geometric transform, so a 3-pixel click
stays 3 pixels wide at any scale instead of vanishing when the image shrinks. Every padding
transform fills masks with 255, so crop padding is void in the target and in the dense mask.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, cast

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from agmm_lightning.data.pixels import IMAGENET_MEAN, IMAGENET_STD
from agmm_lightning.targets import VOID
from agmm_lightning.weak_labels import WeakLabel, rasterize_boxes, rasterize_points

_POINT_LABELS = "point_classes"
_BOX_LABELS = "box_classes"
_DENSE_MASK = "dense_mask"

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IntensityJitter",
    "PixelNormalize",
    "build_eval_sample",
    "build_train_sample",
    "eval_transform",
    "reseed_transform",
    "sample_seed",
    "seed_worker",
    "train_transform",
]


def train_transform(
    crop_size: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    *,
    flip_probability: float = 0.5,
    color_jitter: float = 0.2,
    seed: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Build the training pipeline: scale jitter, pad, random crop, flip, colour jitter, normalise.

    The pipeline takes ``image`` ([H,W,C] uint8, or float32 in 0..1), ``mask`` (the weak-label
    raster), optionally ``dense_mask`` (dense ground truth), ``keypoints`` ("xy") with
    ``point_classes`` and ``bboxes`` ("pascal_voc") with ``box_classes``. Use
    :func:`build_train_sample` to call it.

    Args:
        crop_size: Side of the square training crop, in pixels.
        scale_range: Inclusive range ``(low, high)`` of the uniform random rescale factor.
        flip_probability: Probability of a horizontal flip.
        color_jitter: Strength of brightness, contrast and saturation jitter (hue gets a tenth;
            images of other than three channels get brightness and contrast jitter only).
        seed: Seed of the pipeline's random generators; None draws fresh entropy.
        mean: Per-channel mean of the 0..1 pixels, subtracted at normalisation (C values).
        std: Per-channel standard deviation, divided by at normalisation.

    Returns:
        The albumentations pipeline, with one shared random generator (see
        :func:`reseed_transform`).

    Raises:
        ValueError: If ``crop_size`` is not positive or ``scale_range`` is not ``0 < low <= high``.
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}.")
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}.")
    transform = A.Compose(
        [
            A.RandomScale(
                scale_limit=(low - 1.0, high - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            ),
            A.PadIfNeeded(
                min_height=crop_size,
                min_width=crop_size,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=VOID,
            ),
            A.RandomCrop(height=crop_size, width=crop_size),
            A.HorizontalFlip(p=flip_probability),
            _intensity_jitter(color_jitter, len(mean)),
            PixelNormalize(mean, std),
        ],
        keypoint_params=A.KeypointParams(
            format="xy", label_fields=[_POINT_LABELS], remove_invisible=True
        ),
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=[_BOX_LABELS]),
        additional_targets={_DENSE_MASK: "mask"},
        mask_interpolation=cv2.INTER_NEAREST,
    )
    reseed_transform(transform, seed)
    return transform


def eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> A.Compose:
    """Build the evaluation pipeline: normalisation only, at full resolution.

    Args:
        mean: Per-channel mean of the 0..1 pixels.
        std: Per-channel standard deviation.

    Returns:
        The albumentations pipeline; it takes ``image`` and optionally ``mask``.
    """
    return A.Compose([PixelNormalize(mean, std)])


def _intensity_jitter(strength: float, channels: int) -> A.ImageOnlyTransform:
    """Colour jitter for RGB; brightness and contrast jitter for other channel counts."""
    if channels == 3:
        return A.ColorJitter(
            brightness=strength,
            contrast=strength,
            saturation=strength,
            hue=strength / 10,
            p=0.8,
        )
    return IntensityJitter(strength, p=0.8)


class IntensityJitter(A.ImageOnlyTransform):
    """Brightness and contrast jitter of an image of any channel count, uint8 or float 0..1.

    Brightness multiplies every pixel by a factor in ``1 ± strength``; contrast scales the
    pixels' distance to the image's mean by another, in random order (the rules of
    ``ColorJitter``, whose saturation and hue need colours): the ratios between intensities,
    which tell the classes of a greyscale or multi-band image apart, survive.

    Args:
        strength: Largest relative change of brightness and of contrast.
        p: Probability of jittering an image.
    """

    def __init__(self, strength: float, p: float = 0.8) -> None:
        super().__init__(p=p)
        self.strength = strength

    def get_params(self) -> dict[str, Any]:
        """Draw the brightness and contrast factors and their order."""
        low, high = 1 - self.strength, 1 + self.strength
        return {
            "brightness": self.py_random.uniform(low, high),
            "contrast": self.py_random.uniform(low, high),
            "contrast_first": self.py_random.random() < 0.5,
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float = 1.0,
        contrast: float = 1.0,
        contrast_first: bool = False,
        **params: Any,
    ) -> np.ndarray:
        """Jitter one image, clipped to its range (0..255 for uint8, 0..1 for floats)."""
        top = 255.0 if img.dtype == np.uint8 else 1.0
        pixels = img.astype(np.float32)
        for step in ("contrast", "brightness") if contrast_first else ("brightness", "contrast"):
            if step == "brightness":
                pixels = np.clip(pixels * brightness, 0, top)
            else:
                mean = pixels.mean()
                pixels = np.clip(mean + contrast * (pixels - mean), 0, top)
        return np.round(pixels).astype(np.uint8) if img.dtype == np.uint8 else pixels


class PixelNormalize(A.Normalize):
    """``(pixel - mean) / std`` per channel, for uint8 (0..255) and float (0..1) images alike.

    uint8 images take albumentations' own path (``max_pixel_value=255``), float images are
    already 0..1 (see :mod:`agmm_lightning.data.pixels`).

    Args:
        mean: Per-channel mean of the 0..1 pixels.
        std: Per-channel standard deviation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
        self._unit_mean = np.array(mean, dtype=np.float32)
        self._unit_denominator = np.reciprocal(np.array(std, dtype=np.float32))

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        """Normalise one image (the uint8 path is albumentations' ``Normalize``)."""
        if img.dtype == np.uint8:
            return cast(np.ndarray, super().apply(img, **params))
        return (img.astype(np.float32) - self._unit_mean) * self._unit_denominator


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one training sample of one epoch, from SeedSequence's hash."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def reseed_transform(transform: A.BaseCompose, seed: int | None) -> None:
    """Give every transform of a pipeline one shared pair of generators seeded from ``seed``.

    ``Compose(seed=...)`` and ``Compose.set_random_seed`` in albumentations 2.0.8 seed every
    transform with the *same* seed but separate generators, so their draws are correlated (two
    flips with p=0.5 always fire together). ``set_random_state`` with one shared pair avoids that.

    Args:
        transform: The pipeline to reseed (changed in place).
        seed: Seed of the generators; None draws fresh entropy.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """Reseed numpy, ``random`` and the dataset's albumentations pipelines in a DataLoader worker.

    Use it as ``worker_init_fn=functools.partial(seed_worker, rank=trainer.global_rank)``. Workers
    inherit copies of the parent's generators, so without it every worker (and every epoch of
    non-persistent workers) replays the same augmentations. The seed is ``torch.initial_seed()``,
    which the DataLoader sets to its base seed (drawn from the loader's generator each time its
    workers start) plus ``worker_id``, mixed with the distributed rank: different per worker and
    rank, and reproducible under a fixed loader generator. The rank is given by the parent: a
    worker started by spawn or forkserver (macOS, and Linux from Python 3.14) has no process
    group to ask. Non-persistent workers restart (and reseed) every epoch; persistent ones keep
    drawing from their generators, so epochs differ either way.

    Args:
        worker_id: Index of the worker (already part of ``torch.initial_seed()``).
        rank: Distributed rank of the process that owns the DataLoader.
    """
    del worker_id
    global_seed, pipeline_seed = (
        int(seed) for seed in np.random.SeedSequence([torch.initial_seed(), rank]).generate_state(2)
    )
    np.random.seed(global_seed)
    random.seed(global_seed)
    info = get_worker_info()
    if info is None:
        return
    for transform in _pipelines(info.dataset):
        reseed_transform(transform, pipeline_seed)


def _pipelines(dataset: Dataset | Any) -> Iterator[A.BaseCompose]:
    """Yield the albumentations pipelines of a dataset, looking inside Subset/ConcatDataset."""
    transform = getattr(dataset, "transform", None)
    if isinstance(transform, A.BaseCompose):
        yield transform
    if hasattr(dataset, "dataset"):
        yield from _pipelines(dataset.dataset)
    for child in getattr(dataset, "datasets", ()):
        yield from _pipelines(child)


def build_train_sample(
    transform: A.BaseCompose,
    image: np.ndarray,
    num_classes: int,
    *,
    name: str,
    label: WeakLabel,
    mask: np.ndarray | None = None,
    point_radius: int = 1,
    box_core_fraction: float = 0.0,
    form: str | None = None,
) -> dict[str, Any]:
    """Augment one training image with its weak label and assemble the sample dict.

    The image classes are those of the label on the whole image, before any crop (METHOD §1;
    :meth:`~agmm_lightning.weak_labels.WeakLabel.classes`).

    Args:
        transform: A pipeline from :func:`train_transform`.
        image: [H,W,C] image, uint8 or float32 in 0..1.
        num_classes: Number of classes C (the unlabelled value).
        name: Identifier of the image.
        label: Its weak label: a raster (0..C-1 labelled, C unlabelled, 255 void), clicks or boxes.
        mask: Dense ground truth [H,W] (255 void), carried for pseudo-label quality only.
        point_radius: Radius of the disc each click is rasterised to.
        box_core_fraction: Central fraction of each box labelled with its class.
        form: The label's form, given in a dataset of mixed forms: the sample then carries it
            as ``form`` and always has ``allowed``, so that samples of any forms batch together.
            For a label other than boxes, ``allowed`` is the image classes at every pixel (what
            the losses assume without the map, METHOD §1); void pixels carry no loss either way.

    Returns:
        ``image`` float32 [C,h,w], ``target`` int64 [h,w], ``image_classes`` float32 [C],
        ``name``; ``mask`` int64 [h,w] when ``mask`` is given; ``allowed`` bool [C,h,w] for boxes
        (and for every label when ``form`` is given); ``form`` when given.

    Raises:
        ValueError: If the shapes do not match.
    """
    _check_inputs(image, num_classes, target=label.target, mask=mask)
    shape = image.shape[:2]
    points = _rows(label.points, 3, "points")
    boxes = _rows(label.boxes, 5, "boxes")
    target = label.target
    carrier = np.full(shape, num_classes, np.uint8) if target is None else target.astype(np.uint8)
    inputs: dict[str, Any] = {
        "image": image,
        "mask": carrier,
        "keypoints": points[:, :2],
        _POINT_LABELS: points[:, 2],
        "bboxes": boxes[:, :4],
        _BOX_LABELS: boxes[:, 4],
    }
    if mask is not None:
        inputs[_DENSE_MASK] = mask.astype(np.uint8)
    out = transform(**inputs)
    image_classes = torch.as_tensor(label.classes(shape, num_classes), dtype=torch.float32)
    sample = {"image": _image_tensor(out["image"]), "image_classes": image_classes, "name": name}
    void = out["mask"] == VOID
    if label.points is not None:
        kept = np.column_stack([out["keypoints"], out[_POINT_LABELS]]).astype(np.float32)
        target_out = rasterize_points(kept, void.shape, num_classes, radius=point_radius)
    elif label.boxes is not None:
        kept = np.column_stack([out["bboxes"], out[_BOX_LABELS]]).astype(np.float32)
        target_out, allowed = rasterize_boxes(
            kept.reshape(-1, 5), void.shape, num_classes, core_fraction=box_core_fraction
        )
        allowed[:, void] = False
        sample["allowed"] = torch.from_numpy(np.ascontiguousarray(allowed, dtype=bool))
    else:
        target_out = out["mask"]
    if form is not None:
        sample["form"] = form
        if "allowed" not in sample:
            classes = image_classes > 0
            sample["allowed"] = classes[:, None, None].expand(-1, *void.shape).clone()
    target_out = np.where(void, VOID, target_out)
    sample["target"] = torch.from_numpy(target_out.astype(np.int64))
    if mask is not None:
        sample["mask"] = torch.from_numpy(out[_DENSE_MASK].astype(np.int64))
    return sample


def build_eval_sample(
    transform: A.BaseCompose,
    image: np.ndarray,
    *,
    name: str,
    mask: np.ndarray | None = None,
    image_classes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Normalise one evaluation or prediction image and assemble the sample dict.

    Args:
        transform: A pipeline from :func:`eval_transform` (no geometry).
        image: [H,W,C] image, uint8 or float32 in 0..1.
        name: Identifier of the image.
        mask: Dense ground truth [H,W] (255 void); omitted for prediction.
        image_classes: The image's tags, float [C]; given when predicting on tagged images.

    Returns:
        ``image`` float32 [C,H,W] and ``name``; ``mask`` int64 [H,W] when ``mask`` is given;
        ``image_classes`` float32 [C] when ``image_classes`` is given.

    Raises:
        ValueError: If the image or mask has the wrong shape.
    """
    _check_inputs(image, None, mask=mask)
    out = transform(image=image) if mask is None else transform(image=image, mask=mask)
    sample: dict[str, Any] = {"image": _image_tensor(out["image"]), "name": name}
    if mask is not None:
        sample["mask"] = torch.from_numpy(out["mask"].astype(np.int64))
    if image_classes is not None:
        sample["image_classes"] = torch.as_tensor(image_classes, dtype=torch.float32)
    return sample


def _check_inputs(
    image: np.ndarray,
    num_classes: int | None,
    *,
    target: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> None:
    """Raise a ValueError unless the image is [H,W,C] uint8 or float32 in 0..1, rasters [H,W]."""
    floats = image.dtype == np.float32
    out_of_range = floats and image.size > 0 and not 0 <= image.min() <= image.max() <= 1
    if image.ndim != 3 or not (floats or image.dtype == np.uint8) or out_of_range:
        values = f" of values {image.min():g}..{image.max():g}" if out_of_range else ""
        raise ValueError(
            "Expected an image of shape [H, W, C], uint8 (0..255) or float32 in 0..1, got "
            f"{image.dtype} {image.shape}{values}."
        )
    if num_classes is not None and not 1 <= num_classes < VOID:
        raise ValueError(f"num_classes must be in 1..{VOID - 1}, got {num_classes}.")
    for label, raster in (("target", target), ("mask", mask)):
        if raster is not None and raster.shape != image.shape[:2]:
            raise ValueError(
                f"Expected {label} of shape {image.shape[:2]} (the image's), got {raster.shape}."
            )


def _rows(array: np.ndarray | None, width: int, label: str) -> np.ndarray:
    """Return ``array`` as float32 [N, width] (empty when None), or raise a ValueError."""
    if array is None:
        return np.zeros((0, width), np.float32)
    array = np.asarray(array, dtype=np.float32)
    if array.size == 0:
        return array.reshape(0, width)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"Expected {label} of shape [N, {width}], got {array.shape}.")
    return array


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    """Convert a normalised float image [H,W,C] to a float32 tensor [C,H,W]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
