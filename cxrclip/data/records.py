"""CSV files → typed, validated rows (records), with every problem reported at once by file:line."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrclip.data.cells import images_cell, label_cell, label_list_cell, parse_list_cell, text_cell, text_labels_cell
from cxrclip.data.schema import DataConfig, ImageTextRecord, LabeledRecord, Problems, csv_line


def read_csv(path: Path, required: Iterable[str], problems: Problems) -> pd.DataFrame | None:
    """Read a CSV as strings (no NaN guessing); report a missing file or missing columns."""
    if not path.is_file():
        problems.add(None, "file not found (set data_path in the data config, or pass data_path=...)")
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        problems.add(None, f"not a readable CSV ({type(e).__name__}: {e})")
        return None
    df = df.drop(columns=[c for c in df.columns if c.startswith("Unnamed: ")])
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.add(1, f"missing column(s) {missing}; found {list(df.columns)}")
        return None
    if len(df) == 0:
        problems.add(None, "the CSV has no rows")
        return None
    return df


def view_images(df: pd.DataFrame, index: int, line: int, cfg: DataConfig, problems: Problems, check: bool):
    """Per view listed in the row's ``view`` cell, its images (from the column named after the view)."""
    try:
        views = parse_list_cell(df["view"].iat[index])
    except (ValueError, SyntaxError):
        problems.add(line, f"column 'view': cannot parse {df['view'].iat[index]!r}")
        return ()
    out = []
    for view in dict.fromkeys(views):
        if view not in cfg.view_columns:
            continue
        cell = df[view].iat[index]
        if cell.strip() in ("", "[]"):
            continue
        out.append(images_cell(cell, line, cfg.image_base, problems, check))
    return tuple(v for v in out if v)


def load_imagetext_records(cfg: DataConfig, *, check_images: bool = True) -> list[ImageTextRecord]:
    """Read and validate a train/valid CSV: ``image`` + ``text_label`` (labels turned into sentences), or
    ``image`` + ``text`` report sections (``text_source: report``), optionally with view columns."""
    problems = Problems(str(cfg.csv_path))
    report = cfg.text_source == "report"
    known: set[str] = set()
    if not report:
        try:
            known = set(cfg.label_names) & set(cfg.prompts().labels)
        except ValueError as e:
            problems.add(None, str(e))
            problems.raise_if_any()
    required = ["image", "text" if report else "text_label"]
    required += ["text_augment"] if report and cfg.use_text_augment else []
    required += ["view", *cfg.view_columns] if cfg.view_columns else []
    df = read_csv(cfg.csv_path, required, problems)
    problems.raise_if_any()
    records = []
    for index, image_cell in enumerate(df["image"]):
        line = csv_line(index)
        images = images_cell(image_cell, line, cfg.image_base, problems, check_images)
        views = view_images(df, index, line, cfg, problems, check_images) if cfg.view_columns else ()
        if report:
            texts = text_cell(df["text"].iat[index], line, "text", problems)
            if not texts:
                problems.add(line, "column 'text': empty report")
            augment = (
                text_cell(df["text_augment"].iat[index], line, "text_augment", problems)
                if (cfg.use_text_augment)
                else ()
            )
            records.append(ImageTextRecord(line, images, texts=texts, texts_augment=augment, views=views))
        else:
            pos, neg, unc = text_labels_cell(df["text_label"].iat[index], line, cfg, known, problems)
            records.append(ImageTextRecord(line, images, pos, neg, unc, views=views))
    problems.raise_if_any()
    return records


def pick_eval_text(sections: Sequence[str], how: str) -> str:
    """The test text of a row whose cell lists report sections (``[findings, impression]``)."""
    if not sections:
        return ""
    if how == "findings":
        return sections[0]
    if how == "impression":
        return sections[-1]
    if how == "longest":
        return max(sections, key=len)
    if how == "concat":
        return " ".join(sections)
    return sections[0] if len(sections) == 1 else " ".join(sections)


def load_labeled_records(cfg: DataConfig, *, need_text: bool, check_images: bool = True) -> list[LabeledRecord]:
    """Read and validate a test / classification CSV: ``image``, the labels (one 0/1 column per label, or a
    ``label`` list column, or none for retrieval-only sets) and, for image-text evaluation, ``text``."""
    problems = Problems(str(cfg.csv_path))
    if not cfg.label_names and cfg.label_source != "none":
        problems.add(None, f"data config {cfg.name!r} has no label_names")
        problems.raise_if_any()
    label_columns = {"columns": list(cfg.label_names), "label_column": ["label"], "none": []}[cfg.label_source]
    required = ["image", *label_columns] + (["text"] if need_text else [])
    df = read_csv(cfg.csv_path, required, problems)
    problems.raise_if_any()
    records = []
    columns = [df[name].tolist() for name in cfg.label_names] if cfg.label_source == "columns" else []
    for index, image_cell in enumerate(df["image"]):
        line = csv_line(index)
        images = images_cell(image_cell, line, cfg.image_base, problems, check_images)
        if cfg.label_source == "label_column":
            values = label_list_cell(df["label"].iat[index], cfg, line, problems)
        else:
            values = [
                label_cell(column[index], f"column {name!r}", line, cfg, problems)
                for name, column in zip(cfg.label_names, columns)
            ]
        text = ""
        if "text" in df.columns:
            text = pick_eval_text(text_cell(df["text"].iat[index], line, "text", problems), cfg.eval_text)
        if need_text and not text:
            problems.add(line, "column 'text': empty")
        records.append(LabeledRecord(line=line, images=images, labels=tuple(values), text=text))
    problems.raise_if_any()
    return records


def load_records(cfg: DataConfig, *, check_images: bool = True) -> list:
    """The records of a data config, by its declared ``data_type``."""
    if cfg.data_type == "imagetext":
        return load_imagetext_records(cfg, check_images=check_images)
    return load_labeled_records(cfg, need_text=cfg.data_type == "imagetext_eval", check_images=check_images)


def summarize(cfg: DataConfig, records: Sequence) -> dict:
    """Rows, images and per-label counts, for ``validate-data`` and the training log."""
    counts: Counter = Counter()
    no_label = 0
    for r in records:
        if isinstance(r, ImageTextRecord):
            counts.update(r.positives)
            no_label += not r.positives and r.has_label_set
        else:
            counts.update(n for n, v in zip(cfg.label_names, r.labels) if v == 1)
            no_label += not any(v == 1 for v in r.labels)
    return {
        "csv": str(cfg.csv_path),
        "rows": len(records),
        "images": sum(len(r.images) for r in records),
        "rows_without_label": no_label,
        "label_counts": {n: counts.get(n, 0) for n in cfg.label_names},
    }


def _positives(record) -> tuple:
    if isinstance(record, ImageTextRecord):
        return record.positives
    return tuple(j for j, v in enumerate(record.labels) if v == 1)


def stratified_subset(records: Sequence, frac: float, seed: int) -> list:
    """``data_frac``: a deterministic ``frac`` of the rows (training or classification records), stratified by
    each row's rarest positive label (rows without one form their own stratum), at least one row per stratum, so
    rare labels keep positives. Row order is kept."""
    if frac >= 1.0:
        return list(records)
    counts = Counter(p for r in records for p in _positives(r))
    strata: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        positives = _positives(r)
        key = repr(min(positives, key=lambda p: (counts[p], str(p)))) if positives else ""
        strata.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    keep = []
    for key in sorted(strata):
        rows = strata[key]
        keep += rng.permutation(rows)[: max(1, round(len(rows) * frac))].tolist()
    return [records[i] for i in sorted(keep)]
