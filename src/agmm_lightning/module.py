"""AGMMSegmenter: an smp encoder-decoder trained from weak labels with AGMM (METHOD §2-3)."""

from __future__ import annotations

import inspect
import math
import time
import warnings
from typing import Any, Literal, cast

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex

from agmm_lightning.callbacks import print_line, reduce_statistics
from agmm_lightning.errors import InputError
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
from agmm_lightning.mixtures import ClassMixtures, MixtureStatistics
from agmm_lightning.precision import float32_math
from agmm_lightning.weights import load_encoder_weights

Method = Literal["agmm", "cvpr", "baseline"]

__all__ = ["AGMMSegmenter", "check_inference_options", "format_iou_table"]

# Options only OEM mode reads; "cvpr" also ignores hard_fraction (its seg term is the paper's CE).
_OEM_OPTIONS = (
    "mixture_count",
    "oem_momentum",
    "embed_dim",
    "normalize_embeddings",
    "min_variance",
    "temperature",
    "prior",
    "adaptation",
    "lambda_max",
    "lambda_gmm",
    "lambda_kernel",
    "pseudo_mode",
    "confidence",
    "warmup_steps",
    "max_labelled_samples",
)
_IGNORED_OPTIONS = {"baseline": _OEM_OPTIONS, "cvpr": (*_OEM_OPTIONS, "hard_fraction"), "agmm": ()}


def _architectures() -> dict[str, type[nn.Module]]:
    return {
        name: cls
        for name, cls in vars(smp).items()
        if isinstance(cls, type)
        and issubclass(cls, smp.base.SegmentationModel)
        and cls is not smp.base.SegmentationModel
    }


def check_inference_options(
    tile_size: int | None, tile_stride: int | None, test_scales: tuple[float, ...]
) -> None:
    """Refuse sliding-window and multi-scale options that cannot cover an image.

    Raises:
        InputError: Naming the option and the values that work.
    """
    if tile_size is not None and tile_size < 1:
        raise InputError(f"tile_size must be None (whole image) or >= 1, got {tile_size}")
    if tile_stride is not None:
        if tile_size is None:
            raise InputError(
                f"tile_stride={tile_stride} needs tile_size: set tile_size, or leave tile_stride "
                "unset for whole-image inference"
            )
        if not 1 <= tile_stride <= tile_size:
            raise InputError(
                f"tile_stride must be in 1..tile_size={tile_size} so that the windows cover every "
                f"pixel, got {tile_stride}"
            )
    if not test_scales or min(test_scales) <= 0:
        raise InputError(f"test_scales must be one or more positive scales, got {test_scales}")


def _warn_ignored_options(method: str, given: dict[str, Any]) -> None:
    """Warn about options set away from their defaults that ``method`` does not read."""
    defaults = inspect.signature(AGMMSegmenter.__init__).parameters
    ignored = []
    for name in _IGNORED_OPTIONS[method]:
        if given[name] != defaults[name].default:
            readers = [other for other, skips in _IGNORED_OPTIONS.items() if name not in skips]
            ignored.append(f"{name}={given[name]!r} (read by {' and '.join(readers)} only)")
    if ignored:
        warnings.warn(f"method={method!r} does not use {', '.join(ignored)}", stacklevel=3)


def format_iou_table(title: str, class_names: list[str], ious: list[float], mean: float) -> str:
    """A plain-text table of per-class IoU and mIoU (percent), for logs read as text.

    Args:
        title: The first line.
        class_names: One name per class.
        ious: The IoU of each class in [0, 1].
        mean: The mIoU in [0, 1].

    Returns:
        The table, one class per line, the mIoU last.
    """
    width = max(len(name) for name in [*class_names, "mIoU"])
    rows = [*zip(class_names, ious, strict=True), ("mIoU", mean)]
    return "\n".join([title] + [f"  {name:<{width}}  {100 * iou:5.1f}" for name, iou in rows])


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the argument, its allowed values and the value given."""
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")


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
        raise InputError(
            f"arch={arch!r} is not an smp architecture; choose one of {sorted(architectures)}"
        )
    local = encoder_weights is not None and encoder_weights != "imagenet"
    try:
        model = architectures[arch](
            encoder_name=encoder,
            encoder_weights=None if local else encoder_weights,
            classes=num_classes,
        )
    except (KeyError, ValueError, RuntimeError) as error:
        if "encoder" in str(error).lower() or "model" in str(error).lower():
            raise InputError(
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
        hard_fraction: OHEM fraction of the segmentation loss of ``baseline`` and ``agmm`` (1
            disables it; CVPR mode keeps the paper's loss).
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

    skipped_refits: Tensor

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
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        check_choice("method", method, ("agmm", "cvpr", "baseline"))
        check_choice("prior", prior, ("prediction", "uniform"))
        check_choice("pseudo_mode", pseudo_mode, ("soft", "hard"))
        check_choice("optimizer", optimizer, ("sgd", "adamw"))
        if warmup_steps < 0 or not 0 <= confidence <= 1:
            raise InputError("warmup_steps must be >= 0 and confidence in [0, 1]")
        if not 0 < hard_fraction <= 1:
            raise InputError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
        if adaptation is not None and adaptation <= 0:
            raise InputError(f"adaptation must be None or > 0, got {adaptation}")
        check_inference_options(tile_size, tile_stride, test_scales)
        self.save_hyperparameters()
        _warn_ignored_options(method, dict(self.hparams))
        self.model = build_model(arch, encoder, encoder_weights, num_classes)
        decoder_channels = self.model.segmentation_head[0].in_channels
        self.embedding_head = nn.Conv2d(decoder_channels, embed_dim, kernel_size=1)
        self.mixtures = ClassMixtures(
            num_classes, embed_dim, mixture_count, oem_momentum, min_variance
        )
        self.temperature = float(temperature or embed_dim)
        self.class_names = list(class_names or [])
        self._configure_metrics()
        # Statistics of the micro-batches since the last optimizer step, refitted at the step.
        self._pending_stats: MixtureStatistics | None = None
        self.register_buffer("skipped_refits", torch.zeros((), dtype=torch.long), persistent=False)
        self._skipped_refits_reported = 0
        self.skipped_steps = 0
        self._ious: tuple[str, int, list[float], float] | None = None
        self._start_time = time.monotonic()

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
            raise InputError(
                f"model.num_classes={self.hparams['num_classes']} but the data has "
                f"{data_classes} classes: set --model.num_classes={data_classes}"
            )
        if not self.class_names:
            names = getattr(datamodule, "class_names", None)
            self.class_names = list(names or [])
        if len(self.class_names) != self.hparams["num_classes"]:
            self.class_names = [f"class_{i}" for i in range(self.hparams["num_classes"])]

    def configure_callbacks(self) -> list[Callback]:
        """Image panels and the prediction writer."""
        from agmm_lightning.callbacks import PredictionWriter, SegmentationPanels

        return [SegmentationPanels(), PredictionWriter()]

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
                hard_fraction = self.hparams["hard_fraction"]
                losses = {"seg": partial_cross_entropy(logits, target, hard_fraction=hard_fraction)}
            elif method == "cvpr":
                num_classes, tags = self.hparams["num_classes"], batch.get("image_classes")
                losses = cvpr_agmm_losses(features, logits, target, num_classes, tags)
                losses.pop("total")
            else:
                losses, extra = self._oem_losses(batch, logits, features)
                output.update(extra)
        return losses, output

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Log the losses; in OEM mode keep the E-step statistics for the refit at the step."""
        losses, output = self.compute_losses(batch)
        stats = output.pop("mixture_stats", None)
        if stats is not None:
            pending = self._pending_stats
            self._pending_stats = stats if pending is None else pending + stats
        total = sum(losses.values(), torch.zeros((), device=self.device))
        batch_size = batch["target"].shape[0]
        self.log("train_loss", total, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train_{name}", value, batch_size=batch_size)
        if "posterior" in output:
            self._log_pseudo_label_quality(batch, output["posterior"])
        return {"loss": total, **output}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip a step whose gradients are not finite; refit the mixtures once per step.

        A batch whose loss turned NaN or inf would write NaN into every weight: its gradients are
        dropped instead (the same on every rank, since DDP has already summed them), BatchNorm
        statistics it made non-finite restart, and the run goes on. Under ``16-mixed`` the
        gradient scaler skips such steps itself.

        The refit (METHOD §3.4) sums the statistics of every micro-batch since the last step
        (gradient accumulation) and then across ranks, so every rank applies the same update.
        Non-finite statistics skip it on every rank alike; :attr:`skipped_refits` counts them.
        """
        self._drop_non_finite_gradients()
        if self._pending_stats is None:
            return
        stats, self._pending_stats = reduce_statistics(self._pending_stats, self.trainer), None
        mixtures = self.mixtures
        self.skipped_refits += ~mixtures.update(stats)
        initialized = mixtures.initialized
        live = (mixtures.weights >= 0.1 / mixtures.mixture_count) & initialized[:, None]
        self.log("mixture_live_components", live.sum().float())
        self.log("mixture_classes_seen", initialized.sum().float())
        self.log("mixture_skipped_refits", self.skipped_refits.float())
        mean_variance = mixtures.variances.mean((1, 2))
        seen = initialized.sum().clamp_min(1)
        self.log("mixture_mean_variance", (mean_variance * initialized).sum() / seen)

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

    def _drop_non_finite_gradients(self) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        parameters = [p for p in self.parameters() if p.grad is not None]
        if not parameters:
            return
        norm = torch.nn.utils.clip_grad_norm_(parameters, float("inf"))
        if torch.isfinite(norm):
            return
        for parameter in parameters:
            parameter.grad = None
        # The batch's forward has already fed BatchNorm its statistics: restart any that it spoilt.
        for module in self.modules():
            if not isinstance(module, nn.modules.batchnorm._NormBase):
                continue
            statistics = [module.running_mean, module.running_var]
            if any(value is not None and not value.isfinite().all() for value in statistics):
                module.reset_running_stats()
        self.skipped_steps += 1
        self.log("train_skipped_steps", float(self.skipped_steps))
        warnings.warn(
            f"step {self.global_step}: the loss or its gradients were NaN or inf, so this "
            "optimizer step was skipped and the weights kept (a diverging batch; if it keeps "
            "happening, lower the learning rate or use gradient clipping).",
            stacklevel=1,
        )

    def on_train_epoch_end(self) -> None:
        """Log the pseudo-label mIoU of the epoch; warn about mixture refits that were skipped."""
        if self.train_pseudo_metrics["miou"].update_count:
            self.log("train_pseudo_miou", self.train_pseudo_metrics.compute()["miou"])
        self.train_pseudo_metrics.reset()
        skipped = int(self.skipped_refits)  # one host read per epoch
        if skipped > self._skipped_refits_reported:
            warnings.warn(
                f"{skipped - self._skipped_refits_reported} mixture refit(s) in epoch "
                f"{self.current_epoch} were skipped: their statistics held NaN or inf (the "
                "embeddings diverged on some batch). Training went on with the mixtures as they "
                "were; if it keeps happening, lower the learning rate.",
                stacklevel=1,
            )
            self._skipped_refits_reported = skipped

    # ---------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection) -> None:
        logits = self.predict_logits(batch["image"])
        metrics.update(logits.argmax(1), batch["mask"])

    def _log_metrics(self, prefix: str, metrics: MetricCollection) -> None:
        values = metrics.compute()
        metrics.reset()
        self.log(f"{prefix}_miou", values["miou"], prog_bar=True)
        for name, iou in zip(self.class_names, values["iou"], strict=True):
            self.log(f"{prefix}_iou_{name}", iou)
        if self.trainer.sanity_checking:
            return
        self._ious = (prefix, self.current_epoch, values["iou"].tolist(), float(values["miou"]))
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._start_time))
        print_line(
            f"epoch {self.current_epoch} step {self.global_step}: {prefix}_miou "
            f"{float(values['miou']):.4f} (elapsed {elapsed})"
        )

    def _print_ious(self) -> None:
        """Print the per-class IoU of the last evaluation as a table."""
        if self._ious is None:
            return
        prefix, epoch, ious, mean = self._ious
        title = f"Per-class IoU (%), {prefix}, epoch {epoch}:"
        print_line(format_iou_table(title, self.class_names, ious, mean))

    def on_fit_start(self) -> None:
        """Start the clock of the elapsed time printed after each validation."""
        self._start_time = time.monotonic()

    def on_fit_end(self) -> None:
        """Print the per-class IoU of the last validation."""
        self._print_ious()

    def on_validation_end(self) -> None:
        """Print the per-class IoU table at the end of ``validate`` (``fit`` prints its own)."""
        if not self.trainer.training and self.trainer.state.fn == "validate":
            self._print_ious()

    def on_test_end(self) -> None:
        """Print the per-class IoU table of the test split."""
        self._print_ious()

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
        """uint8 class-index predictions with the images' names."""
        prediction = self.predict_logits(batch["image"]).argmax(1).to(torch.uint8)
        return {"name": batch["name"], "prediction": prediction}
