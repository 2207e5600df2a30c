"""CAMModel: a multi-label classifier and its class activation maps, in pure torch (METHOD §5).

Stage 1 of image-level supervision. An encoder, global average pooling and a 1×1 classifier
predict the image tags; the classifier's weights applied at every position of the last feature
map are the class activation maps (CAMs). Averaged over scales and flips, min-max normalised per
class and masked by the tags, they are thresholded into pseudo labels: confident foreground,
background, and the uncertain band between as unlabelled C (the target-map convention of
:mod:`agmm_lightning.targets`). Training, metrics and writing the labels are the Lightning task's
(:class:`agmm_lightning.tasks.cam.CAMClassifier`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agmm_lightning.errors import InputError
from agmm_lightning.inference import infer_logits

__all__ = ["CAMModel", "cam_pseudo_labels", "check_cam_options", "normalize_cams"]

_EPS = 1e-5


def check_cam_options(
    num_classes: int,
    background_index: int,
    cam_scales: Sequence[float],
    foreground_threshold: float,
    background_threshold: float,
) -> None:
    """Raise an InputError naming the first CAM option out of range.

    Args:
        num_classes: Number of classes C, background included.
        background_index: The class the classifier does not predict.
        cam_scales: Image scales of the CAMs.
        foreground_threshold: Foreground above this normalised score.
        background_threshold: Background at or below this score.
    """
    if num_classes < 2:
        raise InputError(f"num_classes must be >= 2 (background included), got {num_classes}")
    if not 0 <= background_index < num_classes:
        raise InputError(
            f"background_index must be in 0..{num_classes - 1}, got {background_index}"
        )
    if not cam_scales or min(cam_scales) <= 0:
        raise InputError(f"cam_scales must be positive scales, got {cam_scales}")
    if not 0 <= background_threshold <= foreground_threshold <= 1:
        raise InputError(
            "Expected 0 <= background_threshold <= foreground_threshold <= 1, got "
            f"{background_threshold} and {foreground_threshold}"
        )


def normalize_cams(cams: Tensor, tags: Tensor) -> Tensor:
    """Min-max normalise each class activation map to [0, 1] and zero the untagged classes.

    Args:
        cams: ``[B, K, H, W]`` activation maps.
        tags: ``[B, K]`` multi-hot tags of the same K classes.

    Returns:
        ``[B, K, H, W]`` maps in [0, 1]; exactly 0 for classes absent from the tags and for
        constant maps.
    """
    flat = cams.flatten(2)
    low = flat.amin(-1)[..., None, None]
    high = flat.amax(-1)[..., None, None]
    normalized = (cams - low) / (high - low).clamp_min(_EPS)
    return normalized * (tags > 0)[..., None, None].to(cams.dtype)


def cam_pseudo_labels(
    cams: Tensor,
    classes: Tensor,
    *,
    background_index: int,
    unlabeled: int,
    foreground_threshold: float,
    background_threshold: float,
) -> Tensor:
    """Threshold normalised CAMs into a target map (METHOD §5).

    A pixel whose strongest map exceeds ``foreground_threshold`` takes that map's class; one whose
    strongest map is at most ``background_threshold`` is background; the band between is
    ``unlabeled``. Equal thresholds give a dense label map.

    Args:
        cams: ``[B, K, H, W]`` normalised maps (see :func:`normalize_cams`).
        classes: ``[K]`` long, the class index of each map.
        background_index: Class of background pixels.
        unlabeled: Value of the uncertain band (C in the target-map convention).
        foreground_threshold: Foreground above this score.
        background_threshold: Background at or below this score.

    Returns:
        ``[B, H, W]`` long target map.

    Raises:
        InputError: If ``background_threshold > foreground_threshold``.
    """
    if background_threshold > foreground_threshold:
        raise InputError(
            f"background_threshold={background_threshold} exceeds "
            f"foreground_threshold={foreground_threshold}"
        )
    score, strongest = cams.max(1)
    labels = torch.where(score > foreground_threshold, classes[strongest], unlabeled)
    return labels.masked_fill(score <= background_threshold, background_index)


class CAMModel(nn.Module):
    """Multi-label classifier of the foreground classes and its CAM pseudo labels (METHOD §5).

    The classifier predicts the C - 1 classes other than ``background_index``; its maps are in
    that order (:attr:`foreground_classes`).

    Args:
        encoder: An smp encoder (e.g. from :func:`agmm_lightning.encoders.build_encoder`):
            ``encoder(images)[-1]`` is the feature map the CAMs are read from.
        num_classes: Number of classes C, background included.
        background_index: The class the classifier does not predict.
        cam_scales: Image scales whose CAMs (resized to the image) are averaged.
        cam_flip: Also average the CAMs of the horizontally flipped images.
        foreground_threshold: Normalised CAM score above which a pixel takes the strongest class.
        background_threshold: Score at or below which a pixel is background.

    Attributes:
        encoder: The encoder.
        classifier: The bias-free 1×1 convolution from the encoder's last channels to the C - 1
            foreground classes.
        foreground_classes: ``[C - 1]`` long, the class index of each output (a buffer, so it
            follows the module's device; not saved, since it derives from the options).

    Raises:
        InputError: If an option is out of range (see :func:`check_cam_options`).
    """

    foreground_classes: Tensor

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        background_index: int = 0,
        cam_scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
        cam_flip: bool = True,
        foreground_threshold: float = 0.7,
        background_threshold: float = 0.25,
    ) -> None:
        super().__init__()
        check_cam_options(
            num_classes, background_index, cam_scales, foreground_threshold, background_threshold
        )
        self.num_classes = num_classes
        self.background_index = background_index
        self.cam_scales = tuple(cam_scales)
        self.cam_flip = cam_flip
        self.foreground_threshold = foreground_threshold
        self.background_threshold = background_threshold
        self.encoder = encoder
        # Every smp encoder lists the channels of its feature maps; nn.Module's typing does not.
        channels = int(encoder.out_channels[-1])  # type: ignore[index]
        self.classifier = nn.Conv2d(channels, num_classes - 1, kernel_size=1, bias=False)
        foreground = [c for c in range(num_classes) if c != background_index]
        self.register_buffer("foreground_classes", torch.tensor(foreground), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """Classification logits of the foreground classes.

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, C - 1]`` logits.
        """
        features = self.encoder(images)[-1]
        return self.classifier(features.mean((2, 3), keepdim=True)).flatten(1)

    def loss(self, images: Tensor, tags: Tensor) -> tuple[Tensor, Tensor]:
        """The multi-label BCE of the images against their foreground tags, and the logits.

        Args:
            images: ``[B, 3, H, W]`` normalised images.
            tags: ``[B, C - 1]`` float multi-hot foreground tags (see :meth:`foreground_tags`).

        Returns:
            The mean loss and the ``[B, C - 1]`` logits.
        """
        logits = self(images)
        return F.binary_cross_entropy_with_logits(logits, tags), logits

    def activation_maps(self, images: Tensor) -> Tensor:
        """ReLU class activation maps at the last feature map's resolution.

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, C - 1, h, w]`` maps.
        """
        return F.relu(self.classifier(self.encoder(images)[-1]))

    def class_activation_maps(self, images: Tensor, tags: Tensor) -> Tensor:
        """Multi-scale (+ flip) CAMs at image resolution, normalised and masked by the tags.

        Args:
            images: ``[B, 3, H, W]`` normalised images.
            tags: ``[B, C - 1]`` multi-hot foreground tags.

        Returns:
            ``[B, C - 1, H, W]`` maps in [0, 1], zero for untagged classes.
        """
        maps = infer_logits(
            self.activation_maps, images, scales=self.cam_scales, flip=self.cam_flip
        )
        return normalize_cams(maps, tags)

    def pseudo_labels(self, cams: Tensor, *, dense: bool = False) -> Tensor:
        """Target map of normalised CAMs: foreground, background and (unless dense) unlabelled C.

        Args:
            cams: ``[B, C - 1, H, W]`` maps from :meth:`class_activation_maps`.
            dense: Use ``background_threshold`` for the foreground too (no uncertain band).

        Returns:
            ``[B, H, W]`` long labels.
        """
        return cam_pseudo_labels(
            cams,
            self.foreground_classes,
            background_index=self.background_index,
            unlabeled=self.num_classes,
            foreground_threshold=(
                self.background_threshold if dense else self.foreground_threshold
            ),
            background_threshold=self.background_threshold,
        )

    def foreground_tags(self, image_classes: Tensor) -> Tensor:
        """The foreground part of ``[B, C]`` image classes.

        Args:
            image_classes: ``[B, C]`` multi-hot tags, background included.

        Returns:
            ``[B, C - 1]`` float tags in the classifier's class order.

        Raises:
            InputError: If the tags do not have C entries.
        """
        if image_classes.ndim != 2 or image_classes.shape[1] != self.num_classes:
            raise InputError(
                f"Expected image_classes of shape [B, {self.num_classes}] (num_classes, "
                f"background included), got {list(image_classes.shape)}."
            )
        return (image_classes[:, self.foreground_classes] > 0).float()
