"""The library's LightningCLI.

It takes the class count from the data, checks checkpoints, adds the default callbacks, and saves
each run's config in the run's own folder.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from agmm_lightning.callbacks import DEFAULT_CALLBACKS, run_directory, usable_callbacks
from agmm_lightning.cli.arguments import (
    CHECKPOINT_ALIASES,
    IMAGE_FOLDER,
    folder_shorthand,
    latest_checkpoint,
    model_overrides,
)
from agmm_lightning.cli.messages import AGMMArgumentParser
from agmm_lightning.data import AGMMDataModule

__all__ = ["CHECKPOINT_KEYS", "AGMMLightningCLI", "RunConfigSaver"]

# Hyper-parameters that fix the shapes of a checkpoint's weights and mixtures.
CHECKPOINT_KEYS = ("num_classes", "in_channels", "mixture_count", "embed_dim", "arch", "encoder")
# What the model takes from the data: linked at instantiation, checked against a checkpoint's.
DATA_LINKS = ("num_classes", "in_channels", "mean", "std")


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


class AGMMLightningCLI(LightningCLI):
    """LightningCLI that takes the class count from the data and checks what it is given.

    The model's ``num_classes``, ``in_channels``, ``mean`` and ``std`` are linked to the
    datamodule's (give them nowhere, or give the same values). A ``--ckpt_path`` must be a
    readable checkpoint of the configured kind of model (the keys of :data:`CHECKPOINT_KEYS`
    agree, and its normalisation), whose normalisation the data takes where it would compute or
    default its own; the configured model options are kept rather than
    replaced by the checkpoint's, so ``--model.test_flip=true`` at validate/test/predict works.
    Every run gets the :data:`~agmm_lightning.callbacks.DEFAULT_CALLBACKS`, listed by
    ``--print_config``, and ``predict`` keeps no predictions in memory
    (the prediction writer has written them).
    """

    data_links: tuple[str, ...] = DATA_LINKS
    """What the model takes from the data (:data:`DATA_LINKS`)."""

    def __init__(self, **kwargs: Any) -> None:
        """Any task and any DataModule of the library, by class path; ``kwargs`` as LightningCLI's.

        The optimizer is the task's own (its backbone group and poly schedule): LightningCLI's
        ``--optimizer`` and ``--lr_scheduler`` are not offered.
        """
        defaults: dict[str, Any] = {
            "model_class": LightningModule,
            "datamodule_class": AGMMDataModule,
            "subclass_mode_model": True,
            "subclass_mode_data": True,
            "auto_configure_optimizers": False,
            "parser_class": AGMMArgumentParser,
        }
        self._saved_hparams: dict[str, Any] = {}
        self._checkpoint_model: tuple[str, list[str]] | None = None
        super().__init__(**(defaults | kwargs))

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The parser, without abbreviated options (``--trainer.max_step`` is not max_steps)."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the model's class count and input to the data's; add the callbacks' options."""
        for key in self.data_links:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        for key, (cls, _, arguments) in DEFAULT_CALLBACKS.items():
            parser.add_lightning_class_args(cls, key)
            parser.set_defaults({f"{key}.{name}": value for name, value in arguments.items()})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check that a ``--ckpt_path`` file is a checkpoint this library reads.

        The parsed configuration is kept: LightningCLI next overwrites the model options with the
        checkpoint's, and :meth:`before_instantiate_classes` puts the configured ones back.
        """
        given = folder_shorthand(list(sys.argv[1:] if args is None else args))
        self._checkpoint_model = model_overrides(given)
        if self._checkpoint_model:  # no model configured: build the checkpoint's
            given.insert(1, f"--model={self._checkpoint_model[0]}")
        self.config = parser.parse_args(given)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "last":
            root = Path(self.config[subcommand].trainer.get("default_root_dir") or ".")
            found = latest_checkpoint(root)
            if found is None:
                self.parser.error(
                    f"--ckpt_path=last: no checkpoint of an earlier run under {root} (looked for "
                    "*/*/checkpoints/last.ckpt, checkpoints/last.ckpt and hpc_ckpt_*.ckpt); "
                    "leave --ckpt_path out to start afresh"
                )
            self.config[subcommand].ckpt_path = str(found)
        self._configured = self.config.clone()
        if subcommand:
            self._saved_hparams = self._read_checkpoint(self.config[subcommand].get("ckpt_path"))

    def _read_checkpoint(self, ckpt_path: str | None) -> dict[str, Any]:
        """The hyper-parameters of the checkpoint at ``ckpt_path``, or a parser error."""
        if not ckpt_path:
            return {}
        path = Path(ckpt_path)
        if not path.is_file():
            if ckpt_path in CHECKPOINT_ALIASES or ckpt_path.startswith("registry:"):
                return {}
            self.parser.error(f"--ckpt_path={ckpt_path}: file not found")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
            self.parser.error(
                f"--ckpt_path={ckpt_path}: not a checkpoint (torch.load cannot read it as a file "
                "of weights); give a .ckpt file written by `agmm fit`"
            )
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            self.parser.error(
                f"--ckpt_path={ckpt_path}: not a Lightning checkpoint (it holds no state_dict); "
                "give a .ckpt file written by `agmm fit`"
            )
        return dict(checkpoint.get("hyper_parameters") or {})

    def before_instantiate_classes(self) -> None:
        """Restore the configured options over those LightningCLI took from the checkpoint.

        Without a configured model (``predict --ckpt_path=… --data=…`` alone) the checkpoint's is
        built, and a plain folder of images (which has no class count of its own) gets the
        checkpoint's. Data whose ``in_channels``, ``mean`` or ``std`` is left to it (None or
        ``"auto"``) takes the checkpoint's: the images are read and normalised as in training.
        """
        if not self.subcommand:
            self.config = self._configured
            return
        configured, loaded = self._configured[self.subcommand], self.config[self.subcommand]
        if self._checkpoint_model:
            for key in self._checkpoint_model[1]:
                loaded.model.init_args[key] = configured.model.init_args[key]
            configured.model = loaded.model
        data = configured.get("data") or {}
        if data.get("class_path") == IMAGE_FOLDER and data["init_args"]["num_classes"] is None:
            data["init_args"]["num_classes"] = self._saved_hparams.get("num_classes")
        options, saved = data.get("init_args") or {}, self._saved_hparams
        if options.get("in_channels", 0) is None and "in_channels" in saved:
            options["in_channels"] = saved["in_channels"]
        # Another channel count than the checkpoint's is refused by _check_checkpoint.
        if options.get("in_channels", 3) == saved.get("in_channels", 3):
            for key in ("mean", "std"):
                if options.get(key, 0) in (None, "auto") and saved.get(key) is not None:
                    options[key] = tuple(saved[key])
        self.config = self._configured

    def instantiate_classes(self) -> None:
        """Build model and data (bad values become parser errors), then check them."""
        try:
            super().instantiate_classes()
        except ValueError as error:  # jsonargparse wraps the InputError of a class it builds
            self.parser.error(str(error))
        config = self.config[self.subcommand] if self.subcommand else self.config
        given = (config.get("model") or {}).get("init_args", {}).get("num_classes")
        data_classes = getattr(self.datamodule, "num_classes", None)
        if given is not None and data_classes is not None and given != data_classes:
            self.parser.error(
                f"--model.init_args.num_classes={given} but the data has {data_classes} "
                f"classes: leave model.num_classes out (the model takes the data's), or set "
                f"--model.init_args.num_classes={data_classes}"
            )
        if self.subcommand:
            self._check_checkpoint(config.get("ckpt_path"))

    def _check_checkpoint(self, ckpt_path: str | None) -> None:
        """Exit with a parser error if the checkpoint holds another kind of model."""
        saved = self._saved_hparams
        if not saved:
            return
        built = dict(self.model.hparams)
        differences = {
            key: (saved[key], built[key])
            for key in CHECKPOINT_KEYS
            if key in saved and key in built and saved[key] != built[key]
        }
        for key in ("mean", "std"):  # lists or tuples, as the checkpoint and the link give them
            old, new = saved.get(key), built.get(key)
            if old is not None and new is not None and list(old) != list(new):
                differences[key] = (list(old), list(new))
        model_class = f"{type(self.model).__module__}.{type(self.model).__qualname__}"
        saved_class = saved.get("_class_path")
        if saved_class and _class_name(saved_class) != _class_name(model_class):
            differences["class_path"] = (saved_class, model_class)
        if differences:
            found = ", ".join(f"{key}={old!r}" for key, (old, _) in differences.items())
            asked = ", ".join(f"{key}={new!r}" for key, (_, new) in differences.items())
            self.parser.error(
                f"--ckpt_path={ckpt_path} holds a model with {found}, but the config asks for "
                f"{asked}: resume with the checkpoint's values, or start a new run from its "
                f"encoder only with --model.init_args.encoder_weights={ckpt_path}"
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Build the Trainer with the configured callbacks and the defaults the run keeps.

        Which defaults it keeps: :func:`~agmm_lightning.callbacks.usable_callbacks`.

        Args:
            kwargs: Trainer arguments that override the config's.

        Returns:
            The Trainer.
        """
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = {**(config.get("trainer") or {}), **kwargs}
        configured = trainer_config.get("callbacks") or []
        configured = [configured] if isinstance(configured, Callback) else list(configured)
        defaults = [config[key] for key in DEFAULT_CALLBACKS]
        trainer_config["callbacks"] = usable_callbacks(defaults, configured, trainer_config)
        return self._instantiate_trainer(trainer_config, [])


def _class_name(class_path: str) -> str:
    """The class of a dotted path (the package re-exports the classes of its modules)."""
    return class_path.rpartition(".")[2]
