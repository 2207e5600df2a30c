"""What the Lightning tasks share: the optimizer, the poly schedule, and steps that cannot go wrong.

A task saves its init arguments as hyper-parameters (the checkpoint's source of truth), builds its
pure-torch model, and names its parameter groups; this base does the rest.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn

from agmm_lightning.callbacks import shared_run_directory
from agmm_lightning.data.pixels import Normalization, default_normalization
from agmm_lightning.errors import InputError, check_choice, check_non_negative

__all__ = ["BaseTask", "OptimizerOptions"]


@dataclass(frozen=True)
class OptimizerOptions:
    """The optimizer and its schedule, with the defaults every task's init arguments take.

    Each task documents the options among its init arguments.

    Attributes:
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``.
        lr: The base learning rate (a task scales it for one of its parameter groups).
        weight_decay: Weight decay.
        poly_power: Exponent of the per-step poly schedule; 0 keeps the rate constant.

    Raises:
        InputError: For an unknown optimizer or a value below 0 (a rate of 0 freezes weights).
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    weight_decay: float = 1e-4
    poly_power: float = 0.9

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
        check_non_negative(lr=self.lr, weight_decay=self.weight_decay, poly_power=self.poly_power)


class BaseTask(LightningModule):
    """Base of the tasks: SGD or AdamW over two parameter groups, a per-step poly schedule.

    Subclasses pass their :class:`OptimizerOptions` and implement :meth:`parameter_groups`. Their
    hyper-parameters ``in_channels``, ``mean`` and ``std`` say what images the network takes
    (:attr:`normalization`); :meth:`setup` checks them against the datamodule's.

    A step whose loss or gradients are NaN or inf would write NaN into every weight: its
    gradients are dropped instead (the same on every rank, since DDP has already summed them),
    BatchNorm statistics it made non-finite restart, and the run goes on; :attr:`skipped_steps`
    counts such steps. Under ``16-mixed`` the gradient scaler skips them itself.
    """

    prediction_subfolder = "predictions"
    """Folder of the run directory that ``predict`` writes to (see :meth:`prediction_folder`)."""

    selection_metric: str | None = None
    """The validation metric (higher is better) that picks the best checkpoint, if any."""

    def __init__(self, optimization: OptimizerOptions) -> None:
        super().__init__()
        self.optimization = optimization
        self.skipped_steps = 0

    @abstractmethod
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, each with its ``params`` and ``lr``."""

    @property
    def normalization(self) -> Normalization | None:
        """Per-channel ``(mean, std)`` of the 0..1 pixels the network was trained on.

        The ``mean`` and ``std`` hyper-parameters (the data's, linked by the CLI or taken at
        ``fit``); ImageNet's for three channels when not given; None when unknown.
        """
        hp = self.hparams
        default = default_normalization(hp.get("in_channels", 3))
        mean = hp.get("mean") or (default[0] if default else None)
        std = hp.get("std") or (default[1] if default else None)
        if mean is None or std is None:
            return None
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def setup(self, stage: str) -> None:
        """Check the network's input against the datamodule's images.

        The channels must agree. So must the normalisation, except that a model trained
        without one given (``mean``/``std`` None) takes the data's at ``fit``, so that its
        checkpoints normalise as its training did.

        Raises:
            InputError: Naming both values and the fix.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        channels = getattr(datamodule, "in_channels", None)
        if channels is not None and channels != self.hparams.get("in_channels", 3):
            raise InputError(
                f"model.in_channels={self.hparams.get('in_channels', 3)} but the data has "
                f"in_channels={channels}: leave model.in_channels out (the CLI takes the data's), "
                f"or set it to {channels}"
            )
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is None or std is None:
            return
        data = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        mine = self.normalization
        if data == mine:
            return
        if stage == "fit" and self.hparams.get("mean") is None and self.hparams.get("std") is None:
            self.hparams["mean"], self.hparams["std"] = data
            return
        given = "none" if mine is None else f"mean={list(mine[0])} and std={list(mine[1])}"
        raise InputError(
            f"The model normalises its input with {given}, but the data with mean="
            f"{list(data[0])} and std={list(data[1])}: give the data the model's `mean` and "
            "`std` (the CLI does, from a checkpoint), or train a new model."
        )

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """SGD (momentum 0.9) or AdamW, and a poly schedule stepped after every optimizer step."""
        options = self.optimization
        groups = self.parameter_groups()
        optimizer: torch.optim.Optimizer
        if options.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=options.lr, weight_decay=options.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.PolynomialLR(
            optimizer, total_iters=total, power=options.poly_power
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip the step if its gradients are not finite (see the class docstring)."""
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
        # The batch's forward has already fed BatchNorm its statistics: restart any it spoilt.
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

    def prediction_folder(self, trainer: Trainer) -> Path:
        """Where ``predict`` writes: :attr:`prediction_subfolder` of rank 0's run directory.

        A collective call: every rank must make it.
        """
        return shared_run_directory(trainer) / self.prediction_subfolder
