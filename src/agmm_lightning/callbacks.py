"""Callbacks: image panels and prediction PNGs, and the run folder they write to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from agmm_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from agmm_lightning.targets import posterior_labels

__all__ = [
    "PredictionWriter",
    "SegmentationPanels",
    "colorize",
    "palette_of",
    "print_line",
    "run_directory",
    "shared_run_directory",
]


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


def _denormalize(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    rgb = (image * std + mean).clamp(0, 1) * 255
    return rgb.permute(1, 2, 0).byte().cpu().numpy()


class SegmentationPanels(Callback):
    """Write image | weak label | GMM pseudo label | prediction | ground truth panels.

    Panels of the first training batch of every ``every_n_epochs``-th epoch go to
    ``<run directory>/panels/epoch_<n>.png`` (see :func:`run_directory`) and, when the logger is
    TensorBoard or W&B, to it too.

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
        num_classes = pl_module.hparams["num_classes"]
        count = min(self.max_images, batch["image"].shape[0])
        posterior = outputs.get("posterior")
        pseudo = None if posterior is None else posterior_labels(posterior[:count])
        maps = [batch["target"], pseudo, outputs["logits"][:count].argmax(1)]
        maps.append(batch.get("mask"))
        rows = []
        for i in range(count):
            columns = [_denormalize(batch["image"][i])]
            columns += [colorize(m[i].cpu().numpy(), num_classes) for m in maps if m is not None]
            rows.append(np.concatenate(columns, axis=1))
        self._write(trainer, np.concatenate(rows, axis=0))

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
    """Write each prediction as ``<name>.png``: class indices, coloured by a palette.

    A palette PNG (the VOC ground-truth format) holds the indices as its pixel values and shows
    them in colour: index C (unlabelled, in CAM pseudo labels) is grey, void white. Files go to
    ``output_dir``, or to the task's :meth:`~agmm_lightning.tasks.base.BaseTask.prediction_folder`.

    Args:
        output_dir: Folder of the predictions; None asks the task.
    """

    folder: Path

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix the folder once, the same on every rank."""
        default = pl_module.prediction_folder(trainer)  # type: ignore[operator]
        self.folder = Path(self.output_dir) if self.output_dir else default
        self.folder.mkdir(parents=True, exist_ok=True)

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
        for name, labels in zip(prediction["name"], prediction["prediction"], strict=True):
            image = Image.fromarray(labels.cpu().numpy())
            image.putpalette(palette.flatten().tolist())
            image.save(self.folder / f"{name}.png")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say where the predictions went."""
        print_line(f"Predictions written to {self.folder} (class-index palette PNGs)")
