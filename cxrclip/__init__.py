"""cxrclip: chest X-ray language-image pre-training (CXR-CLIP) for hospital data."""

__version__ = "0.1.0"
