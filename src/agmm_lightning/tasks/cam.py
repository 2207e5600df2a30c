"""Stage 1 of image-level supervision (METHOD §5): the Lightning task around :class:`CAMModel`.

The algorithm (encoder, global average pooling and a 1×1 classifier, multi-scale + flip CAMs,
their normalisation and thresholds) is :class:`agmm_lightning.cam.CAMModel`, pure torch.
:class:`CAMClassifier` wires it: it trains the classifier with a multi-label BCE on the image tags,
measures its classification and CAM labels, and at ``predict`` turns every image into pseudo
labels (confident foreground, background, or the uncertain band as unlabelled C), which the
prediction writer saves as ``<output_dir>/<name>.png``: the target-map PNGs that the datamodules
read in stage 2 with ``weak_label="image"`` and ``cam_dir=<output_dir>``. Predicting on the
training images with their tags needs the datamodule's ``predict_split="train"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassJaccardIndex,
    MultilabelAveragePrecision,
    MultilabelF1Score,
)

from agmm_lightning.callbacks import print_line
from agmm_lightning.cam import CAMModel, check_cam_options
from agmm_lightning.data.pixels import check_normalization
from agmm_lightning.encoders import build_encoder
from agmm_lightning.errors import InputError, check_non_negative
from agmm_lightning.targets import VOID, present_classes
from agmm_lightning.tasks.base import BaseTask, OptimizerOptions

__all__ = ["CAMClassifier"]

_OPTIMIZER = OptimizerOptions()

# State-dict keys of checkpoints saved before the CAM model moved out of the task.
_KEYS_BEFORE_THE_MODEL = ("encoder.", "classifier.")


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
        in_channels: Channels of the input images (the CLI takes it from the datamodule).
        mean: Per-channel mean of the 0..1 pixels the encoder takes (the datamodule's; None:
            ImageNet's for three channels, else the datamodule's at ``fit``).
        std: Per-channel standard deviation, likewise.

    Attributes:
        model: The :class:`agmm_lightning.cam.CAMModel` (encoder and classifier) it trains.
        pseudo_label_quality: ``cam_miou``, ``pseudo_miou`` and ``pseudo_coverage`` of the last
            ``predict`` (empty when its batches had no dense masks).

    Raises:
        ValueError: If an argument is out of range or the encoder is unknown.
    """

    prediction_subfolder = "cam_labels"

    def __init__(
        self,
        num_classes: int,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        output_stride: Literal[8, 16, 32] = 16,
        background_index: int = 0,
        optimizer: Literal["sgd", "adamw"] = _OPTIMIZER.optimizer,
        lr: float = _OPTIMIZER.lr,
        head_lr_multiplier: float = 10.0,
        weight_decay: float = _OPTIMIZER.weight_decay,
        poly_power: float = _OPTIMIZER.poly_power,
        cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0),
        cam_flip: bool = True,
        foreground_threshold: float = 0.7,
        background_threshold: float = 0.25,
        output_dir: str | None = None,
        in_channels: int = 3,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        # Every option is checked before the encoder is built (and its weights downloaded).
        super().__init__(OptimizerOptions(optimizer, lr, weight_decay, poly_power))
        check_cam_options(
            num_classes, background_index, cam_scales, foreground_threshold, background_threshold
        )
        check_non_negative(head_lr_multiplier=head_lr_multiplier)
        check_normalization(mean, std, in_channels)
        self.save_hyperparameters()
        self.model = CAMModel(
            build_encoder(encoder, encoder_weights, output_stride, in_channels),
            num_classes,
            background_index=background_index,
            cam_scales=cam_scales,
            cam_flip=cam_flip,
            foreground_threshold=foreground_threshold,
            background_threshold=background_threshold,
        )
        self.train_metrics = _classification_metrics(num_classes - 1, "train_")
        self.val_metrics = _classification_metrics(num_classes - 1, "val_")
        self.val_label_metrics = _pseudo_label_metrics(num_classes, "val_")
        self.predict_label_metrics = _pseudo_label_metrics(num_classes, "")
        self.pseudo_label_quality: dict[str, float] = {}

    # ------------------------------------------------------------ the model's interface
    def forward(self, images: Tensor) -> Tensor:
        """Classification logits of the foreground classes (:meth:`CAMModel.forward`).

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, C - 1]`` logits.
        """
        return self.model(images)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read checkpoints saved before the model moved out of the task, under its old keys."""
        state = checkpoint.get("state_dict", {})
        for key in [key for key in state if key.startswith(_KEYS_BEFORE_THE_MODEL)]:
            state[f"model.{key}"] = state.pop(key)

    # ------------------------------------------------------------------------ training
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The encoder at ``lr``, the new classifier ``head_lr_multiplier`` times faster."""
        lr = self.optimization.lr
        return [
            {"params": list(self.model.encoder.parameters()), "lr": lr},
            {
                "params": list(self.model.classifier.parameters()),
                "lr": lr * self.hparams["head_lr_multiplier"],
            },
        ]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Multi-label BCE on the batch's ``image_classes``."""
        tags = self.model.foreground_tags(batch["image_classes"])
        loss, logits = self.model.loss(batch["image"], tags)
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
        tags = self.model.foreground_tags(present_classes(masks, self.hparams["num_classes"]))
        loss, logits = self.model.loss(batch["image"], tags)
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
        cams = self.model.class_activation_maps(images, tags)
        labels = self.model.pseudo_labels(cams)
        metrics["cam_miou"].update(self.model.pseudo_labels(cams, dense=True), masks)
        labelled = labels < self.hparams["num_classes"]
        metrics["pseudo_miou"].update(labels, masks.masked_fill(~labelled, VOID))
        metrics["pseudo_coverage"].update(labelled[masks != VOID].float())
        return labels

    # ---------------------------------------------------------------------- prediction
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
        model = self.model
        tags = model.foreground_tags(batch["image_classes"])
        if "mask" in batch:
            labels = self._update_label_metrics(
                batch["image"], tags, batch["mask"], self.predict_label_metrics
            )
        else:
            labels = model.pseudo_labels(model.class_activation_maps(batch["image"], tags))
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


def _updated(metrics: MetricCollection) -> bool:
    return any(metric.update_count for metric in metrics.values(copy_state=False))


def _log_and_reset(module: LightningModule, metrics: MetricCollection) -> None:
    if _updated(metrics):
        module.log_dict(metrics.compute())
    metrics.reset()
