"""An exported inference bundle, opened and hash-checked (:class:`Bundle`), and predicting from it
(:class:`BundlePredictor`) with ONNX Runtime and NumPy only — no torch, no transformers, unless a heatmap or a free-text
query asks for the PyTorch towers. The folder's layout is described in :mod:`cxrclip.bundle` (the exporter)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrclip.data.preprocess import PreprocessSpec
from cxrclip.exceptions import InputError, UserError
from cxrclip.hardware import resolve_precision
from cxrclip.io import file_sha256
from cxrclip.predict.base import PredictorBase, label_bank, read_texts
from cxrclip.predict.gate import stored_gate
from cxrclip.scoring.calibration import SITE_CALIBRATIONS, Calibration, site_calibrations

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "bundle.json"
ONNX_FILE = "image_encoder.onnx"
IMAGE_WEIGHTS = "image_encoder.safetensors"
TEXT_WEIGHTS = "text_encoder.safetensors"
PROMPT_FILE = "prompts.safetensors"
TEXT_FOLDER = "text"
IMAGE_PREFIXES = ("image_encoder.", "image_projection.", "logit_scale")


class BundleError(UserError, ValueError):
    """A bundle that is missing, of another format, or whose files do not match their recorded hashes."""


def is_bundle(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Bundle:
    """An exported bundle, opened: the manifest read, each file hash-checked when it is first read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_bundle(self.path):
            raise BundleError(f"{self.path} is not an inference bundle (no {MANIFEST}); make one with `cxrclip export`")
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{self.path / MANIFEST}: not readable JSON ({e})") from e
        if self.manifest.get("format") != FORMAT:
            raise BundleError(
                f"{self.path}: bundle format {self.manifest.get('format')!r}, this cxrclip reads format {FORMAT}"
            )

    def has(self, name: str) -> bool:
        return name in self.manifest.get("files", {})

    def read(self, name: str) -> bytes:
        """A file's bytes, after checking them against the SHA-256 the manifest records."""
        expected = self.manifest.get("files", {}).get(name)
        if expected is None:
            raise BundleError(f"{self.path}: the bundle has no {name}")
        try:
            data = (self.path / name).read_bytes()
        except OSError as e:
            raise BundleError(f"{self.path / name}: cannot read ({e})") from e
        if _sha256(data) != expected:
            raise BundleError(
                f"{self.path / name}: its SHA-256 does not match the one {MANIFEST} records (the file was changed "
                "or only partly copied); nothing was run. Export the bundle again from its checkpoint."
            )
        return data

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        return load(self.read(name))

    def check_text_folder(self) -> Path:
        folder = self.path / TEXT_FOLDER
        for name, digest in self.manifest.get("text_files", {}).items():
            if not (folder / name).is_file() or _sha256((folder / name).read_bytes()) != digest:
                raise BundleError(f"{folder / name}: missing or changed since export; export the bundle again")
        return folder

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.manifest["preprocess"])

    def calibration(self):

        return Calibration.from_dict(self.manifest["calibration"]).for_labels(self.labels)

    def torch_model(self, with_text: bool = False, device="cpu"):
        """The CLIP model rebuilt in PyTorch from the bundle's weights (the image side; the text side too when
        ``with_text``), loaded strictly."""
        text = self.arrays(TEXT_WEIGHTS) if with_text else None
        model, missing, unexpected = torch_side().rebuild_model(
            self.manifest["model"], str(self.check_text_folder()), self.arrays(IMAGE_WEIGHTS), text, device
        )
        if missing or unexpected:
            raise BundleError(
                f"{self.path}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model


class BundlePredictor(PredictorBase):
    """Inference from a bundle: ONNX Runtime for the image encoder (PyTorch when ``device`` is given or the bundle
    has no ONNX file), the stored prompt embeddings; the text tower only for free-text candidates/queries."""

    def __init__(self, bundle: Bundle, device: str | None = None, gate: bool = True, precision: str = "auto"):
        self.bundle, self.device = bundle, device
        self.calibration = bundle.calibration()
        self.precision = resolve_precision(precision, device or "cpu", calibrated=self.calibration.precision)
        if self.precision == "bf16" and device is None:  # ONNX Runtime has no bf16 kernels on x86 CPUs:
            self.device = device = "cpu"  # bf16 asked for runs the bundle's PyTorch weights under bf16 autocast
        self.label_names = bundle.labels
        self.preprocess = bundle.preprocess()
        self.transform = self.preprocess.numpy()
        prompts = bundle.arrays(PROMPT_FILE)
        self.pos_emb, self.neg_emb = prompts["pos"], prompts["neg"]
        self.scale = float(bundle.manifest["scale"])
        self.candidates, self.candidate_emb = list(self.label_names), self.pos_emb
        self.encoders = {k: bundle.manifest["model"][k].get("name") for k in ("image_encoder", "text_encoder")}
        dim = self.pos_emb.shape[1]
        self.gate = stored_gate(bundle.manifest.get("gate"), dim, enforced=gate, where=str(bundle.path))
        self._session = self._torch = self._text = None
        if device is None and bundle.has(ONNX_FILE) and _onnxruntime() is not None:
            ort = _onnxruntime()
            options = ort.SessionOptions()
            options.log_severity_level = 3
            threads = os.environ.get("OMP_NUM_THREADS", "")
            if threads.isdigit() and int(threads) > 0:  # several workers on one machine share its cores
                options.intra_op_num_threads = int(threads)
            self._session = ort.InferenceSession(bundle.read(ONNX_FILE), options, providers=["CPUExecutionProvider"])

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        prompts: str | None = None,
        texts: str | None = None,
        labels: Sequence[str] | None = None,
        device: str | None = None,
        gate: bool = True,
        precision: str = "auto",
    ) -> BundlePredictor:
        """``precision``: auto (= fp32) and fp32 run ONNX Runtime (it has no bf16 kernels on x86 CPUs); ``bf16``
        runs the bundle's PyTorch weights under bf16 autocast instead (imports torch)."""
        predictor = cls(Bundle(path), device, gate, precision)
        if labels and list(labels) != predictor.label_names:
            predictor.select_labels(labels)
        if prompts:
            predictor.use_prompts(prompts)
        if texts:
            candidates = read_texts(texts)
            predictor.candidates, predictor.candidate_emb = candidates, predictor.embed_texts(candidates)
        return predictor

    def select_labels(self, labels: Sequence[str]) -> None:
        """Answer only ``labels`` (some of the bundle's, in this order): their prompt embeddings and calibration."""
        unknown = [n for n in labels if n not in self.label_names]
        if unknown:
            raise InputError(f"a bundle predicts the labels it was exported with {self.label_names}; not {unknown}")
        rows = [self.label_names.index(n) for n in labels]
        self.pos_emb, self.neg_emb = self.pos_emb[rows], self.neg_emb[rows]
        self.label_names = list(labels)
        self.calibration = self.calibration.for_labels(self.label_names)
        if self.candidates == self.bundle.labels:
            self.candidates, self.candidate_emb = list(self.label_names), self.pos_emb

    def identity(self) -> dict:
        """The checkpoint it was exported from (its SHA-256 names the model), and the bundle's own hash."""
        return {
            "name": self.bundle.path.name,
            "checkpoint_sha256": self.bundle.manifest["card"]["checkpoint_sha256"],
            "bundle_sha256": file_sha256(self.bundle.path / MANIFEST),
            "backend": self.backend,
        }

    @property
    def backend(self) -> str:
        return "onnxruntime" if self._session is not None else "torch"

    def use_prompts(self, prompts: str) -> None:
        """Label embeddings from another prompt file (needs the text tower)."""
        bank, names = label_bank(prompts, self.label_names, {})
        self.pos_emb, self.neg_emb = self.label_embeddings(bank, names)
        self.candidate_emb = self.pos_emb

    @property
    def stored(self) -> dict:
        """What the bundle stores beside the weights (its calibration, its gate)."""
        manifest = self.bundle.manifest
        return {"calibration": manifest["calibration"], "gate": manifest.get("gate"),
                SITE_CALIBRATIONS: site_calibrations(manifest)}  # fmt: skip

    def label_embeddings(self, bank, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The stored prompt embeddings where the labels' sentences are the ones exported; else embedded anew with
        the text tower."""
        exported = self.bundle.manifest["prompts"]
        if all(n in exported and exported[n] == {"pos": list(bank[n].pos), "neg": list(bank[n].neg)} for n in names):
            stored = self.bundle.arrays(PROMPT_FILE)
            rows = [self.bundle.labels.index(n) for n in names]
            return stored["pos"][rows], stored["neg"][rows]
        model, tokenizer, device = self.text_tower()
        return torch_side().prompt_embeddings(model, tokenizer, bank, names, device)

    def cam_model(self):
        return self.torch_model(), self.device or "cpu"

    def torch_model(self, with_text: bool = False):
        if self._torch is None or (with_text and not hasattr(self._torch, "text_encoder")):
            self._torch = self.bundle.torch_model(with_text=with_text, device=self.device or "cpu")
        return self._torch

    def embed(self, tensors: Sequence) -> np.ndarray:
        batch = np.stack([np.asarray(t, dtype=np.float32) for t in tensors])
        if self._session is not None:
            return self._session.run(None, {"image": batch})[0]
        return torch_side().encode_images(self.torch_model(), batch, self.precision, self.device or "cpu")

    def text_tower(self):
        """(model with its text side, tokenizer, device), loaded on first use."""
        if self._text is None:
            self._text = torch_side().tokenizer(str(self.bundle.check_text_folder()))
        model = self.torch_model(with_text=True)
        return model, self._text, next(model.parameters()).device

    def embed_texts(self, texts: Sequence[str], max_length: int = 256) -> np.ndarray:
        model, tokenizer, device = self.text_tower()
        return torch_side().text_embeddings(model, tokenizer, texts, device, max_length)


def torch_side():
    """The bundle's PyTorch side (``bundle_torch.py``), imported on first use: ONNX inference never loads torch."""
    import cxrclip.predict.bundle_torch as bundle_torch  # the module itself, not the package (no import circle)

    return bundle_torch


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime
