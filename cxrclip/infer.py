"""Single-image (or folder / CSV) inference: rank candidate texts, and say yes/no per label."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cxrclip.data.cells import image_csv
from cxrclip.data.images import IMAGE_SUFFIXES, ImageReadError, is_dicom, read_image
from cxrclip.exceptions import InputError, exit_on_user_error
from cxrclip.io import atomic_write_text
from cxrclip.pacs.answer import EVERY_YES, answer_datasets, heatmap_labels
from cxrclip.pacs.sr import SourceError, write_sr
from cxrclip.predict import PredictorBase, PredictorOptions, open_predictor
from cxrclip.predict.answer import Answer
from cxrclip.predict.gradcam import write_overlay


def list_images(image_path: str) -> list[Path]:
    """One image, every image in a folder, or the ``image`` column of a CSV (first path of list cells)."""

    p = Path(image_path)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
        return found
    if not p.is_file():
        raise InputError(f"image not found: {p}")
    if p.suffix.lower() == ".csv":
        return image_csv(p)[1]
    return [p]


def format_table(result: Answer, top: int) -> str:
    gate = result.gate
    lines = [f"image: {result.image}", ""]
    if not result.analysed:
        return "\n".join(
            lines
            + [
                f"NOT ANALYSED: {result.reason}",
                "(this model answers frontal chest radiographs only: no label probability is shown for this input;",
                " --no-gate shows them anyway, recorded in the output)",
            ]
        )
    if gate.reason:
        lines += [f"WARNING --no-gate: the input gate would refuse this image: {gate.reason}", ""]
    lines.append(f"{'rank':>4}  {'prob':>6}  {'sim':>7}  candidate")
    for k, r in enumerate(result.ranking[:top], 1):
        lines.append(f"{k:>4}  {r.probability:6.3f}  {r.similarity:7.4f}  {r.text}")
    width = max(len(n) for n in result.labels)
    lines += ["", f"{'label':<{width}}  P(yes)  threshold  {'rule':<16}  finding"]
    flagged = False
    for name, v in result.labels.items():
        mark = "" if v.calibrated else "  (uncalibrated)"
        flagged |= bool(mark)
        decision = "YES" if v.present else "no"
        lines.append(f"{name:<{width}}  {v.probability:6.3f}  {v.threshold:9.3f}  {v.rule:<16}  {decision}{mark}")
    lines += ["", f"{len(result.yes)} of {len(result.labels)} labels called YES."]
    if flagged:
        lines.append("(uncalibrated: the probability is the model's raw score and the threshold a fixed default.)")
    if gate.stage == "none":
        lines.append("(input gate: no image gate fitted for this model; `cxrclip fit-gate` fits one.)")
    return "\n".join(lines)


CSV_FIELDS = (("", "probability"), (":threshold", "threshold"), (":rule", "rule"), (":present", "present"))


def to_csv(results: Sequence[Answer], failed: Sequence[tuple[Path, str]] = (), names: Sequence[str] = ()) -> str:
    """One row per image: whether the gate let it through (``analysed``, ``reason``, ``gate_score``), the top
    candidate, then per label its probability, threshold, rule and decision (blank for a refused image);
    images that could not be read keep their row, with the reason in ``error``."""
    names = next((list(r.labels) for r in results if r.labels), list(names))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    per_label = [f"{n}{suffix}" for n in names for suffix, _ in CSV_FIELDS]
    head = ["image", "analysed", "reason", "gate_score", "top_candidate", "top_probability"]
    writer.writerow([*head, *per_label, "findings", "error"])
    for r in results:
        score = "" if r.gate.score is None else r.gate.score
        head = [r.image, "yes" if r.analysed else "no", r.gate.reason or "", score]
        if not r.labels:
            writer.writerow([*head, "", "", *([""] * len(per_label)), "", ""])
            continue
        cells = [getattr(r.labels[n], key) for n in names for _, key in CSV_FIELDS]
        cells = ["YES" if c is True else "no" if c is False else c for c in cells]
        top, yes = r.ranking[0], set(r.yes)
        writer.writerow([*head, top.text, top.probability, *cells, "; ".join(n for n in names if n in yes), ""])
    for path, error in failed:
        writer.writerow([str(path), "no", "", "", "", "", *([""] * len(per_label)), "", error])
    return out.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rank candidate texts for chest X-rays with a CXR-CLIP checkpoint.")
    p.add_argument("--image_path", "--image-path", required=True, help="an image (JPEG/PNG/DICOM), a folder or a CSV")
    p.add_argument("--texts", help="candidate texts: a JSON list or one per line (default: one per label)")
    p.add_argument("--prompts", help="prompt file (default: the one the checkpoint was trained with)")
    p.add_argument(
        "--threshold", type=float, help="one P(yes) threshold for every label (default: the stored operating points)"
    )
    p.add_argument("--thresholds", help="per-label thresholds: a JSON file {label: threshold} (overrides the stored)")
    p.add_argument("--top", type=int, default=20, help="candidates shown in the table")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--output", help="CSV file for folder/CSV input (default: predictions.csv next to the input)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32)
    p.add_argument("--heatmap", metavar="DIR", help="write Grad-CAM overlays (PNG) of each image's YES labels here")
    p.add_argument("--heatmap-label", action="append", help="the label(s) to draw (default: those called YES)")
    p.add_argument(
        "--sr_out",
        "--sr-out",
        metavar="DIR",
        help="for DICOM input: write each answer as a DICOM SR (TID 1500) here, the file cxrclip pacs stores; with "
        "--heatmap-label (or --heatmap) also the Segmentation of where the model looked",
    )
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    PredictorOptions.add_arguments(p)
    return p


def predict_files(predictor: PredictorBase, images: Sequence[Path], threshold, batch_size: int):
    """Predictions for the readable images, and (path, error) for the others: one bad file never stops a batch."""
    results, failed = [], []
    for start in range(0, len(images), batch_size):
        ok, arrays, facts = [], [], []
        for path in images[start : start + batch_size]:
            found: dict = {}
            try:
                arrays.append(read_image(path, found))
            except ImageReadError as e:
                failed.append((path, str(e)))
                continue
            ok.append(path)
            facts.append(found)
        results += predictor.predict_arrays(ok, arrays, facts, threshold)
    return results, failed


def write_heatmaps(
    predictor: PredictorBase, results: Sequence[Answer], folder: Path, labels: Sequence[str] | None
) -> None:
    """``<image stem>.<label>.png`` overlays: the given labels, else each image's YES labels (else its top one);
    none for an image the gate refused."""
    import re

    for result in results:
        if not result.labels:
            continue
        image = read_image(result.image)
        chosen = labels or result.yes or [max(result.labels, key=lambda n: result.labels[n].probability)]
        for label in chosen:
            cam = predictor.heatmap_of(image, label)
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
            path = write_overlay(
                folder / f"{Path(result.image).stem}.{slug}.png", predictor.picture_of(image, label), cam
            )
            print(f"heatmap: {path}", file=sys.stderr)


def write_srs(predictor: PredictorBase, results: Sequence[Answer], folder: Path, heatmap: Sequence[str] = ()) -> None:
    """One SR per DICOM input (a refused one gets the SR that says why) — the same objects the PACS worker stores;
    ``heatmap`` (labels, or ``yes``: every label called YES): the Segmentation of where the model looked beside it,
    and an outline of it in the SR for those labels called YES."""
    import pydicom

    card = predictor.card()
    for result in results:
        if not is_dicom(result.image):
            print(f"--sr_out: {result.image} is not DICOM; no SR", file=sys.stderr)
            continue
        source = pydicom.dcmread(result.image, stop_before_pixels=not heatmap)
        image = read_image(result.image) if heatmap_labels(heatmap, result) else None
        try:
            sr, *maps = answer_datasets(predictor, card, source, image, result, heatmap)
        except SourceError as e:
            result.sr_error = str(e)  # said in --json beside the answer
            print(f"--sr_out: {result.image}: {e}; no SR", file=sys.stderr)
            continue
        result.sr = str(write_sr(sr, folder))
        print(f"SR: {result.sr}", file=sys.stderr)
        for seg in maps:
            print(f"Segmentation (where the model looked): {write_sr(seg, folder)}", file=sys.stderr)


def read_thresholds(path: str | None, threshold: float | None):
    if not path:
        return threshold
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--thresholds {path}: cannot read a JSON object {{label: threshold}} ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise InputError(f"--thresholds {path}: expected a JSON object {{label: threshold}}")
    return data


def main(argv: list[str] | None = None) -> int:
    """``inference.py``: 0 = all predicted; 2 = a user error, nothing predicted; 1 = some images failed (the
    others are predicted and written; the failures are listed on stderr and in the CSV's ``error`` column)."""

    args = build_parser().parse_args(argv)
    with exit_on_user_error(debug=args.debug):
        images = list_images(args.image_path)
        threshold = read_thresholds(args.thresholds, args.threshold)
        single = len(images) == 1 and not args.output
        if single:
            read_image(images[0])  # a bad file fails here, in one line, before the model is loaded
        if args.sr_out and not any(is_dicom(p) for p in images):
            raise InputError(f"--sr_out: no DICOM input in {args.image_path}; an SR answers a DICOM image")
        predictor = open_predictor(PredictorOptions.from_args(args), prompts=args.prompts, texts=args.texts)
        unknown = sorted(set(args.heatmap_label or ()) - set(predictor.label_names))
        if unknown:
            raise InputError(f"--heatmap-label {unknown}: not a label of this model; labels: {predictor.label_names}")
        results, failed = predict_files(predictor, images, threshold, args.batch_size)
        refused = [r for r in results if not r.analysed]
        if args.heatmap:
            write_heatmaps(predictor, results, Path(args.heatmap), args.heatmap_label)
        if args.sr_out:
            asked = args.heatmap_label or ([EVERY_YES] if args.heatmap else [])
            write_srs(predictor, results, Path(args.sr_out), asked)
        if single:
            print(json.dumps(results[0].to_json(), indent=2) if args.json else format_table(results[0], args.top))
            return 0
        if args.json:
            answers = [r.to_json() for r in results]
            print(json.dumps(answers + [{"image": str(p), "error": e} for p, e in failed], indent=2))
        target = Path(args.output) if args.output else Path(args.image_path).with_suffix("") / "predictions.csv"
        if not args.output and not Path(args.image_path).is_dir():
            target = Path(args.image_path).parent / "predictions.csv"

        atomic_write_text(target, to_csv(results, failed, predictor.label_names))
        print(f"wrote {len(results)} predictions to {target}", file=sys.stderr)
        if refused:
            print(f"{len(refused)} image(s) not analysed by the input gate (reason in the CSV)", file=sys.stderr)
        for _, error in failed:
            print(f"error: {error}", file=sys.stderr)
        if failed:
            print(f"{len(failed)} of {len(images)} images could not be read (listed above)", file=sys.stderr)
            return 1
    return 0
