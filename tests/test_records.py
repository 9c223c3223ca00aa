import shutil

import numpy as np
import pytest
from PIL import Image

from cxrclip.data.cells import parse_list_cell
from cxrclip.data.records import load_imagetext_records, load_labeled_records, summarize
from cxrclip.data.schema import DataConfig, DataValidationError
from cxrclip.synthetic import CGMH_LABELS, DEFAULT_PROMPTS


def train_cfg(csv, **kw):
    return DataConfig(
        name="t",
        data_type="imagetext",
        data_path=str(csv),
        label_names=CGMH_LABELS,
        prompt_path=str(DEFAULT_PROMPTS),
        **kw,
    )


def write_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)


@pytest.mark.parametrize(
    "cell, expected",
    [("['a.png', 'b.png']", ["a.png", "b.png"]), ("a.png", ["a.png"]), ('["x.jpg"]', ["x.jpg"]), ("", [])],
)
def test_parse_list_cell(cell, expected):
    assert parse_list_cell(cell) == expected


def test_relative_paths_resolve_against_the_csv_folder(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    (tmp_path / "train.csv").write_text("image,text_label\n\"['imgs/a.png']\",\"['Pneumothorax']\"\nimgs/a.png,[]\n")
    records = load_imagetext_records(train_cfg(tmp_path / "train.csv"))
    assert records[0].images == (tmp_path / "imgs" / "a.png",)
    assert records[0].positives == ("Pneumothorax",)
    assert records[1].positives == () and records[1].line == 3


def test_relative_paths_resolve_against_image_root_when_set(tmp_path):
    write_png(tmp_path / "root" / "a.png")
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "train.csv").write_text("image,text_label\na.png,[]\n")
    records = load_imagetext_records(train_cfg(tmp_path / "csvs" / "train.csv", image_root=str(tmp_path / "root")))
    assert records[0].images == (tmp_path / "root" / "a.png",)


def test_every_problem_is_reported_with_its_line(tmp_path):
    write_png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    rows = [
        "ok.png,\"['Pneumothorax']\"",  # line 2: fine
        "missing.png,[]",  # line 3: missing file
        "ok.png,\"['Pneumo']\"",  # line 4: unknown label
        "\"['ok.png'\",[]",  # line 5: unparseable image list
        "ok.png,Pneumothorax]",  # line 6: unparseable label list
        "bad.png,[]",  # line 7: unreadable image
    ]
    (tmp_path / "t.csv").write_text("image,text_label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataValidationError) as info:
        load_imagetext_records(train_cfg(tmp_path / "t.csv"))
    problems = info.value.problems
    assert len(problems) == 5
    lines = sorted(int(p.split(":")[1]) for p in problems)
    assert lines == [3, 4, 5, 6, 7]
    text = str(info.value)
    assert "image file not found" in text and "unknown label(s) ['Pneumo']" in text
    assert "unreadable image" in text and "cannot parse" in text


def test_missing_column_and_missing_file(tmp_path):
    (tmp_path / "t.csv").write_text("image,labels\na.png,[]\n")
    with pytest.raises(DataValidationError, match=r"t.csv:1: missing column\(s\) \['text_label'\]"):
        load_imagetext_records(train_cfg(tmp_path / "t.csv"))
    with pytest.raises(DataValidationError, match="file not found"):
        load_imagetext_records(train_cfg(tmp_path / "nope.csv"))


def test_problem_list_is_capped_in_the_message(tmp_path):
    (tmp_path / "t.csv").write_text("image,text_label\n" + "x.png,[]\n" * 100)
    with pytest.raises(DataValidationError) as info:
        load_imagetext_records(train_cfg(tmp_path / "t.csv"))
    assert len(info.value.problems) == 100
    assert "and 70 more" in str(info.value)


def test_triplet_format_is_chosen_by_config(tmp_path):
    write_png(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text(
        "image,text_label\na.png,\"[['Pneumothorax'], ['Foreign body'], ['Pneumomediastinum']]\"\n"
    )
    r = load_imagetext_records(train_cfg(tmp_path / "t.csv", label_format="triplet"))[0]
    assert (r.positives, r.negatives, r.uncertain) == (("Pneumothorax",), ("Foreign body",), ("Pneumomediastinum",))
    with pytest.raises(DataValidationError, match="must be a list of label names"):
        load_imagetext_records(train_cfg(tmp_path / "t.csv"))


def test_test_csv_reads_label_columns_and_text(demo_data):
    cfg = DataConfig(
        name="t", data_type="imagetext_eval", data_path=str(demo_data / "test.csv"), label_names=CGMH_LABELS
    )
    records = load_labeled_records(cfg, need_text=True)
    assert len(records) == 12
    assert all(len(r.labels) == 13 and set(r.labels) <= {0, 1} and r.text for r in records)
    summary = summarize(cfg, records)
    assert sum(summary["label_counts"].values()) == sum(sum(r.labels) for r in records)


def test_test_csv_bad_values_and_missing_label_column(demo_data, tmp_path):
    shutil.copytree(demo_data / "images", tmp_path / "images")
    lines = (demo_data / "test.csv").read_text().splitlines()
    header = lines[0].split(",")
    bad_row = lines[1].rsplit(",", 14)
    bad_row[1] = "yes"
    (tmp_path / "t.csv").write_text("\n".join([lines[0], ",".join(bad_row), *lines[2:]]) + "\n")
    cfg = DataConfig(name="t", data_type="imagetext_eval", data_path=str(tmp_path / "t.csv"), label_names=CGMH_LABELS)
    with pytest.raises(DataValidationError, match=r"t.csv:2: column 'Endotracheal tube in place': expected 0 or 1"):
        load_labeled_records(cfg, need_text=True)
    cfg2 = DataConfig(
        name="t",
        data_type="imagetext_eval",
        data_path=str(tmp_path / "t.csv"),
        label_names=(*CGMH_LABELS, "Cardiomegaly"),
    )
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['Cardiomegaly'\]"):
        load_labeled_records(cfg2, need_text=True)
    assert header[-1] == "text"


def test_data_config_rejects_unknown_keys_and_types():
    with pytest.raises(ValueError, match="unknown keys"):
        DataConfig.from_mapping("x", {"data_type": "imagetext", "data_path": "a.csv", "data_paht": "b"})
    with pytest.raises(ValueError, match="data_type must be one of"):
        DataConfig.from_mapping("x", {"data_type": "text", "data_path": "a.csv"})
