"""One-line messages for command-line mistakes, from jsonargparse's nested error texts."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from agmm_lightning.errors import InputError

__all__ = ["AGMMArgumentParser", "concise_error", "program", "user_message"]

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


def program() -> str:
    """The command's name in messages: ``lightning`` when run as that, else ``agmm``."""
    return "lightning" if Path(sys.argv[0]).name == "lightning" else "agmm"


def user_message(error: InputError) -> str:
    """The error's own message, without what a DataLoader worker wraps around it."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return text
