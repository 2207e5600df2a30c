"""The command line: ``agmm``, ``lightning`` and ``python -m agmm_lightning`` (LightningCLI)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
)
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from agmm_lightning.callbacks import run_directory
from agmm_lightning.data import AGMMDataModule
from agmm_lightning.module import AGMMSegmenter

__all__ = ["CHECKPOINT_KEYS", "AGMMLightningCLI", "RunConfigSaver", "long_run_callbacks", "main"]

# Hyper-parameters that fix the shapes of a checkpoint's weights and mixtures.
CHECKPOINT_KEYS = ("num_classes", "mixture_count", "embed_dim", "arch", "encoder")


class RunConfigSaver(SaveConfigCallback):
    """Save the run's config in the run's own directory, beside its ``checkpoints/``.

    The directory is :func:`~agmm_lightning.callbacks.run_directory`, the one that holds
    Lightning's default ``checkpoints/``: the TensorBoard/CSV version folder,
    ``<save_dir>/<project>/<run id>`` under W&B (whose ``trainer.log_dir`` all runs share), or
    ``default_root_dir`` without a logger. A name an earlier run took is never overwritten.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write ``config.yaml``, or ``config_<n>.yaml`` when an earlier run took the name.

        Lightning calls this on rank 0 alone, so it makes no collective call.

        Args:
            trainer: The trainer of the run.
            pl_module: The module (unused).
            stage: The stage (unused).
        """
        folder = run_directory(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path, count = folder / "config.yaml", 1
        while path.exists():
            path, count = folder / f"config_{count}.yaml", count + 1
        self.parser.save(self.config, str(path), skip_none=False, multifile=self.multifile)


def long_run_callbacks(
    trainer_config: Mapping[str, Any], configured: list[Callback], model: LightningModule
) -> list[Callback]:
    """The callbacks every CLI run gets, unless its config switches them off or has its own.

    A rich progress bar (off with ``enable_progress_bar=false``); best and last checkpoints
    (``best-epoch=…-val_miou=….ckpt`` by ``val_miou`` for an :class:`AGMMSegmenter`, and
    ``last.ckpt``; off with ``enable_checkpointing=false``); and a learning-rate monitor when the
    run has a logger (``logger=false`` would make it fail).

    Args:
        trainer_config: The Trainer's arguments.
        configured: The callbacks the config gives; a callback of the same kind replaces ours.
        model: The model (it decides what the checkpoints monitor).

    Returns:
        The callbacks to add.
    """

    def wanted(kind: type[Callback], enabled: bool) -> bool:
        return enabled and not any(isinstance(callback, kind) for callback in configured)

    callbacks: list[Callback] = []
    if wanted(ProgressBar, trainer_config.get("enable_progress_bar") is not False):
        callbacks.append(RichProgressBar())
    if wanted(ModelCheckpoint, trainer_config.get("enable_checkpointing") is not False):
        monitored = isinstance(model, AGMMSegmenter)
        callbacks.append(
            ModelCheckpoint(
                filename="best-{epoch}-{val_miou:.4f}" if monitored else None,
                monitor="val_miou" if monitored else None,
                mode="max",
                save_last=True,
            )
        )
    # Trainer(logger=None) means the default logger; only False or [] mean none.
    if wanted(LearningRateMonitor, trainer_config.get("logger") not in (False, [])):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


class AGMMLightningCLI(LightningCLI):
    """LightningCLI whose configuration errors end in a message, not a traceback.

    It also refuses a ``--ckpt_path`` whose model differs from the configured one in a key of
    :data:`CHECKPOINT_KEYS`, and adds :func:`long_run_callbacks` to every run.
    """

    def _parse_ckpt_path(self) -> None:
        """Keep the configured model arguments when a checkpoint is given.

        LightningCLI would overwrite them with the checkpoint's hyper-parameters, so options such
        as ``--model.test_flip=true`` or ``--model.tile_size=512`` at validate/test/predict were
        silently ignored. The keys that decide the checkpoint's shapes are checked instead.
        """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse the arguments, then check ``--ckpt_path`` against the configured model.

        Args:
            parser: The parser.
            args: The arguments (None: ``sys.argv``).
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._check_checkpoint(self.config[subcommand])

    def _check_checkpoint(self, config: Any) -> None:
        """Exit with a parser error if ``config.ckpt_path`` holds another kind of model."""
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # None, or "last"/"best"/"hpc", which Lightning resolves itself
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            self.parser.error(f"--ckpt_path={ckpt_path} is not a readable checkpoint: {error}")
        saved = checkpoint.get("hyper_parameters", {})
        model = config.get("model")
        if model is None:
            return
        init_args = model.get("init_args") or {}
        differences = {
            key: (saved[key], init_args[key])
            for key in CHECKPOINT_KEYS
            if key in saved and key in init_args and saved[key] != init_args[key]
        }
        saved_class = saved.get("_class_path")
        if saved_class and saved_class != model.get("class_path"):
            differences["class_path"] = (saved_class, model.get("class_path"))
        if differences:
            found = ", ".join(f"{key}={old!r}" for key, (old, _) in differences.items())
            asked = ", ".join(f"{key}={new!r}" for key, (_, new) in differences.items())
            self.parser.error(
                f"--ckpt_path={ckpt_path} holds a model with {found}, but the config asks for "
                f"{asked}: resume with the checkpoint's values, or start a new run from its "
                f"encoder only with --model.init_args.encoder_weights={ckpt_path}"
            )

    def instantiate_classes(self) -> None:
        """Build model and data, turning bad values into parser errors."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            self.parser.error(str(error))
        model_classes = self.model.hparams.get("num_classes")
        data_classes = getattr(self.datamodule, "num_classes", model_classes)
        if model_classes != data_classes:
            self.parser.error(
                f"model.init_args.num_classes={model_classes} but the data has {data_classes} "
                f"classes: set --model.init_args.num_classes={data_classes}"
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer with :func:`long_run_callbacks` after the configured callbacks.

        Args:
            kwargs: Trainer arguments that override the config's.

        Returns:
            The Trainer.
        """
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**(config.get("trainer") or {}), **kwargs}
        configured = trainer_config.get("callbacks") or []
        configured = [configured] if isinstance(configured, Callback) else list(configured)
        callbacks = configured + long_run_callbacks(trainer_config, configured, self.model)
        return super().instantiate_trainer(**{**kwargs, "callbacks": callbacks})


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``fit``, ``validate``, ``test`` or ``predict``).

    Args:
        args: Arguments instead of ``sys.argv[1:]`` (for tests).
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    AGMMLightningCLI(
        LightningModule,
        AGMMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"save_to_log_dir": False},
        args=args,
    )
