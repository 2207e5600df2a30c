"""The errors about what the user gave: files, folders and options.

Their messages name the file or key, say what was expected there and how to fix it. The command
line prints such a message alone, without a traceback, and exits non-zero; any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "MissingInputError"]


class InputError(ValueError):
    """A file, folder or option that the user gave is not what the library expects."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder that the configuration points at does not exist."""
