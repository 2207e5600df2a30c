"""Stage 1 of image-level supervision (METHOD §5): a multi-label classifier and its CAM labels.

:class:`CAMClassifier` trains an encoder, global average pooling and a 1×1 classifier with a
multi-label BCE on the image tags. Its ``predict`` turns every image into class activation maps
(ReLU, multi-scale + flip, min-max normalised per class, masked by the tags), thresholds them into
pseudo labels (confident foreground, background, or the uncertain band as unlabelled C), which
the prediction writer saves as ``<output_dir>/<name>.png``: the target-map PNGs that the
datamodules read in stage 2 with ``weak_label="image"`` and ``cam_dir=<output_dir>``. Predicting
on the training images with their tags needs the datamodule's ``predict_split="train"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassJaccardIndex,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from agmm_lightning.agmm.model import check_encoder
from agmm_lightning.callbacks import PredictionWriter, print_line
from agmm_lightning.errors import InputError
from agmm_lightning.inference import infer_logits
from agmm_lightning.targets import VOID, present_classes
from agmm_lightning.tasks.base import BaseTask, check_optimizer_options
from agmm_lightning.weights import load_encoder_weights, split_weights

__all__ = ["CAMClassifier", "build_encoder", "cam_pseudo_labels", "normalize_cams"]

_EPS = 1e-5


def build_encoder(name: str, weights: str | None, output_stride: int) -> tuple[nn.Module, int]:
    """Build an smp encoder by name; ``weights`` may be a local weights file.

    Args:
        name: An smp encoder name or ``tu-<timm model>``.
        weights: None, ``"imagenet"`` or a local file read by
            :func:`agmm_lightning.weights.load_encoder_weights` (as for the segmenter).
        output_stride: 8, 16 or 32 (the last stages are dilated below 32).

    Returns:
        The encoder (``encoder(images)[-1]`` is its last feature map) and the channels of that
        map.

    Raises:
        InputError: For an unknown encoder or weights name, or a file that does not fit.
    """
    check_encoder(name)
    downloaded, local = split_weights(weights)
    encoder = smp.encoders.get_encoder(name, weights=downloaded, output_stride=output_stride)
    if local is not None:
        load_encoder_weights(encoder, local)
    return encoder, int(encoder.out_channels[-1])


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
        ValueError: If ``background_threshold > foreground_threshold``.
    """
    if background_threshold > foreground_threshold:
        raise InputError(
            f"background_threshold={background_threshold} exceeds "
            f"foreground_threshold={foreground_threshold}"
        )
    score, strongest = cams.max(1)
    labels = torch.where(score > foreground_threshold, classes[strongest], unlabeled)
    return labels.masked_fill(score <= background_threshold, background_index)


def _classification_metrics(num_labels: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "map": MultilabelAveragePrecision(num_labels, average="macro"),
            "f1": MultilabelF1Score(num_labels, average="macro"),
        },
        prefix=prefix,
    )


def _pseudo_label_metrics(num_classes: int, prefix: str) -> MetricCollection:
    # Updated one by one (their inputs differ), so no compute groups.
    return MetricCollection(
        {
            "cam_miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=VOID),
            "pseudo_miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=VOID),
            "pseudo_coverage": MeanMetric(),
        },
        prefix=prefix,
        compute_groups=False,
    )


class CAMClassifier(BaseTask):
    """Multi-label classifier whose class activation maps become pseudo labels (METHOD §5).

    The classifier predicts the C - 1 classes other than ``background_index`` from the batch's
    ``image_classes``. Logged: ``train_loss``, ``train_map``/``train_f1`` (macro mAP and F1) and,
    at validation (tags taken from the dense masks), ``val_loss``, ``val_map``, ``val_f1`` and
    the quality of the CAM labels: ``val_cam_miou`` (dense: background at or below
    ``background_threshold``, else the strongest class), ``val_pseudo_miou`` (the thresholded
    pseudo labels, uncertain band excluded) and ``val_pseudo_coverage`` (their labelled fraction).
    ``predict`` writes ``<output_dir>/<name>.png`` (class-index palette PNGs; unlabelled = C, as
    the datamodules' ``unlabeled_value`` detection expects) and, when the batches carry dense
    masks, prints the same three measures and stores them in :attr:`pseudo_label_quality`.

    Args:
        num_classes: Number of classes C, background included (the datamodule's).
        encoder: smp encoder name, or ``tu-<timm model>``.
        encoder_weights: None, ``"imagenet"`` or a local weights file of the encoder.
        output_stride: Stride of the last feature map (16 dilates the last stage, as usual for
            CAMs).
        background_index: The class the classifier does not predict.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``.
        lr: Learning rate of the encoder.
        head_lr_multiplier: The new classifier learns this many times faster than the encoder.
        weight_decay: Weight decay.
        poly_power: Exponent of the per-step poly schedule; 0 keeps the rate constant.
        cam_scales: Image scales whose CAMs (resized to the image) are averaged.
        cam_flip: Also average the CAMs of the horizontally flipped images.
        foreground_threshold: Normalised CAM score above which a pixel takes the strongest class.
        background_threshold: Score at or below which a pixel is background.
        output_dir: Folder of the pseudo-label PNGs; None uses ``<run directory>/cam_labels``
            (:func:`agmm_lightning.callbacks.run_directory`).

    Attributes:
        pseudo_label_quality: ``cam_miou``, ``pseudo_miou`` and ``pseudo_coverage`` of the last
            ``predict`` (empty when its batches had no dense masks).

    Raises:
        ValueError: If an argument is out of range or the encoder is unknown.
    """

    foreground_classes: Tensor
    prediction_subfolder = "cam_labels"

    def __init__(
        self,
        num_classes: int,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: Literal[8, 16, 32] = 16,
        background_index: int = 0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        head_lr_multiplier: float = 10.0,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0),
        cam_flip: bool = True,
        foreground_threshold: float = 0.7,
        background_threshold: float = 0.25,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(
            num_classes, background_index, cam_scales, foreground_threshold, background_threshold
        )
        check_optimizer_options(
            optimizer,
            lr=lr,
            head_lr_multiplier=head_lr_multiplier,
            weight_decay=weight_decay,
            poly_power=poly_power,
        )
        self.save_hyperparameters()
        self.encoder, channels = build_encoder(encoder, encoder_weights, output_stride)
        self.classifier = nn.Conv2d(channels, num_classes - 1, kernel_size=1, bias=False)
        foreground = [c for c in range(num_classes) if c != background_index]
        self.register_buffer("foreground_classes", torch.tensor(foreground), persistent=False)
        self.train_metrics = _classification_metrics(num_classes - 1, "train_")
        self.val_metrics = _classification_metrics(num_classes - 1, "val_")
        self.val_label_metrics = _pseudo_label_metrics(num_classes, "val_")
        self.predict_label_metrics = _pseudo_label_metrics(num_classes, "")
        self.pseudo_label_quality: dict[str, float] = {}

    # ------------------------------------------------------------------------- forward
    def forward(self, images: Tensor) -> Tensor:
        """Classification logits of the foreground classes.

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, C - 1]`` logits.
        """
        features = self.encoder(images)[-1]
        return self.classifier(features.mean((2, 3), keepdim=True)).flatten(1)

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
        hp = self.hparams
        maps = infer_logits(
            self.activation_maps, images, scales=hp["cam_scales"], flip=hp["cam_flip"]
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
        hp = self.hparams
        return cam_pseudo_labels(
            cams,
            self.foreground_classes,
            background_index=hp["background_index"],
            unlabeled=hp["num_classes"],
            foreground_threshold=hp["background_threshold" if dense else "foreground_threshold"],
            background_threshold=hp["background_threshold"],
        )

    def foreground_tags(self, image_classes: Tensor) -> Tensor:
        """The foreground part of ``[B, C]`` image classes.

        Args:
            image_classes: ``[B, C]`` multi-hot tags, background included.

        Returns:
            ``[B, C - 1]`` float tags in the classifier's class order.

        Raises:
            ValueError: If the tags do not have C entries.
        """
        num_classes = self.hparams["num_classes"]
        if image_classes.ndim != 2 or image_classes.shape[1] != num_classes:
            raise InputError(
                f"Expected image_classes of shape [B, {num_classes}] (num_classes, background "
                f"included), got {list(image_classes.shape)}."
            )
        return (image_classes[:, self.foreground_classes] > 0).float()

    # ------------------------------------------------------------------------ training
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The encoder at ``lr``, the new classifier ``head_lr_multiplier`` times faster."""
        hp = self.hparams
        return [
            {"params": list(self.encoder.parameters()), "lr": hp["lr"]},
            {
                "params": list(self.classifier.parameters()),
                "lr": hp["lr"] * hp["head_lr_multiplier"],
            },
        ]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Multi-label BCE on the batch's ``image_classes``."""
        tags = self.foreground_tags(batch["image_classes"])
        logits = self(batch["image"])
        loss = F.binary_cross_entropy_with_logits(logits, tags)
        self.log("train_loss", loss, prog_bar=True, batch_size=tags.shape[0])
        self.train_metrics.update(logits.detach().sigmoid(), tags.long())
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the epoch's ``train_map`` and ``train_f1``."""
        _log_and_reset(self, self.train_metrics)

    # ---------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Classification and CAM-label quality, with the tags of the dense masks."""
        masks = batch["mask"]
        tags = self.foreground_tags(present_classes(masks, self.hparams["num_classes"]))
        logits = self(batch["image"])
        loss = F.binary_cross_entropy_with_logits(logits, tags)
        self.log("val_loss", loss, batch_size=tags.shape[0])
        self.val_metrics.update(logits.sigmoid(), tags.long())
        self._update_label_metrics(batch["image"], tags, masks, self.val_label_metrics)

    def on_validation_epoch_end(self) -> None:
        """Log ``val_map``, ``val_f1``, ``val_cam_miou``, ``val_pseudo_miou``, coverage."""
        _log_and_reset(self, self.val_metrics)
        _log_and_reset(self, self.val_label_metrics)

    def _update_label_metrics(
        self, images: Tensor, tags: Tensor, masks: Tensor, metrics: MetricCollection
    ) -> Tensor:
        """Accumulate the CAM-label measures of a batch and return its pseudo labels."""
        cams = self.class_activation_maps(images, tags)
        labels = self.pseudo_labels(cams)
        metrics["cam_miou"].update(self.pseudo_labels(cams, dense=True), masks)
        labelled = labels < self.hparams["num_classes"]
        metrics["pseudo_miou"].update(labels, masks.masked_fill(~labelled, VOID))
        metrics["pseudo_coverage"].update(labelled[masks != VOID].float())
        return labels

    # ---------------------------------------------------------------------- prediction
    def configure_callbacks(self) -> list[Callback]:
        """The writer of the pseudo-label PNGs."""
        return [PredictionWriter()]

    def prediction_folder(self, trainer: Trainer) -> Path:
        """``output_dir``, or ``cam_labels`` in the run directory."""
        output_dir = self.hparams["output_dir"]
        return Path(output_dir) if output_dir else super().prediction_folder(trainer)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The CAM pseudo labels of a batch (written by the prediction writer).

        Returns:
            The images' names and their uint8 target maps (unlabelled = C).

        Raises:
            ValueError: If the batch has no ``image_classes`` (the images' tags).
        """
        if "image_classes" not in batch:
            raise InputError(
                "CAMClassifier.predict needs each image's tags: use the datamodule's "
                "predict_split='train' with weak_label='image'."
            )
        tags = self.foreground_tags(batch["image_classes"])
        if "mask" in batch:
            labels = self._update_label_metrics(
                batch["image"], tags, batch["mask"], self.predict_label_metrics
            )
        else:
            labels = self.pseudo_labels(self.class_activation_maps(batch["image"], tags))
        return {"name": batch["name"], "prediction": labels.to(torch.uint8)}

    def on_predict_epoch_end(self) -> None:
        """Print (and send to the loggers) the pseudo-label quality when masks were there."""
        if not _updated(self.predict_label_metrics):
            return
        values = self.predict_label_metrics.compute()
        self.predict_label_metrics.reset()
        self.pseudo_label_quality = {name: float(value) for name, value in values.items()}
        summary = ", ".join(f"{k} {v:.4f}" for k, v in self.pseudo_label_quality.items())
        print_line(f"CAM pseudo labels against the dense masks: {summary}")
        for logger in self.trainer.loggers:
            logger.log_metrics({f"predict_{k}": v for k, v in self.pseudo_label_quality.items()})


def _check_arguments(
    num_classes: int,
    background_index: int,
    cam_scales: tuple[float, ...],
    foreground_threshold: float,
    background_threshold: float,
) -> None:
    """Raise a ValueError for out-of-range arguments of :class:`CAMClassifier`."""
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


def _updated(metrics: MetricCollection) -> bool:
    return any(metric.update_count for metric in metrics.values(copy_state=False))


def _log_and_reset(module: LightningModule, metrics: MetricCollection) -> None:
    if _updated(metrics):
        module.log_dict(metrics.compute())
    metrics.reset()
