"""Promotion and rollback, by the plan only: ``promote`` refuses unless the comparison's verdict says promote, was
made under this very plan (its SHA-256), against the champion now in effect, and of this very challenger file (its
SHA-256); each promotion and rollback is an append-only row of the review store (who, when, both models, the plan,
the evidence). The champion in effect is the last row's model; a rollback returns to the model the last promotion
replaced."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cxrclip.exceptions import UserError
from cxrclip.io import database_url, file_sha256
from cxrclip.reviews.store import ReviewStore


class PromotionRefused(UserError):
    """The evidence does not allow the change (each reason is listed)."""


def champion(store: ReviewStore) -> dict | None:
    """The model in effect: ``{"path", "sha256", "since", "by"}``, or None before any promotion."""
    rows = store.model_changes()
    if not rows:
        return None
    last = rows[-1]
    return {"path": last["to_path"], "sha256": last["to_sha256"], "since": last["created_at"], "by": last["by"]}


def model_sha256(path: str | Path) -> str:
    """A model's SHA-256 as its card gives it: a checkpoint file's own hash; a bundle's or routed model's card's."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    from cxrclip.predict.factory import PredictorOptions, open_predictor

    return open_predictor(PredictorOptions(str(path), device="cpu")).card()["checkpoint_sha256"]


def promote(store: ReviewStore, verdict_path: str | Path, plan_path: str | Path, challenger: str | Path,
            by: str) -> dict:  # fmt: skip
    try:
        verdict = json.loads(Path(verdict_path).read_text(encoding="utf-8"))
        plan_sha = hashlib.sha256(Path(plan_path).read_bytes()).hexdigest()
    except (OSError, json.JSONDecodeError) as e:
        raise PromotionRefused(f"cannot read the verdict or the plan ({e})") from e
    reasons = []
    if verdict.get("decision") != "promote":
        reasons.append(f"the verdict is {verdict.get('decision')!r}, not promote: "
                       + "; ".join(verdict.get("reasons") or []))  # fmt: skip
    if (verdict.get("plan") or {}).get("sha256") != plan_sha:
        reasons.append(f"the verdict was reached under another plan than {plan_path} (SHA-256 {plan_sha[:12]}…)")
    to_sha = model_sha256(challenger)
    if verdict.get("challenger_sha256") != to_sha:
        reasons.append(f"{challenger} (SHA-256 {to_sha[:12]}…) is not the challenger the verdict compared")
    current = champion(store)
    if current is not None and verdict.get("champion_sha256") != current["sha256"]:
        reasons.append(f"the verdict compared against another champion than the one in effect ({current['path']})")
    if reasons:
        raise PromotionRefused("promotion refused:\n  " + "\n  ".join(reasons))
    return store.add_model_change(
        action="promote", by=by, from_sha256=current["sha256"] if current else verdict.get("champion_sha256"),
        from_path=current["path"] if current else verdict.get("champion"), to_sha256=to_sha, to_path=str(challenger),
        plan_sha256=plan_sha, evidence=json.dumps(verdict, sort_keys=True),
    )  # fmt: skip


def rollback(store: ReviewStore, by: str, reason: str) -> dict:
    """Back to the model the last promotion in effect replaced."""
    rows = store.model_changes()
    current = champion(store)
    promoted = [r for r in rows if r["action"] == "promote" and r["to_sha256"] == (current or {}).get("sha256")]
    if not promoted or not promoted[-1]["from_sha256"]:
        raise PromotionRefused("rollback refused: no promotion in effect to undo")
    last = promoted[-1]
    return store.add_model_change(
        action="rollback", by=by, from_sha256=last["to_sha256"], from_path=last["to_path"],
        to_sha256=last["from_sha256"], to_path=last["from_path"], plan_sha256=None,
        evidence=json.dumps({"reason": reason}),
    )  # fmt: skip


def options_in_effect(options, db: str | Path | None):
    """``options`` (:class:`~cxrclip.predict.factory.PredictorOptions`) for the champion ``db``'s audit rows name
    (``--champion-db``); ``options`` as they are without a ``db`` or before a first promotion."""
    if not db:
        return options
    path = model_in_effect(db, options.model_path)
    return options if path == options.model_path else options.for_model(path)


def model_in_effect(db: str | Path, fallback: str | None) -> str:
    """The champion's path from the audit rows of ``db`` (``--champion-db``), else ``fallback`` (``--model_path``)."""
    store = ReviewStore(database_url(db, option="--champion-db", must_exist=True))
    try:
        current = champion(store)
    finally:
        store.close()
    if current is not None:
        return current["path"]
    if not fallback:
        raise PromotionRefused(f"--champion-db {db}: no promotion recorded yet; give --model_path for the first model")
    return fallback
