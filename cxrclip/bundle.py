"""The inference bundle: what single-image inference needs from a checkpoint, and nothing else.

``cxrclip export --checkpoint CKPT --out BUNDLE`` writes a folder::

    bundle.json                 labels, prompts, preprocessing, calibration, model card, file hashes
    image_encoder.onnx          image → L2-normalized embedding (the encoder, its projection, the normalization)
    image_encoder.safetensors   the same weights for PyTorch (heatmaps, or where ONNX Runtime is missing)
    prompts.safetensors         each label's positive/negative prompt embeddings (projected, normalized)
    text_encoder.safetensors    the text tower, loaded only for free-text queries
    text/                       its tokenizer and architecture config (no weights)

Predicting with a bundle imports neither torch nor transformers: preprocessing is NumPy/Pillow
(:mod:`cxrclip.data.preprocess`, the same functions the checkpoint's transform runs) and the image encoder runs
in ONNX Runtime. Every file's SHA-256 is recorded in ``bundle.json`` and checked before it is used, so a changed
or half-copied weight file is refused, not run.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrclip.exceptions import OutputError
from cxrclip.io import _umask, atomic_write_text, file_sha256
from cxrclip.predict.base import label_bank
from cxrclip.predict.bundle import (
    FORMAT,
    IMAGE_PREFIXES,
    IMAGE_WEIGHTS,
    MANIFEST,
    ONNX_FILE,
    PROMPT_FILE,
    TEXT_FOLDER,
    TEXT_WEIGHTS,
    BundleError,
    _onnxruntime,
    _sha256,
)
from cxrclip.predict.checkpoint import Predictor
from cxrclip.predict.routed import MANIFEST as ROUTED_MANIFEST
from cxrclip.predict.routed import Member, RoutingError, assign_labels, member_labels, write_routed
from cxrclip.scoring.calibration import SITE_CALIBRATIONS, site_calibrations

log = logging.getLogger(__name__)
UTC = datetime.timezone.utc
ONNX_TOLERANCE = 1e-4  # largest |ONNX − PyTorch| embedding difference accepted at export


def _card(loaded, checkpoint: Path, calibration) -> dict:

    config = loaded.config
    data = {
        group: {name: dc.get("data_path") for name, dc in (config.get(group) or {}).items() if isinstance(dc, dict)}
        for group in ("data_train", "data_valid")
    }
    return {
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_modified": datetime.datetime.fromtimestamp(checkpoint.stat().st_mtime, UTC).isoformat(),
        "epoch": loaded.checkpoint.get("epoch"),
        "training_data": data,
        "calibrated_on": calibration.fitted_on or None,
        "exported": datetime.datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _export_onnx(model, size: int, path: Path) -> float:
    """The image side as ONNX (dynamic batch); returns the largest difference from PyTorch on two random images."""
    import warnings

    import torch

    class ImageEmbedder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.image_encoder, self.image_projection = clip.image_encoder, clip.image_projection

        def forward(self, image):
            return torch.nn.functional.normalize(self.image_projection(self.image_encoder(image)).float(), dim=-1)

    module = ImageEmbedder(model).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        import onnx  # noqa: F401 (torch.onnx needs it)
    except ImportError as e:
        raise BundleError("exporting ONNX needs the onnx package (pip install onnx), or pass --no-onnx") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
        )
    ort = _onnxruntime()
    if ort is None:
        return float("nan")
    with torch.no_grad():
        expected = module(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    return float(np.abs(got - expected).max())


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    *,
    prompts: str | None = None,
    labels: Sequence[str] | None = None,
    onnx: bool = True,
    overwrite: bool = False,
    text_encoder: str | None = None,
) -> Path:
    """Write the bundle of ``checkpoint`` to the folder ``out`` (built beside it, then moved into place)."""
    import torch
    from safetensors.torch import save_file

    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    predictor = Predictor.create(
        str(checkpoint), prompts=prompts, labels=labels, device="cpu", text_encoder=text_encoder, precision="fp32"
    )
    predictor.loaded.model.set_channels_last(False)  # exported in the ONNX (NCHW) layout
    loaded = predictor.loaded
    state = loaded.model.state_dict()
    image_state = {k: v.contiguous() for k, v in state.items() if k.startswith(IMAGE_PREFIXES)}
    text_state = {k: v.contiguous() for k, v in state.items() if not k.startswith(IMAGE_PREFIXES)}
    preprocess = predictor.preprocess
    preprocess.numpy()  # a test transform that cannot run without torch fails here, first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(image_state, str(tmp / IMAGE_WEIGHTS))
        save_file(text_state, str(tmp / TEXT_WEIGHTS))
        pos, neg = torch.from_numpy(predictor.pos_emb), torch.from_numpy(predictor.neg_emb)
        save_file({"pos": pos.contiguous(), "neg": neg.contiguous()}, str(tmp / PROMPT_FILE))
        loaded.tokenizer.save_pretrained(str(tmp / TEXT_FOLDER))
        loaded.model.text_encoder.text_encoder.config.save_pretrained(str(tmp / TEXT_FOLDER))
        onnx_error = _export_onnx(loaded.model, preprocess.size, tmp / ONNX_FILE) if onnx else None
        if onnx_error is not None and onnx_error > ONNX_TOLERANCE:
            raise BundleError(f"the ONNX image encoder differs from PyTorch by {onnx_error:.2e}; export with --no-onnx")
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        text_files = sorted(p.name for p in (tmp / TEXT_FOLDER).iterdir())
        bank, names = label_bank(prompts, predictor.label_names, loaded.config)
        manifest = {
            "format": FORMAT,
            "kind": "cxrclip inference bundle",
            "labels": predictor.label_names,
            "prompts": {n: {"pos": list(bank[n].pos), "neg": list(bank[n].neg)} for n in names},
            "preprocess": preprocess.to_dict(),
            "scale": predictor.scale,
            "embedding_dim": int(pos.shape[1]),
            "model": loaded.model_config,
            "calibration": predictor.calibration.to_dict(),
            "gate": loaded.checkpoint.get("gate"),  # the input gate (cxrclip fit-gate); None: not fitted
            SITE_CALIBRATIONS: site_calibrations(loaded.checkpoint),  # cxrclip calibrate --site
            "card": _card(loaded, checkpoint, predictor.calibration),
            "onnx_max_abs_difference": onnx_error,
            "files": {name: _sha256((tmp / name).read_bytes()) for name in files},
            "text_files": {name: _sha256((tmp / TEXT_FOLDER / name).read_bytes()) for name in text_files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")

        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """A folder built beside ``out`` replaces it in one rename, with the usual file modes (mkdtemp made it private)."""
    for f in [tmp, *tmp.rglob("*")]:
        f.chmod((0o777 if f.is_dir() else 0o666) & ~_umask())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def export_routed_bundle(
    out: str | Path, members: Sequence[Member], *, default: str | None = None, overwrite: bool = False, **export_kw
) -> Path:
    """A routed bundle: each member exported as a bundle of the labels it answers under ``members/NAME``, and a
    ``routed.json`` that holds each member bundle's hash (built beside ``out``, then moved into place)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    paths = {m.name: Path(m.path) for m in members}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise RoutingError(f"member file(s) not found: {missing}")
    routes = assign_labels(members, {m.name: member_labels(paths[m.name]) for m in members})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        exported = []
        for m in members:
            folder = export_bundle(paths[m.name], tmp / "members" / m.name, labels=routes[m.name], **export_kw)
            exported.append(Member(m.name, str(folder), tuple(routes[m.name])))
        write_routed(
            tmp, exported, default=default, card={"exported_from": {m.name: str(paths[m.name]) for m in members}}
        )
        manifest = json.loads((tmp / ROUTED_MANIFEST).read_text(encoding="utf-8"))
        for entry in manifest["members"]:  # inside the bundle the members are found relative to it
            entry["path"] = str(Path("members") / entry["name"])
        atomic_write_text(tmp / ROUTED_MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
