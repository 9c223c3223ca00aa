import pytest
import torch
import torch.nn.functional as F

from cxrclip.data.batch import Batch
from cxrclip.loss import CXRClipLoss
from cxrclip.loss.targets import contrastive_targets, label_set_targets, soft_jaccard_targets


def labelled(labels, known=None):
    """A batch carrying only label sets (the loss reads nothing else of it)."""
    labels = torch.as_tensor(labels).float()
    mask = torch.ones(labels.shape, dtype=torch.bool)
    if known is not None:
        mask[~torch.as_tensor(known)] = False
    return Batch(images=torch.empty(len(labels), 0), labels=labels, label_mask=mask)


def outputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = lambda: F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return {
        "image_embeddings": e(),
        "image_view_embeddings": e(),
        "text_embeddings": e(),
        "text_embeddings2": e(),
        "logit_scale": torch.tensor(10.0, dtype=torch.float64),
    }


@pytest.mark.parametrize("kind", ["label_set", "soft_jaccard"])
def test_distinct_disjoint_label_sets_give_exactly_the_plain_loss(kind):
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    out = outputs()
    plain = CXRClipLoss(label_smoothing=0.1)(out, labelled(labels))
    aware = CXRClipLoss(label_smoothing=0.1, targets=kind)(out, labelled(labels))
    assert float(aware["loss"]) == float(plain["loss"])


def test_label_set_targets_are_uniform_over_equal_sets():
    labels = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0], [0, 0], [1, 0]])
    t = label_set_targets(labels)
    expected = torch.tensor(
        [
            [1 / 3, 0, 1 / 3, 0, 0, 1 / 3],
            [0, 1, 0, 0, 0, 0],
            [1 / 3, 0, 1 / 3, 0, 0, 1 / 3],
            [0, 0, 0, 0.5, 0.5, 0],
            [0, 0, 0, 0.5, 0.5, 0],
            [1 / 3, 0, 1 / 3, 0, 0, 1 / 3],
        ]
    )
    torch.testing.assert_close(t, expected)


def test_soft_jaccard_targets_by_hand():
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    # J(0,1) = 1/2, J(0,2) = 0, J(1,2) = 0; diagonals max(1, Σ off) = 1
    t = soft_jaccard_targets(labels)
    expected = torch.tensor([[1 / 1.5, 0.5 / 1.5, 0], [0.5 / 1.5, 1 / 1.5, 0], [0, 0, 1.0]])
    torch.testing.assert_close(t, expected)
    many = soft_jaccard_targets(torch.tensor([[1, 0]] * 4))  # 3 identical others: diagonal still holds half
    assert many[0, 0] == pytest.approx(0.5) and many[0, 1] == pytest.approx(1 / 6)


def test_duplicates_are_pulled_together_not_pushed_apart():
    import math

    a = 0.4
    base = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [0.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1]])  # rows 0 and 1 say the same thing

    def cosine_after_a_step(kind):
        img, txt = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
        out = {
            "image_embeddings": img,
            "image_view_embeddings": img,
            "text_embeddings": txt,
            "text_embeddings2": txt,
            "logit_scale": torch.tensor(10.0, dtype=torch.float64),
        }
        CXRClipLoss(targets=kind)(out, labelled(labels))["loss"].backward()
        moved = F.normalize(img.detach() - 0.05 * img.grad, dim=-1)
        return float(moved[0] @ moved[1])

    before = float(base[0] @ base[1])
    assert cosine_after_a_step("label_set") > before > cosine_after_a_step("diagonal")
    assert contrastive_targets("diagonal", labels, 3, "cpu") is None
    with pytest.raises(ValueError, match="targets must be one of"):
        CXRClipLoss(targets="nope")
