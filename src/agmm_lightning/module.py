"""AGMMSegmenter: an smp encoder-decoder trained from weak labels with AGMM (METHOD §2-3)."""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex

from agmm_lightning.inference import infer_logits
from agmm_lightning.losses import (
    VOID,
    absent_class_loss,
    bilinear_taps,
    check_target,
    cvpr_agmm_losses,
    maximization_loss,
    partial_cross_entropy,
    pseudo_label_loss,
)
from agmm_lightning.mixtures import ClassMixtures
from agmm_lightning.precision import float32_math
from agmm_lightning.weights import load_encoder_weights

Method = Literal["agmm", "cvpr", "baseline"]

__all__ = ["AGMMSegmenter"]


def _architectures() -> dict[str, type[nn.Module]]:
    return {
        name: cls
        for name, cls in vars(smp).items()
        if isinstance(cls, type)
        and issubclass(cls, smp.base.SegmentationModel)
        and cls is not smp.base.SegmentationModel
    }


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the argument, its allowed values and the value given."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def build_model(
    arch: str, encoder: str, encoder_weights: str | None, num_classes: int
) -> smp.base.SegmentationModel:
    """Build an smp model by name; ``encoder_weights`` may be a local weights file.

    Args:
        arch: An smp architecture name (``Unet``, ``DeepLabV3Plus``, ...).
        encoder: An smp encoder name or ``tu-<timm model>``.
        encoder_weights: None, ``"imagenet"`` (downloaded by smp/timm, or read from the Hugging
            Face cache when ``HF_HUB_OFFLINE=1``) or a local file read by
            :func:`agmm_lightning.weights.load_encoder_weights`.
        num_classes: Output classes of the segmentation head.

    Returns:
        The model, its encoder loaded with the requested weights.

    Raises:
        ValueError: For an unknown architecture or encoder, or a weights file that is unreadable
            or does not fit the encoder.
    """
    architectures = _architectures()
    if arch not in architectures:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {sorted(architectures)}")
    local = encoder_weights is not None and encoder_weights != "imagenet"
    try:
        model = architectures[arch](
            encoder_name=encoder,
            encoder_weights=None if local else encoder_weights,
            classes=num_classes,
        )
    except (KeyError, ValueError, RuntimeError) as error:
        if "encoder" in str(error).lower() or "model" in str(error).lower():
            raise ValueError(
                f"Unknown encoder {encoder!r} for {arch}: use an smp encoder name "
                f"(smp.encoders.get_encoder_names()) or 'tu-<timm model>'. ({error})"
            ) from error
        raise
    if local:
        load_encoder_weights(cast(nn.Module, model.encoder), str(encoder_weights))
    return model


class AGMMSegmenter(LightningModule):
    """Semantic segmentation from weak labels with adaptive Gaussian mixtures.

    Args:
        num_classes: Number of classes C (must equal the datamodule's).
        arch: Any segmentation-models-pytorch architecture name.
        encoder: smp encoder name, or ``tu-<timm model>``.
        encoder_weights: None, ``"imagenet"`` or a local weights file of the encoder (a timm,
            torchvision or smp state dict, ``.safetensors`` too; see
            :func:`agmm_lightning.weights.load_encoder_weights`).
        method: ``"agmm"`` (OEM mode, METHOD §3), ``"cvpr"`` (METHOD §2) or ``"baseline"``
            (partial cross-entropy).
        mixture_count: Gaussian components per class K (OEM mode). The defaults K = 1 and
            m = 0.9 are set from ``benchmarks/sweep.py`` (K in {1, 2, 4} x m in {0.5, 0.9, 0.99},
            README): all cells lie within 2.8 points, inside the seed spread, and the best
            (K = 1, m = 0.99) equalled the defaults over three seeds; K = 1 is the cheapest.
        oem_momentum: Online EM momentum m in ``[0, 1)``.
        embed_dim: Dimension D of the embedding the mixtures live in.
        normalize_embeddings: L2-normalise the embeddings.
        min_variance: Variance floor of the mixtures.
        temperature: T of the GMM posterior and the maximization loss; None uses ``embed_dim``.
        prior: ``"prediction"`` (the detached segmentation output) or ``"uniform"``.
        adaptation: Relevance factor of the per-image adaptation of the class means in the GMM
            posterior (:meth:`ClassMixtures.adapted_means`), in labelled features; None uses
            the global mixtures alone (METHOD §3.3 as written). On the demo data, adapted
            means give far better pseudo labels than the global mixtures alone.
        lambda_max: Weight of the maximization loss.
        lambda_gmm: Weight of the GMM pseudo supervision (ramped up over ``warmup_steps``).
        lambda_kernel: Weight of CVPR mode's per-image Gaussian-kernel terms (``gmm_to_pred``,
            ``label_to_gmm``, ``separation``; METHOD §2) in OEM mode, on the decoder features;
            0 leaves METHOD §3.5 as written. On the demo they lift OEM mode clearly above the
            baseline, which its own terms alone did not (README, Results).
        pseudo_mode: ``"soft"`` (CE against G) or ``"hard"`` (argmax G above ``confidence``).
        confidence: Posterior threshold of confident pseudo labels and of the fitting set.
        warmup_steps: Steps over which the pseudo loss is ramped up; unlabelled pixels join the
            fitting set only after them.
        max_labelled_samples: Cap on the labelled features used per step (dense labels).
        hard_fraction: OHEM fraction of the segmentation loss (1 disables it).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``.
        lr: Learning rate of the decoder and heads.
        backbone_lr_multiplier: The encoder's learning rate is ``lr`` times this.
        weight_decay: Weight decay.
        poly_power: Exponent of the per-step poly schedule; 0 keeps the rate constant.
        tile_size: Sliding-window size at validation/test/predict; None: whole image.
        tile_stride: Sliding-window step; None: two thirds of the tile.
        test_scales: Scales averaged at validation/test/predict.
        test_flip: Also average horizontal flips.
        class_names: Names used in ``val_iou_<name>``; taken from the datamodule when None.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "DeepLabV3Plus",
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        method: Method = "agmm",
        mixture_count: int = 1,
        oem_momentum: float = 0.9,
        embed_dim: int = 64,
        normalize_embeddings: bool = True,
        min_variance: float = 1e-4,
        temperature: float | None = None,
        prior: Literal["prediction", "uniform"] = "prediction",
        adaptation: float | None = 4.0,
        lambda_max: float = 0.1,
        lambda_gmm: float = 1.0,
        lambda_kernel: float = 1.0,
        pseudo_mode: Literal["soft", "hard"] = "soft",
        confidence: float = 0.9,
        warmup_steps: int = 100,
        max_labelled_samples: int = 16384,
        hard_fraction: float = 1.0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.01,
        backbone_lr_multiplier: float = 0.1,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        test_scales: tuple[float, ...] = (1.0,),
        test_flip: bool = False,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        check_choice("method", method, ("agmm", "cvpr", "baseline"))
        check_choice("prior", prior, ("prediction", "uniform"))
        check_choice("pseudo_mode", pseudo_mode, ("soft", "hard"))
        check_choice("optimizer", optimizer, ("sgd", "adamw"))
        if warmup_steps < 0 or not 0 <= confidence <= 1:
            raise ValueError("warmup_steps must be >= 0 and confidence in [0, 1]")
        if not 0 < hard_fraction <= 1:
            raise ValueError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
        if adaptation is not None and adaptation <= 0:
            raise ValueError(f"adaptation must be None or > 0, got {adaptation}")
        self.save_hyperparameters()
        self.model = build_model(arch, encoder, encoder_weights, num_classes)
        decoder_channels = self.model.segmentation_head[0].in_channels
        self.embedding_head = nn.Conv2d(decoder_channels, embed_dim, kernel_size=1)
        self.mixtures = ClassMixtures(
            num_classes, embed_dim, mixture_count, oem_momentum, min_variance
        )
        self.temperature = float(temperature or embed_dim)
        self.class_names = list(class_names or [])
        self._configure_metrics()

    # -------------------------------------------------------------------------- set-up
    def _configure_metrics(self) -> None:
        num_classes = self.hparams["num_classes"]

        def metrics() -> MetricCollection:
            return MetricCollection(
                {
                    "miou": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=VOID),
                    "iou": MulticlassJaccardIndex(num_classes, average="none", ignore_index=VOID),
                },
                compute_groups=[["miou", "iou"]],
            )

        self.val_metrics = metrics()
        self.test_metrics = metrics()
        self.train_pseudo_metrics = metrics()

    def setup(self, stage: str) -> None:
        """Check the model against the datamodule and take its class names."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.hparams["num_classes"]:
            raise ValueError(
                f"model.num_classes={self.hparams['num_classes']} but the data has "
                f"{data_classes} classes: set --model.num_classes={data_classes}"
            )
        if not self.class_names:
            names = getattr(datamodule, "class_names", None)
            self.class_names = list(names or [])
        if len(self.class_names) != self.hparams["num_classes"]:
            self.class_names = [f"class_{i}" for i in range(self.hparams["num_classes"])]

    def configure_callbacks(self) -> list[Callback]:
        """Panels, prediction PNGs, and the OEM refit callback in OEM mode."""
        from agmm_lightning.callbacks import AGMMPseudoLabeler, PredictionWriter, SegmentationPanels

        callbacks: list[Callback] = [SegmentationPanels(), PredictionWriter()]
        if self.hparams["method"] == "agmm":
            callbacks.append(AGMMPseudoLabeler())
        return callbacks

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """SGD or AdamW with a lower encoder rate and a per-step poly schedule."""
        hp = self.hparams
        encoder = list(self.model.encoder.parameters())
        encoder_ids = {id(p) for p in encoder}
        heads = [p for p in self.parameters() if id(p) not in encoder_ids]
        groups = [
            {"params": encoder, "lr": hp["lr"] * hp["backbone_lr_multiplier"]},
            {"params": heads, "lr": hp["lr"]},
        ]
        if hp["optimizer"] == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=hp["lr"], momentum=0.9, weight_decay=hp["weight_decay"]
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp["lr"], weight_decay=hp["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        power = hp["poly_power"]

        def poly(step: int) -> float:
            return max(0.0, 1 - step / total) ** power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------------- forward
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at the input resolution and the decoder features, in one pass.

        Inputs whose size is not a multiple of the encoder's output stride are padded at the
        bottom and right, and the outputs cropped back.

        Args:
            images: ``[B, 3, H, W]`` normalised images.

        Returns:
            ``[B, C, H, W]`` logits and ``[B, D0, h, w]`` decoder features.
        """
        height, width = images.shape[-2:]
        stride = self.model.encoder.output_stride
        pad_h, pad_w = -height % stride, -width % stride
        padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        features = self.model.decoder(self.model.encoder(padded))
        logits = self.model.segmentation_head(features)
        if logits.shape[-2:] != padded.shape[-2:]:
            logits = F.interpolate(
                logits, size=padded.shape[-2:], mode="bilinear", align_corners=False
            )
        scale = features.shape[-1] / padded.shape[-1]
        feature_size = (math.ceil(height * scale), math.ceil(width * scale))
        return logits[..., :height, :width], features[..., : feature_size[0], : feature_size[1]]

    def embed(self, features: Tensor) -> Tensor:
        """The embedding e the mixtures live in (METHOD §3.1) of decoder feature vectors.

        Args:
            features: ``[..., D0]`` decoder feature vectors (channels last).

        Returns:
            ``[..., D]`` float32 embeddings, L2-normalised when ``normalize_embeddings``.
        """
        head = self.embedding_head
        embeddings = F.linear(features.float(), head.weight.flatten(1), head.bias)
        if self.hparams["normalize_embeddings"]:
            embeddings = F.normalize(embeddings, dim=-1)
        return embeddings

    def predict_logits(self, images: Tensor) -> Tensor:
        """Inference logits with the configured sliding window, scales and flip."""
        hp = self.hparams
        return infer_logits(
            lambda x: self(x)[0],
            images,
            tile=hp["tile_size"],
            stride=hp["tile_stride"],
            scales=hp["test_scales"],
            flip=hp["test_flip"],
        )

    # ------------------------------------------------------------------------ training
    def compute_losses(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Weighted loss terms of the configured method, and what the callbacks need.

        Args:
            batch: A training batch (``image``, ``target``, ``image_classes``, optional
                ``allowed`` and ``mask``).

        Returns:
            The loss terms (their sum is the training loss) and a dict with the detached
            ``logits`` and, in OEM mode, ``mixture_stats`` and the GMM ``posterior`` at label
            resolution (see :func:`~agmm_lightning.losses.posterior_labels`).
        """
        target = batch["target"]
        check_target(target, self.hparams["num_classes"])
        logits, features = self(batch["image"])
        method = self.hparams["method"]
        output: dict[str, Any] = {"logits": logits.detach()}
        # The network runs in the autocast dtype; the losses in float32, each upcasting its inputs.
        with float32_math(logits.device):
            if method == "baseline":
                losses = {"seg": partial_cross_entropy(logits, target)}
            elif method == "cvpr":
                num_classes, tags = self.hparams["num_classes"], batch.get("image_classes")
                losses = cvpr_agmm_losses(features, logits, target, num_classes, tags)
                losses.pop("total")
            else:
                losses, extra = self._oem_losses(batch, logits, features)
                output.update(extra)
        return losses, output

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Log the losses; in OEM mode also return the detached E-step statistics."""
        losses, output = self.compute_losses(batch)
        total = sum(losses.values(), torch.zeros((), device=self.device))
        batch_size = batch["target"].shape[0]
        self.log("train_loss", total, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train_{name}", value, batch_size=batch_size)
        if "posterior" in output:
            self._log_pseudo_label_quality(batch, output["posterior"])
        return {"loss": total, **output}

    def _allowed(self, batch: dict[str, Any], size: tuple[int, ...]) -> Tensor:
        """``[B, C, *size]`` bool map of the classes each pixel may take (boxes or image tags)."""
        if "allowed" in batch:
            allowed = batch["allowed"].float()
            if allowed.shape[-2:] != size:
                allowed = F.adaptive_max_pool2d(allowed, size)
            return allowed > 0
        tags = batch["image_classes"] > 0
        return tags[..., None, None].expand(*tags.shape, *size)

    def _oem_losses(
        self, batch: dict[str, Any], logits: Tensor, features: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        hp = self.hparams
        target = batch["target"]
        num_classes = hp["num_classes"]
        batch_size, channels, height, width = features.shape
        dim = hp["embed_dim"]

        # Labelled features, read by bilinear sampling at the labels' own coordinates.
        labelled_features, labels, labelled_image, labelled_allowed = self._labelled_samples(
            batch, features, target
        )
        valid = self.mixtures.initialized[None] & labelled_allowed
        log_likelihood = self.mixtures.log_likelihood(labelled_features)
        maximization = maximization_loss(log_likelihood, labels, self.temperature, valid)

        # One E-step over every pixel at feature resolution serves both the GMM posterior and
        # the statistics of the online update (the labelled features have their own).
        allowed_low = self._allowed(batch, (height, width))
        fit_labelled = labelled_features.detach()
        with torch.no_grad():
            # Only the labelled features carry gradients: every pixel's embedding is built
            # without autograd, directly in the [N, D] rows the mixtures read.
            flat_embeddings = self.embed(features.permute(0, 2, 3, 1).reshape(-1, channels))
            pixels, means = flat_embeddings, None
            if hp["adaptation"] is not None:
                means = self.mixtures.adapted_means(
                    fit_labelled, labels, labelled_image, batch_size, hp["adaptation"]
                )
                pixels = flat_embeddings.view(batch_size, height * width, dim)
            expectation = self.mixtures.expectation(pixels, means)
            prior = None
            if hp["prior"] == "prediction":
                prior = logits.detach().float().softmax(1)
                if prior.shape[-2:] != (height, width):
                    prior = F.adaptive_avg_pool2d(prior, (height, width))
                prior = prior.permute(0, 2, 3, 1).reshape(-1, num_classes)
            flat_allowed = allowed_low.permute(0, 2, 3, 1).reshape(-1, num_classes)
            posterior_low = self.mixtures.posterior_from_log_likelihood(
                expectation.log_likelihood, prior, flat_allowed, self.temperature
            )
            posterior = posterior_low.view(batch_size, height, width, num_classes)
            posterior = posterior.permute(0, 3, 1, 2)
            if posterior.shape[-2:] != target.shape[-2:]:
                # Upsampling blends neighbours: restrict to each pixel's allowed classes again.
                posterior = F.interpolate(
                    posterior, size=target.shape[-2:], mode="bilinear", align_corners=False
                )
                posterior = posterior * self._allowed(batch, target.shape[-2:])
                posterior = posterior / posterior.sum(1, keepdim=True).clamp_min(1e-12)

        ramp = min(1.0, (self.global_step + 1) / hp["warmup_steps"]) if hp["warmup_steps"] else 1.0
        allowed_map = batch.get("allowed", batch["image_classes"])
        losses = {
            "seg": partial_cross_entropy(logits, target, hard_fraction=hp["hard_fraction"]),
            "maximization": hp["lambda_max"] * maximization,
            "pseudo": ramp
            * hp["lambda_gmm"]
            * pseudo_label_loss(logits, posterior, target, hp["pseudo_mode"], hp["confidence"]),
            "absent": absent_class_loss(logits, allowed_map, target),
        }
        if hp["lambda_kernel"]:
            kernel_losses = cvpr_agmm_losses(
                features, logits, target, num_classes, batch.get("image_classes")
            )
            for name in ("gmm_to_pred", "label_to_gmm", "separation"):
                losses[name] = hp["lambda_kernel"] * kernel_losses[name]

        # Fitting set of the online EM: labelled features, then confident unlabelled ones.
        fit_unlabelled = torch.zeros_like(posterior_low[:, 0], dtype=torch.bool)
        if self.global_step >= hp["warmup_steps"]:
            unlabelled = F.interpolate(
                (target == num_classes)[:, None].float(), size=(height, width), mode="nearest"
            ).flatten()
            fit_unlabelled = (posterior_low.amax(1) >= hp["confidence"]) & (unlabelled > 0)
        labelled_stats = self.mixtures.sufficient_statistics(
            fit_labelled, F.one_hot(labels, num_classes).to(posterior_low.dtype)
        )
        pixel_stats = self.mixtures.sufficient_statistics(
            flat_embeddings, posterior_low * fit_unlabelled[:, None], expectation
        )
        return losses, {"mixture_stats": labelled_stats + pixel_stats, "posterior": posterior}

    def _labelled_samples(
        self, batch: dict[str, Any], features: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Embeddings at labelled pixels, their labels, images and allowed classes.

        Each is the bilinear upsampling of the embedding map to label resolution, read at the
        pixel: the four feature cells it blends are embedded and mixed with their weights, so
        neither the dense embedding map nor its upsampling is built with gradients.
        """
        num_classes = self.hparams["num_classes"]
        index = (target < num_classes).nonzero()
        if index.shape[0] > self.hparams["max_labelled_samples"]:
            keep = torch.randperm(index.shape[0], device=index.device)
            index = index[keep[: self.hparams["max_labelled_samples"]]]
        image, row, col = index.unbind(1)
        cells, weights = bilinear_taps(row, col, features.shape[-2:], target.shape[-2:])
        taps = features.flatten(2)[image[:, None], :, cells]  # [n, 4, D0]
        samples = (self.embed(taps) * weights[..., None]).sum(1)
        labels = target[image, row, col].long()
        allowed = self._allowed(batch, target.shape[-2:])[image, :, row, col]
        return samples, labels, image, allowed

    def _log_pseudo_label_quality(self, batch: dict[str, Any], posterior: Tensor) -> None:
        """``train_pseudo_miou`` against dense GT (never trained on) and the coverage."""
        target = batch["target"]
        confidence, pseudo = posterior.max(1)
        unlabelled = target == self.hparams["num_classes"]
        confident = (confidence >= self.hparams["confidence"]) & unlabelled
        coverage = confident.sum() / unlabelled.sum().clamp_min(1)
        self.log("train_pseudo_coverage", coverage, batch_size=target.shape[0])
        if "mask" in batch:
            self.train_pseudo_metrics.update(
                pseudo, batch["mask"].masked_fill(confidence == 0, VOID)
            )

    def on_train_epoch_end(self) -> None:
        """Log the pseudo-label mIoU accumulated over the epoch."""
        if self.train_pseudo_metrics["miou"].update_count:
            self.log("train_pseudo_miou", self.train_pseudo_metrics.compute()["miou"])
        self.train_pseudo_metrics.reset()

    # ---------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection) -> None:
        logits = self.predict_logits(batch["image"])
        metrics.update(logits.argmax(1), batch["mask"])

    def _log_metrics(self, prefix: str, metrics: MetricCollection) -> None:
        values = metrics.compute()
        self.log(f"{prefix}_miou", values["miou"], prog_bar=True)
        for name, iou in zip(self.class_names, values["iou"], strict=True):
            self.log(f"{prefix}_iou_{name}", iou)
        metrics.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the validation confusion matrix."""
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        """Log ``val_miou`` and ``val_iou_<class>`` of the whole split."""
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate the test confusion matrix."""
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        """Log ``test_miou`` and ``test_iou_<class>``."""
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Class-index predictions with the images' names."""
        return {"name": batch["name"], "prediction": self.predict_logits(batch["image"]).argmax(1)}
