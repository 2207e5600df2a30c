"""The command line: ``agmm``, ``lightning`` and ``python -m agmm_lightning`` (LightningCLI).

Subcommands ``fit``, ``validate``, ``test`` and ``predict`` run the Trainer; ``check-data`` decodes
every file of the configured dataset and lists the ones that fail. Mistakes in what the user gave
(a key, a value, a file) end in one short message that names it, and a non-zero exit.
"""

from __future__ import annotations

import os
import signal
import sys

from lightning.pytorch.utilities.exceptions import SIGTERMException

from agmm_lightning import __version__
from agmm_lightning.cli.app import CHECKPOINT_KEYS, AGMMLightningCLI, RunConfigSaver
from agmm_lightning.cli.arguments import (
    check_config_files,
    folder_shorthand,
    latest_checkpoint,
    model_overrides,
)
from agmm_lightning.cli.check_data import check_data
from agmm_lightning.cli.messages import (
    AGMMArgumentParser,
    concise_error,
    program,
    user_message,
)
from agmm_lightning.errors import InputError

__all__ = [
    "CHECKPOINT_KEYS",
    "AGMMArgumentParser",
    "AGMMLightningCLI",
    "RunConfigSaver",
    "check_data",
    "concise_error",
    "folder_shorthand",
    "latest_checkpoint",
    "main",
    "model_overrides",
]


def main(args: list[str] | None = None) -> None:
    """Run the CLI (``fit``, ``validate``, ``test``, ``predict`` or ``check-data``).

    Args:
        args: Arguments instead of ``sys.argv[1:]`` (for tests).
    """
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        given = folder_shorthand(sys.argv[1:] if args is None else list(args))
        check_config_files(given)
        if given[:1] == ["check-data"]:
            sys.exit(check_data(given[1:]))
        AGMMLightningCLI(
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"save_to_log_dir": False},
            args=given,
            parser_kwargs={"prog": program(), "version": __version__},
        )
    except InputError as error:
        sys.stderr.write(f"error: {user_message(error)}\n")
        sys.exit(1)
    except SIGTERMException:
        sys.stderr.write(
            "stopped by SIGTERM; the state of the interrupted step is in the run's last.ckpt: "
            "rerun the same command with --ckpt_path=last to resume\n"
        )
        sys.exit(128 + signal.SIGTERM)
