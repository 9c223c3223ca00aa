"""The errors a user can fix (bad data, config, files, checkpoints): shown as one message, exit code 2.

Every module raises these (or subclasses) for user mistakes; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used (unknown option, missing path, mismatched labels)."""


class InputError(UserError, ValueError):
    """A file or argument given to a job that cannot be used (a missing image, an empty folder, a bad list)."""


class OutputError(UserError, OSError):
    """An output that cannot be written (disk full, read-only or unwritable folder, a folder in use)."""
