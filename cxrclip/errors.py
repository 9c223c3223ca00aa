"""User-facing errors: shown as one clear message (no traceback) and exit code 2."""

from __future__ import annotations

import contextlib
import os
import sys

from cxrclip.exceptions import UserError

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
