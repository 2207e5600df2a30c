"""The errors about what the user gave: files, folders and options.

Their messages name the file or key, say what was expected there and how to fix it. The command
line prints such a message alone, without a traceback, and exits non-zero; any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "MissingInputError", "check_choice", "check_non_negative"]


class InputError(ValueError):
    """A file, folder or option that the user gave is not what the library expects."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder that the configuration points at does not exist."""


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise an InputError naming the option, its allowed values and the value given."""
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_non_negative(**values: float) -> None:
    """Raise an InputError naming the first of ``values`` (by option name) below 0."""
    for name, value in values.items():
        if value < 0:
            raise InputError(f"{name} must be >= 0, got {value}")
