"""CSV files → typed, validated rows (records), with every problem reported at once by file:line."""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from cxrclip.data.images import check_image_header
from cxrclip.data.prompts import PromptBank, load_prompts
from cxrclip.exceptions import ConfigError, UserError
from cxrclip.paths import resolve_user_path

DATA_TYPES = ("imagetext", "imagetext_eval", "image_classification")
LABEL_FORMATS = ("list", "triplet")
TEXT_SOURCES = ("labels", "report")
BLANK_MEANING = {"excluded": -1, "negative": 0}  # what a blank 0/1 cell means, when the data config says
BLANK_LABELS = ("error", *BLANK_MEANING)
LABEL_SOURCES = ("columns", "label_column", "none")
EVAL_TEXTS = ("as_is", "findings", "impression", "longest", "concat")
MAX_PROBLEMS_SHOWN = 30


def named_label_list(name: str) -> list[str]:
    """``label_names: chexpert`` → the list in ``configs/labels/chexpert.yaml``."""
    from omegaconf import OmegaConf

    from cxrclip.paths import CONFIG_DIR

    path = CONFIG_DIR / "labels" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"label_names: no label list named {name!r}; known: {known} (or give a list)")
    return list(OmegaConf.load(path).names)


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
    # original CXR-CLIP formats, declared here (never guessed from the dataset's name):
    text_source: str = "labels"  # imagetext: "labels" (text_label column) or "report" (text column)
    use_text_augment: bool = False  # report rows: also sample the text_augment column (back-translation)
    sentence_shuffle: bool = False  # training reports: shuffle their sentences
    view_columns: tuple[str, ...] = ()  # e.g. [AP, PA, Lateral]: two views come from two different views
    label_source: str = "columns"  # test/classification: one 0/1 column per label, a "label" list column, or none
    eval_text: str = "as_is"  # test text from a [findings, impression] list: findings|impression|longest|concat
    blank_labels: str = "error"  # test/classification: a blank 0/1 cell is an error, or "excluded" / "negative"

    @classmethod
    def from_mapping(cls, key: str, cfg: Mapping) -> DataConfig:
        cfg = dict(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known - {"n_class"})  # n_class: the original's, derived here
        if unknown:
            raise ConfigError(f"data config {key!r}: unknown keys {unknown}; known keys: {sorted(known)}")
        cfg.pop("n_class", None)
        cfg.setdefault("name", key)
        if cfg.get("data_type") not in DATA_TYPES:
            raise ConfigError(
                f"data config {key!r}: data_type must be one of {DATA_TYPES}, got {cfg.get('data_type')!r}"
            )
        if cfg.get("label_format", "list") not in LABEL_FORMATS:
            raise ConfigError(f"data config {key!r}: label_format must be one of {LABEL_FORMATS}")
        if not cfg.get("data_path"):
            raise ConfigError(f"data config {key!r}: data_path is empty; set it to your CSV file")
        for option, allowed in (
            ("text_source", TEXT_SOURCES),
            ("label_source", LABEL_SOURCES),
            ("eval_text", EVAL_TEXTS),
            ("blank_labels", BLANK_LABELS),
        ):
            if cfg.get(option, allowed[0]) not in allowed:
                raise ConfigError(f"data config {key!r}: {option} must be one of {allowed}, got {cfg[option]!r}")
        cfg["view_columns"] = tuple(cfg.get("view_columns") or ())
        cfg["label_names"] = tuple(
            named_label_list(cfg["label_names"])
            if isinstance(cfg.get("label_names"), str)
            else cfg.get("label_names") or ()
        )
        if len(set(cfg["label_names"])) != len(cfg["label_names"]):
            raise ConfigError(f"data config {key!r}: label_names has duplicates")
        return cls(**cfg)

    @property
    def csv_path(self) -> Path:
        return resolve_user_path(self.data_path)

    @property
    def image_base(self) -> Path:
        return resolve_user_path(self.image_root) if self.image_root else self.csv_path.parent

    @property
    def prompts_file(self) -> Path:
        if not self.prompt_path:
            raise ConfigError(f"data config {self.name!r}: prompt_path is not set")
        return resolve_user_path(self.prompt_path)

    def prompts(self) -> PromptBank:
        bank = load_prompts(self.prompts_file)
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
    texts: tuple[str, ...] = ()  # report sections (text_source: report)
    texts_augment: tuple[str, ...] = ()
    views: tuple[tuple[Path, ...], ...] = ()  # images per available view (view_columns)

    @property
    def has_label_set(self) -> bool:
        return not self.texts


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


class DataValidationError(UserError, ValueError):
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


def _text_cell(cell: str, line: int, column: str, problems: Problems) -> tuple[str, ...]:
    """A report cell: a list of sections (``['findings', 'impression']``) or one plain string — one report,
    never a list of characters."""
    cell = cell.strip()
    if cell.startswith("["):
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.add(line, f"column {column!r}: cannot parse {cell[:60]!r} as a list of texts")
            return ()
        return tuple(v.strip() for v in value if v and v.strip())
    return (cell,) if cell else ()


def _view_images(df: pd.DataFrame, index: int, line: int, cfg: DataConfig, problems: Problems, check: bool):
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
        out.append(_images(cell, line, cfg.image_base, problems, check))
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
        images = _images(image_cell, line, cfg.image_base, problems, check_images)
        views = _view_images(df, index, line, cfg, problems, check_images) if cfg.view_columns else ()
        if report:
            texts = _text_cell(df["text"].iat[index], line, "text", problems)
            if not texts:
                problems.add(line, "column 'text': empty report")
            augment = (
                _text_cell(df["text_augment"].iat[index], line, "text_augment", problems)
                if (cfg.use_text_augment)
                else ()
            )
            records.append(ImageTextRecord(line, images, texts=texts, texts_augment=augment, views=views))
        else:
            pos, neg, unc = _text_labels(df["text_label"].iat[index], line, cfg, known, problems)
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


BLANK = object()  # a blank label cell: what it means is declared by the data config (``blank_labels``)


def _label_value(cell: str) -> int | None | object:
    """1, 0 or -1 (uncertain); BLANK for an empty/NaN cell; None for anything else."""
    cell = str(cell).strip()
    if cell == "" or cell.lower() == "nan":
        return BLANK
    try:
        value = float(cell)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0, -1.0) else None


def _label_cell(cell: str, where: str, line: int, cfg: DataConfig, problems: Problems) -> int:
    """One label cell of a test/classification row, with blanks read as the config declares (default: an error)."""
    value = _label_value(cell)
    if value is BLANK:
        if cfg.blank_labels in BLANK_MEANING:
            return BLANK_MEANING[cfg.blank_labels]
        problems.add(
            line,
            f"{where}: blank label; fill in 0/1 (-1 = uncertain) or declare blanks in the data config "
            "(blank_labels: excluded | negative)",
        )
        return -1
    if value is None:
        problems.add(line, f"{where}: expected 0 or 1 (or -1 = uncertain), got {cell!r}")
        return -1
    return value


def _label_list_cell(cell: str, cfg: DataConfig, line: int, problems: Problems) -> tuple[int, ...]:
    """The original's ``label`` column: one 0/1 value (single label) or a list of them."""
    n = len(cfg.label_names)
    try:
        values = parse_list_cell(cell) if cell.strip().startswith("[") else [cell]
    except (ValueError, SyntaxError):
        values = None
    if values is None or len(values) != n:
        problems.add(line, f"column 'label': expected {n} value(s) of 0/1, got {cell!r}")
        return (-1,) * n
    return tuple(_label_cell(str(v), "column 'label'", line, cfg, problems) for v in values)


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
        images = _images(image_cell, line, cfg.image_base, problems, check_images)
        if cfg.label_source == "label_column":
            values = _label_list_cell(df["label"].iat[index], cfg, line, problems)
        else:
            values = [
                _label_cell(column[index], f"column {name!r}", line, cfg, problems)
                for name, column in zip(cfg.label_names, columns)
            ]
        text = ""
        if "text" in df.columns:
            text = pick_eval_text(_text_cell(df["text"].iat[index], line, "text", problems), cfg.eval_text)
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
