import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logit
from sklearn.metrics import roc_auc_score

from cxrclip.eval.metrics import TIE_TOLERANCE, binary_metrics, merge_texts, multiclass_metrics, retrieval_metrics


def brute_force_retrieval(img, txt, gt, ks=(1, 5, 10)):
    """Python loops over every pair: the reference the vectorized version must match."""
    sim = (img @ txt.t()).tolist()
    gt = gt.tolist()
    i2t = []
    for i, row in enumerate(sim):
        i2t.append(1 + sum(1 for s in row if s > row[gt[i]] + TIE_TOLERANCE))
    t2i = []
    for t in range(len(txt)):
        matches = [i for i in range(len(img)) if gt[i] == t]
        if not matches:
            continue
        best = max(sim[i][t] for i in matches)
        t2i.append(1 + sum(1 for i in range(len(img)) if sim[i][t] > best + TIE_TOLERANCE))

    def summary(ranks):
        r = np.array(ranks, dtype=float)
        out = {f"Recall@{k}": float((r <= k).mean()) for k in ks}
        return {**out, "MeanRank": float(r.mean()), "MedianRank": float(np.median(r))}

    return {"retrieval_i2t": summary(i2t), "retrieval_t2i": summary(t2i)}


def test_merge_texts_keeps_first_seen_order():
    texts, gt = merge_texts(["b", "a", "b", "c", "a"])
    assert texts == ["b", "a", "c"] and gt.tolist() == [0, 1, 0, 2, 1]


@pytest.mark.parametrize("n, n_text, chunk", [(60, 25, 7), (200, 200, 4096), (37, 5, 10)])
def test_retrieval_matches_brute_force(n, n_text, chunk):
    g = torch.Generator().manual_seed(n)
    img = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)
    gt = torch.randint(0, n_text, (n,), generator=g)
    # some texts have no image; duplicates of a text share one entry
    txt = F.normalize(torch.randn(n_text, 8, generator=g, dtype=torch.float64), dim=-1)
    got = retrieval_metrics(img, txt, gt, chunk=chunk)
    ref = brute_force_retrieval(img, txt, gt)
    for direction in ref:
        for key in ref[direction]:
            assert got[direction][key] == pytest.approx(ref[direction][key]), (direction, key)


def test_float_rounding_does_not_change_a_rank():
    img = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    out = retrieval_metrics(img, img, torch.arange(50))  # each image's own embedding is its text
    assert out["retrieval_i2t"]["Recall@1"] == 1.0 and out["retrieval_t2i"]["Recall@1"] == 1.0


def test_perfect_retrieval():
    e = torch.eye(6, dtype=torch.float64)
    out = retrieval_metrics(e, e, torch.arange(6))
    assert out["retrieval_i2t"]["Recall@1"] == 1.0 and out["retrieval_t2i"]["MeanRank"] == 1.0


def test_binary_metrics_against_sklearn_and_the_undefined_rule():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (50, 3))
    labels[:, 1] = 0  # no positive → undefined
    labels[:5, 2] = -1  # uncertain → excluded
    probs = rng.random((50, 3))
    out = binary_metrics(logit(probs), labels, ["a", "b", "c"])  # no calibration: sigmoid(logit) = probs, at 0.5
    assert out["a"]["AUROC"] == pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]))
    assert out["c"]["AUROC"] == pytest.approx(roc_auc_score(labels[5:, 2], probs[5:, 2])) and out["c"]["n"] == 45
    assert out["b"]["AUROC"] is None and "undefined" in out["b"]["note"]
    assert out["AUROC(Avg)"] == pytest.approx((out["a"]["AUROC"] + out["c"]["AUROC"]) / 2)
    assert out["labels_averaged"] == 2
    acc = ((probs[:, 0] >= 0.5) == labels[:, 0]).mean()
    assert out["a"]["Accuracy"] == pytest.approx(acc) and out["a"]["at_0.5"]["Accuracy"] == pytest.approx(acc)
    assert out["a"]["threshold"] == 0.5 and out["a"]["rule"] == "fixed=0.5" and out["a"]["calibrated"] is False
    assert out["uncalibrated_labels"] == ["a", "b", "c"]
    assert out["YES_per_image"] == pytest.approx(((probs >= 0.5) & (labels >= 0)).sum(1).mean())


def test_multiclass_uses_only_single_label_rows():
    labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
    scores = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.9, 0, 0.1], [1, 1, 1], [1, 0, 0], [0.1, 0.2, 0.9]])
    out = multiclass_metrics(scores, labels, ["a", "b", "c"])
    assert out["n"] == 4
    assert out["Accuracy(Micro)"] == pytest.approx(2 / 4)
    assert out["per_class"] == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert out["Accuracy(Macro)"] == pytest.approx(0.5)
    assert out["confusion"][2][0] == 1 and out["confusion"][1][2] == 1
