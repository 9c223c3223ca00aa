"""The prediction core: one ``Predictor`` interface (``base.py``) with a checkpoint predictor (``checkpoint.py``), a
torch-free bundle predictor (``bundle.py``) and a routed predictor (``routed.py``); the input gate (``gate.py``) in
front of all of them, and Grad-CAM (``gradcam.py``) once. ``load_predictor`` picks the one a path needs.
Inference, the server, evaluation and calibration use these, never their own adapters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cxrclip.exceptions import InputError
from cxrclip.predict.base import PredictorBase
from cxrclip.predict.bundle import BundlePredictor, is_bundle
from cxrclip.predict.checkpoint import Predictor
from cxrclip.predict.routed import RoutedPredictor, is_routed

__all__ = ["BundlePredictor", "Predictor", "PredictorBase", "RoutedPredictor", "load_predictor"]


def load_predictor(
    model_path: str | Path,
    *,
    prompts: str | None = None,
    texts: str | None = None,
    labels: Sequence[str] | None = None,
    device: str | None = None,
    image_size: int | None = None,
    text_encoder: str | None = None,
    gate: bool = True,
    site: str | None = None,
    precision: str = "auto",
):
    """The predictor a path needs: a routed model (a folder with ``routed.json``), an inference bundle (a folder with
    ``bundle.json``) or a checkpoint. ``gate=False`` (``--no-gate``): the gate's verdicts are recorded, not enforced.
    ``site``: answer with that site's calibration (``cxrclip calibrate --site``). ``precision``: the image
    encoder's, auto (= fp32) / fp32 / bf16 (opt-in; a bundle under ONNX Runtime runs fp32)."""
    if is_routed(model_path):
        if image_size or prompts or labels:
            raise InputError("a routed model keeps each member's own preprocessing, prompts and labels")
        if site:
            raise InputError("--site: a routed model answers with each member's own calibration")
        return RoutedPredictor.create(
            model_path, device=device, text_encoder=text_encoder, gate=gate, texts=texts, precision=precision
        )
    if is_bundle(model_path):
        if image_size:
            raise InputError("a bundle keeps the preprocessing it was exported with; image_size cannot change")
        predictor = BundlePredictor.create(
            model_path, prompts=prompts, texts=texts, labels=labels, device=device, gate=gate, precision=precision
        )
    else:
        predictor = Predictor.create(
            str(model_path), prompts=prompts, texts=texts, labels=labels, device=device, image_size=image_size,
            text_encoder=text_encoder, gate=gate, precision=precision,
        )  # fmt: skip
    if site:
        predictor.use_site(site)
    return predictor
