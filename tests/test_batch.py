"""The typed batch: labels + label_mask from the dataset to the loss; mixed label lists are aligned, never dropped."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cxrclip.data.batch import Batch, labels_from_values
from cxrclip.data.collate import ImageTextCollator, union_label_names
from cxrclip.data.dataset import label_set
from cxrclip.data.schema import DataConfig, ImageTextRecord
from cxrclip.engine.tasks import run_label_names
from cxrclip.loss import CXRClipLoss
from cxrclip.loss.targets import contrastive_targets
from cxrclip.model.probe import MaskedBCELoss

A = ("Pneumothorax", "Chest tube in place", "Foreign body")
B = ("Chest tube in place", "Pleural effusion")


def item(names, values, known=None):
    labels = torch.tensor(values, dtype=torch.float32)
    mask = torch.ones(len(values), dtype=torch.bool) if known is None else torch.tensor(known)
    return {"image": torch.zeros(3, 4, 4), "labels": labels, "label_mask": mask, "label_names": names}


def test_a_batch_mixing_label_lists_is_aligned_by_name_onto_the_run_list():
    run = union_label_names([A, B])
    assert run == ("Pneumothorax", "Chest tube in place", "Foreign body", "Pleural effusion")
    batch = ImageTextCollator(None, label_names=run)([item(A, [1, 0, 1]), item(B, [1, 1]), item(A, [0, 1, 0])])
    assert batch.label_names == run
    assert batch.labels.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 0]]
    assert batch.label_mask.tolist() == [
        [True, True, True, False],  # dataset A has no "Pleural effusion": unknown for its rows
        [False, True, False, True],
        [True, True, True, False],
    ]
    same = ImageTextCollator(None, label_names=run)([item(A, [1, 0, 1])] * 2)  # one list, still the run's width
    assert same.labels.shape == (2, 4) and not same.label_mask[:, 3].any()


def test_mixed_widths_without_names_carry_no_labels_and_say_so_once(caplog):
    collate = ImageTextCollator(None)
    items = [item(None, [0.0] * 13), item(None, [0.0] * 5)]
    with caplog.at_level("WARNING"):
        batch = collate(items)
        collate(items)
    assert batch.labels is None and batch.label_mask is None
    messages = [r.message for r in caplog.records]
    assert len(messages) == 1 and "different label lists (label widths [5, 13])" in messages[0]


def test_mixed_lists_with_names_and_no_run_list_are_aligned_over_the_batch(caplog):
    with caplog.at_level("WARNING"):
        batch = ImageTextCollator(None)([item(A, [1, 0, 0]), item(B, [0, 1])])
    assert batch.label_names == union_label_names([A, B])
    assert batch.labels.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]
    assert "aligned by name over their union of 4" in caplog.records[0].message


def test_equal_widths_with_different_names_are_aligned_not_stacked():
    c = ("Foreign body", "Pneumothorax")  # two labels, like B, but other ones
    batch = ImageTextCollator(None)([item(B, [1, 0]), item(c, [0, 1])])
    assert batch.label_names == B + c and batch.labels.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match=r"labels \['Pleural effusion'\] of a dataset are not in the run's"):
        ImageTextCollator(None, label_names=A)([item(A, [1, 0, 0]), item(B, [0, 1])])


def test_run_label_names_is_the_union_and_warns_when_lists_differ(caplog):
    dc = lambda name, names: DataConfig(name=name, data_type="imagetext", data_path="x.csv", label_names=names)  # noqa: E731
    spec = SimpleNamespace(data={"data_train": [dc("a", A), dc("b", B)], "data_valid": [dc("v", A)]})
    with caplog.at_level("WARNING"):
        assert run_label_names(spec, SimpleNamespace(is_main=True)) == union_label_names([A, B])
    assert "different label lists (a: 3; b: 2; v: 3)" in caplog.records[0].message
    caplog.clear()
    one = SimpleNamespace(data={"data_train": [dc("a", A)], "data_valid": [dc("v", A)]})
    assert run_label_names(one, SimpleNamespace(is_main=True)) == A and not caplog.records


def test_label_sets_of_training_rows():
    path = (Path("x.png"),)
    labels, mask = label_set(ImageTextRecord(2, path, positives=("Pneumothorax",), uncertain=("Foreign body",)), A)
    assert labels.tolist() == [1, 0, 0] and mask.tolist() == [True, True, False]  # uncertain: unknown
    labels, mask = label_set(ImageTextRecord(3, path, texts=("A free-text report.",)), A)
    assert labels.tolist() == [0, 0, 0] and not mask.any()  # a report row has no label set
    values, known = labels_from_values([1, 0, -1])  # a test/classification record: -1 = uncertain or left out
    assert values.tolist() == [1, 0, 0] and known.tolist() == [True, True, False]


def test_masked_bce_leaves_unknown_entries_out_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    batch = Batch(
        images=torch.empty(2, 0),
        labels=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        label_mask=torch.tensor([[True, True, False], [False, True, True]]),
    )
    got = MaskedBCELoss()({"logits": logits}, batch)["loss"]
    known = [(2.0, 1.0), (-1.0, 0.0), (3.0, 1.0), (-2.0, 0.0)]
    want = sum(F.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y)) for x, y in known) / 4
    assert float(got) == pytest.approx(float(want), abs=1e-7)


def test_report_rows_stay_on_the_diagonal_in_the_loss():
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [False, False], [False, False]])  # rows 2, 3: reports
    batch = Batch(images=torch.empty(4, 0), labels=labels, label_mask=mask)
    target = contrastive_targets("label_set", labels, 4, "cpu", known=batch.has_label_set)
    torch.testing.assert_close(target, torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    g = torch.Generator().manual_seed(0)
    out = {k: F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1) for k in (
        "image_embeddings", "image_view_embeddings", "text_embeddings", "text_embeddings2")}  # fmt: skip
    out["logit_scale"] = torch.tensor(10.0, dtype=torch.float64)
    all_reports = Batch(images=torch.empty(4, 0), labels=labels * 0, label_mask=mask & False)
    plain = CXRClipLoss()(out)["loss"]
    assert float(CXRClipLoss(targets="label_set")(out, all_reports)["loss"]) == float(plain)
    assert float(CXRClipLoss(targets="label_set")(out, batch)["loss"]) != float(plain)


def test_batch_to_moves_every_tensor_and_keeps_the_rest():
    batch = Batch(
        images=torch.zeros(2, 3, 4, 4),
        tokens={"input_ids": torch.zeros(2, 3, dtype=torch.long)},
        texts=["a", "b"],
        labels=torch.zeros(2, 1),
        label_mask=torch.ones(2, 1, dtype=torch.bool),
        label_names=("x",),
    )
    moved = batch.to("cpu", channels_last=True)
    assert moved.images.is_contiguous(memory_format=torch.channels_last)
    assert not batch.images.is_contiguous(memory_format=torch.channels_last)  # the original is left as it was
    assert moved.tokens["input_ids"].dtype == torch.long and moved.texts == ["a", "b"] and moved.label_names == ("x",)
    assert len(moved) == 2 and moved.label_mask.dtype == torch.bool
