"""CSV files → typed, validated rows (records), with every problem reported at once by file:line."""

from __future__ import annotations

import ast
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from cxrclip.data.images import check_image_header
from cxrclip.data.prompts import PromptBank, load_prompts
from cxrclip.paths import resolve_user_path

DATA_TYPES = ("imagetext", "imagetext_eval", "image_classification")
LABEL_FORMATS = ("list", "triplet")
MAX_PROBLEMS_SHOWN = 30


@dataclass(frozen=True)
class DataConfig:
    """One entry of a ``data_train`` / ``data_valid`` / ``data_test`` config group."""

    name: str
    data_type: str
    data_path: str
    label_names: tuple[str, ...] = ()
    image_root: str | None = None
    label_format: str = "list"
    prompt_path: str | None = None
    num_negs: int = 0
    normal_sentence: str = "no acute findings."
    image_size: int = 224
    text_max_length: int = 256
    data_frac: float = 1.0

    @classmethod
    def from_mapping(cls, key: str, cfg: Mapping) -> DataConfig:
        cfg = dict(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known - {"n_class"})  # n_class: the original's, derived here
        if unknown:
            raise ValueError(f"data config {key!r}: unknown keys {unknown}; known keys: {sorted(known)}")
        cfg.pop("n_class", None)
        cfg.setdefault("name", key)
        if cfg.get("data_type") not in DATA_TYPES:
            raise ValueError(
                f"data config {key!r}: data_type must be one of {DATA_TYPES}, got {cfg.get('data_type')!r}"
            )
        if cfg.get("label_format", "list") not in LABEL_FORMATS:
            raise ValueError(f"data config {key!r}: label_format must be one of {LABEL_FORMATS}")
        if not cfg.get("data_path"):
            raise ValueError(f"data config {key!r}: data_path is empty; set it to your CSV file")
        cfg["label_names"] = tuple(cfg.get("label_names") or ())
        if len(set(cfg["label_names"])) != len(cfg["label_names"]):
            raise ValueError(f"data config {key!r}: label_names has duplicates")
        return cls(**cfg)

    @property
    def csv_path(self) -> Path:
        return resolve_user_path(self.data_path)

    @property
    def image_base(self) -> Path:
        return resolve_user_path(self.image_root) if self.image_root else self.csv_path.parent

    def prompts(self) -> PromptBank:
        if not self.prompt_path:
            raise ValueError(f"data config {self.name!r}: prompt_path is not set")
        bank = load_prompts(resolve_user_path(self.prompt_path))
        bank.check_covers(self.label_names)
        return bank


@dataclass(frozen=True)
class ImageTextRecord:
    """A training/validation row: images and either labels (to turn into sentences) or report texts."""

    line: int
    images: tuple[Path, ...]
    positives: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabeledRecord:
    """A test / classification row: images, one value per label (1, 0, or -1 = uncertain), optional text."""

    line: int
    images: tuple[Path, ...]
    labels: tuple[int, ...]
    text: str = ""


@dataclass
class Problems:
    """Collects problems as ``file:line: message``; raises them together."""

    source: str
    items: list[str] = field(default_factory=list)

    def add(self, line: int | None, message: str) -> None:
        self.items.append(f"{self.source}:{line}: {message}" if line else f"{self.source}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise DataValidationError(self.items)


class DataValidationError(ValueError):
    """One or more problems in a data file; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_PROBLEMS_SHOWN]
        more = len(self.problems) - len(shown)
        text = f"{len(self.problems)} problem(s) in the data:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


def csv_line(index: int) -> int:
    """Row index of the data frame → line in the file (line 1 is the header)."""
    return index + 2


def parse_list_cell(value: str) -> list:
    """A cell holding a Python/JSON list string, or one plain value (→ a one-item list)."""
    value = value.strip()
    if value.startswith("["):
        parsed = ast.literal_eval(value)
        if not isinstance(parsed, list):
            raise ValueError("not a list")
        return parsed
    return [value] if value else []


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


def _images(cell: str, line: int, base: Path, problems: Problems, check_images: bool) -> tuple[Path, ...]:
    try:
        items = parse_list_cell(cell)
    except (ValueError, SyntaxError):
        problems.add(line, f"column 'image': cannot parse {cell!r} as a list of paths")
        return ()
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        problems.add(line, f"column 'image': no image path in {cell!r}")
        return ()
    paths = tuple(p if p.is_absolute() else base / p for p in (Path(i.strip()) for i in items))
    if check_images:
        for p in paths:
            issue = check_image_header(p)
            if issue:
                problems.add(line, f"{issue}: {p}")
    return paths


def _label_list(value: object, line: int, known: set[str], problems: Problems, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(line, f"column 'text_label': {what} must be a list of label names, got {value!r}")
        return ()
    unknown = [v for v in value if v not in known]
    if unknown:
        problems.add(line, f"column 'text_label': unknown label(s) {unknown} (not in label_names / prompt file)")
    return tuple(v for v in value if v in known)


def _text_labels(cell: str, line: int, cfg: DataConfig, known: set[str], problems: Problems):
    try:
        value = ast.literal_eval(cell.strip()) if cell.strip() else None
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, list):
        problems.add(line, f"column 'text_label': cannot parse {cell!r} as a list (use [] for no findings)")
        return (), (), ()
    if cfg.label_format == "triplet":
        if len(value) != 3:
            problems.add(line, f"column 'text_label': expected [[pos], [neg], [unc]], got {cell!r}")
            return (), (), ()
        return tuple(_label_list(v, line, known, problems, k) for v, k in zip(value, ("pos", "neg", "unc")))
    return _label_list(value, line, known, problems, "the cell"), (), ()


def load_imagetext_records(cfg: DataConfig, *, check_images: bool = True) -> list[ImageTextRecord]:
    """Read and validate a train/valid CSV (columns ``image``, ``text_label``)."""
    problems = Problems(str(cfg.csv_path))
    try:
        known = set(cfg.label_names) & set(cfg.prompts().labels)
    except ValueError as e:
        problems.add(None, str(e))
        problems.raise_if_any()
    df = read_csv(cfg.csv_path, ["image", "text_label"], problems)
    problems.raise_if_any()
    records = []
    for index, (image_cell, label_cell) in enumerate(zip(df["image"], df["text_label"])):
        line = csv_line(index)
        images = _images(image_cell, line, cfg.image_base, problems, check_images)
        pos, neg, unc = _text_labels(label_cell, line, cfg, known, problems)
        records.append(ImageTextRecord(line=line, images=images, positives=pos, negatives=neg, uncertain=unc))
    problems.raise_if_any()
    return records


def _label_value(cell: str) -> int | None:
    cell = cell.strip()
    if cell == "":
        return -1
    try:
        value = float(cell)
    except ValueError:
        return None
    if math.isnan(value):
        return -1
    return int(value) if value in (0.0, 1.0, -1.0) else None


def load_labeled_records(cfg: DataConfig, *, need_text: bool, check_images: bool = True) -> list[LabeledRecord]:
    """Read and validate a test / classification CSV (``image``, one 0/1 column per label, ``text``)."""
    problems = Problems(str(cfg.csv_path))
    if not cfg.label_names:
        problems.add(None, f"data config {cfg.name!r} has no label_names")
        problems.raise_if_any()
    required = ["image", *cfg.label_names] + (["text"] if need_text else [])
    df = read_csv(cfg.csv_path, required, problems)
    problems.raise_if_any()
    records = []
    columns = [df[name].tolist() for name in cfg.label_names]
    texts = df["text"].tolist() if "text" in df.columns else [""] * len(df)
    for index, image_cell in enumerate(df["image"]):
        line = csv_line(index)
        images = _images(image_cell, line, cfg.image_base, problems, check_images)
        values = []
        for name, column in zip(cfg.label_names, columns):
            value = _label_value(column[index])
            if value is None:
                problems.add(line, f"column {name!r}: expected 0 or 1 (or -1/empty = uncertain), got {column[index]!r}")
                value = -1
            values.append(value)
        if need_text and not texts[index].strip():
            problems.add(line, "column 'text': empty")
        records.append(LabeledRecord(line=line, images=images, labels=tuple(values), text=texts[index].strip()))
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
            no_label += not r.positives
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


def stratified_subset(records: Sequence[LabeledRecord], frac: float, seed: int) -> list[LabeledRecord]:
    """A deterministic ``frac`` of the rows, stratified by each row's rarest positive label (rows without one form
    their own stratum), at least one row per stratum, so rare labels keep positives. Row order is kept."""
    if frac >= 1.0:
        return list(records)
    counts = Counter(j for r in records for j, v in enumerate(r.labels) if v == 1)
    strata: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        positives = [j for j, v in enumerate(r.labels) if v == 1]
        strata.setdefault(min(positives, key=lambda j: (counts[j], j)) if positives else -1, []).append(i)
    rng = np.random.default_rng(seed)
    keep = []
    for key in sorted(strata):
        rows = strata[key]
        keep += rng.permutation(rows)[: max(1, round(len(rows) * frac))].tolist()
    return [records[i] for i in sorted(keep)]
