"""The errors a user can fix (bad data, config, files, checkpoints): shown as one message, exit code 2.

Every module raises these (or subclasses) for user mistakes; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys


class UserError(Exception):
    """Base of every error whose message tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used (unknown option, missing path, mismatched labels)."""


class InputError(UserError, ValueError):
    """A file or argument given to a job that cannot be used (a missing image, an empty folder, a bad list)."""


class OutputError(UserError, OSError):
    """An output that cannot be written (disk full, read-only or unwritable folder, a folder in use)."""


# ---------------------------------------------------------------------------- shown at the edge, exit code 2

EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """What counts as a user's mistake: our :class:`UserError` family, a non-finite loss (with its hint), and
    OmegaConf's "missing mandatory value" (``test.checkpoint=???`` left unset)."""
    from omegaconf.errors import MissingMandatoryValue

    return (UserError, FloatingPointError, MissingMandatoryValue)


def debugging() -> bool:
    """Tracebacks are shown with ``--debug``, ``CXRCLIP_DEBUG=1`` or Hydra's ``HYDRA_FULL_ERROR=1``."""
    return os.environ.get("CXRCLIP_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def message(e: BaseException) -> str:
    """The user-facing text of an error; OmegaConf's multi-line "missing value" becomes one line with a hint."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(e, MissingMandatoryValue) and e.full_key:
        return f"{e.full_key} is not set; give it on the command line, e.g. {e.full_key}=/PATH"
    return str(e)


@contextlib.contextmanager
def exit_on_user_error(debug: bool = False):
    """Turn the errors a user can fix into ``error: <message>`` on stderr and exit code 2."""
    try:
        yield
    except user_errors() as e:
        if debug or debugging():
            raise
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
