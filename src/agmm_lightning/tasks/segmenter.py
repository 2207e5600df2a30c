"""AGMMSegmenter: the Lightning task that trains an :class:`~agmm_lightning.agmm.AGMMModel`.

Steps, metrics, logs and the mixtures' refit at every optimizer step; the algorithm itself is the
pure-torch model.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.wrappers import ClasswiseWrapper

from agmm_lightning.agmm import METHODS, AGMMModel, Method, MixtureStatistics, OEMOptions
from agmm_lightning.agmm.bands import Fused
from agmm_lightning.agmm.model import build_network
from agmm_lightning.callbacks import print_line
from agmm_lightning.data.base import WeakLabelDataset
from agmm_lightning.data.pixels import ImageInput, check_normalization, image_batch
from agmm_lightning.errors import InputError, check_choice, check_non_negative
from agmm_lightning.inference import infer_logits
from agmm_lightning.targets import VOID, upsample_posterior
from agmm_lightning.tasks.base import BaseTask, OptimizerOptions

__all__ = ["AGMMSegmenter", "check_inference_options", "format_iou_table"]

_OEM = OEMOptions()
"""The defaults of OEM mode's options, which AGMMSegmenter's signature takes."""
_OPTIMIZER = OptimizerOptions()
"""The optimizer's defaults, shared with the other tasks."""
_OEM_OPTIONS = tuple(field.name for field in dataclasses.fields(OEMOptions))
# Options a method does not read: OEM mode's for the others; CVPR mode keeps the paper's CE.
_IGNORED_OPTIONS = {
    "baseline": (*_OEM_OPTIONS, "fused"),
    "cvpr": (*_OEM_OPTIONS, "hard_fraction"),
    "agmm": (),
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


def _is_batch(image: ImageInput) -> bool:
    """Whether an input to :meth:`AGMMSegmenter.segment` is a [B,3,H,W] batch tensor."""
    return isinstance(image, Tensor) and image.ndim == 4


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


def _warn_padded_crops(crop_size: int | None, stride: int) -> None:
    """Warn when every training crop would be padded up to a multiple of the output stride.

    The forward pass pads such inputs at the bottom and right. A band that every training crop
    carries becomes a cue the network relies on and then misses on images without it (measured in
    docs/data.md); crops without a band leave the network indifferent to padding at evaluation.
    """
    if crop_size is None or crop_size % stride == 0:
        return
    lower = crop_size - crop_size % stride
    warnings.warn(
        f"data.crop_size={crop_size} is not a multiple of the encoder's output stride {stride}: "
        f"every training crop gets a {stride - crop_size % stride}-pixel padding band, which the "
        f"network learns to rely on and misses at validation. Set crop_size to "
        f"{lower + stride}{f' or {lower}' if lower else ''}.",
        stacklevel=2,
    )


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


class AGMMSegmenter(BaseTask):
    """Semantic segmentation from weak labels with adaptive Gaussian mixtures.

    Args:
        num_classes: Number of classes C (the CLI takes it from the datamodule).
        arch: Any segmentation-models-pytorch architecture name.
        encoder: smp encoder name, or ``tu-<timm model>``.
        encoder_weights: None, ``"imagenet"`` or a local weights file of the encoder (a timm,
            torchvision or smp state dict, ``.safetensors`` too; see
            :func:`agmm_lightning.weights.load_encoder_weights`).
        method: ``"agmm"`` (OEM mode, METHOD §3), ``"cvpr"`` (METHOD §2) or ``"baseline"``
            (partial cross-entropy).
        <OEMOptions>
        hard_fraction: OHEM fraction of the segmentation loss of ``baseline`` and ``agmm`` (1
            disables it; CVPR mode keeps the paper's loss).
        fused: How the kernel block's pixel terms of ``cvpr`` and ``agmm`` run: ``"eager"``,
            ``"compile"`` (``torch.compile``; without a compiler one warning, then eager) or
            ``"auto"`` (compiled on a CPU from 2**21 logits, where that measures faster).
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
        in_channels: Channels of the input images (the CLI takes it from the datamodule).
        mean: Per-channel mean of the 0..1 pixels the network takes (the datamodule's; None:
            ImageNet's for three channels, else the datamodule's at ``fit``).
        std: Per-channel standard deviation, likewise.

    Attributes:
        model: The network and the method's losses (and, in OEM mode, the mixtures).
        skipped_refits: How many mixture refits non-finite statistics skipped.
    """

    skipped_refits: Tensor
    selection_metric = "val_miou"

    def __init__(
        self,
        num_classes: int,
        arch: str = "DeepLabV3Plus",
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        method: Method = "agmm",
        mixture_count: int = _OEM.mixture_count,
        oem_momentum: float = _OEM.oem_momentum,
        embed_dim: int = _OEM.embed_dim,
        normalize_embeddings: bool = _OEM.normalize_embeddings,
        min_variance: float = _OEM.min_variance,
        temperature: float | None = _OEM.temperature,
        prior: Literal["prediction", "uniform"] = _OEM.prior,
        adaptation: float | None = _OEM.adaptation,
        lambda_max: float = _OEM.lambda_max,
        lambda_gmm: float = _OEM.lambda_gmm,
        lambda_kernel: float = _OEM.lambda_kernel,
        pseudo_mode: Literal["agree", "soft", "hard", "surer"] = _OEM.pseudo_mode,
        pseudo_gradient: Literal["network", "head"] = _OEM.pseudo_gradient,
        confidence: float = _OEM.confidence,
        fit_confidence: float = _OEM.fit_confidence,
        unlabelled_mass: float | None = _OEM.unlabelled_mass,
        warmup_steps: int = _OEM.warmup_steps,
        max_labelled_samples: int = _OEM.max_labelled_samples,
        hard_fraction: float = 1.0,
        fused: Fused = "auto",
        optimizer: Literal["sgd", "adamw"] = _OPTIMIZER.optimizer,
        lr: float = _OPTIMIZER.lr,
        backbone_lr_multiplier: float = 0.1,
        weight_decay: float = _OPTIMIZER.weight_decay,
        poly_power: float = _OPTIMIZER.poly_power,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        test_scales: tuple[float, ...] = (1.0,),
        test_flip: bool = False,
        class_names: list[str] | None = None,
        in_channels: int = 3,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__(OptimizerOptions(optimizer, lr, weight_decay, poly_power))
        if num_classes < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        check_choice("method", method, METHODS)
        check_non_negative(backbone_lr_multiplier=backbone_lr_multiplier)
        if not 0 < hard_fraction <= 1:
            raise InputError(f"hard_fraction must be in (0, 1], got {hard_fraction}")
        check_inference_options(tile_size, tile_stride, test_scales)
        check_normalization(mean, std, in_channels)
        arguments = locals()
        oem = OEMOptions(**{name: arguments[name] for name in _OEM_OPTIONS})
        self.save_hyperparameters()
        _warn_ignored_options(method, dict(self.hparams))
        self.model = AGMMModel(
            build_network(arch, encoder, encoder_weights, num_classes, in_channels),
            num_classes,
            method,
            oem,
            hard_fraction,
            fused,
        )
        self.class_names = list(class_names or [])
        # Statistics of the micro-batches since the last optimizer step, refitted at the step.
        self._pending_stats: MixtureStatistics | None = None
        self.register_buffer("skipped_refits", torch.zeros((), dtype=torch.long), persistent=False)
        self._skipped_refits_reported = 0
        self._ious: tuple[str, int, list[float], float, list[str]] | None = None
        self._left_out: list[str] = []  # why images of the evaluation under way were left out
        self._start_time = time.monotonic()

    # -------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Check the model against the datamodule, take its class names, build the metrics."""
        super().setup(stage)
        num_classes = self.hparams["num_classes"]
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != num_classes:
            raise InputError(
                f"model.num_classes={num_classes} but the data has {data_classes} classes: set "
                f"--model.init_args.num_classes={data_classes}, or leave it out"
            )
        if stage == "fit":
            stride = self.model.network.encoder.output_stride
            _warn_padded_crops(getattr(datamodule, "crop_size", None), stride)
        if not self.class_names:
            self.class_names = list(getattr(datamodule, "class_names", None) or [])
        if len(self.class_names) != num_classes:
            self.class_names = [f"class_{i}" for i in range(num_classes)]
        self.val_metrics = self._metrics("val_")
        self.test_metrics = self._metrics("test_")
        self.train_pseudo_metrics = self._metrics("train_pseudo_")
        self.train_student_metrics = self._metrics("train_student_")
        # The same two mIoUs per weak-label form, when the data mixes forms.
        train = getattr(datamodule, "datasets", {}).get("train")
        forms = train.forms_present() if isinstance(train, WeakLabelDataset) else []
        self.train_metrics_by_form = nn.ModuleDict(
            {
                f"{who}_{form}": MulticlassJaccardIndex(num_classes, ignore_index=VOID)
                for form in forms
                for who in ("pseudo", "student")
            }
        ).to(self.device)
        # Pixels the pseudo loss supervised in the epoch, and those of them it labelled right.
        self._pseudo_pixels = torch.zeros(2, device=self.device)

    def _metrics(self, prefix: str) -> MetricCollection:
        """MIoU and per-class IoU of one confusion matrix, accumulated over a whole split."""
        num_classes = self.hparams["num_classes"]

        def jaccard(average: Literal["macro", "none"]) -> MulticlassJaccardIndex:
            return MulticlassJaccardIndex(num_classes, average=average, ignore_index=VOID)

        per_class = ClasswiseWrapper(jaccard("none"), labels=self.class_names, prefix="iou_")
        return MetricCollection(
            {"miou": jaccard("macro"), "iou": per_class}, prefix=prefix, compute_groups=False
        ).to(self.device)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The encoder at ``lr × backbone_lr_multiplier``, the rest at ``lr``."""
        hp = self.hparams
        encoder = list(self.model.network.encoder.parameters())
        encoder_ids = {id(p) for p in encoder}
        heads = [p for p in self.parameters() if id(p) not in encoder_ids]
        return [
            {"params": encoder, "lr": self.optimization.lr * hp["backbone_lr_multiplier"]},
            {"params": heads, "lr": self.optimization.lr},
        ]

    # ------------------------------------------------------------------------- forward
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits at the input resolution and the decoder features (see :class:`AGMMModel`)."""
        return self.model(images)

    def predict_logits(self, images: Tensor) -> Tensor:
        """Inference logits with the configured sliding window, scales and flip."""
        hp = self.hparams
        return infer_logits(
            lambda x: self.model(x)[0],
            images,
            tile=hp["tile_size"],
            stride=hp["tile_stride"],
            scales=hp["test_scales"],
            flip=hp["test_flip"],
        )

    @torch.inference_mode()
    def segment(self, image: ImageInput | Sequence[ImageInput]) -> Tensor | list[Tensor]:
        """The class map of an image, with the configured sliding window, scales and flip.

        Args:
            image: A file path (read at full bit depth), PIL image, [H,W,C] array, or [C,H,W] /
                [B,C,H,W] tensor, C = ``in_channels`` (any dtype: integers 0..255, floats 0..1 or
                0..255; see :data:`~agmm_lightning.data.pixels.ImageInput`), or a list of them.
                It is normalised with the model's :attr:`normalization`.

        Returns:
            int64 class indices on the CPU: [H,W], [B,H,W] for a batch tensor, or a list of
            maps for a list of images. Class i is ``class_names[i]``.
        """
        if isinstance(image, (list, tuple)):
            return [cast(Tensor, self.segment(one)) for one in image]
        single = cast(ImageInput, image)
        batch = image_batch(single, self.hparams["in_channels"], self.normalization)
        batch = batch.to(self.device)
        training = self.training
        self.eval()
        try:
            labels = self.predict_logits(batch).argmax(1).cpu()
        finally:
            self.train(training)
        return labels if _is_batch(single) else labels[0]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the class names the data gave, for :meth:`segment`'s users and the panels."""
        checkpoint["class_names"] = self.class_names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the class names saved with the checkpoint."""
        self.class_names = list(checkpoint.get("class_names") or self.class_names)

    # ------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Log the losses; in OEM mode keep the E-step statistics for the refit at the step."""
        step, logits = self.model.losses(batch, self.global_step)
        total = sum(step.terms.values(), torch.zeros((), device=self.device))
        batch_size = batch["target"].shape[0]
        self.log("train_loss", total, prog_bar=True, batch_size=batch_size)
        for name, value in step.terms.items():
            self.log(f"train_{name}", value, batch_size=batch_size)
        if step.stats is not None:
            pending = self._pending_stats
            self._pending_stats = step.stats if pending is None else pending + step.stats
        output: dict[str, Any] = {"loss": total, "logits": logits.detach()}
        if step.posterior is not None:
            output["posterior"] = step.posterior
            output["pseudo_cells"] = step.pseudo_cells
        return output

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Score the step's pseudo labels and prediction, after backward freed the activations."""
        if not isinstance(outputs, dict):
            return
        if "posterior" in outputs:
            self._log_pseudo_label_quality(batch, outputs)
        elif "mask" in batch:
            self.train_student_metrics.update(outputs["logits"].argmax(1), batch["mask"])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip non-finite steps (see :class:`BaseTask`); refit the mixtures once per step.

        The refit (METHOD §3.4) sums the statistics of every micro-batch since the last step
        (gradient accumulation) and then across ranks, so every rank applies the same update.
        Non-finite statistics skip it on every rank alike; :attr:`skipped_refits` counts them.
        """
        super().on_before_optimizer_step(optimizer)
        if self._pending_stats is None:
            return
        stats, self._pending_stats = self._pending_stats, None
        if self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            stats = stats.reduced(
                lambda t: strategy.reduce(t, reduce_op="sum"), strategy.all_gather
            )
        mixtures = self.model.mixtures
        self.skipped_refits += ~mixtures.update(stats)
        initialized = mixtures.initialized
        self.log("mixture_live_components", mixtures.live_components().sum().float())
        self.log("mixture_classes_seen", initialized.sum().float())
        self.log("mixture_skipped_refits", self.skipped_refits.float())
        mean_variance = mixtures.variances.mean((1, 2))
        seen = initialized.sum().clamp_min(1)
        self.log("mixture_mean_variance", (mean_variance * initialized).sum() / seen)

    def _log_pseudo_label_quality(self, batch: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Teacher against student on the same training pixels (METHOD §3.6).

        ``train_pseudo_coverage``: the share of unlabelled pixels the pseudo loss supervised.
        With dense ground truth (never trained on): the mIoU of the GMM labels
        (``train_pseudo_*``) and of the network's prediction (``train_student_*``) over the
        pixels the GMM labels, and the precision of the supervised pixels, logged per epoch.
        """
        target = batch["target"]
        size = target.shape[-2:]
        posterior = upsample_posterior(outputs["posterior"], size, batch.get("allowed"))
        confidence, pseudo = posterior.max(1)
        unlabelled = target == self.hparams["num_classes"]
        cells = F.interpolate(outputs["pseudo_cells"][:, None].float(), size=size)[:, 0]
        supervised = (cells > 0) & unlabelled
        coverage = supervised.sum() / unlabelled.sum().clamp_min(1)
        self.log("train_pseudo_coverage", coverage, batch_size=target.shape[0])
        if "mask" in batch:
            mask = batch["mask"].masked_fill(confidence == 0, VOID)
            prediction = outputs["logits"].argmax(1)
            self.train_pseudo_metrics.update(pseudo, mask)
            self.train_student_metrics.update(prediction, mask)
            self._update_metrics_by_form(batch.get("form"), pseudo, prediction, mask)
            supervised &= mask != VOID
            right = (supervised & (pseudo == mask)).sum()
            self._pseudo_pixels += torch.stack([supervised.sum(), right]).float()

    def _update_metrics_by_form(
        self, forms: list[str] | None, pseudo: Tensor, prediction: Tensor, mask: Tensor
    ) -> None:
        """Add the batch's images to the teacher and student mIoU of their own weak-label form."""
        if not forms or not len(self.train_metrics_by_form):
            return
        for form in set(forms):
            rows = [index for index, name in enumerate(forms) if name == form]
            for who, labels in (("pseudo", pseudo), ("student", prediction)):
                metric = cast(MulticlassJaccardIndex, self.train_metrics_by_form[f"{who}_{form}"])
                metric.update(labels[rows], mask[rows])

    def on_train_epoch_end(self) -> None:
        """Log the epoch's teacher and student scores; warn about skipped refits.

        With mixed weak-label forms, also ``train_pseudo_miou_<form>`` and
        ``train_student_miou_<form>``: the same scores over each form's images.
        """
        for metrics in (self.train_pseudo_metrics, self.train_student_metrics):
            if metrics["miou"].update_count:
                self.log_dict(metrics.compute())
            metrics.reset()
        for key, module in self.train_metrics_by_form.items():
            metric = cast(MulticlassJaccardIndex, module)
            if metric.update_count:
                who, form = key.split("_", 1)
                self.log(f"train_{who}_miou_{form}", metric.compute())
            metric.reset()
        supervised, right = self._pseudo_pixels
        if supervised > 0:  # one host read per epoch
            self.log("train_pseudo_precision", right / supervised)
        self._pseudo_pixels.zero_()
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
        # Images a dataset could not read come as all-void samples with the reason.
        reasons = batch.get("left_out") or []
        self._left_out += [reason for reason in reasons if reason]

    def _log_metrics(self, prefix: str, metrics: MetricCollection) -> None:
        values = metrics.compute()
        metrics.reset()
        left_out, self._left_out = self._left_out, []
        miou = values.pop(f"{prefix}_miou")
        self.log(f"{prefix}_miou", miou, prog_bar=True)
        self.log_dict(values)
        if self.trainer.sanity_checking:
            return
        ious = [float(values[f"{prefix}_iou_{name}"]) for name in self.class_names]
        mean = float(miou)
        self._ious = (prefix, self.current_epoch, ious, mean, left_out)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._start_time))
        print_line(
            f"epoch {self.current_epoch} step {self.global_step}: {prefix}_miou {mean:.4f} "
            f"(elapsed {elapsed})"
        )

    def _print_ious(self) -> None:
        """Print the per-class IoU of the last evaluation as a table.

        Raises:
            InputError: If the evaluation left images out (files it could not read), after the
                table, which says so: a metric over part of a split must not pass for the whole.
        """
        if self._ious is None:
            return
        prefix, epoch, ious, mean, left_out = self._ious
        missing = f", {len(left_out)} image(s) LEFT OUT" if left_out else ""
        title = f"Per-class IoU (%), {prefix}, epoch {epoch}{missing}:"
        print_line(format_iou_table(title, self.class_names, ious, mean))
        if left_out:
            shown = "\n  ".join(left_out[:5]) + ("\n  ..." if len(left_out) > 5 else "")
            raise InputError(
                f"{len(left_out)} image(s) of the {prefix} split could not be read and were left "
                f"out of its metrics, which cover the rest:\n  {shown}\nFix or remove them "
                "(`agmm check-data --config <your config>` lists every bad file)."
            )

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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """uint8 class-index predictions with the images' names."""
        prediction = self.predict_logits(batch["image"]).argmax(1).to(torch.uint8)
        return {"name": batch["name"], "prediction": prediction}


# OEM mode's options are documented once, in OEMOptions: the CLI's help reads them from here.
AGMMSegmenter.__doc__ = (AGMMSegmenter.__doc__ or "").replace(
    "        <OEMOptions>\n", OEMOptions.documentation() + "\n"
)
