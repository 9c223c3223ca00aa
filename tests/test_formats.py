"""The original CXR-CLIP data formats, each from its shipped config, on tiny generated CSVs."""

import numpy as np
import pytest
import torch
from PIL import Image

from cxrclip.config import compose, data_configs
from cxrclip.data.collate import ImageTextCollator
from cxrclip.data.dataset import ImageTextDataset, LabeledImageDataset
from cxrclip.data.records import load_imagetext_records, load_labeled_records
from cxrclip.data.transforms import build_transform

EVAL = {"Resize": {"size": 16}, "CenterCrop": {"size": 16}}


def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    return path.name


def data_config(group, option, csv, config="train"):
    extra = ["test.checkpoint=x"] if config == "eval_clip" else []
    cfg = compose(config, [f"{group}={option}", f"{group}.{option}.data_path={csv}", *extra])
    (dc,) = data_configs(cfg, group)
    return dc


def imagetext(dc, train=True):
    prompts = dc.prompts() if dc.text_source == "labels" else None
    return ImageTextDataset(load_imagetext_records(dc), dc, prompts, build_transform(EVAL, "imagenet"), train=train)


def test_mimic_reports_views_and_text_augment(tmp_path):
    for i in range(3):
        png(tmp_path / f"ap{i}.png", 40), png(tmp_path / f"lat{i}.png", 220)
    rows = [
        "image,view,AP,PA,Lateral,text,text_augment",
        "\"['ap0.png', 'lat0.png']\",\"['AP', 'Lateral']\",\"['ap0.png']\",[],\"['lat0.png']\","
        "\"['Heart is normal. Lungs are clear. No effusion.', 'No acute disease.']\","
        "\"['The heart is fine.', 'Normal.']\"",
        "ap1.png,\"['AP']\",\"['ap1.png']\",[],[],Just one plain report. With two sentences.,Augmented plain.",
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    dc = data_config("data_train", "mimic_cxr", tmp_path / "m.csv")
    assert dc.text_source == "report" and dc.view_columns == ("AP", "PA", "Lateral")
    ds = imagetext(dc)
    assert len(ds.records[0].views) == 2 and ds.records[1].texts == ("Just one plain report. With two sentences.",)
    torch.manual_seed(0)
    for _ in range(5):
        item = ds[0]
        means = sorted(round(float(item[k].mean()), 1) for k in ("image", "image_view"))
        assert means[0] < means[1]  # one AP image and one lateral image, never the same view twice
    texts = {ds[1]["text"] for _ in range(30)}
    assert all(len(t) > 5 for t in texts)  # a plain cell is one report, not characters
    shuffled = {t for t in texts if t.startswith("With two sentences")}
    assert shuffled  # sentence shuffling really shuffles
    assert "Augmented plain." in texts
    batch = ImageTextCollator(None)([ds[0], ds[1]])
    assert batch.images.shape == (2, 3, 16, 16) and batch.labels.shape == (2, 0)


def test_chexpert_triplets_use_unc_sentences(tmp_path):
    png(tmp_path / "a.png", 100)
    (tmp_path / "c.csv").write_text(
        "image,view,AP,PA,Lateral,text_label\n"
        "a.png,\"['AP']\",\"['a.png']\",[],[],\"[['Edema'], ['Pneumothorax'], ['Cardiomegaly']]\"\n"
    )
    dc = data_config("data_train", "chexpert", tmp_path / "c.csv")
    ds = imagetext(dc)
    r = ds.records[0]
    assert (r.positives, r.negatives, r.uncertain) == (("Edema",), ("Pneumothorax",), ("Cardiomegaly",))
    torch.manual_seed(0)
    text = ds[0]["text"]
    assert "edema" in text and "cardiomegaly" in text and any(w in text for w in ("may", "possible", "cannot"))
    assert ds[0]["labels"].sum() == 1


def test_chest14_positive_lists(tmp_path):
    png(tmp_path / "a.png", 100)
    (tmp_path / "c.csv").write_text("image,text_label\na.png,\"['Effusion', 'Pleural_Thickening']\"\na.png,[]\n")
    ds = imagetext(data_config("data_train", "chest14", tmp_path / "c.csv"), train=False)
    assert ds[0]["text"] == "effusion. pleural thickening." and ds[1]["text"] == "no acute cardiopulmonary abnormality."


@pytest.mark.parametrize(
    "how, expected",
    [
        ("longest", "a much longer findings section."),
        ("impression", "short."),
        ("findings", "a much longer findings section."),
        ("concat", "a much longer findings section. short."),
    ],
)
def test_eval_text_choice(tmp_path, how, expected):
    png(tmp_path / "a.png", 10)
    (tmp_path / "t.csv").write_text("image,text\na.png,\"['a much longer findings section.', 'short.']\"\n")
    dc = data_config("data_test", "mimic_cxr", tmp_path / "t.csv", config="eval_clip")
    dc = type(dc)(**{**dc.__dict__, "eval_text": how})
    assert load_labeled_records(dc, need_text=True)[0].text == expected


def test_openi_and_chexpert5x200(tmp_path):
    png(tmp_path / "a.png", 10)
    (tmp_path / "o.csv").write_text("image,text\na.png,Heart size normal.\n")
    assert (
        load_labeled_records(data_config("data_test", "openi", tmp_path / "o.csv", "eval_clip"), need_text=True)[
            0
        ].labels
        == ()
    )
    (tmp_path / "c.csv").write_text(
        "image,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion,text\na.png,0,1,0,0,-1,cardiomegaly.\n"
    )
    r = load_labeled_records(
        data_config("data_test", "chexpert5x200", tmp_path / "c.csv", "eval_clip"), need_text=True
    )[0]
    assert r.labels == (0, 1, 0, 0, -1)  # uncertain stays -1: excluded from the metrics, not a negative


def test_classification_formats(tmp_path):
    png(tmp_path / "a.png", 10)
    (tmp_path / "r.csv").write_text("image,label,class\na.png,1,Pneumonia\na.png,0,Normal\n")
    dc = data_config("data_train", "rsna_pneumonia", tmp_path / "r.csv", "finetune_10")
    records = load_labeled_records(dc, need_text=False)
    assert [r.labels for r in records] == [(1,), (0,)]
    ds = LabeledImageDataset(records, build_transform(EVAL, "imagenet"))
    assert ImageTextCollator(None)([ds[0], ds[1]]).labels.tolist() == [[1.0], [0.0]]
    names = data_config("data_train", "vindr_cxr", tmp_path / "r.csv", "finetune_10").label_names
    header = ",".join(["image", "image_id", *names, "Other diseases", "No finding"])
    values = ",".join(["a.png", "x", *(["1"] + ["0"] * (len(names) - 1)), "1", "0"])
    (tmp_path / "v.csv").write_text(header + "\n" + values + "\n")
    r = load_labeled_records(
        data_config("data_train", "vindr_cxr", tmp_path / "v.csv", "finetune_10"), need_text=False
    )[0]
    assert len(r.labels) == len(names) and r.labels[0] == 1 and sum(r.labels) == 1  # extra columns ignored


def test_label_set_targets_leave_report_rows_on_the_diagonal():
    from cxrclip.loss.targets import label_set_targets

    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    t = label_set_targets(labels, known=torch.tensor([True, True, False, False]))  # rows 2, 3: free-text reports
    torch.testing.assert_close(t[2:], torch.eye(4)[2:])
    assert t[0, 1] == 0.5
