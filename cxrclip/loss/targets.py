"""Label-aware contrastive targets: rows that say the same thing are not each other's negatives.

Captions generated from a few labels repeat within a batch; the plain CLIP target (the diagonal) then
pushes an image away from a caption that describes it exactly. Given each row's label set as a multi-hot
vector of its positives (a generated caption names its positives) and whether the row has a label set at all
(``known``: a free-text report row has none and only matches itself), these functions return a row-stochastic
target matrix for the batch.
"""

from __future__ import annotations

import torch

from cxrclip.exceptions import ConfigError

TARGETS = ("diagonal", "label_set", "soft_jaccard")


def _known(labels: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(len(labels), dtype=torch.bool, device=labels.device) if known is None else known.bool()


def label_set_targets(labels: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform over every row whose set of positives equals this row's (rows without positives share the "normal"
    set); a row that is not ``known`` only matches itself."""
    known = _known(labels, known)
    same = (labels[:, None, :] == labels[None, :, :]).all(dim=-1) & known[:, None] & known[None, :]
    same = (same | torch.eye(len(labels), dtype=torch.bool, device=labels.device)).float()
    return same / same.sum(dim=1, keepdim=True)


def soft_jaccard_targets(labels: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Proportional to the Jaccard similarity of label sets (two empty sets: 1), the diagonal kept dominant:
    it weighs max(1, Σ other weights), so a row keeps at least half of its own target mass."""
    known = _known(labels, known)
    y = labels.float()
    inter = y @ y.t()
    union = y.sum(1, keepdim=True) + y.sum(1)[None, :] - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    jaccard = jaccard * (known[:, None] & known[None, :])
    off = jaccard.fill_diagonal_(0.0)
    weights = off + torch.diag(off.sum(dim=1).clamp(min=1.0))
    return weights / weights.sum(dim=1, keepdim=True)


def contrastive_targets(
    kind: str, labels: torch.Tensor | None, n: int, device, known: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The target matrix of ``kind`` for ``n`` rows (``known``: which rows have a label set; default all);
    ``None`` means the plain diagonal."""
    if kind not in TARGETS:
        raise ConfigError(f"loss targets must be one of {TARGETS}, got {kind!r}")
    if kind == "diagonal" or labels is None or labels.shape[-1] == 0:
        return None
    labels = labels.to(device)
    known = None if known is None else known.to(device)
    targets = label_set_targets(labels, known) if kind == "label_set" else soft_jaccard_targets(labels, known)
    # no shared sets in this batch: the index targets are the same distribution, and exactly the plain loss
    return None if torch.equal(targets, torch.eye(n, device=device)) else targets
