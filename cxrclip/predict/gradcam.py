"""Where the model looked: Grad-CAM on the image encoder for a label's zero-shot score.

The target is the label's logit, ``scale · (cos(image, positive prompts) − cos(image, negative prompts))``:
the map shows what pushes the image toward the label's positive sentences and away from its negative ones.
Every image encoder exposes ``cam_features(images) -> (activations, pooled, to_map)`` (ResNet: layer4,
timm models: ``forward_features``, Swin/ViT: the last hidden tokens on their grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrclip.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from cxrclip.model.clip import CXRClip


def grad_cam(model: CXRClip, image: torch.Tensor, direction: torch.Tensor, scale: float) -> np.ndarray:
    """A (H, W) map in [0, 1] for one preprocessed image (1×3×H×W) and a target direction in embedding space."""
    import torch
    import torch.nn.functional as F

    encoder = model.image_encoder
    image = image.detach().clone().requires_grad_(True)  # a graph even when every weight is frozen
    with torch.enable_grad():
        activations, pooled, to_map = encoder.cam_features(image)
        embedding = F.normalize(model.image_projection(pooled).float(), dim=-1)
        target = (embedding @ direction.to(embedding.device).float()).sum() * scale
        (grads,) = torch.autograd.grad(target, activations)
    acts, grads = to_map(activations.detach()).float(), to_map(grads).float()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    return (cam / peak).cpu().numpy() if peak > 0 else np.zeros(image.shape[-2:], dtype=np.float32)


def saliency_outline(cam: np.ndarray, level: float = 0.5, max_points: int = 64) -> np.ndarray:
    """Where the model looked, as a polygon: the outline of the connected area around the map's maximum where it is
    at least ``level`` × that maximum; (K, 2) float32 points (column, row) in the map's pixel coordinates, at pixel
    centres, simplified to at most ``max_points``. Empty (0, 2) for a map that is zero everywhere. A saliency area,
    not an object's boundary (not a tube's tip)."""
    import cv2

    index = int(np.argmax(cam)) if cam.size else 0
    peak = float(cam.flat[index]) if cam.size else 0.0
    if not peak > 0:  # zero everywhere (or NaN): no point, an empty outline
        return np.empty((0, 2), dtype=np.float32)
    mask = np.empty(cam.shape, np.uint8)
    np.greater_equal(cam, level * peak, out=mask)
    row, col = np.unravel_index(index, cam.shape)
    # every area's outer border (8-connected, traced as for that area alone); the maximum's area is the smallest one
    # around it (a larger one around it holds it in a hole). No labelling of the film: 3–5 ms a 2048² map, not 15.
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    around = [c for c, h in zip(contours, hierarchy[0])
              if h[3] < 0 and cv2.pointPolygonTest(c, (float(col), float(row)), False) >= 0]  # fmt: skip
    contour = min(around, key=cv2.contourArea)
    epsilon = 0.5
    while len(contour) > max_points:  # Douglas–Peucker, coarser until it fits
        contour = cv2.approxPolyDP(contour, epsilon, closed=True)
        epsilon *= 1.5
    points = contour.reshape(-1, 2).astype(np.float32) + 0.5  # DICOM's (0, 0) is the first pixel's corner
    if len(points) < 3:  # a single pixel or a line: its bounding square
        c0, r0 = points.min(axis=0) - 0.5
        c1, r1 = points.max(axis=0) + 0.5
        points = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1]], dtype=np.float32)
    return points


def display_image(image, mean, std) -> np.ndarray:
    """A preprocessed 3×H×W image (array or CPU tensor) back to the grayscale uint8 picture the model saw."""
    x = np.asarray(image, dtype=np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    picture = np.clip((x * s + m).mean(axis=0), 0, 1)
    return (picture * 255).round().astype(np.uint8)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (OpenCV's JET colormap) blended over the grayscale image; RGB uint8."""
    import cv2

    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    base = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return np.clip((1 - alpha) * base + alpha * heat.astype(np.float32), 0, 255).astype(np.uint8)


def png_bytes(rgb_or_gray: np.ndarray) -> bytes:
    import cv2

    image = rgb_or_gray if rgb_or_gray.ndim == 2 else rgb_or_gray[..., ::-1]
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def write_overlay(path: str | Path, gray: np.ndarray, cam: np.ndarray) -> Path:

    return atomic_write_bytes(path, png_bytes(overlay(gray, cam)))
