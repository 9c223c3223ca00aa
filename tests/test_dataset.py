import torch
from torch.utils.data import DataLoader

from cxrclip.data.collate import ImageTextCollator
from cxrclip.data.dataset import ImageTextDataset, LabeledImageDataset
from cxrclip.data.records import load_imagetext_records, load_labeled_records
from cxrclip.data.schema import DataConfig
from cxrclip.data.transforms import build_transform
from cxrclip.synthetic import CGMH_LABELS, DEFAULT_PROMPTS

TRAIN_STEPS = {"RandomResizedCrop": {"size": 32, "scale": [0.8, 1.0]}, "CLAHE": {"clip_limit": 4.0}}
EVAL_STEPS = {"Resize": {"size": 32}, "CenterCrop": {"size": 32}}


def cfg(demo_data, split, **kw):
    return DataConfig(
        name="cgmh",
        data_type="imagetext",
        data_path=str(demo_data / f"{split}.csv"),
        label_names=CGMH_LABELS,
        prompt_path=str(DEFAULT_PROMPTS),
        normal_sentence="normal.",
        **kw,
    )


def dataset(demo_data, split, train, **kw):
    c = cfg(demo_data, split, **kw)
    steps = TRAIN_STEPS if train else EVAL_STEPS
    return ImageTextDataset(load_imagetext_records(c), c, c.prompts(), build_transform(steps, "imagenet"), train=train)


def test_collate_pads_to_the_longest_text_in_the_batch(minilm_tokenizer):
    collate = ImageTextCollator(minilm_tokenizer, text_max_length=256)
    tokens = collate.tokenize(["pneumothorax.", "the endotracheal tube terminates in the mid trachea."])
    longest = len(minilm_tokenizer("the endotracheal tube terminates in the mid trachea.")["input_ids"])
    assert tokens["input_ids"].shape == (2, longest) and longest < 20
    assert tokens["attention_mask"][0].sum() == len(minilm_tokenizer("pneumothorax.")["input_ids"])
    assert tokens["attention_mask"][1].all()
    assert ImageTextCollator(minilm_tokenizer, text_max_length=5).tokenize(["a " * 50])["input_ids"].shape == (1, 5)


def test_training_batch_has_two_views_two_texts_and_labels(demo_data, minilm_tokenizer):
    ds = dataset(demo_data, "train", train=True, num_negs=2)
    loader = DataLoader(ds, batch_size=6, collate_fn=ImageTextCollator(minilm_tokenizer), num_workers=0)
    batch = next(iter(loader))
    assert batch.images.shape == batch.image_views.shape == (6, 3, 32, 32)
    assert batch.tokens["input_ids"].shape[0] == batch.tokens2["input_ids"].shape[0] == 6
    assert batch.labels.shape == batch.label_mask.shape == (6, 13) and batch.label_mask.all()
    assert batch.label_names == tuple(CGMH_LABELS)
    for i in range(6):
        positives = [n for n, v in zip(CGMH_LABELS, batch.labels[i]) if v]
        assert positives == list(ds.records[i].positives)
    assert batch.texts != batch.texts2  # independent draws (with 2 negatives each)


def test_rows_with_two_images_use_two_different_images(demo_data):
    from cxrclip.data.images import read_image

    ds = dataset(demo_data, "train", train=True)
    index = next(i for i, r in enumerate(ds.records) if len(r.images) == 2)
    record = ds.records[index]
    assert not (read_image(record.images[0]) == read_image(record.images[1])).all()
    eval_ds = dataset(demo_data, "train", train=False)  # no augmentation: the views differ only by image
    item = eval_ds[index]
    assert not torch.equal(item["image"], item["image_view"])
    single = next(i for i, r in enumerate(ds.records) if len(r.images) == 1)
    item = eval_ds[single]
    assert torch.equal(item["image"], item["image_view"])
    torch.manual_seed(0)
    item = ds[single]  # one image: two different augmentations of it
    assert not torch.equal(item["image"], item["image_view"])


def test_validation_is_deterministic(demo_data):
    ds = dataset(demo_data, "valid", train=False, num_negs=3)
    torch.manual_seed(0)
    a = [ds[i] for i in range(len(ds))]
    torch.manual_seed(1)
    b = [ds[i] for i in range(len(ds))]
    for x, y in zip(a, b):
        assert x["text"] == y["text"] == x["text2"]
        assert torch.equal(x["image"], y["image"])
        assert "no " not in x["text"].split(".")[0] or x["text"].startswith("no tubes")


def test_training_sampling_is_reproducible_from_the_torch_seed(demo_data):
    ds = dataset(demo_data, "train", train=True, num_negs=2)
    torch.manual_seed(5)
    a = ds[0]
    torch.manual_seed(5)
    b = ds[0]
    assert a["text"] == b["text"] and torch.equal(a["image"], b["image"])


def test_unreadable_image_mid_run_is_skipped_then_stops(demo_data, tmp_path):
    import shutil

    import pytest

    shutil.copytree(demo_data, tmp_path / "d")
    ds = dataset(tmp_path / "d", "train", train=True)
    ds.guard.max_frac = 0.05  # 24 rows: one failure allowed
    broken = ds.records[0].images
    for p in broken:
        p.write_bytes(b"broken")
    item = ds[0]  # falls through to the next row
    assert item["labels"].tolist() == [float(n in ds.records[1].positives) for n in CGMH_LABELS]
    for p in ds.records[1].images:
        p.write_bytes(b"broken")
    with pytest.raises(RuntimeError, match="failed to decode"):
        ds[1]


def test_labeled_dataset(demo_data):
    c = DataConfig(name="t", data_type="imagetext_eval", data_path=str(demo_data / "test.csv"), label_names=CGMH_LABELS)
    ds = LabeledImageDataset(load_labeled_records(c, need_text=True), build_transform(EVAL_STEPS, "huggingface"))
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["labels"].shape == (13,) and item["index"] == 3
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
