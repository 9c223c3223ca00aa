"""Encoders (timm / torchvision / transformers), the CLIP model, checkpoints."""
