import json
import random
from collections import Counter

import pytest

from cxrclip.data.prompts import PromptBank, PromptFileError, generate_report, load_prompts
from cxrclip.synthetic import CGMH_LABELS, DEFAULT_PROMPTS

BANK = PromptBank.from_dict(
    {
        "A": {"pos": ["a1.", "", "a2."], "neg": ["no_a."], "unc": ["maybe_a."]},
        "B": {"pos": ["b1."], "neg": ["no_b1.", "no_b2."], "unc": []},
        "C": {"pos": ["c1."], "neg": [], "unc": []},
        "D": {"pos": ["d1."], "neg": ["no_d."]},
    }
)
NAMES = ["A", "B", "C", "D"]
NORMAL = "normal."  # sentences without spaces: a report splits back into them


def report(pos, rng=None, **kw):
    return generate_report(pos, BANK, label_names=NAMES, normal_sentence=NORMAL, rng=rng, **kw)


def test_shipped_prompt_file_covers_the_13_cgmh_labels():
    bank = load_prompts(DEFAULT_PROMPTS)
    bank.check_covers(CGMH_LABELS)
    assert all(bank[n].neg for n in CGMH_LABELS)
    assert "Pigtail malpositon" in bank  # the data's spelling is the key


def test_empty_strings_are_dropped_and_never_chosen():
    assert BANK["A"].pos == ("a1.", "a2.")
    rng = random.Random(0)
    seen = Counter(report(["A"], rng) for _ in range(200))
    assert set(seen) == {"a1.", "a2."}


def test_deterministic_mode_uses_first_sentences_no_negatives():
    assert report(["B", "A"], num_negs=3) == "b1. a1."
    assert report([], num_negs=3) == NORMAL
    assert report(["B"], uncertain=["A"]) == "b1. maybe_a."


def test_training_report_has_one_pos_per_label_and_num_negs_from_the_rest():
    rng = random.Random(1)
    for _ in range(100):
        text = report(["A"], rng, num_negs=2)
        sentences = text.split(" ")
        assert len(sentences) == 3
        assert sum(s in ("a1.", "a2.") for s in sentences) == 1
        negs = [s for s in sentences if s.startswith("no_")]
        assert len(negs) == 2
        # only B and D have neg sentences (C has none, A is positive); one sentence per drawn label
        assert {"no_b1.", "no_b2."} & set(negs) and "no_d." in negs


def test_num_negs_larger_than_the_pool_takes_the_whole_pool():
    text = report(["A", "B"], random.Random(0), num_negs=10)
    assert sorted(text.split(" "))[1:] == ["no", "d."] or "no_d." in text
    assert text.count("no_") == 1


def test_sentences_are_shuffled():
    rng = random.Random(0)
    orders = {report(["A", "B", "C", "D"], rng).split(" ")[0] for _ in range(100)}
    assert len(orders) >= 3


def test_row_without_positive_gets_normal_sentence_plus_negatives():
    text = report([], random.Random(0), num_negs=1)
    assert NORMAL in text and text.count("no_") == 1


def test_uncertain_labels_use_unc_and_are_not_negatives():
    rng = random.Random(0)
    for _ in range(50):
        text = report(["B"], rng, uncertain=["A"], num_negs=5)
        assert "maybe_a." in text and "no_a." not in text


@pytest.mark.parametrize(
    "data, match",
    [
        ([1, 2], "JSON object"),
        ({"A": ["x"]}, "pos/neg/unc"),
        ({"A": {"pos": "x"}}, "list of sentences"),
        ({"A": {"pos": ["x"], "bad": []}}, "unknown keys"),
    ],
)
def test_malformed_prompt_files_are_rejected(tmp_path, data, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PromptFileError, match=match):
        load_prompts(path)


def test_labels_without_pos_sentences_are_reported():
    bank = PromptBank.from_dict({"A": {"pos": [""], "neg": ["no_a."]}})
    with pytest.raises(PromptFileError, match=r"no non-empty 'pos'.*\['A'\].*missing.*\['Z'\]|missing.*\['Z'\]"):
        bank.check_covers(["A", "Z"])
