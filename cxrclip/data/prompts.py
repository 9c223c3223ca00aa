"""The prompt file (label → pos/neg/unc sentences) and report generation from labels."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrclip.exceptions import UserError
from cxrclip.paths import PROJECT_ROOT

KINDS = ("pos", "neg", "unc")
DEFAULT_PROMPTS = PROJECT_ROOT / "datasets" / "train_prompts_cgmh.json"  # the CGMH prompt file the project ships
NORMAL_SENTENCE = "no tubes, lines or air leaks are seen."  # the report of a study with no positive label


class PromptFileError(UserError, ValueError):
    """The prompt file is missing, not JSON, or not shaped {label: {"pos": [...], "neg": [...], "unc": [...]}}."""


@dataclass(frozen=True)
class LabelPrompts:
    pos: tuple[str, ...]
    neg: tuple[str, ...]
    unc: tuple[str, ...]


@dataclass(frozen=True)
class PromptBank:
    """Sentences per label; empty strings were dropped at load so they can never be chosen."""

    labels: Mapping[str, LabelPrompts]
    path: str = "<memory>"

    def __contains__(self, label: str) -> bool:
        return label in self.labels

    def __getitem__(self, label: str) -> LabelPrompts:
        return self.labels[label]

    def check_covers(self, label_names: Sequence[str]) -> None:
        """Every configured label needs at least one positive sentence."""
        missing = [n for n in label_names if n not in self.labels]
        no_pos = [n for n in label_names if n in self.labels and not self.labels[n].pos]
        if missing or no_pos:
            parts = []
            if missing:
                parts.append(f"labels missing from the prompt file: {missing}")
            if no_pos:
                parts.append(f"labels with no non-empty 'pos' sentence: {no_pos}")
            raise PromptFileError(f"{self.path}: " + "; ".join(parts) + ". Add them to the prompt file.")

    @classmethod
    def from_dict(cls, data: object, path: str = "<memory>") -> PromptBank:
        if not isinstance(data, dict):
            raise PromptFileError(f"{path}: expected a JSON object {{label: {{'pos': [...], ...}}}}")
        labels = {}
        for label, entry in data.items():
            if not isinstance(entry, dict):
                raise PromptFileError(f"{path}: label {label!r} must map to an object with pos/neg/unc lists")
            unknown = set(entry) - set(KINDS)
            if unknown:
                raise PromptFileError(f"{path}: label {label!r} has unknown keys {sorted(unknown)}; use pos/neg/unc")
            kinds = {}
            for kind in KINDS:
                sentences = entry.get(kind, [])
                if isinstance(sentences, str) or not isinstance(sentences, list):
                    raise PromptFileError(f"{path}: {label!r}.{kind} must be a list of sentences")
                if not all(isinstance(s, str) for s in sentences):
                    raise PromptFileError(f"{path}: {label!r}.{kind} must hold only strings")
                kinds[kind] = tuple(s.strip() for s in sentences if s.strip())
            labels[label] = LabelPrompts(**kinds)
        return cls(labels=labels, path=path)


def load_prompts(path: str | Path) -> PromptBank:
    """Read and check a prompt file."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: not valid JSON ({e})") from e
    return PromptBank.from_dict(data, path=str(path))


def generate_report(
    positives: Sequence[str],
    bank: PromptBank,
    *,
    label_names: Sequence[str],
    normal_sentence: str,
    rng: random.Random | None = None,
    num_negs: int = 0,
    uncertain: Sequence[str] = (),
) -> str:
    """Turn a row's labels into a report (SPEC §3).

    ``rng=None`` is the deterministic (validation) mode: first sentence of each label, in the row's
    label order, no negatives, no shuffle. Otherwise one random ``pos`` sentence per positive label,
    ``num_negs`` random labels that are neither positive nor uncertain and have ``neg`` sentences (one
    random ``neg`` sentence each), one ``unc`` sentence per uncertain label, shuffled.
    """
    positives = list(dict.fromkeys(positives))
    uncertain = [u for u in dict.fromkeys(uncertain) if u not in positives]
    if rng is None:
        sentences = [bank[p].pos[0] for p in positives]
        sentences += [bank[u].unc[0] for u in uncertain if bank[u].unc]
        return " ".join(sentences) if sentences else normal_sentence

    sentences = [rng.choice(bank[p].pos) for p in positives]
    sentences += [rng.choice(bank[u].unc) for u in uncertain if bank[u].unc]
    if not sentences:
        sentences.append(normal_sentence)
    if num_negs > 0:
        taken = set(positives) | set(uncertain)
        pool = [n for n in label_names if n not in taken and n in bank and bank[n].neg]
        for n in rng.sample(pool, min(num_negs, len(pool))):
            sentences.append(rng.choice(bank[n].neg))
    rng.shuffle(sentences)
    return " ".join(sentences)
