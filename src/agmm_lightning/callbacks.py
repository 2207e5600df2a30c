"""Callbacks: image panels, prediction PNGs, the latest and best checkpoints, the run folder.

:data:`DEFAULT_CALLBACKS` are those every command-line run gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    BasePredictionWriter,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from matplotlib.figure import Figure
from PIL import Image

from agmm_lightning.data.pixels import IMAGENET_MEAN, IMAGENET_STD, Normalization
from agmm_lightning.errors import InputError
from agmm_lightning.panels import draw_panel, render
from agmm_lightning.targets import posterior_labels, upsample_posterior

__all__ = [
    "DEFAULT_CALLBACKS",
    "BestCheckpoint",
    "LatestCheckpoint",
    "PredictionWriter",
    "SegmentationPanels",
    "colorize",
    "default_callbacks",
    "palette_of",
    "print_line",
    "run_directory",
    "shared_run_directory",
    "usable_callbacks",
]


class LatestCheckpoint(ModelCheckpoint):
    """``last.ckpt``: the latest state, whatever the validation interval, so nothing is lost.

    Written after every training epoch, at the end of fit (a ``max_steps`` budget may end one
    mid-epoch) and when fit is interrupted: by SIGTERM (a cluster's preemption or time limit;
    Lightning stops every rank at the same step), or by Ctrl+C or an error in a single-process
    run. ``--ckpt_path=last`` resumes from it.

    Args:
        dirpath: The folder; by default the run folder's ``checkpoints/``, as ModelCheckpoint's.
    """

    def __init__(self, dirpath: str | Path | None = None) -> None:
        super().__init__(
            dirpath, filename="last", enable_version_counter=False, save_on_train_epoch_end=True
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save the final state unless the last epoch's checkpoint already holds it."""
        self._save_latest(trainer)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Save the state of the interrupted step (every rank reaches here on SIGTERM)."""
        alone = trainer.world_size == 1
        if trainer.state.fn == "fit" and (isinstance(exception, SIGTERMException) or alone):
            self._save_latest(trainer)

    def _save_latest(self, trainer: Trainer) -> None:
        if self.dirpath is None or self._last_global_step_saved == trainer.global_step:
            return
        trainer.save_checkpoint(self.format_checkpoint_name({}))
        self._last_global_step_saved = trainer.global_step


class BestCheckpoint(ModelCheckpoint):
    """``best-epoch=<n>-<metric>=<value>.ckpt``: the checkpoint of the best validation score.

    The score is the task's :attr:`~agmm_lightning.tasks.base.BaseTask.selection_metric`
    (``val_miou`` for :class:`~agmm_lightning.AGMMSegmenter`); a task without one (the CAM
    classifier) keeps no best checkpoint.

    Args:
        dirpath: The folder; by default the run folder's ``checkpoints/``, as ModelCheckpoint's.
    """

    def __init__(self, dirpath: str | Path | None = None) -> None:
        super().__init__(dirpath, mode="max")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Monitor the task's selection metric."""
        metric = getattr(pl_module, "selection_metric", None)
        self.monitor = metric
        self.save_top_k = 1 if metric else 0
        self.filename = f"best-{{epoch}}-{{{metric}:.4f}}"
        super().setup(trainer, pl_module, stage)


@rank_zero_only
def print_line(text: str) -> None:
    """Print on rank 0 to stdout, flushed: what a cluster job's redirected log shows at once."""
    print(text, flush=True)


def run_directory(trainer: Trainer) -> Path:
    """The folder of this run's files: the one Lightning's ModelCheckpoint puts ``checkpoints/`` in.

    That is ``<save_dir>/<name>/<version>`` of the first logger (TensorBoard and CSV: their
    ``log_dir``; W&B: ``<save_dir>/<project>/<run id>``), or ``default_root_dir`` without one.
    Unlike ``trainer.log_dir`` it makes no collective call, so rank 0 may call it alone, and it
    differs between W&B runs (whose ``trainer.log_dir`` is the shared ``save_dir``).

    Args:
        trainer: The trainer of the run.

    Returns:
        The run's folder (not created here).
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def shared_run_directory(trainer: Trainer) -> Path:
    """:func:`run_directory` as rank 0 sees it, on every rank (a collective: all must call it).

    A logger on another rank may number its version on its own; writers shared by all ranks
    take rank 0's folder.
    """
    return Path(trainer.strategy.broadcast(str(run_directory(trainer))))


def _voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map: class bits spread over the high bits of R, G and B."""
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


_PALETTE = _voc_palette()


def palette_of(num_classes: int) -> np.ndarray:
    """uint8 [256, 3] colours of class indices: the VOC palette, C (unlabelled) grey, void white."""
    palette = _PALETTE.copy()
    palette[num_classes] = (96, 96, 96)
    palette[255] = 255
    return palette


def colorize(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """RGB image of a class-index map in :func:`palette_of` colours."""
    return palette_of(num_classes)[labels]


def _denormalize(image: torch.Tensor, normalization: Normalization | None) -> np.ndarray:
    """uint8 RGB [H,W,3] of a normalised image: the first three channels, or the first as grey."""
    mean_values, std_values = normalization or (IMAGENET_MEAN, IMAGENET_STD)
    mean = torch.tensor(mean_values, device=image.device)[:, None, None]
    std = torch.tensor(std_values, device=image.device)[:, None, None]
    pixels = (image * std + mean).clamp(0, 1) * 255
    rgb = pixels[:3] if pixels.shape[0] >= 3 else pixels[:1].expand(3, -1, -1)
    return rgb.permute(1, 2, 0).byte().cpu().numpy()


class SegmentationPanels(Callback):
    """Write image | weak label | pseudo label | prediction | ground truth panels.

    Panels of the first training batch of every ``every_n_epochs``-th epoch, drawn by
    :func:`~agmm_lightning.panels.draw_panel` with titled columns, a legend of the class names,
    and the epoch and last val mIoU in the title, go to
    ``<run directory>/panels/epoch_<n>.png`` (see :func:`run_directory`) and, when the logger is
    TensorBoard or W&B, to it too: the same picture everywhere.

    Args:
        every_n_epochs: Epoch interval.
        max_images: Images per panel.
    """

    def __init__(self, every_n_epochs: int = 1, max_images: int = 4) -> None:
        self.every_n_epochs = every_n_epochs
        self.max_images = max_images

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Draw the panel of the epoch's first batch."""
        first_batch = batch_idx == 0 and trainer.current_epoch % self.every_n_epochs == 0
        if not (first_batch and trainer.is_global_zero):
            return
        if not isinstance(outputs, dict) or "logits" not in outputs:
            return
        figure = self.figure(trainer, pl_module, outputs, batch)
        self._write(trainer, render(figure))

    def figure(
        self, trainer: Trainer, pl_module: LightningModule, outputs: dict[str, Any], batch: Any
    ) -> Figure:
        """The panel of a training batch and the step's outputs."""
        hp = pl_module.hparams
        num_classes = hp["num_classes"]
        count = min(self.max_images, batch["image"].shape[0])

        def numpy(labels: torch.Tensor) -> list[np.ndarray]:
            return list(labels[:count].cpu().numpy())

        posterior = outputs.get("posterior")
        pseudo: list[np.ndarray | None] = [None] * count
        if posterior is not None:
            size = batch["target"].shape[-2:]
            posterior = upsample_posterior(posterior, size, batch.get("allowed"))[:count]
            fitted = (posterior.flatten(1).sum(1) > 0).tolist()
            labels = numpy(posterior_labels(posterior))
            pseudo = [lab if ok else None for lab, ok in zip(labels, fitted, strict=True)]
        maps: dict[str, list[np.ndarray | None]] = {
            "weak label": list(numpy(batch["target"])),
            "pseudo label": pseudo,
            "prediction": list(numpy(outputs["logits"].argmax(1))),
        }
        if batch.get("mask") is not None:
            maps["ground truth"] = list(numpy(batch["mask"]))
        method = hp.get("method")
        missing = (
            "no pseudo labels yet:\nmixtures not fitted"
            if method == "agmm"
            else f"no pseudo labels:\nmethod={method}"
        )
        names = list(getattr(pl_module, "class_names", None) or [])
        if len(names) != num_classes:
            names = [f"class_{i}" for i in range(num_classes)]
        normalization = getattr(pl_module, "normalization", None)
        miou = trainer.callback_metrics.get("val_miou")
        score = "not validated yet" if miou is None else f"{100 * float(miou):.1f}%"
        return draw_panel(
            [_denormalize(image, normalization) for image in batch["image"][:count]],
            maps,
            palette_of(num_classes),
            names,
            title=f"epoch {trainer.current_epoch}, step {trainer.global_step}: val mIoU {score}",
            missing=missing,
            row_names=batch["form"][:count] if "form" in batch else None,
        )

    def _write(self, trainer: Trainer, panel: np.ndarray) -> None:
        # Rank 0 alone gets here: trainer.log_dir would broadcast and hang the other ranks.
        path = run_directory(trainer) / "panels" / f"epoch_{trainer.current_epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(panel).save(path)
        for logger in trainer.loggers:
            experiment: Any = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("panels", panel, trainer.global_step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # W&B
                logger.log_image("panels", [panel], step=trainer.global_step)


class PredictionWriter(BasePredictionWriter):
    """Write each prediction as class indices, in colour, and list what was written.

    ``<name>.png`` is a palette PNG (the VOC ground-truth format): its pixel values are the class
    indices and viewers show them in colour (index C, unlabelled in CAM pseudo labels, grey; void
    white); ``color/<name>.png`` is the same map as plain RGB, for tools that ignore palettes.
    ``predictions.csv`` lists ``name,index_png,color_png`` per image (one list per rank under
    DDP: ``predictions_rank<r>.csv``). A name with folders (an image in a sub-folder) keeps them.
    Images a dataset could not read (``unreadable`` in the batch) are skipped, and listed at the
    end in an error, after everything else is written.
    Files go to ``output_dir``, or to the task's
    :meth:`~agmm_lightning.tasks.base.BaseTask.prediction_folder`.

    Args:
        output_dir: Folder of the predictions; None asks the task.
    """

    folder: Path

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.written: list[str] = []
        self.skipped: list[str] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix the folder once, the same on every rank."""
        default = pl_module.prediction_folder(trainer)  # type: ignore[operator]
        self.folder = Path(self.output_dir) if self.output_dir else default
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written, self.skipped = [], []

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Save the batch's predictions."""
        palette = palette_of(pl_module.hparams["num_classes"])
        unreadable = batch.get("unreadable") or [""] * len(prediction["name"])
        for name, labels, reason in zip(
            prediction["name"], prediction["prediction"], unreadable, strict=True
        ):
            if reason:
                self.skipped.append(reason)
                continue
            indices = labels.cpu().numpy()
            index_file, color_file = f"{name}.png", f"color/{name}.png"
            for file in (index_file, color_file):
                (self.folder / file).parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(indices)
            image.putpalette(palette.flatten().tolist())
            image.save(self.folder / index_file)
            Image.fromarray(palette[indices]).save(self.folder / color_file)
            self.written.append(f"{name},{index_file},{color_file}")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the list and say where the predictions went."""
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        listing = self.folder / f"predictions{suffix}.csv"
        listing.write_text("\n".join(["name,index_png,color_png", *self.written]) + "\n")
        print_line(
            f"Predictions of {len(self.written)} images written to {self.folder} (class-index "
            f"palette PNGs, color/ RGB PNGs, listed in {listing.name})"
        )
        if self.skipped:
            shown = "\n  ".join(self.skipped[:10])
            more = f"\n  ... and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            raise InputError(
                f"{len(self.skipped)} image(s) could not be read and were skipped:\n  {shown}{more}"
            )


DEFAULT_CALLBACKS: dict[str, tuple[type[Callback], type[Callback], dict[str, Any]]] = {
    "progress_bar": (RichProgressBar, ProgressBar, {}),
    "last_checkpoint": (LatestCheckpoint, LatestCheckpoint, {}),
    "best_checkpoint": (BestCheckpoint, BestCheckpoint, {}),
    "lr_monitor": (LearningRateMonitor, LearningRateMonitor, {"logging_interval": "step"}),
    "panels": (SegmentationPanels, SegmentationPanels, {}),
    "prediction_writer": (PredictionWriter, PredictionWriter, {}),
}
"""The callbacks every run gets: config key -> (class, the kind a configured callback replaces
it by, its default arguments). The command line lists them in ``--print_config`` under these
keys."""


def usable_callbacks(
    defaults: Sequence[Callback], configured: Sequence[Callback], trainer_options: Mapping[str, Any]
) -> list[Callback]:
    """The configured callbacks, then the defaults the run keeps.

    A default is left out when a configured callback is of its kind (that one replaces it), or
    when the Trainer's options switch it off: ``enable_progress_bar=false``,
    ``enable_checkpointing=false``, or no logger (``logger=false``) for the learning-rate monitor.

    Args:
        defaults: Instances of :data:`DEFAULT_CALLBACKS`.
        configured: The callbacks given in ``trainer.callbacks``.
        trainer_options: The Trainer's arguments.

    Returns:
        The callbacks of the run.
    """
    kinds = {cls: kind for cls, kind, _ in DEFAULT_CALLBACKS.values()}
    switched_off = {
        ProgressBar: trainer_options.get("enable_progress_bar") is False,
        ModelCheckpoint: trainer_options.get("enable_checkpointing") is False,
        # Trainer(logger=None) means the default logger; only False or [] mean none.
        LearningRateMonitor: trainer_options.get("logger") in (False, []),
    }

    def kept(callback: Callback) -> bool:
        kind = kinds.get(type(callback), type(callback))
        replaced = any(isinstance(other, kind) for other in configured)
        off = any(isinstance(callback, cls) and off for cls, off in switched_off.items())
        return not (replaced or off)

    return [*configured, *(callback for callback in defaults if kept(callback))]


def default_callbacks(
    trainer_options: Mapping[str, Any] | None = None, configured: Sequence[Callback] = ()
) -> list[Callback]:
    """The command line's callbacks for a Trainer built in Python.

    Args:
        trainer_options: The Trainer's arguments (they may switch defaults off).
        configured: Callbacks of your own; one of a default's kind replaces it.

    Returns:
        ``configured`` and the :data:`DEFAULT_CALLBACKS` that the run keeps.
    """
    defaults = [cls(**arguments) for cls, _, arguments in DEFAULT_CALLBACKS.values()]
    return usable_callbacks(defaults, configured, trainer_options or {})
