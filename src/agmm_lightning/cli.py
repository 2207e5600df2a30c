"""The command line: ``agmm``, ``lightning`` and ``python -m agmm_lightning`` (LightningCLI)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from agmm_lightning.data import AGMMDataModule

__all__ = ["AGMMLightningCLI", "main"]


class RunConfigSaver(SaveConfigCallback):
    """Save the run's config in its log directory without ever overwriting another run's."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write ``config.yaml``, or ``config_<n>.yaml`` when an earlier run took the name."""
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path, count = folder / "config.yaml", 1
        while path.exists():
            path, count = folder / f"config_{count}.yaml", count + 1
        self.parser.save(self.config, str(path), skip_none=False, multifile=self.multifile)


class AGMMLightningCLI(LightningCLI):
    """LightningCLI whose configuration errors end in a message, not a traceback."""

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
