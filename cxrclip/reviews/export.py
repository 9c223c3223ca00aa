"""``cxrclip reviews export``: the reviewed cases as data the other jobs read.

- ``reviewed_test.csv`` — the CGMH test format: ``image`` (the kept file, else the name the image was uploaded under:
  give ``--image-root`` to where you keep them), one 0/1 column per label — **blank** where the reviewer said "can't
  tell" or gave no verdict (read it with ``blank_labels: excluded`` / ``--blank-labels excluded``) — and ``text``, the
  positive prompt of each label reviewed present (the normal sentence when none). Evaluate with it, or refit a site's
  calibration: ``cxrclip calibrate --checkpoint CKPT --data reviewed_test.csv --split cls --blank-labels excluded
  --site NAME``.
- ``reviewed_train.csv`` (only the kept images): ``image`` and ``text_label`` (the labels reviewed present; an image
  with none gets the normal sentence's label list, empty) for fine-tuning.
- ``export.json``: what was exported from which store, how many reviews were corrections, and images reviewed twice
  independently (the latest review is used).

Only reviews nobody corrected count: a correction replaces what it corrects.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from cxrclip.data.prompts import NORMAL_SENTENCE
from cxrclip.io import atomic_write_text, redact_url


def export_reviews(store, out: str | Path, labels: Sequence[str], bank=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current = store.current()
    latest: dict[str, dict] = {}
    repeated = 0
    for review in current:  # oldest first: a later independent review of the same image wins
        repeated += review["image_sha256"] in latest
        latest[review["image_sha256"]] = review
    rows = sorted(latest.values(), key=lambda r: r["id"])

    test = io.StringIO()
    writer = csv.writer(test, lineterminator="\n")
    writer.writerow(["image", *labels, "text"])
    train = io.StringIO()
    train_writer = csv.writer(train, lineterminator="\n")
    train_writer.writerow(["image", "text_label"])
    kept = 0
    for review in rows:
        verdicts = review["verdicts"]
        image = review["image_path"] or review["image_name"] or review["image_sha256"]
        cells = ["1" if verdicts.get(n) == "present" else "0" if verdicts.get(n) == "absent" else "" for n in labels]
        present = [n for n in labels if verdicts.get(n) == "present"]
        sentences = [bank[n].pos[0] for n in present if bank is not None and n in bank and bank[n].pos]
        writer.writerow([repr([image]), *cells, " ".join(sentences) or NORMAL_SENTENCE])
        if review["image_path"]:
            kept += 1
            train_writer.writerow([repr([review["image_path"]]), repr(present)])
    paths = {"test": atomic_write_text(out / "reviewed_test.csv", test.getvalue())}
    if kept:
        paths["train"] = atomic_write_text(out / "reviewed_train.csv", train.getvalue())
    summary = {
        "store": redact_url(store.url),
        "schema": store.revision,
        "reviews": len(store.list()),
        "corrected": len(store.list()) - len(current),
        "images": len(rows),
        "images_reviewed_twice": repeated,
        "images_kept": kept,
        "labels": {
            n: {v: sum(r["verdicts"].get(n) == v for r in rows) for v in ("present", "absent", "unsure")}
            for n in labels
        },
        "files": {k: str(v) for k, v in paths.items()},
    }
    paths["summary"] = atomic_write_text(out / "export.json", json.dumps(summary, indent=2))
    summary["files"]["summary"] = str(paths["summary"])
    return summary
