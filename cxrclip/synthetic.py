"""A synthetic chest-X-ray-like dataset whose 13 CGMH labels are visible in the images.

Each image is an AP radiograph in outline (soft tissue, lungs with vessel markings, ribs,
clavicles, mediastinum, heart, spine, trachea, diaphragm domes). Devices are drawn on their
anatomical path, and the tip position tells "in place" from "malposition"; air leaks and
foreign bodies are drawn as a radiologist would see them. Image left is the patient's right.
Everything depends only on the seed, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from cxrclip.data.prompts import DEFAULT_PROMPTS, NORMAL_SENTENCE, PromptBank, load_prompts
from cxrclip.exceptions import ConfigError
from cxrclip.io import atomic_write_bytes, atomic_write_text
from cxrclip.paths import config_labels

CGMH_LABELS = config_labels("cgmh")  # configs/labels/cgmh.yaml: the one list of the 13 labels

# (device, probability present); present devices are "in place" with probability 0.6.
DEVICES = (("Endotracheal tube", 0.3), ("NG tube", 0.3), ("Chest tube", 0.2), ("Pigtail", 0.2))
MALPOSITION = {"Pigtail": "Pigtail malpositon"}
FINDINGS = (
    ("Central venous catheter in place", 0.3),
    ("Pneumothorax", 0.2),
    ("Subcutaneous emphysema", 0.15),
    ("Pneumomediastinum", 0.12),
    ("Foreign body", 0.12),
)


@dataclass
class Patient:
    """What is in the chest (labels and their sides/variants), independent of one exposure."""

    labels: list[str]
    side: dict[str, int] = field(default_factory=dict)  # label -> -1 (image left) / +1 (image right)
    variant: dict[str, int] = field(default_factory=dict)
    lung_scale: float = 1.0
    body_width: float = 0.47
    seed: int = 0


def sample_patient(rng: np.random.Generator, label_names: Sequence[str] = CGMH_LABELS) -> Patient:
    labels = []
    for device, p in DEVICES:
        if rng.random() < p:
            labels.append(
                f"{device} in place" if rng.random() < 0.6 else MALPOSITION.get(device, f"{device} malposition")
            )
    labels += [name for name, p in FINDINGS if rng.random() < p]
    labels = [n for n in label_names if n in labels]  # the list's order (draws are the same whatever the list)
    side = {n: int(rng.choice([-1, 1])) for n in labels}
    variant = {n: int(rng.integers(0, 2)) for n in labels}
    return Patient(
        labels, side, variant, float(rng.uniform(0.92, 1.06)), float(rng.uniform(0.43, 0.49)), int(rng.integers(2**31))
    )


class Canvas:
    """Draws in normalized coordinates (0..1) onto a float image of size S."""

    def __init__(self, size: int):
        self.s = size
        self.img = np.zeros((size, size), np.float32)

    def pt(self, x: float, y: float) -> tuple[int, int]:
        return int(round(x * self.s)), int(round(y * self.s))

    def px(self, v: float) -> int:
        return max(1, int(round(v * self.s)))

    def ellipse(self, layer, c, axes, value, angle=0.0, start=0, end=360, thickness=-1):
        cv2.ellipse(
            layer,
            self.pt(*c),
            (self.px(axes[0]), self.px(axes[1])),
            angle,
            start,
            end,
            value,
            thickness,
            lineType=cv2.LINE_AA,
        )

    def path(self, layer, points, value, width):
        pts = np.array([self.pt(x, y) for x, y in points], np.int32).reshape(-1, 1, 2)
        cv2.polylines(layer, [pts], False, value, self.px(width), lineType=cv2.LINE_AA)


def _spline(points: Sequence[tuple[float, float]], n: int = 40) -> list[tuple[float, float]]:
    """A smooth curve through a few control points (Catmull-Rom)."""
    p = [points[0], *points, points[-1]]
    out = []
    for i in range(1, len(p) - 2):
        for t in np.linspace(0, 1, n, endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(
                tuple(
                    0.5
                    * (
                        2 * p[i][k]
                        + (-p[i - 1][k] + p[i + 1][k]) * t
                        + (2 * p[i - 1][k] - 5 * p[i][k] + 4 * p[i + 1][k] - p[i + 2][k]) * t2
                        + (-p[i - 1][k] + 3 * p[i][k] - 3 * p[i + 1][k] + p[i + 2][k]) * t3
                    )
                    for k in range(2)
                )
            )
    out.append(points[-1])
    return out


def _lungs(c: Canvas, pt: Patient) -> tuple[np.ndarray, list]:
    mask = np.zeros_like(c.img)
    k = pt.lung_scale
    lungs = [((0.32, 0.46), (0.145 * k, 0.27 * k)), ((0.68, 0.47), (0.135 * k, 0.26 * k))]
    for center, axes in lungs:
        c.ellipse(mask, center, axes, 1.0)
    return mask, lungs


def _anatomy(c: Canvas, pt: Patient, rng: np.random.Generator) -> np.ndarray:
    img = c.img
    c.ellipse(img, (0.5, 0.6), (pt.body_width, 0.6), 105.0)  # soft tissue
    c.ellipse(img, (0.5, 0.02), (0.12, 0.12), 110.0)  # neck
    lung_mask, lungs = _lungs(c, pt)
    img -= 62.0 * lung_mask
    # mediastinum, spine, heart, abdomen below the domes
    cv2.rectangle(img, c.pt(0.43, 0.08), c.pt(0.57, 0.72), 165.0, -1)
    c.ellipse(img, (0.57, 0.63), (0.13, 0.11), 165.0)
    cv2.rectangle(img, c.pt(0.478, 0.0), c.pt(0.522, 1.0), 172.0, -1)
    trachea = np.zeros_like(img)
    c.path(trachea, [(0.5, 0.0), (0.5, 0.30)], 1.0, 0.03)
    c.path(trachea, [(0.5, 0.30), (0.41, 0.37)], 1.0, 0.018)
    c.path(trachea, [(0.5, 0.30), (0.59, 0.37)], 1.0, 0.018)
    img -= 70.0 * trachea
    # ribs (posterior arcs) and clavicles
    bones = np.zeros_like(img)
    for side in (-1, 1):
        for i in range(9):
            y = 0.18 + i * 0.062 * pt.lung_scale
            # a posterior rib leaves the spine, arches up and runs down laterally
            c.ellipse(
                bones,
                (0.5 + side * 0.03, y + 0.07),
                (0.21, 0.07),
                1.0,
                0,
                180 if side < 0 else 270,
                270 if side < 0 else 360,
                thickness=c.px(0.012),
            )
        c.path(bones, [(0.5 + side * 0.05, 0.17), (0.5 + side * 0.3, 0.13)], 1.0, 0.014)
    img += 28.0 * bones
    # vessel markings: branches from the hila, only inside the lungs
    markings = np.zeros_like(img)
    for (cx, cy), (ax, ay) in lungs:
        hilum = (0.5 + (cx - 0.5) * 0.45, cy - 0.02)
        for _ in range(14):
            ang = rng.uniform(-math.pi, math.pi)
            length = rng.uniform(0.5, 0.95)
            end = (cx + math.cos(ang) * ax * length, cy + math.sin(ang) * ay * length)
            c.path(markings, [hilum, end], 1.0, 0.004)
    return markings * lung_mask


def _tube(c: Canvas, layer, points, width, value=1.0):
    c.path(layer, _spline(points), value, width)


def _pneumothorax(c: Canvas, pt: Patient, rng, markings: np.ndarray) -> np.ndarray:
    """A lucent rim without markings lateral/apical to a collapsed lung, edged by the pleural line."""
    side = pt.side["Pneumothorax"]
    lung_mask, lungs = _lungs(c, pt)
    (cx, cy), (ax, ay) = lungs[0 if side < 0 else 1]
    f = rng.uniform(0.5, 0.7)
    collapsed = np.zeros_like(c.img)
    ccx = cx - side * ax * (1 - f) * 0.9  # collapses toward the hilum
    c.ellipse(collapsed, (ccx, cy + ay * (1 - f) * 0.5), (ax * f, ay * f), 1.0)
    half = np.zeros_like(c.img)
    c.ellipse(half, (cx, cy), (ax, ay), 1.0)
    rim = np.clip(half - collapsed, 0, 1)
    markings *= 1 - rim
    c.img -= 40.0 * rim
    pleura = np.zeros_like(c.img)
    c.ellipse(pleura, (ccx, cy + ay * (1 - f) * 0.5), (ax * f, ay * f), 1.0, thickness=max(1, c.px(0.004)))
    c.img += 45.0 * pleura * rim.clip(0, 1).max()
    return markings


@dataclass
class Layers:
    """What label drawers paint on: radiopaque devices, extra lucency, and the lung markings (erasable)."""

    dev: np.ndarray
    air: np.ndarray
    markings: np.ndarray


def _ett_in_place(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    _tube(c, layers.dev, [(0.5, -0.02), (0.5, 0.12), (0.5, rng.uniform(0.21, 0.26))], 0.011)


def _ett_malposition(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    if pt.variant["Endotracheal tube malposition"]:  # right main bronchus
        _tube(c, layers.dev, [(0.5, -0.02), (0.5, 0.25), (0.46, 0.33), (0.41, 0.38)], 0.011)
    else:  # too high, above the thoracic inlet
        _tube(c, layers.dev, [(0.5, -0.02), (0.5, rng.uniform(0.11, 0.15))], 0.011)


def _ng_in_place(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    _tube(c, layers.dev, [(0.51, -0.02), (0.51, 0.3), (0.53, 0.62), (0.6, 0.78), (0.67, 0.83)], 0.006)


def _ng_malposition(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    if pt.variant["NG tube malposition"]:  # coiled in the esophagus
        _tube(c, layers.dev, [(0.51, -0.02), (0.51, 0.3), (0.52, 0.42)], 0.006)
        c.ellipse(layers.dev, (0.52, 0.46), (0.035, 0.04), 1.0, thickness=c.px(0.006))
    else:  # down the right bronchus into the lung
        _tube(c, layers.dev, [(0.51, -0.02), (0.5, 0.28), (0.42, 0.38), (0.33, 0.6)], 0.006)


def _cvc(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    _tube(c, layers.dev, [(0.12, 0.13), (0.3, 0.16), (0.44, 0.2), (0.46, rng.uniform(0.3, 0.34))], 0.005)


def _subcutaneous_emphysema(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    side = pt.side["Subcutaneous emphysema"]
    for _ in range(int(rng.integers(14, 24))):
        x = 0.5 + side * rng.uniform(0.37, 0.45)
        y = rng.uniform(0.12, 0.7)
        ang = rng.uniform(-0.5, 0.5) + math.pi / 2
        ln = rng.uniform(0.02, 0.06)
        c.path(layers.air, [(x, y), (x + math.cos(ang) * ln * 0.3, y + math.sin(ang) * ln)], 1.0, 0.01)


def _pneumomediastinum(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    for side in (-1, 1):
        bottom = 0.5 + side * (0.09 if side < 0 else 0.2)
        points = [(0.5 + side * 0.06, 0.12), (0.5 + side * 0.075, 0.35), (bottom, 0.6)]
        c.path(layers.air, _spline(points), 1.0, 0.007)


def _foreign_body(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    x, y = rng.uniform(0.25, 0.75), rng.uniform(0.2, 0.7)
    if pt.variant["Foreign body"]:
        c.ellipse(layers.dev, (x, y), (0.045, 0.045), 1.0)  # coin
    else:
        ang = rng.uniform(0, math.pi)
        c.path(layers.dev, [(x, y), (x + 0.07 * math.cos(ang), y + 0.07 * math.sin(ang))], 1.0, 0.012)  # pin


def _pneumothorax_layer(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
    layers.markings = _pneumothorax(c, pt, rng, layers.markings)


def _drain(device: str, width: float):
    def draw(c: Canvas, pt: Patient, rng, layers: Layers) -> None:
        _draw_drain(c, layers.dev, pt, device, width, set(pt.labels), rng)

    return draw


# label → how it looks, in drawing order (the order fixes the random draws: same seed, same pixels). A label list
# (configs/labels/*.yaml) may use any of these; a label without a drawer cannot be generated.
DRAWERS = {
    "Pneumothorax": _pneumothorax_layer,
    "Endotracheal tube in place": _ett_in_place,
    "Endotracheal tube malposition": _ett_malposition,
    "NG tube in place": _ng_in_place,
    "NG tube malposition": _ng_malposition,
    "Central venous catheter in place": _cvc,
    "Chest tube in place": _drain("Chest tube", 0.014),
    "Chest tube malposition": _drain("Chest tube", 0.014),
    "Pigtail in place": _drain("Pigtail", 0.006),
    "Pigtail malpositon": _drain("Pigtail", 0.006),
    "Subcutaneous emphysema": _subcutaneous_emphysema,
    "Pneumomediastinum": _pneumomediastinum,
    "Foreign body": _foreign_body,
}


def _draw_labels(c: Canvas, pt: Patient, rng: np.random.Generator, markings: np.ndarray) -> np.ndarray:
    layers = Layers(np.zeros_like(c.img), np.zeros_like(c.img), markings)
    for name, draw in DRAWERS.items():
        if name in pt.labels:
            draw(c, pt, rng, layers)
    c.img -= 55.0 * np.clip(layers.air, 0, 1)
    c.img += 18.0 * layers.markings
    return layers.dev


def _draw_drain(c: Canvas, layer, pt: Patient, device: str, width: float, labels: set, rng) -> None:
    bad = MALPOSITION.get(device, f"{device} malposition")
    good = f"{device} in place"
    if good not in labels and bad not in labels:
        return
    name = good if good in labels else bad
    side = pt.side[name]
    entry = (0.5 + side * 0.44, rng.uniform(0.55, 0.65))
    if device == "Chest tube":
        if name == good:  # through the pleural space toward the apex
            pts = [entry, (0.5 + side * 0.33, 0.5), (0.5 + side * 0.22, 0.22)]
        else:  # stays in the chest-wall soft tissue, kinked back on itself
            pts = [entry, (0.5 + side * 0.46, 0.45), (0.5 + side * 0.44, 0.34), (0.5 + side * 0.4, 0.42)]
        _tube(c, layer, pts, width)
        return
    if name == good:  # pigtail curled in the lower pleural space
        tip = (0.5 + side * 0.25, rng.uniform(0.58, 0.66))
    elif pt.variant[name]:  # curled outside the thorax
        tip = (0.5 + side * 0.47, rng.uniform(0.35, 0.45))
    else:  # curled below the diaphragm
        tip = (0.5 + side * 0.25, rng.uniform(0.86, 0.92))
    _tube(c, layer, [entry, ((entry[0] + tip[0]) / 2, (entry[1] + tip[1]) / 2 + 0.01), tip], width)
    c.ellipse(layer, (tip[0], tip[1] - 0.025), (0.025, 0.025), 1.0, thickness=c.px(width))


def render(pt: Patient, exposure: int, size: int) -> np.ndarray:
    """One exposure of a patient: anatomy + labels, a small pose change, blur, contrast, noise."""
    # separate streams: adding a label changes nothing else (pose, noise, vessel markings)
    anatomy_rng, label_rng, rng = (np.random.default_rng([pt.seed, exposure, k]) for k in range(3))
    c = Canvas(size)
    markings = _anatomy(c, pt, anatomy_rng)
    dev = _draw_labels(c, pt, label_rng, markings)
    c.img = cv2.GaussianBlur(c.img, (0, 0), size / 220.0)
    c.img = np.maximum(c.img, 235.0 * np.clip(dev, 0, 1))
    angle, scale = rng.uniform(-4, 4), rng.uniform(0.95, 1.05)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.03, 0.03, 2) * size
    img = cv2.warpAffine(c.img, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
    img += rng.normal(0, 5.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def _sentence(labels: Sequence[str], bank: PromptBank, rng: np.random.Generator) -> str:
    if not labels:
        return NORMAL_SENTENCE
    return " ".join(bank[n].pos[int(rng.integers(len(bank[n].pos)))] for n in labels)


def generate_demo_data(
    out: str | Path,
    *,
    n_train: int = 800,
    n_valid: int = 100,
    n_test: int = 200,
    image_size: int = 256,
    seed: int = 0,
    second_view_frac: float = 0.2,
    prompt_path: str | Path = DEFAULT_PROMPTS,
    label_names: Sequence[str] = CGMH_LABELS,
) -> dict[str, Path]:
    """Write ``train.csv``, ``valid.csv``, ``test.csv`` and ``images/`` under ``out``; return the CSV paths.
    ``label_names`` (default: configs/labels/cgmh.yaml) may be any subset of the labels in :data:`DRAWERS`."""
    unknown = [n for n in label_names if n not in DRAWERS]
    if unknown:
        raise ConfigError(f"the synthetic generator cannot draw {unknown}; it draws {list(DRAWERS)}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    bank = load_prompts(prompt_path)
    bank.check_covers(label_names)
    written = {}
    for split_index, (split, n) in enumerate((("train", n_train), ("valid", n_valid), ("test", n_test))):
        rng = np.random.default_rng([seed, split_index])
        rows = []
        for i in range(n):
            pt = sample_patient(rng, label_names)
            views = 2 if split == "train" and rng.random() < second_view_frac else 1
            names = []
            for v in range(views):
                name = f"images/{split}_{i:05d}_{v}.png"
                atomic_write_bytes(out / name, _png(render(pt, v, image_size)))
                names.append(name)
            if split == "test":
                rows.append([str(names), *(int(n in pt.labels) for n in label_names), _sentence(pt.labels, bank, rng)])
            else:
                rows.append([str(names), str(pt.labels)])
        header = ["image", *label_names, "text"] if split == "test" else ["image", "text_label"]
        written[split] = atomic_write_text(out / f"{split}.csv", _csv_text(header, rows))
    return written


SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
}


def radiograph_dicom(
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    patient_id: str = "CXRCLIP-DEMO-1",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    study_date: str | None = None,
    **attrs,
):
    """A complete DICOM radiograph (pydicom Dataset, 12 bits in 16) of a grayscale image — what a modality sends to a
    PACS: patient, study, series and equipment attributes filled. ``photometric="MONOCHROME1"`` stores the inverted
    values, so that any correct reader shows the same picture. For tests, the benchmark and the PACS guide."""
    import datetime

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    values = np.round(np.asarray(pixels, dtype=np.float32) * (4095.0 / max(float(np.max(pixels)), 1.0)))
    values = values.astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (4095 - values).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASSES.get(modality, SOP_CLASSES["DX"])
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("radiograph.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Demo^Patient", patient_id, "19700101", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date or now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer, ds.ConversionType = "cxrclip synthetic", "WSD"
    if view:
        ds.ViewPosition = view
    if body_part:
        ds.BodyPartExamined = body_part
    ds.PatientOrientation = ["L", "F"] if modality != "CT" else ""
    if modality != "CT":
        ds.ImagerPixelSpacing = [0.143, 0.143]  # mm at the detector, as DX requires (a typical flat panel)
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = values.tobytes()
    return ds
