"""One CSV cell → a value, with what is wrong reported into ``Problems`` as file:line (never raised one by one).

Every list-shaped cell (image paths, label lists, report sections, view lists) is read by :func:`literal_list`.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

from cxrclip.data.images import check_image_header
from cxrclip.data.schema import BLANK_MEANING, DataConfig, Problems, csv_line
from cxrclip.exceptions import InputError


def literal_list(cell: str) -> list | None:
    """A ``[...]`` cell (Python or JSON literal) as a list; ``None`` when it is not one."""
    cell = cell.strip()
    if not cell.startswith("["):
        return None
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, list) else None


def parse_list_cell(value: str) -> list:
    """A list cell, or one plain value (→ a one-item list); ``ValueError`` for a bracketed cell that is no list."""
    value = value.strip()
    if value.startswith("["):
        parsed = literal_list(value)
        if parsed is None:
            raise ValueError(f"cannot parse {value!r} as a list")
        return parsed
    return [value] if value else []


def images_cell(cell: str, line: int, base: Path, problems: Problems, check_images: bool) -> tuple[Path, ...]:
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


def label_names_cell(value: object, line: int, known: set[str], problems: Problems, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(line, f"column 'text_label': {what} must be a list of label names, got {value!r}")
        return ()
    unknown = [v for v in value if v not in known]
    if unknown:
        problems.add(line, f"column 'text_label': unknown label(s) {unknown} (not in label_names / prompt file)")
    return tuple(v for v in value if v in known)


def text_labels_cell(cell: str, line: int, cfg: DataConfig, known: set[str], problems: Problems):
    value = literal_list(cell)
    if value is None:
        problems.add(line, f"column 'text_label': cannot parse {cell!r} as a list (use [] for no findings)")
        return (), (), ()
    if cfg.label_format == "triplet":
        if len(value) != 3:
            problems.add(line, f"column 'text_label': expected [[pos], [neg], [unc]], got {cell!r}")
            return (), (), ()
        return tuple(label_names_cell(v, line, known, problems, k) for v, k in zip(value, ("pos", "neg", "unc")))
    return label_names_cell(value, line, known, problems, "the cell"), (), ()


def text_cell(cell: str, line: int, column: str, problems: Problems) -> tuple[str, ...]:
    """A report cell: a list of sections (``['findings', 'impression']``) or one plain string — one report,
    never a list of characters."""
    cell = cell.strip()
    if cell.startswith("["):
        value = literal_list(cell)
        if value is None or not all(isinstance(v, str) for v in value):
            problems.add(line, f"column {column!r}: cannot parse {cell[:60]!r} as a list of texts")
            return ()
        return tuple(v.strip() for v in value if v and v.strip())
    return (cell,) if cell else ()


BLANK = object()  # a blank label cell: what it means is declared by the data config (``blank_labels``)


def label_value(cell: str) -> int | None | object:
    """1, 0 or -1 (uncertain); BLANK for an empty/NaN cell; None for anything else."""
    cell = str(cell).strip()
    if cell == "" or cell.lower() == "nan":
        return BLANK
    try:
        value = float(cell)
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0, -1.0) else None


def label_cell(cell: str, where: str, line: int, cfg: DataConfig, problems: Problems) -> int:
    """One label cell of a test/classification row, with blanks read as the config declares (default: an error)."""
    value = label_value(cell)
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


def label_list_cell(cell: str, cfg: DataConfig, line: int, problems: Problems) -> tuple[int, ...]:
    """The original's ``label`` column: one 0/1 value (single label) or a list of them."""
    n = len(cfg.label_names)
    values = literal_list(cell) if cell.strip().startswith("[") else [cell]
    if values is None or len(values) != n:
        problems.add(line, f"column 'label': expected {n} value(s) of 0/1, got {cell!r}")
        return (-1,) * n
    return tuple(label_cell(str(v), "column 'label'", line, cfg, problems) for v in values)


def image_csv(path: Path) -> tuple[list[dict], list[Path]]:
    """A CSV with an ``image`` column (a path or a list cell): its rows and each row's first image, resolved
    against the CSV's folder; an unreadable file or cell is an :class:`InputError` naming ``file:line``."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from e
    if not rows or "image" not in rows[0]:
        raise InputError(f"{path}: needs an 'image' column and at least one row")
    images = []
    for index, row in enumerate(rows):
        try:
            images.append(path.parent / parse_list_cell(row["image"] or "")[0])
        except (ValueError, SyntaxError, IndexError) as e:
            raise InputError(f"{path}:{csv_line(index)}: column 'image': no image path in {row['image']!r}") from e
    return rows, images
