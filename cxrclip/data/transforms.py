"""Image transforms from ``configs/transform/*.yaml``: steps run in the order the config lists them.

Everything works on a 1×H×W uint8 tensor (radiographs are grayscale); the final step turns it
into the 3-channel float tensor the encoder expects, normalized with the mean/std that the
*model* config declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
from torchvision.transforms import v2

from cxrclip.exceptions import ConfigError

NAMED_NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "huggingface": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the original's name for 0.5/0.5
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class CLAHE(torch.nn.Module):
    """Contrast-limited adaptive histogram equalization (OpenCV) on a grayscale uint8 tensor."""

    def __init__(self, clip_limit: float = 4.0, tile_grid_size: Sequence[int] = (8, 8), p: float = 1.0):
        super().__init__()
        self.clip_limit = float(clip_limit)
        self.tile_grid_size = tuple(int(t) for t in tile_grid_size)
        self.p = p

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.p < 1.0 and torch.rand(()) >= self.p:
            return image
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=self.tile_grid_size)
        out = clahe.apply(np.ascontiguousarray(image[0].numpy()))
        return torch.from_numpy(out)[None]


def _size(kwargs: dict) -> dict:
    size = kwargs.get("size")
    if isinstance(size, int):
        kwargs["size"] = [size, size]
    return kwargs


def _random_resized_crop(**kw) -> v2.Transform:
    return v2.RandomResizedCrop(antialias=True, **_size(kw))


def _resize(**kw) -> v2.Transform:
    # A square size keeps the original's behaviour (shorter side → size, then CenterCrop).
    size = kw.pop("size")
    return v2.Resize(size if isinstance(size, int) else list(size), antialias=True, **kw)


def _color_jitter(**kw) -> v2.Transform:
    # Saturation and hue mean nothing on a grayscale radiograph; accept them for old configs.
    kw.pop("saturation", None)
    kw.pop("hue", None)
    return v2.ColorJitter(**kw)


TRANSFORMS: dict[str, Callable[..., torch.nn.Module]] = {
    "RandomResizedCrop": _random_resized_crop,
    "ResizedCrop": _random_resized_crop,  # the original's default.yaml spelling
    "Resize": _resize,
    "CenterCrop": lambda **kw: v2.CenterCrop(**_size(kw)),
    "CLAHE": CLAHE,
    "ColorJitter": _color_jitter,
    "RandomAffine": lambda **kw: v2.RandomAffine(**kw),
    "HorizontalFlip": lambda p=0.5: v2.RandomHorizontalFlip(p=p),
}


def resolve_normalization(spec: str | Mapping) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"imagenet"`` / ``"huggingface"`` or ``{mean: [...], std: [...]}`` → (mean, std)."""
    if isinstance(spec, str):
        if spec not in NAMED_NORMALIZATION:
            raise ConfigError(f"unknown normalization {spec!r}; use one of {sorted(NAMED_NORMALIZATION)} or mean/std")
        return NAMED_NORMALIZATION[spec]
    mean, std = tuple(float(m) for m in spec["mean"]), tuple(float(s) for s in spec["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"normalization needs 3 means and 3 stds, got {mean} / {std}")
    return mean, std


class ImageTransform:
    """uint8 H×W array → normalized 3×S×S float tensor."""

    def __init__(self, steps: Sequence[torch.nn.Module], mean: Sequence[float], std: Sequence[float]):
        self.steps = v2.Compose(list(steps)) if steps else None
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image))[None]
        if self.steps is not None:
            x = self.steps(x)
        x = x.to(torch.float32).div_(255.0).expand(3, -1, -1)
        return self.normalize(x)


def build_transform(steps_config: Mapping | None, normalize: str | Mapping) -> ImageTransform:
    """Build the transform of one split from its config section (``transform.train`` etc.)."""
    steps = []
    for name, kwargs in (steps_config or {}).items():
        if name not in TRANSFORMS:
            raise ConfigError(f"unknown transform {name!r}; available: {sorted(TRANSFORMS)}")
        steps.append(TRANSFORMS[name](**dict(kwargs or {})))
    mean, std = resolve_normalization(normalize)
    return ImageTransform(steps, mean, std)
