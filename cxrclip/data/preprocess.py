"""The deterministic test-time steps (Resize, CenterCrop, CLAHE, normalization) in NumPy, Pillow and OpenCV only.

Training, evaluation and inference from a checkpoint run these same functions (wrapped as transform steps in
:mod:`cxrclip.data.transforms`), and so does the inference bundle, which must start without importing torch:
one implementation, so a bundle sees exactly the pixels its checkpoint saw. Resize is Pillow's antialiased
bilinear filter (the one torchvision's antialiased resize was ported from); sizes and crop anchors follow
torchvision's rules (shorter side to ``size``; crop offset ``round((H - h) / 2)``; zero padding when smaller).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from cxrclip.exceptions import ConfigError

NAMED_NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "huggingface": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # the original's name for 0.5/0.5
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
DETERMINISTIC_STEPS = ("Resize", "CenterCrop", "CLAHE")


def image_normalization(image_cfg: Mapping):
    """The normalization an image encoder config means: its ``normalize``, or — for configs that leave it out,
    like the published CXR-CLIP ones — ImageNet statistics for torchvision encoders and 0.5/0.5 otherwise, as
    the original code did. Training, evaluation and inference all resolve it here, so they always agree."""
    if image_cfg.get("normalize"):
        return image_cfg["normalize"]
    return "imagenet" if image_cfg.get("source") == "torchvision" else "huggingface"


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


def resized_shape(height: int, width: int, size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) after Resize: an int sends the shorter side to ``size`` (torchvision's rule), a pair is (H, W)."""
    if not isinstance(size, int):
        if len(size) == 1:
            size = int(size[0])
        else:
            return int(size[0]), int(size[1])
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def resize(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """Antialiased bilinear resize (Pillow) of an H×W uint8 image."""
    h, w = resized_shape(*image.shape[-2:], size)
    if (h, w) == image.shape[-2:]:
        return image
    return np.array(Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.BILINEAR))


def crop_shape(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of a CenterCrop ``size``: an int for a square, else [H, W] (one value: a square)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))


def center_crop(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """The central crop, zero-padded first where the image is smaller (torchvision's rule)."""
    ch, cw = crop_shape(size)
    h, w = image.shape[-2:]
    if ch > h or cw > w:
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        bottom, right = (max(ch - h, 0) + 1) // 2, (max(cw - w, 0) + 1) // 2
        image = np.pad(image, ((top, bottom), (left, right)))
        h, w = image.shape
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return image[top : top + ch, left : left + cw]


def clahe(image: np.ndarray, clip_limit: float = 4.0, tile_grid_size: Sequence[int] = (8, 8)) -> np.ndarray:
    """Contrast-limited adaptive histogram equalization (OpenCV) of an H×W uint8 image."""
    import cv2

    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=tuple(int(t) for t in tile_grid_size))
    return op.apply(np.ascontiguousarray(image))


def to_chw(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """H×W uint8 → 3×H×W float32 in [0, 1], then ``(x − mean) / std`` per channel."""
    x = image.astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return (x[None] - m) / s


def step_function(name: str, kwargs: Mapping | None):
    """One deterministic step as a function of an H×W uint8 array; a ConfigError for anything else."""
    kw = dict(kwargs or {})
    if name == "Resize":
        size = kw.pop("size")
        extra = sorted(k for k in kw if k != "antialias")
        if extra:
            raise ConfigError(f"Resize: unsupported option(s) {extra}; give size only")
        return partial(resize, size=size)
    if name == "CenterCrop":
        return partial(center_crop, size=kw["size"])
    if name == "CLAHE":
        if float(kw.pop("p", 1.0)) < 1.0:
            raise ConfigError("CLAHE with p < 1 is random; a test transform needs p: 1")
        return partial(clahe, **kw)
    raise ConfigError(f"{name} is not a deterministic test-time step ({', '.join(DETERMINISTIC_STEPS)})")


class Preprocess:
    """A test transform without torch: H×W uint8 array → 3×S×S float32 array."""

    def __init__(self, steps: Mapping | None, normalize: str | Mapping):
        self.config = {name: dict(kw or {}) for name, kw in (steps or {}).items()}
        self.functions = [step_function(name, kw) for name, kw in self.config.items()]
        self.mean, self.std = resolve_normalization(normalize)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        for fn in self.functions:
            image = fn(image)
        return to_chw(image, self.mean, self.std)


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model's images are prepared at test time — the deterministic steps (Resize, CenterCrop, CLAHE), the
    normalization and the channels — as one value. Training writes it into every checkpoint (key ``preprocess``);
    evaluation, calibration, inference, the bundle and the page read it (``/v1/model`` reports it). A checkpoint
    without it (older ones, the published ones) gets it from its stored config, as before."""

    steps: tuple  # ((name, ((option, value), ...)), ...): frozen form of {name: {option: value}}
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    @classmethod
    def create(cls, steps: Mapping | None, normalize: str | Mapping) -> PreprocessSpec:
        mean, std = resolve_normalization(normalize)
        frozen = tuple(
            (str(name), tuple((str(k), _frozen(v)) for k, v in dict(kw or {}).items()))
            for name, kw in (steps or {}).items()
        )
        return cls(frozen, tuple(mean), tuple(std))

    @property
    def step_dict(self) -> dict:
        return {name: {k: _plain(v) for k, v in kw} for name, kw in self.steps}

    @property
    def normalization(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @property
    def size(self) -> int | list[int] | None:
        """The model's input size: the CenterCrop's, else the Resize's (an int for a square, else [H, W])."""
        steps = self.step_dict
        for name in ("CenterCrop", "Resize"):
            if name in steps and "size" in steps[name]:
                size = steps[name]["size"]
                if isinstance(size, list):
                    return int(size[0]) if len(size) == 1 or size[0] == size[-1] else [int(s) for s in size]
                return int(size)
        return None

    def resized(self, size: int) -> PreprocessSpec:
        """The same normalization at another size: Resize + CenterCrop to ``size`` (an evaluation's override)."""
        return PreprocessSpec.create({"Resize": {"size": int(size)}, "CenterCrop": {"size": int(size)}},
                                     self.normalization)  # fmt: skip

    def to_dict(self) -> dict:
        return {"steps": self.step_dict, **self.normalization, "channels": self.channels, "size": self.size}

    @classmethod
    def from_dict(cls, data: Mapping) -> PreprocessSpec:
        try:
            spec = cls.create(data["steps"], {"mean": data["mean"], "std": data["std"]})
        except (KeyError, TypeError) as e:
            raise ConfigError(f"a stored preprocessing spec lacks {e}; it needs steps, mean and std") from e
        return cls(spec.steps, spec.mean, spec.std, int(data.get("channels", 3)))

    def image_to_input(self, height: int, width: int) -> np.ndarray:
        """The 3×3 affine map from an H×W image's pixel coordinates (x = column, y = row, pixel centres) to the model
        input's, through the Resize and CenterCrop steps (CLAHE moves no pixel)."""
        m = np.eye(3)
        h, w = height, width
        for name, kw in self.step_dict.items():
            if name == "Resize":
                h2, w2 = resized_shape(h, w, kw["size"])
                sx, sy = w2 / w, h2 / h  # Pillow samples at pixel centres: x' + ½ = (x + ½)·s
                m = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]]) @ m
                h, w = h2, w2
            elif name == "CenterCrop":
                ch, cw = crop_shape(kw["size"])
                top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2  # zero padding first, as center_crop does
                ph, pw = h + max(ch - h, 0), w + max(cw - w, 0)
                dy, dx = top - int(round((ph - ch) / 2.0)), left - int(round((pw - cw) / 2.0))
                m = np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]], dtype=float) @ m
                h, w = ch, cw
        return m

    def to_image(self, input_map: np.ndarray, height: int, width: int) -> np.ndarray:
        """A map on the model's input grid (a Grad-CAM) carried back onto the H×W image it was made from (bilinear;
        0 where the crop cut the image off)."""
        import cv2

        m = self.image_to_input(height, width)[:2].astype(np.float64)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # m maps the destination (the image) into the source
        src = np.ascontiguousarray(input_map, dtype=np.float32)
        return cv2.warpAffine(src, m, (int(width), int(height)), flags=flags, borderValue=0.0)

    def numpy(self) -> Preprocess:
        """The torch-free transform (the bundle's)."""
        return Preprocess(self.step_dict, self.normalization)
