"""Losses: features in, a dict of named terms out (the trainer logs them)."""

from cxrclip.loss.contrastive import ClipLoss, CXRClipLoss, build_loss

__all__ = ["ClipLoss", "CXRClipLoss", "build_loss"]
