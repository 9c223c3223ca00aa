"""The data contract as types: a data config (``DataConfig``), the typed rows it yields (``ImageTextRecord``,
``LabeledRecord``) and how problems are reported (``Problems`` → ``DataValidationError``, every one as file:line)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from cxrclip.data.prompts import PromptBank, load_prompts
from cxrclip.exceptions import ConfigError, UserError
from cxrclip.paths import CONFIG_DIR, resolve_user_path

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
        # n_class: the original's, derived here; image_size: the original's, but the image size belongs to the model's
        # preprocessing (base.image_size, stored in the checkpoint), never to a dataset
        unknown = sorted(set(cfg) - known - {"n_class", "image_size"})
        if unknown:
            raise ConfigError(f"data config {key!r}: unknown keys {unknown}; known keys: {sorted(known)}")
        cfg.pop("n_class", None)
        cfg.pop("image_size", None)
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

    def caption_prompts(self) -> PromptBank:
        """The sentences training captions are drawn from: the prompt file for a label dataset; none for a report
        dataset (``text_source: report``), whose captions are its own texts and which needs no prompt file."""
        return self.prompts() if self.text_source == "labels" else PromptBank(labels={}, path="<reports>")


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
