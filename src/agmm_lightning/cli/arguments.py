"""The command line's arguments before parsing.

A folder given as ``--data``, a checkpoint without a config, ``--ckpt_path=last``, and files that
are not there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from agmm_lightning.errors import InputError

__all__ = [
    "CHECKPOINT_ALIASES",
    "check_config_files",
    "folder_shorthand",
    "latest_checkpoint",
    "model_overrides",
]

# Values of --ckpt_path that Lightning resolves itself.
CHECKPOINT_ALIASES = ("best", "last", "hpc", "registry")
# The datamodule of a plain folder of images given as --data=<folder>.
IMAGE_FOLDER = "agmm_lightning.data.ImageFolderDataModule"


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
            out += [f"--data={IMAGE_FOLDER}", f"--data.root={value}"]
        elif value is not None:
            _check_data_path(value)
            out += [f"--data={value}"]
        else:
            out.append(arg)
        index += 1
    return out


def check_config_files(args: list[str]) -> None:
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
    if configured or not path or path in CHECKPOINT_ALIASES or path.startswith("registry:"):
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


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint a run under ``root`` (a ``default_root_dir``) left to resume from.

    Each fit writes to a run folder of its own (``<logger name>/version_<n>/checkpoints/``, or
    ``checkpoints/`` without a logger), and SLURM's requeue writes ``hpc_ckpt_<n>.ckpt`` in
    ``root``: the newest ``last.ckpt`` or ``hpc_ckpt`` file among them, or None.
    """
    patterns = ("*/*/checkpoints/last.ckpt", "checkpoints/last.ckpt", "hpc_ckpt_*.ckpt")
    found = [path for pattern in patterns for path in root.glob(pattern)]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)
