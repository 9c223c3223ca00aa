"""Models and change-control records for the tests: a challenger that differs from a checkpoint, and the verdict
`cxrclip compare` would write to promote it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PLAN = "criteria: [{metric: auroc, non_inferiority: 0.02}]\n"


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def challenger_checkpoint(champion: str | Path, out: Path) -> Path:
    """``champion`` with its image projection negated: a model that sees things the other way round (other
    decisions, another SHA-256)."""
    from cxrclip.model.checkpoint import load_checkpoint, save_checkpoint

    state = {k: v for k, v in load_checkpoint(champion).items() if k != "format"}
    state["model"] = dict(state["model"])
    key = "image_projection.projection.weight"
    state["model"][key] = -state["model"][key]
    return save_checkpoint(out, state)


def promotion_verdict(folder: Path, champion: str | Path, challenger: str | Path) -> tuple[Path, Path]:
    """(verdict, plan): a plan file and a verdict that says promote ``challenger`` over ``champion`` under it."""
    plan = folder / "plan.yaml"
    plan.write_text(PLAN)
    verdict = folder / "verdict.json"
    said = {"decision": "promote", "plan": {"sha256": sha256(plan)}, "champion": str(champion),
            "champion_sha256": sha256(champion), "challenger_sha256": sha256(challenger)}  # fmt: skip
    verdict.write_text(json.dumps(said))
    return verdict, plan
