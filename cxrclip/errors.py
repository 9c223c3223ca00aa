"""User-facing errors: shown as one clear message (no traceback) and a non-zero exit."""

from __future__ import annotations

import contextlib
import logging
import sys

from cxrclip.data.prompts import PromptFileError
from cxrclip.data.records import DataValidationError
from cxrclip.eval.calibration import CalibrationError
from cxrclip.model.checkpoint import CheckpointError
from cxrclip.model.encoders import ModelNotFoundError

USER_ERRORS = (
    DataValidationError,
    CalibrationError,
    PromptFileError,
    CheckpointError,
    ModelNotFoundError,
    FloatingPointError,
)


@contextlib.contextmanager
def exit_on_user_error():
    """Turn the errors a user can fix into a message on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as e:
        logging.getLogger("cxrclip").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
