"""Checkpoints: written atomically, read with ``weights_only=True`` (no pickled code is ever run)."""

from __future__ import annotations

import collections
import random
import typing
from pathlib import Path

import numpy as np
import torch

from cxrclip.io import atomic_write

FORMAT = "cxrclip/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not a CXR-CLIP checkpoint."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` to ``path`` via a temp file and a rename, so an old checkpoint is never half-overwritten."""
    return atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def _config_allowlist() -> list:
    """The OmegaConf classes a published CXR-CLIP checkpoint's ``config`` may be pickled with: plain
    containers and value nodes, no code. Only these are allowed in addition to tensors."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode

    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        StringNode,
        IntegerNode,
        FloatNode,
        BooleanNode,
        typing.Any,
        dict,
        list,
        int,
        float,
        str,
        bool,
        collections.defaultdict,
    ]


def plain_config(config) -> dict:
    """A checkpoint's config as a plain dict (it may be an OmegaConf DictConfig in published files)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config or {})


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely; errors say which file and why."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_config_allowlist()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"cannot load checkpoint {path} safely ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a CXR-CLIP checkpoint (no 'model' entry)")
    return ckpt


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
