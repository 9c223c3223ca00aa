import hashlib

import numpy as np
import pandas as pd
import pytest

from cxrclip.data.records import load_imagetext_records, load_labeled_records
from cxrclip.data.schema import DataConfig
from cxrclip.synthetic import CGMH_LABELS, DEFAULT_PROMPTS, Patient, generate_demo_data, render


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_byte_identical_output(tmp_path):
    for name in ("a", "b"):
        generate_demo_data(tmp_path / name, n_train=6, n_valid=2, n_test=3, image_size=48, seed=7)
    generate_demo_data(tmp_path / "c", n_train=6, n_valid=2, n_test=3, image_size=48, seed=8)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_output_follows_the_data_contract(demo_data):
    train = DataConfig(
        name="t",
        data_type="imagetext",
        data_path=str(demo_data / "train.csv"),
        label_names=CGMH_LABELS,
        prompt_path=str(DEFAULT_PROMPTS),
    )
    records = load_imagetext_records(train)
    assert len(records) == 24
    assert any(len(r.positives) >= 2 for r in records) and any(not r.positives for r in records)
    test = DataConfig(
        name="t", data_type="imagetext_eval", data_path=str(demo_data / "test.csv"), label_names=CGMH_LABELS
    )
    assert len(load_labeled_records(test, need_text=True)) == 12
    df = pd.read_csv(demo_data / "test.csv")
    assert list(df.columns) == ["image", *CGMH_LABELS, "text"]


def pixels_changed(label, variant=0, side=1, size=128):
    """Render the same patient with and without one label; return where the image changed."""
    base = Patient(labels=[], seed=11)
    with_label = Patient(labels=[label], side={label: side}, variant={label: variant}, seed=11)
    a = render(base, 0, size).astype(int)
    b = render(with_label, 0, size).astype(int)
    return np.abs(a - b) > 20


def test_every_label_is_visible():
    for label in CGMH_LABELS:
        assert pixels_changed(label).sum() > 20, label


def test_tip_position_tells_in_place_from_malposition():
    s = 128
    ett_ok = pixels_changed("Endotracheal tube in place", size=s)
    ett_high = pixels_changed("Endotracheal tube malposition", variant=0, size=s)
    ett_deep = pixels_changed("Endotracheal tube malposition", variant=1, size=s)
    lowest = lambda m: np.nonzero(m.any(axis=1))[0].max()  # noqa: E731
    assert lowest(ett_high) < lowest(ett_ok) < lowest(ett_deep)
    ng_ok = pixels_changed("NG tube in place", size=s)
    ng_coiled = pixels_changed("NG tube malposition", variant=1, size=s)
    assert lowest(ng_ok) > 0.75 * s > lowest(ng_coiled)  # in the stomach vs above the diaphragm


def test_pneumothorax_darkens_one_side():
    s = 128
    changed = pixels_changed("Pneumothorax", side=1, size=s)
    assert changed[:, s // 2 + 5 :].sum() > 5 * changed[:, : s // 2 - 5].sum()


def test_the_label_list_comes_from_the_config_and_each_label_has_a_drawer(tmp_path):
    import csv

    from cxrclip.exceptions import ConfigError
    from cxrclip.paths import config_labels
    from cxrclip.synthetic import CGMH_LABELS, DRAWERS, generate_demo_data

    assert CGMH_LABELS == config_labels("cgmh") and len(CGMH_LABELS) == 13
    assert set(CGMH_LABELS) == set(DRAWERS)
    subset = ["Pneumothorax", "Foreign body"]
    generate_demo_data(tmp_path, n_train=4, n_valid=1, n_test=20, image_size=48, label_names=subset)
    with (tmp_path / "test.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", *subset, "text"] and any(r["Pneumothorax"] == "1" for r in rows)
    with pytest.raises(ConfigError, match="cannot draw \\['Atelectasis'\\]"):
        generate_demo_data(tmp_path / "x", n_train=1, label_names=["Atelectasis"])
