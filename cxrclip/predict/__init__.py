"""The prediction core: one ``Predictor`` interface (``base.py``) with a checkpoint predictor (``checkpoint.py``), a
torch-free bundle predictor (``bundle.py``) and a routed predictor (``routed.py``); the input gate (``gate.py``) in
front of all of them, and Grad-CAM (``gradcam.py``) once. ``open_predictor`` (``factory.py``) is the one door:
:class:`PredictorOptions` in, the predictor a path needs out. Inference, the server, the PACS worker, evaluation and
calibration use these, never their own adapters."""

from __future__ import annotations

from pathlib import Path

from cxrclip.predict.base import PredictorBase
from cxrclip.predict.bundle import BundlePredictor
from cxrclip.predict.checkpoint import Predictor
from cxrclip.predict.factory import PredictorOptions, open_predictor, predictor_kind
from cxrclip.predict.routed import RoutedPredictor

__all__ = [
    "BundlePredictor",
    "Predictor",
    "PredictorBase",
    "PredictorOptions",
    "RoutedPredictor",
    "load_predictor",
    "open_predictor",
    "predictor_kind",
]


def load_predictor(model_path: str | Path, *, prompts=None, texts=None, labels=None, image_size=None, **options):
    """:func:`open_predictor` with the options as keywords (``device``, ``precision``, ``text_encoder``, ``gate``,
    ``site``, ``threads``): for scripts and tests."""
    return open_predictor(
        PredictorOptions(str(model_path), **options), prompts=prompts, texts=texts, labels=labels, image_size=image_size
    )
