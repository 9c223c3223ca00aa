"""``cxrclip fit-gate``: fit the input gate's image stage on the user's frontal films and other images, choose its
threshold on a patient-disjoint validation part, and store it in the checkpoint (key ``gate``). All of the gate's
fitting lives here (scikit-learn); running it is ``cxrclip/predict/gate.py`` (NumPy only)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrclip.data.cells import image_csv
from cxrclip.data.images import IMAGE_SUFFIXES, ImageReadError, read_image
from cxrclip.data.schema import csv_line
from cxrclip.model.checkpoint import save_checkpoint
from cxrclip.predict.checkpoint import Predictor
from cxrclip.predict.gate import FRONTAL, GateError, ImageGate, pixel_features
from cxrclip.scoring.intervals import wilson

log = logging.getLogger(__name__)
GROUP_COLUMNS = ("patient_id", "patient", "PatientID", "subject_id")
MAX_LISTED = 20
KEEP_FOR_GENERATED = 64  # frontal films kept (downsized) to make rotated / inverted negatives from


# --------------------------------------------------------------------------------------- the gate's image stage


def group_split(groups: Sequence[str], valid_frac: float, seed: int) -> np.ndarray:
    """A boolean mask of the validation rows: whole groups (patients) go to one side, about ``valid_frac``
    of the rows."""
    groups = [str(g) for g in groups]
    unique = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    target, taken, chosen = valid_frac * len(groups), 0, set()
    counts = {g: groups.count(g) for g in unique}
    for g in unique:
        if taken >= target:
            break
        chosen.add(g)
        taken += counts[g]
    return np.array([g in chosen for g in groups])


def choose_threshold(frontal_scores: np.ndarray, target_frr: float) -> float:
    """The smallest score threshold that refuses at most ``target_frr`` of the validation frontal films
    (refused when score > threshold)."""
    s = np.sort(np.asarray(frontal_scores, dtype=np.float64))
    if not len(s):
        raise GateError("no validation frontal films to choose the gate's threshold on")
    k = max(1, math.ceil((1.0 - target_frr) * len(s)))
    return float(s[k - 1])


def rates(gate: ImageGate, emb: np.ndarray, kinds: Sequence[str], pixels: np.ndarray | None = None) -> dict:
    """False-refusal rate of frontal films and the miss rate (let through) of each other kind, with Wilson
    intervals, at the gate's threshold."""
    scores, _ = gate.scores(emb, pixels)
    kinds = np.asarray(kinds)
    out: dict = {}
    frontal = kinds == FRONTAL
    refused = scores > gate.threshold
    k, n = int(refused[frontal].sum()), int(frontal.sum())
    out["frontal"] = {"n": n, "false_refusals": k, "rate": round(k / n, 4) if n else None, "ci95": wilson(k, n, 4)}
    for kind in sorted({str(k) for k in kinds[~frontal]}):
        rows = kinds == kind
        k, n = int((~refused[rows]).sum()), int(rows.sum())
        out[kind] = {"n": n, "missed": k, "rate": round(k / n, 4), "ci95": wilson(k, n, 4)}
    if frontal.any() and (~frontal).any():
        from sklearn.metrics import roc_auc_score

        out["auroc"] = round(float(roc_auc_score(~frontal, scores)), 4)
    return out


def fit_image_gate(
    emb_fit: np.ndarray,
    kinds_fit: Sequence[str],
    emb_valid: np.ndarray,
    kinds_valid: Sequence[str],
    *,
    target_frr: float = 0.01,
    c: float = 1.0,
    fitted_on: Mapping | None = None,
    pixels_fit: np.ndarray | None = None,
    pixels_valid: np.ndarray | None = None,
) -> ImageGate:
    """A multinomial logistic regression (standardized inputs, balanced kinds) on the fit rows — the embeddings,
    and the :func:`pixel_features` after them when given; the threshold from the validation frontal films; the
    validation rates as its evidence."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    kinds_fit = [str(k) for k in kinds_fit]
    present = sorted(set(kinds_fit))
    if FRONTAL not in present or len(present) < 2:
        raise GateError(f"fitting a gate needs frontal films and at least one other kind; the fit rows have {present}")
    if not 0.0 <= target_frr < 0.5:
        raise GateError(f"--target-frr {target_frr}: expected a rate in [0, 0.5)")
    kinds = (FRONTAL, *[k for k in present if k != FRONTAL])
    y = np.array([kinds.index(k) for k in kinds_fit])
    x = np.asarray(emb_fit, dtype=np.float64)
    side = 0
    if pixels_fit is not None:
        side = math.isqrt(np.asarray(pixels_fit).shape[1])
        x = np.concatenate([x, np.asarray(pixels_fit, dtype=np.float64)], axis=1)
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    lr.fit(scaler.transform(x), y)
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: P(other) = sigmoid(w·x + b) = softmax([-(w·x + b)/2, (w·x + b)/2])
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    scale = scaler.scale_
    folded_coef = coef / scale
    folded_intercept = intercept - folded_coef @ scaler.mean_
    kinds_valid = np.asarray([str(k) for k in kinds_valid])
    provisional = ImageGate(kinds, folded_coef, folded_intercept, 1.0, target_frr, pixel_side=side)
    frontal = kinds_valid == FRONTAL
    scores, _ = provisional.scores(
        np.asarray(emb_valid)[frontal], None if pixels_valid is None else np.asarray(pixels_valid)[frontal]
    )
    threshold = choose_threshold(scores, target_frr)
    gate = ImageGate(kinds, folded_coef, folded_intercept, threshold, target_frr, pixel_side=side)
    counts = {k: int((np.asarray(kinds_fit) == k).sum()) for k in kinds}
    evidence = {
        "fit_rows": counts,
        "valid": rates(gate, np.asarray(emb_valid), kinds_valid, pixels_valid),
        "C": c,
        "reads": f"image embedding + {side}×{side} pixels" if side else "image embedding",
        **({"fitted_on": dict(fitted_on)} if fitted_on else {}),
    }
    return ImageGate(kinds, folded_coef, folded_intercept, threshold, target_frr, evidence, side)


# ------------------------------------------------------------------------------------------ generated negatives


def generated_negatives(frontal: Sequence[np.ndarray], n: int, seed: int = 0, size: int = 256):
    """``n`` images that are not upright frontal chest radiographs, made from nothing or from ``frontal``
    films: noise, smooth gradients, shapes and text-like strokes (``not_radiograph``), the films turned 90° or
    180° (``rotated``) and their negatives (``inverted``). Returns (images, kinds)."""
    rng = np.random.default_rng(seed)
    images, kinds = [], []
    makers = ("noise", "gradient", "shapes", "rotated", "inverted")
    for i in range(n):
        what = makers[i % len(makers)] if frontal else makers[i % 3]
        if what == "noise":
            sigma = rng.uniform(1, 8)
            base = rng.normal(128, 60, (size // 8, size // 8))
            img = np.kron(base, np.ones((8, 8))) if sigma > 4 else rng.normal(128, 60, (size, size))
            kinds.append("not_radiograph")
        elif what == "gradient":
            yy, xx = np.mgrid[0:size, 0:size] / size
            a, b, c = rng.uniform(-1, 1, 3)
            img = 128 + 100 * np.sin(3 * (a * xx + b * yy) + c) * np.cos(5 * c * xx)
            kinds.append("not_radiograph")
        elif what == "shapes":
            img = np.full((size, size), rng.uniform(0, 255))
            for _ in range(rng.integers(4, 12)):
                y0, x0 = rng.integers(0, size - 16, 2)
                h, w = rng.integers(8, size // 3, 2)
                img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255)
            kinds.append("not_radiograph")
        else:
            src = np.asarray(frontal[int(rng.integers(len(frontal)))], dtype=np.float64)
            if what == "rotated":
                img = np.rot90(src, k=int(rng.choice([1, 2, 3])))
            else:
                img = 255.0 - src
            kinds.append(what)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images, kinds


@dataclass(frozen=True)
class GateImage:
    path: Path
    kind: str
    group: str


def gather(spec: str, kind: str | None) -> list[GateImage]:
    """The images of a folder or a CSV. ``kind`` None (the ``--other`` sets): a CSV's ``kind`` column, or in a
    folder the name of the sub-folder an image lies in (``other/lateral/x.png`` → lateral; ``not_radiograph``
    for files at the top). The group (for the patient-disjoint split) is a CSV's patient column, else the image."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise GateError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        out = []
        for f in files:
            sub = f.relative_to(path).parts
            out.append(GateImage(f, kind or (sub[0] if len(sub) > 1 else "not_radiograph"), str(f)))
        return out
    if not path.is_file():
        raise GateError(f"{path}: no such folder or CSV of images")
    rows, images = image_csv(path)
    group_column = next((c for c in GROUP_COLUMNS if c in rows[0]), None)
    out = []
    for index, (row, image) in enumerate(zip(rows, images)):
        row_kind = kind or (row.get("kind") or "").strip() or "not_radiograph"
        if kind is None and row_kind == FRONTAL:
            raise GateError(f"{path}:{csv_line(index)}: kind frontal in an --other set (list them in --frontal)")
        group = (row.get(group_column) or "").strip() if group_column else ""
        out.append(GateImage(image, row_kind, group or str(image)))
    return out


@dataclass(frozen=True)
class GateFit:
    """How the gate is fitted: ``valid_frac`` of the patients choose the threshold that refuses ``target_frr`` of
    frontal films; ``generated`` non-radiographs made from the frontal films (``seed``); ``c``: the logistic
    regression's inverse regularisation; ``pixels``: the gate also reads a 32×32 thumbnail (what catches inverted
    films); ``synthetic_only``: the frontal films are synthetic (the demo's), recorded so every refusal says so."""

    valid_frac: float = 0.3
    target_frr: float = 0.01
    generated: int = 100
    seed: int = 0
    c: float = 1.0
    batch_size: int = 32
    pixels: bool = True
    synthetic_only: bool = False


def fit_gate_checkpoint(
    checkpoint: str | Path,
    frontal: Sequence[str],
    other: Sequence[str] = (),
    *,
    fit: GateFit = GateFit(),
    out: str | Path | None = None,
    device: str | None = None,
    text_encoder: str | None = None,
    precision: str = "fp32",
) -> ImageGate:
    """Embed every image with the checkpoint's own model and test transform, fit the gate on the fit part, choose
    its threshold on the validation part (whole patients on one side), and write the checkpoint back (to
    ``out`` if given) with it, atomically. Every unreadable image is listed before anything is fitted. ``precision``:
    the image encoder's while embedding (fit the gate, like the calibration, under the precision that will answer).
    """
    valid_frac, generated, seed, batch_size = fit.valid_frac, fit.generated, fit.seed, fit.batch_size
    if not frontal:
        raise GateError("fit-gate needs frontal chest radiographs (--frontal FOLDER_OR_CSV)")
    if not other and generated <= 0:
        raise GateError("fit-gate needs other images (--other FOLDER_OR_CSV) or generated ones (--generated N)")
    if not 0.05 <= valid_frac <= 0.8:
        raise GateError(f"--valid {valid_frac}: expected a fraction between 0.05 and 0.8")
    items = [x for spec in frontal for x in gather(spec, FRONTAL)] + [x for spec in other for x in gather(spec, None)]
    problems = [f"{x.path}: image not found" for x in items if not x.path.is_file()]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        raise GateError(f"{len(problems)} image(s) cannot be used:\n  {listed}")
    predictor = Predictor.create(
        str(checkpoint), device=device, text_encoder=text_encoder, gate=False, precision=precision
    )
    kept: list[np.ndarray] = []
    emb, thumbs, failed = [], [], []
    for start in range(0, len(items), batch_size):
        tensors = []
        for x in items[start : start + batch_size]:
            try:
                image = read_image(x.path)
            except ImageReadError as e:
                failed.append(str(e))
                continue
            if x.kind == FRONTAL and len(kept) < KEEP_FOR_GENERATED:
                kept.append(_downsized(image))
            tensors.append(predictor.transform(image))
            thumbs.append(pixel_features(image))
        if tensors:
            emb.append(predictor.embed(tensors))
    if failed:
        listed = "\n  ".join(failed[:MAX_LISTED])
        raise GateError(f"{len(failed)} image(s) cannot be read; nothing was fitted:\n  {listed}")
    kinds = [x.kind for x in items]
    groups = [x.group for x in items]
    if generated > 0:
        images, made = generated_negatives(kept, generated, seed=seed)
        for start in range(0, len(images), batch_size):
            emb.append(predictor.embed([predictor.transform(a) for a in images[start : start + batch_size]]))
        thumbs += [pixel_features(a) for a in images]
        kinds += made
        groups += [f"generated:{i}" for i in range(len(made))]
    emb = np.concatenate(emb)
    thumbs_arr = np.stack(thumbs) if fit.pixels else None
    kinds_arr = np.asarray(kinds)
    valid = np.zeros(len(kinds), dtype=bool)
    for kind in sorted(set(kinds)):  # each kind split on its own, so every kind is on both sides
        rows = np.flatnonzero(kinds_arr == kind)
        valid[rows] = group_split([groups[i] for i in rows], valid_frac, seed)
    for kind in sorted(set(kinds)):
        if not ((kinds_arr == kind) & ~valid).any():
            raise GateError(f"kind {kind!r} has too few patients/images to fit on after the validation split")
    if not ((kinds_arr == FRONTAL) & valid).any():
        raise GateError("no frontal film left for validation: give more frontal films")
    fitted_on = {
        "frontal": [str(s) for s in frontal],
        "other": [str(s) for s in other],
        "generated": int(generated),
        "valid_frac": valid_frac,
        "seed": seed,
        "split": "by patient where the CSV has a patient column, else by image",
        **({"synthetic_only": True} if fit.synthetic_only else {}),
        "precision": predictor.precision,
    }
    fit_kinds = [k for k, v in zip(kinds, valid) if not v]
    valid_kinds = [k for k, v in zip(kinds, valid) if v]
    gate = fit_image_gate(
        emb[~valid], fit_kinds, emb[valid], valid_kinds, target_frr=fit.target_frr, c=fit.c, fitted_on=fitted_on,
        pixels_fit=None if thumbs_arr is None else thumbs_arr[~valid],
        pixels_valid=None if thumbs_arr is None else thumbs_arr[valid],
    )  # fmt: skip
    ckpt = {k: v for k, v in predictor.loaded.checkpoint.items() if k != "format"}
    ckpt["gate"] = gate.to_dict()
    target = save_checkpoint(out or checkpoint, ckpt)
    log.info("input gate fitted (%s) → %s", ", ".join(gate.kinds), target)
    return gate


def _downsized(image: np.ndarray, side: int = 384) -> np.ndarray:
    from PIL import Image

    h, w = image.shape
    if max(h, w) <= side:
        return image
    scale = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale)))))


def summary_lines(gate: ImageGate) -> list[str]:
    """The gate's validation evidence, for the terminal."""
    valid = gate.evidence.get("valid", {})
    lines = [
        f"kinds: {', '.join(gate.kinds)}; fitted on {gate.evidence.get('fit_rows')}",
        f"threshold {gate.threshold:.4f} (refused when 1 − P(frontal) is above it; target false refusals "
        f"{gate.target_frr:.1%} of frontal films)",
        f"reads: {gate.evidence.get('reads', 'image embedding')}",
        f"validation AUROC frontal vs other: {valid.get('auroc', float('nan')):.4f}",
    ]
    f = valid.get("frontal", {})
    if f:
        lines.append(f"  frontal films refused: {f['false_refusals']}/{f['n']} = {f['rate']:.1%}  95 % CI {f['ci95']}")
    for kind, v in valid.items():
        if kind in ("frontal", "auroc"):
            continue
        lines.append(f"  {kind:<16} let through: {v['missed']}/{v['n']} = {v['rate']:.1%}  95 % CI {v['ci95']}")
    return lines
