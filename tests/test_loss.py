import math

import pytest
import torch
import torch.nn.functional as F

from cxrclip.loss import ClipLoss, CXRClipLoss, build_loss


def ce_by_hand(logits, smoothing=0.0):
    """Mean over rows of -log softmax at the diagonal, with label smoothing, in plain Python."""
    rows = logits.tolist()
    n = len(rows)
    total = 0.0
    for i, row in enumerate(rows):
        lse = math.log(sum(math.exp(v) for v in row))
        logp = [v - lse for v in row]
        total += -(1 - smoothing) * logp[i] - smoothing / n * sum(logp)
    return total / n


def sym_by_hand(a, b, s, smoothing=0.0):
    logits = s * a @ b.t()
    return 0.5 * (ce_by_hand(logits, smoothing) + ce_by_hand(logits.t(), smoothing))


def emb(seed, n=3, d=4):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_clip_loss_matches_a_hand_computation():
    a, b = emb(0), emb(1)
    out = ClipLoss()({"image_embeddings": a, "text_embeddings": b, "logit_scale": torch.tensor(10.0)})
    # a 2x2 case fully by hand: logits [[s, 0], [0, s]] → CE = log(1 + e^-s)
    eye = torch.eye(2, dtype=torch.float64)
    two = ClipLoss()({"image_embeddings": eye, "text_embeddings": eye, "logit_scale": torch.tensor(3.0)})
    assert float(two["loss"]) == pytest.approx(math.log(1 + math.exp(-3.0)), abs=1e-12)
    assert float(out["loss"]) == pytest.approx(sym_by_hand(a, b, 10.0), abs=1e-10)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cxr_clip_loss_is_the_four_pair_average_plus_icl_and_tcl(smoothing):
    i1, i2, t1, t2 = emb(0), emb(1), emb(2), emb(3)
    s = 14.0
    loss = CXRClipLoss(label_smoothing=smoothing, i2i_weight=1.0, t2t_weight=0.5, loss_ratio=2.0)
    out = loss(
        {
            "image_embeddings": i1,
            "image_view_embeddings": i2,
            "text_embeddings": t1,
            "text_embeddings2": t2,
            "logit_scale": torch.tensor(s),
        }
    )
    clip = sum(sym_by_hand(i, t, s, smoothing) for i in (i1, i2) for t in (t1, t2)) / 4
    icl, tcl = sym_by_hand(i1, i2, s, smoothing), sym_by_hand(t1, t2, s, smoothing)
    assert float(out["clip"]) == pytest.approx(clip, abs=1e-10)
    assert float(out["icl"]) == pytest.approx(icl, abs=1e-10)
    assert float(out["tcl"]) == pytest.approx(tcl, abs=1e-10)
    assert float(out["loss"]) == pytest.approx(2.0 * (clip + icl + 0.5 * tcl), abs=1e-10)


def test_perfect_alignment_gives_a_small_loss_and_gradient_flows_to_the_scale():
    e = F.normalize(torch.eye(4), dim=-1)
    scale = torch.tensor(50.0, requires_grad=True)
    out = CXRClipLoss()(
        {
            "image_embeddings": e,
            "image_view_embeddings": e,
            "text_embeddings": e,
            "text_embeddings2": e,
            "logit_scale": scale,
        }
    )
    assert float(out["loss"]) < 1e-10
    out["loss"].backward()
    assert scale.grad is not None


def test_build_loss_from_config():
    assert isinstance(build_loss({"cxr_clip": {"i2i_weight": 1.0}}), CXRClipLoss)
    assert isinstance(build_loss({"clip": None}), ClipLoss)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss({"simclr": {}})
