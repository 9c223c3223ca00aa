"""The answer's outward form, pinned: ``inference.py --json`` (an analysed film, a refused one), its CSV and a saved
review row, on the session's tiny checkpoint, against files written before the answer became typed (issue 33); the
one change since is the ``answer_version`` field, added last.
Keys, order, strings and decisions must match exactly; numbers to 2e-3 (the tiny model is trained in the test
session, and another CPU sums in another order). ``CXRCLIP_WRITE_GOLDEN=1`` writes the files anew."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

GOLDEN = Path(__file__).parent / "golden"
TOLERANCE = 2e-3
VOLATILE = {"image", "image_path", "created_at", "model_sha256", "image_sha256", "id"}  # paths, times, hashes

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")


def same(got, want, where: str = "") -> None:
    """Equal in shape and order; floats within TOLERANCE; volatile values only present."""
    assert type(got) is type(want) or {type(got), type(want)} <= {int, float}, (where, got, want)
    if isinstance(want, dict):
        assert list(got) == list(want), (where, list(got), list(want))
        for key in want:
            if key not in VOLATILE:
                same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), (where, len(got), len(want))
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert abs(got - want) <= TOLERANCE, (where, got, want)
    else:
        assert got == want, (where, got, want)


def settle(answer: dict) -> dict:
    """What another CPU may order or decide otherwise is not compared: the ranking's order among near-equal
    similarities (it is checked to be by similarity, then compared by text), a decision within TOLERANCE of its
    threshold."""
    ranking = answer.get("ranking")
    if ranking:
        similarities = [r["similarity"] for r in ranking]
        assert similarities == sorted(similarities, reverse=True)
        answer["ranking"] = sorted(ranking, key=lambda r: r["text"])
    for v in (answer.get("labels") or {}).values():
        if abs(v["probability"] - v["threshold"]) <= TOLERANCE:
            v["present"] = None
    return answer


def golden(name: str, value):
    path = GOLDEN / name
    if os.environ.get("CXRCLIP_WRITE_GOLDEN"):
        path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    return json.loads(path.read_text(encoding="utf-8"))


def csv_rows(text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
    return rows


def test_inference_json_csv_and_review_rows_keep_their_form(tiny_clip_checkpoint, demo_data, tmp_path, capsys):
    from cxrclip.infer import main as infer_main
    from cxrclip.reviews.store import ReviewStore

    folder = tmp_path / "films"
    folder.mkdir()
    film = sorted((demo_data / "images").glob("test_*.png"))[0]
    (folder / "a_film.png").write_bytes(film.read_bytes())
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(folder / "b_blank.png")  # refused: unreadable
    argv = ["--model_path", str(tiny_clip_checkpoint), "--image_path", str(folder), "--device", "cpu"]
    capsys.readouterr()
    assert infer_main([*argv, "--json", "--output", str(tmp_path / "p.csv")]) == 0
    printed = capsys.readouterr().out
    answers = json.loads(printed)
    assert [a["analysed"] for a in answers] == [True, False]
    assert all(list(a)[-1] == "answer_version" and a.pop("answer_version") == 1 for a in answers)  # added, last
    want = [settle(a) for a in golden("inference.json", json.loads(json.dumps(answers)))]
    same([settle(a) for a in answers], want, "inference --json")
    rows = csv_rows((tmp_path / "p.csv").read_text(encoding="utf-8"))
    same(rows, golden("predictions.json", rows), "predictions.csv")

    store = ReviewStore(tmp_path / "r.sqlite")
    shown = {n: {k: v[k] for k in ("probability", "threshold", "rule", "present", "calibrated")}
             for n, v in answers[0]["labels"].items()}  # fmt: skip
    saved = store.add(reviewer="Dr. Lin", image_sha256="ab" * 32, model_sha256="cd" * 32, calibration="default",
                      shown=shown, verdicts={"Pneumothorax": "absent"}, labels=list(shown), comment="skin fold",
                      image_name="a_film.png")  # fmt: skip
    assert store.list() == [saved]
    same(saved, golden("review.json", saved), "review row")
