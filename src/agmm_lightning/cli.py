"""The command line: ``agmm``, ``lightning`` and ``python -m agmm_lightning`` (LightningCLI).

Subcommands ``fit``, ``validate``, ``test`` and ``predict`` run the Trainer; ``check-data`` decodes
every file of the configured dataset and lists the ones that fail. Mistakes in what the user gave
(a key, a value, a file) end in one short message that names it, and a non-zero exit.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import re
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from agmm_lightning import __version__
from agmm_lightning.callbacks import DEFAULT_CALLBACKS, run_directory, usable_callbacks
from agmm_lightning.data import AGMMDataModule
from agmm_lightning.errors import InputError

__all__ = [
    "CHECKPOINT_KEYS",
    "AGMMArgumentParser",
    "AGMMLightningCLI",
    "RunConfigSaver",
    "check_data",
    "folder_shorthand",
    "model_overrides",
    "main",
]

# Hyper-parameters that fix the shapes of a checkpoint's weights and mixtures.
CHECKPOINT_KEYS = ("num_classes", "mixture_count", "embed_dim", "arch", "encoder")
# Values of --ckpt_path that Lightning resolves itself.
_CHECKPOINT_ALIASES = ("best", "last", "hpc", "registry")
# The datamodule of a plain folder of images given as --data=<folder>.
_IMAGE_FOLDER = "agmm_lightning.data.ImageFolderDataModule"
# Lines of jsonargparse's union-type errors that say nothing about the mistake.
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Parser key",
    "Problem with given class_path",
)


def concise_error(message: str) -> str:
    """Jsonargparse's nested error text, reduced to the key first and the reason after it.

    ``Parser key "model": Does not validate against any of the Union subtypes ... Option
    'mixture_cnt' is not accepted ... Given value: ...`` becomes ``--model.mixture_cnt: Option
    'mixture_cnt' is not accepted by agmm_lightning.AGMMSegmenter (did you mean mixture_count?)``.

    Args:
        message: The parser's message.

    Returns:
        The short message.
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    given = re.findall(r"Given value: (?:NestedArg\(key='[^']*', val=(.*)\)|(.*))", message)
    reasons = []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(_NOISE) and text not in reasons:
            reasons.append(text)
    if re.search(r"(?i)unrecognized arguments:.*--(optimizer|lr_scheduler)", message):
        return (
            f"{reasons[0]}: the optimizer and its schedule are the model's options "
            "(--model.init_args.optimizer=sgd|adamw, lr, weight_decay, poly_power)"
        )
    if not keys:
        return "; ".join(reasons) or message
    key = ".".join(keys + ([unknown.group(1)] if unknown else []))
    if unknown and classes:
        reason = f"no such option of {classes[-1]}"
        suggestion = difflib.get_close_matches(unknown.group(1), _init_arguments(classes[-1]), 1)
        reason += f" (did you mean {suggestion[0]}?)" if suggestion else ""
    else:
        reason = "; ".join(reasons) or "not a valid value"
        if given and "Got value" not in reason:
            reason += f", got {next(part for part in given[-1] if part)}"
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", reason).replace(" a int", " an int")
    return f"--{key}: {reason}"


def _init_arguments(class_path: str) -> list[str]:
    """The init argument names of a class given by its dotted path (none if it cannot load)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]


class AGMMArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors name the offending key first in one short message.

    ``predict`` defaults to ``return_predictions=False``: the prediction writer has written every
    prediction, and keeping them would hold every full-resolution map in memory.
    """

    def add_method_arguments(self, theclass: Any, themethod: str, *args: Any, **kwargs: Any) -> Any:
        """Add a method's arguments (a subcommand's); ``predict`` keeps no predictions."""
        added = super().add_method_arguments(theclass, themethod, *args, **kwargs)
        if themethod == "predict" and "return_predictions" in added:
            self.set_defaults(return_predictions=False)
        return added

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print the concise message and a pointer to ``--help``, then exit with status 2."""
        if not self.exit_on_error:
            super().error(message, ex)  # an inner parser: its caller reports
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {concise_error(message)}\n(`{prog} --help` lists every option)\n")
        sys.exit(2)


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

    The model's ``num_classes`` is linked to the datamodule's (give it nowhere, or give the same
    number). A ``--ckpt_path`` must be a readable checkpoint of the configured kind of model (the
    keys of :data:`CHECKPOINT_KEYS` agree); the configured model options are kept rather than
    replaced by the checkpoint's, so ``--model.test_flip=true`` at validate/test/predict works.
    Every run gets the :data:`~agmm_lightning.callbacks.DEFAULT_CALLBACKS`, listed by
    ``--print_config``, and ``predict`` keeps no predictions in memory
    (the prediction writer has written them).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", AGMMArgumentParser)
        self._saved_hparams: dict[str, Any] = {}
        self._checkpoint_model: tuple[str, list[str]] | None = None
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The parser, without abbreviated options (``--trainer.max_step`` is not max_steps)."""
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the model's class count to the data's; add the default callbacks' options."""
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )
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
            if ckpt_path in _CHECKPOINT_ALIASES or ckpt_path.startswith("registry:"):
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
        checkpoint's.
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
        if data.get("class_path") == _IMAGE_FOLDER and data["init_args"]["num_classes"] is None:
            data["init_args"]["num_classes"] = self._saved_hparams.get("num_classes")
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


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint a run under ``root`` (a ``default_root_dir``) left to resume from.

    Each fit writes to a run folder of its own (``<logger name>/version_<n>/checkpoints/``, or
    ``checkpoints/`` without a logger), and SLURM's requeue writes ``hpc_ckpt_<n>.ckpt`` in
    ``root``: the newest ``last.ckpt`` or ``hpc_ckpt`` file among them, or None.
    """
    patterns = ("*/*/checkpoints/last.ckpt", "checkpoints/last.ckpt", "hpc_ckpt_*.ckpt")
    found = [path for pattern in patterns for path in root.glob(pattern)]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def _class_name(class_path: str) -> str:
    """The class of a dotted path (the package re-exports the classes of its modules)."""
    return class_path.rpartition(".")[2]


class _DataOnlyCLI(AGMMLightningCLI):
    """Parses a full run configuration but builds only its datamodule (for ``check-data``)."""

    def instantiate_classes(self) -> None:
        """Instantiate the data alone: the model is not needed to check files."""
        config = self.config.clone()
        config.model = None
        try:
            self.datamodule = self.parser.instantiate_classes(config).get("data")
        except InputError as error:
            self.parser.error(str(error))


def check_data(args: list[str]) -> int:
    """``agmm check-data``: decode every file of the configured dataset, list those that fail.

    Args:
        args: The options after ``check-data``: the run's ``--config`` and any overrides.

    Returns:
        The exit status: 0 when every file decodes, 1 otherwise.
    """
    from agmm_lightning.data.checks import decode_all, read_headers
    from agmm_lightning.data.files import FileDataModule

    cli = _DataOnlyCLI(
        LightningModule,
        AGMMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        seed_everything_default=False,
        run=False,
        args=args,
        parser_kwargs={"prog": f"{_program()} check-data"},
    )
    data = cli.datamodule
    if not isinstance(data, FileDataModule):
        print(f"{type(data).__name__} makes its images: there are no files to check.")
        return 0
    problems, counts, seen = [], [], set()
    for split in ("train", "val", "test"):
        try:
            dataset = data.build_dataset(split)
        except InputError as error:
            problems.append(f"[{split}] {error}")
            continue
        images = tuple(record.image for record in dataset.records)
        if (dataset.mode, images) in seen:
            continue  # the test split is the validation split
        seen.add((dataset.mode, images))
        counts.append(f"{len(images)} {split}")
        found = read_headers(dataset, split, progress=False) + decode_all(dataset, split)
        problems += [f"[{split}] {problem}" for problem in dict.fromkeys(found)]
    checked = f"{', '.join(counts) or 'no'} images of {type(data).__name__} at {data.root}"
    if not problems:
        print(f"Checked {checked}: every file decodes.")
        return 0
    print(f"Checked {checked}: {len(problems)} problem(s).", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def folder_shorthand(args: list[str]) -> list[str]:
    """``--data=<folder>`` (or ``--data <folder>``) means an :class:`ImageFolderDataModule` on it.

    Any other ``--data`` value (a class name or a config file) passes unchanged.

    Args:
        args: The command-line arguments.

    Returns:
        The arguments with a folder given to ``--data`` spelt out as the datamodule's options.

    Raises:
        InputError: For a ``--data`` path that is neither a folder nor a config file.
    """
    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        value = None
        if arg.startswith("--data="):
            value = arg.removeprefix("--data=")
        elif arg == "--data" and index + 1 < len(args):
            value, index = args[index + 1], index + 1
        if value is not None and Path(value).is_dir():
            out += [f"--data={_IMAGE_FOLDER}", f"--data.root={value}"]
        elif value is not None:
            _check_data_path(value)
            out += [f"--data={value}"]
        else:
            out.append(arg)
        index += 1
    return out


def _check_config_files(args: list[str]) -> None:
    """Refuse a ``--config`` (``-c``) file that does not exist, naming it."""
    for index, arg in enumerate(args):
        value = None
        if arg.startswith("--config="):
            value = arg.removeprefix("--config=")
        elif arg in ("--config", "-c") and index + 1 < len(args):
            value = args[index + 1]
        if value and not Path(value).expanduser().is_file():
            raise InputError(f"--config={value}: file not found")


def _check_data_path(value: str) -> None:
    """Refuse a ``--data`` path that is neither a folder of images nor a config file."""
    path = Path(value).expanduser()
    if path.is_file() and path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise InputError(
            f"--data={value}: a file, not a folder of images or a data config (.yaml); give the "
            "folder that holds the images"
        )
    if not path.exists() and ("/" in value or value.startswith((".", "~"))):
        raise InputError(f"--data={value}: no such folder")


def model_overrides(args: list[str]) -> tuple[str, list[str]] | None:
    """For a run that configures no model but names a checkpoint: its model and the options given.

    ``agmm predict --ckpt_path=model.ckpt --data=photos/ --model.init_args.tile_size=512`` builds
    the checkpoint's model with ``tile_size`` changed.

    Args:
        args: The command-line arguments.

    Returns:
        None when ``--config`` or ``--model=<class>`` is given or no checkpoint file is named;
        else the checkpoint's model class and the names of the ``--model`` options given.
    """
    options = dict(arg.removeprefix("--").split("=", 1) for arg in args if "=" in arg)
    path = options.get("ckpt_path")
    if path is None and "--ckpt_path" in args[:-1]:
        path = args[args.index("--ckpt_path") + 1]
    configured = any(arg in ("-c", "--config", "--model") for arg in args) or "model" in options
    if configured or not path or path in _CHECKPOINT_ALIASES or path.startswith("registry:"):
        return None
    if not Path(path).is_file():
        raise InputError(f"--ckpt_path={path}: file not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        class_path = saved["hyper_parameters"]["_class_path"]
    except Exception:  # noqa: BLE001 - not a checkpoint of ours: _read_checkpoint says so
        return None
    given = [arg.removeprefix("--model.") for arg in args if arg.startswith("--model.")]
    return class_path, [key.split("=", 1)[0].removeprefix("init_args.") for key in given]


def _program() -> str:
    """The command's name in messages: ``lightning`` when run as that, else ``agmm``."""
    return "lightning" if Path(sys.argv[0]).name == "lightning" else "agmm"


def _user_message(error: InputError) -> str:
    """The error's own message, without what a DataLoader worker wraps around it."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return text


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``fit``, ``validate``, ``test``, ``predict`` or ``check-data``).

    Args:
        args: Arguments instead of ``sys.argv[1:]`` (for tests).
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        given = folder_shorthand(sys.argv[1:] if args is None else list(args))
        _check_config_files(given)
        if given[:1] == ["check-data"]:
            sys.exit(check_data(given[1:]))
        AGMMLightningCLI(
            LightningModule,
            AGMMDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"save_to_log_dir": False},
            args=given,
            parser_kwargs={"prog": _program(), "version": __version__},
            # One optimizer path: the task's own (its backbone group and poly schedule).
            auto_configure_optimizers=False,
        )
    except InputError as error:
        sys.stderr.write(f"error: {_user_message(error)}\n")
        sys.exit(1)
    except SIGTERMException:
        sys.stderr.write(
            "stopped by SIGTERM; the state of the interrupted step is in the run's last.ckpt: "
            "rerun the same command with --ckpt_path=last to resume\n"
        )
        sys.exit(128 + signal.SIGTERM)
