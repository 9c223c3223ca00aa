"""Image transforms from ``configs/transform/*.yaml``: steps run in the order the config lists them.

Everything works on a 1×H×W uint8 tensor (radiographs are grayscale); the final step turns it
into the 3-channel float tensor the encoder expects, normalized with the mean/std that the
*model* config declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from cxrclip.data.preprocess import (  # noqa: F401 (re-exported)
    PreprocessSpec,
    clahe,
    resolve_normalization,
    step_function,
    to_chw,
)
from cxrclip.exceptions import ConfigError


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
        return torch.from_numpy(clahe(image[0].numpy(), self.clip_limit, self.tile_grid_size))[None]


def _size(kwargs: dict) -> dict:
    size = kwargs.get("size")
    if isinstance(size, int):
        kwargs["size"] = [size, size]
    return kwargs


def _random_resized_crop(**kw) -> v2.Transform:
    return v2.RandomResizedCrop(antialias=True, **_size(kw))


class ArrayStep(torch.nn.Module):
    """A deterministic step of :mod:`cxrclip.data.preprocess` on a 1×H×W uint8 tensor (the same code as the
    torch-free inference bundle runs)."""

    def __init__(self, name: str, **kwargs):
        super().__init__()
        self.name, self.kwargs = name, kwargs
        self.fn = step_function(name, kwargs)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(self.fn(image[0].numpy()), copy=True))[None]

    def extra_repr(self) -> str:
        return f"{self.name}({self.kwargs})"


def _color_jitter(**kw) -> v2.Transform:
    # Saturation and hue mean nothing on a grayscale radiograph; accept them for old configs.
    kw.pop("saturation", None)
    kw.pop("hue", None)
    return v2.ColorJitter(**kw)


TRANSFORMS: dict[str, Callable[..., torch.nn.Module]] = {
    "RandomResizedCrop": _random_resized_crop,
    "ResizedCrop": _random_resized_crop,  # the original's default.yaml spelling
    # A square size keeps the original's behaviour (shorter side → size, then CenterCrop).
    "Resize": lambda **kw: ArrayStep("Resize", **kw),
    "CenterCrop": lambda **kw: ArrayStep("CenterCrop", **kw),
    "CLAHE": CLAHE,
    "ColorJitter": _color_jitter,
    "RandomAffine": lambda **kw: v2.RandomAffine(**kw),
    "HorizontalFlip": lambda p=0.5: v2.RandomHorizontalFlip(p=p),
}


class ImageTransform:
    """uint8 H×W array → normalized 3×S×S float tensor."""

    def __init__(self, steps: Sequence[torch.nn.Module], mean: Sequence[float], std: Sequence[float]):
        self.steps = v2.Compose(list(steps)) if steps else None
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image))[None]
        if self.steps is not None:
            x = self.steps(x)
        return torch.from_numpy(to_chw(x[0].numpy(), self.mean, self.std))


def build_transform(steps_config: Mapping | None, normalize: str | Mapping) -> ImageTransform:
    """Build the transform of one split from its config section (``transform.train`` etc.)."""
    steps = []
    for name, kwargs in (steps_config or {}).items():
        if name not in TRANSFORMS:
            raise ConfigError(f"unknown transform {name!r}; available: {sorted(TRANSFORMS)}")
        steps.append(TRANSFORMS[name](**dict(kwargs or {})))
    mean, std = resolve_normalization(normalize)
    return ImageTransform(steps, mean, std)


def spec_transform(spec: PreprocessSpec) -> ImageTransform:
    """A model's :class:`~cxrclip.data.preprocess.PreprocessSpec` as the torch test transform (training's test
    transform, evaluation, calibration, inference from a checkpoint)."""
    return build_transform(spec.step_dict, spec.normalization)
