"""The ``cxrclip`` command: the jobs as subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cxrclip.data.images import ImageReadError, read_image
from cxrclip.data.prompts import DEFAULT_PROMPTS, NORMAL_SENTENCE, PromptFileError, load_prompts
from cxrclip.data.records import load_records, summarize
from cxrclip.data.schema import DataConfig, DataValidationError, Problems
from cxrclip.exceptions import ConfigError, exit_on_user_error
from cxrclip.infer import main as infer_main
from cxrclip.io import atomic_write, atomic_write_text, database_url
from cxrclip.pacs.dicomweb import Connection, add_connection_arguments
from cxrclip.paths import CONFIG_DIR, config_labels
from cxrclip.predict.bundle import Bundle
from cxrclip.predict.factory import PredictorOptions
from cxrclip.predict.routed import MANIFEST, Member, RoutingError, is_routed, write_routed
from cxrclip.scoring.calibration import CalibrationError, CalibrationSettings

SPLIT_TYPES = {"train": "imagetext", "valid": "imagetext", "test": "imagetext_eval", "cls": "image_classification"}


def _data_size(args: argparse.Namespace) -> dict:
    """The synthetic data's size options (``add_data_args``) as keyword arguments."""
    return {k: getattr(args, k) for k in ("n_train", "n_valid", "n_test", "image_size", "seed")}


def _demo_data(args: argparse.Namespace) -> int:
    from cxrclip.synthetic import generate_demo_data

    start = time.perf_counter()
    paths = generate_demo_data(args.out, **_data_size(args))
    print(f"wrote synthetic CGMH-style data in {time.perf_counter() - start:.1f} s:")
    for split, path in paths.items():
        print(f"  {split:5s} {path}")
    return 0


def _to_dicom(args: argparse.Namespace) -> int:
    from cxrclip.synthetic import radiograph_dicom

    with exit_on_user_error():
        ds = radiograph_dicom(read_image(args.image), modality=args.modality, view=args.view or None,
                              photometric=args.photometric, patient_id=args.patient_id)  # fmt: skip
        atomic_write(args.out, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
    print(f"wrote {args.out}: {args.modality} {args.view or '(no view)'} {args.photometric}, "
          f"study {ds.StudyInstanceUID}, instance {ds.SOPInstanceUID} (a test image: not a patient's)")  # fmt: skip
    return 0


def _label_names(labels_file: str | None) -> tuple[str, ...]:
    if not labels_file:
        return config_labels("cgmh")  # configs/labels/cgmh.yaml
    text = Path(labels_file).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _validate(args: argparse.Namespace) -> int:
    cfg = _data_config(args.csv, args.split, args)
    try:
        records = load_records(cfg, check_images=True)
        if args.deep:
            _decode_all(records, cfg.csv_path)
    except (DataValidationError, PromptFileError, ConfigError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 2
    summary = summarize(cfg, records)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"OK: {summary['csv']}: {summary['rows']} rows, {summary['images']} images, "
            f"{summary['rows_without_label']} rows without a positive label"
        )
        width = max(len(n) for n in summary["label_counts"])
        for name, count in summary["label_counts"].items():
            print(f"  {name:<{width}}  {count:6d}")
    return 0


def _decode_all(records, csv_path: Path) -> None:

    problems = Problems(str(csv_path))
    for r in records:
        for path in r.images:
            try:
                read_image(path)
            except ImageReadError as e:
                problems.add(r.line, str(e))
    problems.raise_if_any()


def _calibrate(args: argparse.Namespace) -> int:
    from cxrclip.eval.calibrate import calibrate_checkpoint, calibrate_routed

    with exit_on_user_error():
        split = args.split or ("valid" if "text_label" in _csv_header(args.data) else "cls")
        rules = {}
        for item in args.label_rule or []:
            label, sep, rule = item.partition(":")
            if not sep:
                raise CalibrationError(f"--label-rule {item!r}: expected LABEL:RULE (Pneumothorax:sensitivity=0.95)")
            rules[label.strip()] = rule.strip()
        settings = CalibrationSettings.from_mapping(
            {
                "method": args.method,
                "rule": args.rule,
                "rules": rules,
                "min_positives": args.min_positives,
                "precision": args.precision,
            }
        )
        data = _data_config(args.data, split, args)
        unknown = sorted(set(rules) - set(data.label_names))
        if unknown:
            raise CalibrationError(f"--label-rule names unknown labels {unknown}")
        if is_routed(args.checkpoint):
            if args.out:
                raise CalibrationError("a routed model's members are calibrated in place: leave out --out")
            calibration = calibrate_routed(
                args.checkpoint, [data], settings, device=args.device, text_encoder=args.text_encoder
            )
        else:
            calibration = calibrate_checkpoint(
                args.checkpoint, [data], settings, out=args.out, device=args.device, text_encoder=args.text_encoder,
                site=args.site,
            )  # fmt: skip
    print(f"calibration stored in {args.out or args.checkpoint} (fitted on {args.data}, {split} format):")
    width = max(len(n) for n in calibration.labels)
    for name, c in calibration.labels.items():
        state = c.method if c.calibrated else f"UNCALIBRATED ({c.note})"
        counts = f"{c.n_pos:4d} pos / {c.n_neg:4d} neg"
        print(f"  {name:<{width}}  threshold {c.threshold:.3f}  {c.rule:<16} {counts}  {state}")
    return 0


def _csv_header(path: str) -> list[str]:
    """A CSV's column names ([] when it cannot be read: the data check then says why)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _data_config(csv_path: str, split: str, args: argparse.Namespace) -> DataConfig:
    """A data config for one CSV given on the command line."""
    return DataConfig(
        name=Path(csv_path).stem,
        data_type=SPLIT_TYPES[split],
        data_path=str(Path(csv_path).resolve()),
        image_root=args.image_root,
        label_names=_label_names(args.labels),
        label_format=getattr(args, "label_format", "list"),
        blank_labels=getattr(args, "blank_labels", "error"),
        prompt_path=args.prompts,
        normal_sentence=NORMAL_SENTENCE,
    )


def _reviews_export(args: argparse.Namespace) -> int:
    from cxrclip.reviews.export import export_reviews
    from cxrclip.reviews.store import ReviewStore

    with exit_on_user_error():
        store = ReviewStore(database_url(args.db, must_exist=True))
        summary = export_reviews(store, args.out, _label_names(args.labels), load_prompts(args.prompts))
    print(f"{summary['images']} reviewed images ({summary['reviews']} reviews, {summary['corrected']} corrected, "
          f"{summary['images_kept']} with the image kept) from {summary['store']}:")  # fmt: skip
    for kind, path in summary["files"].items():
        print(f"  {kind:7s} {path}")
    print("read the test CSV with --blank-labels excluded (blank = can't tell or not reviewed)")
    return 0


def _reviews_to_pacs(args: argparse.Namespace) -> int:
    from cxrclip.pacs.assessment import send_review
    from cxrclip.reviews.store import ReviewStore

    with exit_on_user_error():
        if not args.dicomweb:
            raise ConfigError("cxrclip reviews to-pacs needs --dicomweb URL (the PACS the images came from)")
        store = ReviewStore(database_url(args.db, must_exist=True))
        pacs = Connection.from_args(args).open()
        counts = {"stored": 0, "already": 0}
        for review in (r for r in store.list() if "dicom" in r):
            counts["stored" if send_review(pacs, review)["stored"] else "already"] += 1
    print(f"reviews of PACS images: {counts['stored']} stored as verified SRs, {counts['already']} already there")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from cxrclip.change.run import compare_models, compare_on_reviews, verdict_lines

    with exit_on_user_error():
        if bool(args.test) == bool(args.db):
            raise ConfigError("cxrclip compare needs the reviewed cases: --db DB (the review store) or --test CSV")
        if args.db:
            out = compare_on_reviews(args.plan, args.db, args.challenger, args.champion, device=args.device,
                                     patients=args.patients)  # fmt: skip
        elif not args.champion:
            raise ConfigError("cxrclip compare --test needs --champion MODEL")
        else:
            out = compare_models(args.plan, args.test, args.champion, args.challenger, device=args.device,
                                 patient_column=args.patient_column)  # fmt: skip
        if args.out:
            atomic_write_text(args.out, json.dumps(out, indent=1))
    print("\n".join(verdict_lines(out)))
    return 0


def _retrain(args: argparse.Namespace) -> int:
    from cxrclip.change.retrain import evidence_lines, retrain

    with exit_on_user_error():
        manifest = retrain(args.reviews, args.base, args.out, scope=args.scope, extra_train=args.train,
                           prompts=args.prompts, patients=args.patients, valid_frac=args.valid_frac,
                           min_reviewed=args.min_reviewed, epochs=args.epochs, seed=args.seed,
                           gate_other=args.gate_other)  # fmt: skip
    split = manifest["split"]
    print(f"challenger {manifest['challenger']['path']} (SHA-256 {manifest['challenger']['sha256'][:12]}…) from "
          f"{manifest['base']['path']}: trained {manifest['trained']}")  # fmt: skip
    print(f"on {len(manifest['images']['fit'])} reviewed films ({split['fit_patients']} patients), calibrated on "
          f"{len(manifest['images']['validation'])} ({split['validation_patients']} patients); best epoch "
          f"{manifest['epochs']['best']} of {manifest['epochs']['of']}")  # fmt: skip
    print("\n".join(evidence_lines(manifest)))
    print("next: cxrclip compare --db ... --plan PLAN.yaml --challenger " + manifest["challenger"]["path"])
    return 0


def _model_change(args: argparse.Namespace) -> int:
    from cxrclip.change.promote import champion, promote, rollback
    from cxrclip.reviews.store import ReviewStore

    with exit_on_user_error():
        store = ReviewStore(database_url(args.db, must_exist=args.command != "promote"))
        if args.command == "promote":
            row = promote(store, args.verdict, args.plan, args.challenger, args.by)
        elif args.command == "rollback":
            row = rollback(store, args.by, args.reason)
        else:
            row = None
        now = champion(store)
    if row is not None:
        print(f"{row['action']} by {row['by']} at {row['created_at']}: {row['from_path']} -> {row['to_path']}")
    print(f"champion: {now['path']} (SHA-256 {now['sha256'][:12]}…, since {now['since']})" if now else
          "champion: none recorded (the model each command is given answers)")  # fmt: skip
    return 0


def _read_users(path: str | None) -> tuple[tuple[str, str], ...]:
    """--users FILE: a JSON object {reader name: their bearer token}."""
    if not path:
        return ()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--users {path}: cannot read a JSON object {{name: token}} ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) >= 16
                                             for k, v in data.items()):  # fmt: skip
        raise ConfigError(f"--users {path}: expected {{name: token}} with tokens of at least 16 characters")
    if len(set(data.values())) != len(data):
        raise ConfigError(f"--users {path}: two readers share a token")
    return tuple(data.items())


def _pacs(argv: list[str]) -> int:
    from cxrclip.pacs.worker import main as pacs_main

    return pacs_main(argv)


def _serve(args: argparse.Namespace) -> int:
    from cxrclip.serve.app import ServeSettings, serve

    with exit_on_user_error():
        if not (args.model_path or args.champion_db):
            raise ConfigError("cxrclip serve needs --model_path MODEL (or --champion-db DB)")
        settings = ServeSettings(
            model=PredictorOptions.from_args(args),
            champion_db=args.champion_db,
            host=args.host,
            port=args.port,
            token=args.token,
            insecure=args.insecure,
            max_upload_mb=args.max_upload_mb,
            workers=args.workers,
            cors_origins=tuple(args.cors_origin or ()),
            users=_read_users(args.users),
            db=None if args.no_reviews else args.db,
            keep_images=args.keep_images,
            pacs=Connection.from_args(args) if args.dicomweb else None,
            shadow=args.shadow,
        )
        serve(settings)
    return 0


def _fit_gate(args: argparse.Namespace) -> int:
    from cxrclip.fit_gate import GateFit, fit_gate_checkpoint, summary_lines

    with exit_on_user_error():
        fit = GateFit(valid_frac=args.valid, target_frr=args.target_frr, generated=args.generated, seed=args.seed,
                      pixels=not args.embedding_only)  # fmt: skip
        gate = fit_gate_checkpoint(args.checkpoint, args.frontal, args.other or [], fit=fit, out=args.out,
                                   device=args.device, text_encoder=args.text_encoder,
                                   precision=args.precision)  # fmt: skip
    print(f"input gate stored in {args.out or args.checkpoint}:")
    for line in summary_lines(gate):
        print("  " + line)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from cxrclip.model.checkpoint import convert_checkpoint

    with exit_on_user_error():
        path = convert_checkpoint(args.checkpoint, args.out)
    print(f"wrote {path}: weights and config as plain data, no optimizer state; loads with weights_only=True")
    return 0


def _route(args: argparse.Namespace) -> int:
    from cxrclip.eval.route import route_by_validation

    with exit_on_user_error():
        if bool(args.member) == bool(args.candidates):
            raise RoutingError(
                "give either --member NAME=CKPT[:labels] (one per member) or --candidates A B ... --data"
            )
        if args.member:
            members = [Member.parse(m) for m in args.member]
            out = write_routed(args.out, members, default=args.default, overwrite=args.overwrite)
        else:
            if not args.data:
                raise RoutingError("--candidates needs --data VALID.csv to choose on (never the test split)")
            split = "valid" if "text_label" in _csv_header(args.data) else "test"
            data = _data_config(args.data, split, args)
            out = route_by_validation(
                args.candidates, args.data, args.out, data_config=data, device=args.device, overwrite=args.overwrite
            )
        manifest = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    print(f"wrote {Path(out) / MANIFEST}: use the folder as --model_path / test.checkpoint")
    for m in manifest["members"]:
        print(f"  {m['name']:<16} {m['path']}\n  {'':<16} answers: {', '.join(m['labels'])}")
    for label, e in manifest["card"].get("evidence", {}).items():
        print(f"  {label}: {e.get('chosen', 'default')} — {e['why']}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from cxrclip.bundle import export_bundle, export_routed_bundle

    if args.member:
        with exit_on_user_error():
            if args.checkpoint or args.labels or args.prompts:
                raise RoutingError("--member exports a routed bundle: leave out --checkpoint, --labels and --prompts")
            out = export_routed_bundle(
                args.out,
                [Member.parse(m) for m in args.member],
                default=args.default,
                overwrite=args.overwrite,
                onnx=not args.no_onnx,
                text_encoder=args.text_encoder,
            )
            manifest = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
        print(
            f"wrote routed bundle {out}: "
            + "; ".join(f"{m['name']} → {len(m['labels'])} labels" for m in manifest["members"])
        )
        return 0
    with exit_on_user_error():
        if not args.checkpoint:
            raise RoutingError("cxrclip export needs --checkpoint CKPT (or --member NAME=CKPT[:labels] ...)")
        labels = list(_label_names(args.labels)) if args.labels else None
        path = export_bundle(
            args.checkpoint,
            args.out,
            prompts=args.prompts,
            labels=labels,
            onnx=not args.no_onnx,
            overwrite=args.overwrite,
            text_encoder=args.text_encoder,
        )
        manifest = Bundle(path).manifest
    sizes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
    print(
        f"wrote {path} ({sizes:.1f} MB): {len(manifest['labels'])} labels, "
        f"image encoder {'ONNX + ' if 'image_encoder.onnx' in manifest['files'] else ''}safetensors; "
        f"use it as --model_path for inference.py / cxrclip serve"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cxrclip.demo import run_demo

    with exit_on_user_error():
        sizes = {k: v for k, v in _data_size(args).items() if k != "image_size"}
        run_demo(args.out, **sizes, png_size=args.image_size, image_size=args.train_size, epochs=args.epochs)
    return 0


def _hydra_job(config_name: str, target: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand that composes ``config_name`` with the given overrides and runs ``target`` (``module:function``,
    imported when the subcommand runs) in-process."""

    def job(args: argparse.Namespace) -> int:
        import importlib

        from cxrclip.config import compose

        with exit_on_user_error():
            overrides = list(args.overrides)
            name = config_name
            if overrides[:1] == ["--config-name"] and len(overrides) > 1:
                name, overrides = overrides[1], overrides[2:]
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(compose(name, overrides))
        return 0

    return job


def _infer(args: argparse.Namespace) -> int:

    return infer_main(args.args)


def _train(args: argparse.Namespace) -> int:
    """``train.py``'s job in this process, under Hydra's own entry point (run folder, logging, ``--multirun``)."""
    import hydra

    from cxrclip.jobs import pretrain

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def main(cfg) -> None:
        logging.getLogger("cxrclip").setLevel(logging.INFO)
        with exit_on_user_error():
            pretrain(cfg)

    argv = sys.argv
    sys.argv = ["cxrclip-train", *args.overrides]
    try:
        main()
    finally:
        sys.argv = argv
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrclip", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n-train", type=int, default=800)
        p.add_argument("--n-valid", type=int, default=100)
        p.add_argument("--n-test", type=int, default=200)
        p.add_argument("--image-size", type=int, default=256, help="the generated PNGs' size in pixels")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="generate synthetic data, then train, evaluate and run inference on it")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-size", type=int, help="model input size (default: 192, the demo's recipe)")
    add_data_args(p)
    p.set_defaults(func=_demo, n_train=600)  # the demo's budget

    p = sub.add_parser("train", help="the train.py job: cxrclip train [hydra overrides]")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="the evaluate_clip.py job: cxrclip evaluate test.checkpoint=CKPT [...]")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_hydra_job("eval_clip", "cxrclip.eval.evaluate:evaluate"))

    p = sub.add_parser("finetune", help="the finetune.py job: [--config-name finetune_10] model.load_backbone_weights=")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_hydra_job("finetune_100", "cxrclip.jobs:probe"))

    p = sub.add_parser("evaluate-finetune", help="the evaluate_finetune.py job: test.checkpoint=PROBE_CKPT [...]")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_hydra_job("eval_finetune", "cxrclip.eval.finetune:evaluate_finetune"))

    p = sub.add_parser("infer", help="the inference.py job: cxrclip infer --model_path CKPT --image_path IMG")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_infer)

    p = sub.add_parser("pacs", help="answer new radiographs on a PACS (DICOMweb) with a DICOM SR stored back")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _pacs(args.args))

    p = sub.add_parser(
        "calibrate",
        help="fit per-label calibration and operating points on validation data; store them in the checkpoint",
    )
    p.add_argument("--checkpoint", required=True, help="a CLIP (model-best.tar, published) or linear-probe checkpoint")
    p.add_argument("--data", required=True, help="validation CSV: image + text_label, or image + 0/1 label columns")
    p.add_argument("--split", choices=["valid", "cls"], help="CSV format (default: from its header)")
    p.add_argument("--rule", default="mcc", help="mcc | youden | f1 | sensitivity=0.95 | specificity=0.9 | fixed=0.5")
    p.add_argument("--label-rule", action="append", help="per-label rule, e.g. 'Pneumothorax:sensitivity=0.95'")
    p.add_argument("--method", choices=["platt", "isotonic"], default="platt")
    p.add_argument("--min-positives", type=int, default=5, help="fewer positives: the label stays uncalibrated")
    p.add_argument("--blank-labels", choices=["error", "excluded", "negative"], default="error",
                   help="cls: what a blank 0/1 cell means (reviewed cases: excluded)")  # fmt: skip
    p.add_argument("--site", help="store this as the calibration of site NAME, beside the model's own "
                   "(inference.py / serve / pacs --site NAME use it)")  # fmt: skip
    p.add_argument("--out", help="write the calibrated checkpoint here (default: rewrite --checkpoint atomically)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file (zero-shot scores)")
    p.add_argument("--labels", help="a text file with one label name per line (default: the 13 CGMH labels)")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the CSV's folder)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--text-encoder", help="local folder of the text encoder (offline)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the image encoder's while "
                   "calibrating: calibrate under the precision that will answer (a bf16-calibrated model answers in "
                   "bf16 under --precision auto where the CPU has native bf16)")  # fmt: skip
    p.set_defaults(func=_calibrate)

    p = sub.add_parser(
        "fit-gate", help="fit the input gate (frontal chest radiograph or not) and store it in the checkpoint"
    )
    p.add_argument("--checkpoint", required=True, help="the CLIP checkpoint whose image embedding the gate reads")
    p.add_argument("--frontal", action="append", required=True, help="frontal chest films: a folder or a CSV (image)")
    p.add_argument(
        "--other",
        action="append",
        help="images that are not: a CSV (image, kind, patient_id) or a folder (sub-folder name = kind, e.g. lateral/)",
    )
    p.add_argument("--generated", type=int, default=100, help="add N generated negatives (noise, rotated, inverted)")
    p.add_argument("--target-frr", type=float, default=0.01, help="false refusals of frontal films allowed (0.01)")
    p.add_argument("--valid", type=float, default=0.3, help="share held out (whole patients) to choose the threshold")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the image encoder's while "
                   "embedding: fit under the precision that will answer (like calibrate --precision)")  # fmt: skip
    p.add_argument("--embedding-only", action="store_true", help="read the image embedding only, not also a 32×32 "
                   "thumbnail (the thumbnail is what catches inverted films)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the checkpoint with its gate here (default: rewrite --checkpoint atomically)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--text-encoder", help="local folder of the text encoder (offline)")
    p.set_defaults(func=_fit_gate)

    p = sub.add_parser("serve", help="a local web page and REST API over a checkpoint (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on /v1/* (needed to bind elsewhere)")
    p.add_argument("--insecure", action="store_true", help="allow another --host without a token")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="larger uploads get 413")
    p.add_argument("--workers", type=int, default=2, help="predictions run at once (a bounded thread pool)")
    p.add_argument("--cors-origin", action="append", help="allow this web origin to call the API (default: none)")
    p.add_argument("--db", default="cxrclip-reviews.sqlite", help="the review store: a SQLite file (default "
                   "./cxrclip-reviews.sqlite) or postgresql+psycopg://... shared by several servers")  # fmt: skip
    p.add_argument("--users", metavar="FILE", help="a JSON file {reader name: token}: each reader's own bearer token; "
                   "their reviews are signed with their name")  # fmt: skip
    p.add_argument("--no-reviews", action="store_true", help="no review store: the page shows no review controls")
    p.add_argument("--keep-images", metavar="DIR", help="keep each reviewed image here (default: only its SHA-256)")
    p.add_argument("--shadow", metavar="CHALLENGER", help="a challenger that answers every image silently: logged "
                   "with its hash for /monitor's comparison, never shown, never in an API answer")  # fmt: skip
    add_connection_arguments(p, what="the PACS a review of a DICOM image goes back to, as a verified SR")
    p.add_argument("--champion-db", metavar="DB", help="serve the champion cxrclip promote / rollback recorded in "
                   "this review store (else --model_path); read at start: restart after a promotion")  # fmt: skip
    PredictorOptions.add_arguments(p, required=False)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "convert", help="rewrite a checkpoint (e.g. from the original CXR-CLIP trainer) as a pickle-free cxrclip one"
    )
    p.add_argument("--checkpoint", required=True, help="the checkpoint to read (safely)")
    p.add_argument("--out", required=True, help="where to write the converted checkpoint")
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "export", help="write an inference bundle (safetensors/ONNX weights, prompt embeddings, calibration)"
    )
    p.add_argument("--checkpoint", help="a CLIP checkpoint (model-best.tar or published)")
    p.add_argument("--member", action="append", help="a routed bundle: NAME=CKPT[:label,label...] per member")
    p.add_argument("--default", help="routed: the member for free text and the ranking (default: the first)")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--prompts", help="prompt file (default: the one the checkpoint was trained with)")
    p.add_argument("--labels", help="a text file with one label name per line (default: the training labels)")
    p.add_argument("--no-onnx", action="store_true", help="PyTorch weights only (inference then imports torch)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--text-encoder", "--text_encoder", help="local folder of the text encoder (offline)")
    p.set_defaults(func=_export)

    p = sub.add_parser("route", help="several models as one: each label answered by the member chosen for it")
    p.add_argument("--member", action="append", help="NAME=CKPT_OR_BUNDLE[:label,label...] (labels: default all left)")
    p.add_argument("--candidates", nargs="+", help="choose per label on --data; the first is the default model")
    p.add_argument("--data", help="validation CSV (image + text_label, or image + 0/1 label columns)")
    p.add_argument("--default", help="with --member: the member for free text and the ranking (default: the first)")
    p.add_argument("--out", required=True, help="the routed model's folder (routed.json)")
    p.add_argument("--labels", help="a text file with one label name per line (default: the 13 CGMH labels)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file (to read --data's labels)")
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the CSV's folder)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing routed.json")
    p.set_defaults(func=_route)

    p = sub.add_parser("demo-data", help="write a synthetic CGMH-style dataset (train/valid/test CSVs + images)")
    p.add_argument("out", help="output folder")
    add_data_args(p)
    p.set_defaults(func=_demo_data)

    p = sub.add_parser("compare", help="a challenger against the champion on reviewed cases, judged by a change-"
                       "control plan declared beforehand (docs/USER_GUIDE.md)")  # fmt: skip
    p.add_argument("--plan", required=True, help="the change-control plan (YAML); its SHA-256 is in the verdict")
    p.add_argument("--db", help="the review store: its reviewed films with kept images, less those either model "
                   "trained on (cxrclip retrain records them)")  # fmt: skip
    p.add_argument("--test", help="or a CSV of reviewed cases the challenger never trained on: image and 0/1 label "
                   "columns (blank: not reviewed), e.g. reviews export's test CSV")  # fmt: skip
    p.add_argument("--champion", help="the model answering now (checkpoint, bundle or routed); with --db the default "
                   "is the champion the audit rows name, else the challenger's base")  # fmt: skip
    p.add_argument("--challenger", required=True, help="the candidate")
    p.add_argument("--patient-column", help="--test: resample whole patients by this column (default: each image)")
    p.add_argument("--patients", help="--db: a CSV of image,patient (default: a PACS film's study, else the image)")
    p.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--out", help="write the verdict with its evidence as JSON here")
    p.set_defaults(func=_compare)

    p = sub.add_parser("retrain", help="a challenger from the site's reviews: trained as the base's recipe on "
                       "reviewed films, split by patient, calibrated on validation (docs/USER_GUIDE.md)")  # fmt: skip
    p.add_argument("--reviews", required=True, help="the review store (reviews with their images kept)")
    p.add_argument("--base", required=True, help="the checkpoint to start from (the champion)")
    p.add_argument("--out", required=True, help="a new folder: data/, checkpoints/model-best.tar, retrain.json")
    p.add_argument("--train", nargs="+", default=[], help="also the original training CSV(s) (image, text_label)")
    p.add_argument("--scope", nargs="+", help="the labels that must have enough reviewed cases (default: all)")
    p.add_argument("--prompts", help="prompt file (default: the base's)")
    p.add_argument("--patients", help="a CSV of image,patient (default: a PACS film's study, else the image)")
    p.add_argument("--valid-frac", type=float, default=0.3, help="patients for validation and calibration")
    p.add_argument("--min-reviewed", type=int, default=5, help="positives and negatives per label and part")
    p.add_argument("--epochs", type=int, help="default: the base's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-other", nargs="+", default=[], help="real non-frontal images (folders or CSVs, as "
                   "fit-gate --other) for the challenger's refitted input gate")  # fmt: skip
    p.set_defaults(func=_retrain)

    p = sub.add_parser("promote", help="make a challenger the champion: only with a compare verdict that says so, "
                       "under the same plan, of the same files; an append-only audit row")  # fmt: skip
    p.add_argument("--db", required=True, help="the review store (it keeps the audit rows)")
    p.add_argument("--verdict", required=True, help="cxrclip compare --out's JSON")
    p.add_argument("--plan", required=True, help="the change-control plan the verdict was reached under")
    p.add_argument("--challenger", required=True, help="the model to promote (the one compare judged)")
    p.add_argument("--by", required=True, help="who promotes (kept in the audit row)")
    p.set_defaults(func=_model_change)
    p = sub.add_parser("rollback", help="back to the model the last promotion replaced (an append-only audit row)")
    p.add_argument("--db", required=True)
    p.add_argument("--by", required=True)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=_model_change)
    p = sub.add_parser("champion", help="the model in effect, by the audit rows")
    p.add_argument("--db", required=True)
    p.set_defaults(func=_model_change)

    p = sub.add_parser("reviews", help="the reviews saved in cxrclip serve: export them as data")
    reviews = p.add_subparsers(dest="reviews_command", required=True)
    q = reviews.add_parser("export", help="the reviewed cases as a CGMH test CSV (and a train CSV of kept images)")
    q.add_argument("--db", required=True, help="the review store: a SQLite file or postgresql+psycopg://...")
    q.add_argument("--out", required=True, help="folder for reviewed_test.csv, reviewed_train.csv, export.json")
    q.add_argument("--labels", help="a text file with one label name per line (default: the 13 CGMH labels)")
    q.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file (the test CSV's text column)")
    q.set_defaults(func=_reviews_export)
    q = reviews.add_parser("to-pacs", help="store each review of a PACS image in its study as a verified SR (those "
                           "a PACS outage held back; never twice)")  # fmt: skip
    q.add_argument("--db", required=True, help="the review store: a SQLite file or postgresql+psycopg://...")
    add_connection_arguments(q)
    q.set_defaults(func=_reviews_to_pacs)

    p = sub.add_parser("to-dicom", help="wrap a PNG/JPEG film as a DICOM radiograph (to try cxrclip pacs on a PACS)")
    p.add_argument("image", help="a PNG or JPEG film")
    p.add_argument("out", help="the .dcm file to write")
    p.add_argument("--modality", default="DX", choices=["DX", "CR", "CT"])
    p.add_argument("--view", default="PA", help="ViewPosition (PA, AP, LL, ...; '' for none)")
    p.add_argument("--photometric", default="MONOCHROME2", choices=["MONOCHROME2", "MONOCHROME1"])
    p.add_argument("--patient-id", default="CXRCLIP-DEMO-1")
    p.set_defaults(func=_to_dicom)

    p = sub.add_parser("validate-data", help="check a CSV (columns, lists, labels, images) and summarize it")
    p.add_argument("csv")
    p.add_argument(
        "--split",
        choices=sorted(SPLIT_TYPES),
        default="train",
        help="train/valid: image + text_label; test: image + 0/1 label columns + text; cls: no text",
    )
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file (train/valid)")
    p.add_argument("--labels", help="a text file with one label name per line (default: the 13 CGMH labels)")
    p.add_argument("--label-format", choices=["list", "triplet"], default="list")
    p.add_argument(
        "--blank-labels",
        choices=["error", "excluded", "negative"],
        default="error",
        help="test/cls: what a blank 0/1 cell means (default: an error)",
    )
    p.add_argument("--image-root", help="folder that relative image paths start from (default: the CSV's folder)")
    p.add_argument("--deep", action="store_true", help="decode every image fully (slower)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["infer"]:  # inference.py's own options, passed through untouched
        from cxrclip.infer import main as infer_main

        return infer_main(argv[1:])
    if argv[:1] == ["pacs"]:  # the worker's own options
        return _pacs(argv[1:])
    if argv[:1] == ["train"]:  # Hydra's own flags (--multirun, --cfg job, ...) pass through untouched
        return _train(argparse.Namespace(overrides=argv[1:]))
    if argv[:1] == ["finetune"] and not {"-h", "--help"} & set(argv[1:]):  # Hydra's --config-name passes through too
        return _hydra_job("finetune_100", "cxrclip.jobs:probe")(argparse.Namespace(overrides=argv[1:]))
    args = build_parser().parse_args(argv)
    if args.debug:
        import os

        os.environ["CXRCLIP_DEBUG"] = "1"
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
