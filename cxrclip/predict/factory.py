"""The one door to a predictor. :class:`PredictorOptions` is what every command that predicts takes (one argparse
group is made from it: ``inference.py``, ``cxrclip serve``, ``cxrclip pacs``); :func:`open_predictor` is the only
place that decides whether a path is a routed model, an inference bundle or a checkpoint (evaluation and a routed
model's members open theirs here too)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from cxrclip.exceptions import InputError
from cxrclip.hardware import PRECISION_HELP, PRECISIONS
from cxrclip.predict.base import PredictorBase
from cxrclip.predict.bundle import BundlePredictor, is_bundle
from cxrclip.predict.checkpoint import Predictor
from cxrclip.predict.routed import RoutedPredictor, is_routed, open_routed


@dataclass(frozen=True)
class PredictorOptions:
    """How to open a model for prediction. A new option is one field here and one line in :meth:`add_arguments`."""

    model_path: str
    device: str | None = None  # cpu, cuda, cuda:1; None: cuda when available
    precision: str = "auto"  # the image encoder's (cxrclip/hardware.py)
    text_encoder: str | None = None  # a local folder of the text tower (offline)
    gate: bool = True  # False (--no-gate): the gate's verdict is recorded, the labels shown anyway
    site: str | None = None  # answer with this site's calibration (cxrclip calibrate --site NAME)
    threads: int | None = None  # CPU threads of the model

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
        """The model's options, as one argument group (the same names and help everywhere)."""
        g = parser.add_argument_group("the model")
        g.add_argument("--model_path", "--model-path", required=required,
                       help="a checkpoint (model-best.tar, a published .tar), a bundle or a routed model")  # fmt: skip
        g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
        g.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
        g.add_argument("--text_encoder", "--text-encoder", help="local folder of the text encoder (offline)")
        g.add_argument("--no-gate", action="store_true",
                       help="show the labels of inputs the input gate refuses (the verdict is recorded)")  # fmt: skip
        g.add_argument("--site", help="answer with this site's calibration (cxrclip calibrate --site NAME)")
        g.add_argument("--threads", type=int, help="CPU threads for the model (split the cores between processes)")

    def for_model(self, path: str | Path) -> PredictorOptions:
        """Another model opened the way this one is (device, precision, text encoder, gate), with its own calibration
        and no thread setting of its own: a shadow challenger, the champion after a promotion."""
        return replace(self, model_path=str(path), site=None, threads=None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PredictorOptions:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "gate"}
        return cls(**values, gate=not args.no_gate)


def predictor_kind(path: str | Path) -> str:
    """``routed`` (a folder with ``routed.json``), ``bundle`` (a folder with ``bundle.json``) or ``checkpoint``."""
    if is_routed(path):
        return "routed"
    return "bundle" if is_bundle(path) else "checkpoint"


def use_threads(n: int) -> None:
    """Limit the model's CPU threads: read by torch and ONNX Runtime at start, and set in torch if it is loaded."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def open_predictor(
    options: PredictorOptions,
    *,
    prompts: str | None = None,
    texts: str | None = None,
    labels: Sequence[str] | None = None,
    image_size: int | None = None,
    image_encoder: str | None = None,
) -> PredictorBase | RoutedPredictor:
    """The predictor ``options.model_path`` needs. ``prompts``, ``labels``: another prompt file / label list;
    ``texts``: candidate texts to rank; ``image_size``, ``image_encoder``: a checkpoint's preprocessing size and an
    offline image tower (a bundle keeps what it was exported with, a routed model each member's own)."""
    if options.threads:
        use_threads(options.threads)
    path, kind = options.model_path, predictor_kind(options.model_path)
    if kind == "routed":
        if image_size or image_encoder or prompts or labels:
            raise InputError("a routed model keeps each member's own preprocessing, prompts and labels")
        if options.site:
            raise InputError("--site: a routed model answers with each member's own calibration")
        return _open_routed(options, texts)
    if kind == "bundle":
        if image_size or image_encoder:
            raise InputError("a bundle keeps the preprocessing it was exported with; image_size cannot change")
        predictor = BundlePredictor.create(path, prompts=prompts, texts=texts, labels=labels, device=options.device,
                                           gate=options.gate, precision=options.precision)  # fmt: skip
    else:
        predictor = Predictor.create(
            str(path), prompts=prompts, texts=texts, labels=labels, device=options.device, image_size=image_size,
            text_encoder=options.text_encoder, image_encoder=image_encoder, gate=options.gate,
            precision=options.precision,
        )  # fmt: skip
    if options.site:
        predictor.use_site(options.site)
    return predictor


def _open_routed(options: PredictorOptions, texts: str | None) -> RoutedPredictor:
    """Each member opened here with the routed model's options, over the labels it answers; the default member
    also ranks ``texts``."""
    path = Path(options.model_path)
    manifest, paths = open_routed(path)
    members = {}
    for m in manifest["members"]:
        if predictor_kind(paths[m["name"]]) == "routed":
            raise InputError(f"{path}: member {m['name']} is itself a routed model; route checkpoints or bundles")
        own = replace(options, model_path=str(paths[m["name"]]), site=None, threads=None)
        default = m["name"] == manifest["default"]
        members[m["name"]] = open_predictor(own, labels=m["labels"], texts=texts if default else None)
    return RoutedPredictor(path, manifest, members, manifest["default"])
