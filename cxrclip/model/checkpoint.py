"""Checkpoints: written atomically, read with ``weights_only=True`` (no pickled code is ever run)."""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from cxrclip.exceptions import UserError
from cxrclip.io import atomic_write, file_sha256
from cxrclip.model import safe_pickle
from cxrclip.model.safe_pickle import config_classes, to_plain_data

FORMAT = "cxrclip/1"
log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable, or not a CXR-CLIP checkpoint."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` to ``path`` via a temp file and a rename, so an old checkpoint is never half-overwritten."""
    return atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def _config_allowlist() -> list:
    """The OmegaConf classes a published CXR-CLIP checkpoint's ``config`` may be pickled with, plus plain
    builtins: allowed in addition to tensors by the weights-only reader."""

    return [*config_classes(), dict, list, int, float, str, bool]


def plain_config(config) -> dict:
    """A checkpoint's config as a plain dict (``load_checkpoint`` has already made it plain data)."""

    return dict(to_plain_data(config) or {})


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def _load_restricted(path: Path, refusal: Exception) -> dict:
    """The original CXR-CLIP trainer's files: read with the restricted unpickler (no code runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle)
    except safe_pickle.RefusedGlobalError as e:
        raise CheckpointError(
            f"cannot load checkpoint {path} safely: it names {e.qualified_name!r}, which is not a tensor, container "
            "or OmegaConf config; nothing in it was run. Only load it if you trust its source."
        ) from e
    except Exception as e:  # torch raises many types for corrupt files; all mean "unreadable"
        raise CheckpointError(
            f"cannot load checkpoint {path} safely ({type(refusal).__name__}: {_first_line(refusal)})"
        ) from e
    log.info(
        "%s: read with the restricted unpickler (its config holds OmegaConf objects, as the original CXR-CLIP "
        "trainer writes them); only tensors, containers and OmegaConf classes were admitted",
        path,
    )
    return ckpt


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely; errors say which file and why. The config comes back as plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_config_allowlist()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only reader refused a global or could not fill a container
        ckpt = _load_restricted(path, e)
    except Exception as e:  # torch raises RuntimeError, EOFError... for bad files
        raise CheckpointError(f"cannot load checkpoint {path} safely ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a CXR-CLIP checkpoint (no 'model' entry)")
    try:
        ckpt["config"] = plain_config(ckpt.get("config"))
    except Exception as e:  # OmegaConf raises its own error types for unresolvable configs
        raise CheckpointError(f"{path}: its config cannot be read ({type(e).__name__}: {_first_line(e)})") from e
    return ckpt


TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng")


def convert_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Rewrite a checkpoint (e.g. one from the original CXR-CLIP trainer) in cxrclip's format: weights,
    config as plain data, no optimizer/scheduler state; it then loads with plain ``weights_only=True``."""

    ckpt = load_checkpoint(source)
    kept = {k: v for k, v in ckpt.items() if k not in (*TRAINING_STATE, "format")}
    kept["converted_from"] = {"path": str(Path(source).resolve()), "sha256": file_sha256(source)}
    path = save_checkpoint(out, kept)
    torch.load(path, map_location="cpu", weights_only=True)  # no allowlist needed any more: check it
    return path


def require_training_state(ckpt: dict, path: str | Path) -> None:
    """``base.resume`` needs cxrclip's training state; say so plainly for other checkpoints."""
    missing = [k for k in (*TRAINING_STATE, "step", "batches_done", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"cannot resume from {path}: it has no {', '.join(missing)} (it was not written by cxrclip's trainer, "
            "e.g. it comes from the original CXR-CLIP code). Evaluate it, run inference, probe it "
            "(model.load_backbone_weights=) or `cxrclip convert` it; training restarts from a cxrclip checkpoint only."
        )


def rng_state() -> dict:
    """Every RNG a training step touches, as tensors/ints that load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
