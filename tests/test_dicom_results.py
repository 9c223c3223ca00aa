"""The answer as the radiologist's archive holds it: the TID 1500 SR (IHE AI Results) and the Segmentation of where
the model looked, checked by PixelMed's validators and dciodvfy, read back field for field, and the SRs PACSs
already hold (the template before TID 1500) still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrclip.data.preprocess import PreprocessSpec
from cxrclip.pacs.seg import build_saliency_seg
from cxrclip.pacs.sr import FINDING_CODES, build_sr, read_sr, sr_uids
from cxrclip.paths import config_labels
from cxrclip.predict.answer import Answer, GateVerdict
from cxrclip.predict.gradcam import saliency_outline
from cxrclip.synthetic import radiograph_dicom
from tests.validators import dciodvfy_errors, pixelmed_iod_errors, pixelmed_sr_findings

GOLDEN = Path(__file__).parent / "golden"
CARD = {"name": "model-best.tar", "checkpoint_sha256": "ab" * 32, "image_size": 224, "gate": {"fitted": False}}
FRONTAL = GateVerdict(analysed=True, kind="frontal", stage="image", score=0.02, threshold=0.4)
LATERAL = GateVerdict(analysed=False, kind="lateral", reason="lateral view (gate score 0.97)", stage="image",
                      score=0.97, threshold=0.4)  # fmt: skip
KEYS = ("probability", "threshold", "rule", "present", "calibrated", "uncalibrated_probability")


def answer_of_13() -> Answer:
    labels = {
        name: {"probability": round(0.05 + 0.07 * i, 4), "threshold": 0.4, "rule": "mcc" if i % 2 else "youden",
               "present": 0.05 + 0.07 * i >= 0.4, "calibrated": i % 3 != 0,
               "uncalibrated_probability": round(0.5 - 0.01 * i, 4)}
        for i, name in enumerate(config_labels("cgmh"))
    }  # fmt: skip
    return Answer(analysed=True, gate=FRONTAL, labels=labels)


def gaussian(rows: int, cols: int, row: float, col: float, spread: float) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    return np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * spread**2)).astype(np.float32)


@pytest.fixture(scope="module")
def film():
    return radiograph_dicom((np.add.outer(np.arange(320), np.arange(256)) % 251).astype(np.uint16))


def test_the_sr_is_tid_1500_and_every_validator_finds_it_clean(film, tmp_path):
    result = answer_of_13()
    yes = [n for n, v in result.labels.items() if v.present]
    regions = {n: saliency_outline(gaussian(320, 256, 100 + 10 * i, 80 + 5 * i, 20)) for i, n in enumerate(yes)}
    sr = build_sr(film, result, CARD, regions=regions)
    refusal = build_sr(film, Answer(analysed=False, reason=LATERAL.reason, gate=LATERAL), CARD)
    for ds in (sr, refusal):
        root = ds.ConceptNameCodeSequence[0]
        assert (root.CodingSchemeDesignator, root.CodeValue) == ("DCM", "126000")  # Imaging Measurement Report
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        equipment = ds.ContributingEquipmentSequence[0]
        assert equipment.DeviceSerialNumber == "ab" * 32 and "checkpoint_sha256=" in equipment.ContributionDescription
        assert pixelmed_sr_findings(ds, tmp_path) == []  # no error, no warning, nothing outside the template
        assert dciodvfy_errors(ds, tmp_path) == []
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back = read_sr(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert {n: {k: v[k] for k in KEYS} for n, v in back["labels"].items()} == {
        n: {k: v[k] for k in KEYS} for n, v in result.to_json()["labels"].items()
    }
    assert back["source"] == film.SOPInstanceUID and back["analysed"] and "not for diagnostic use" in back["notice"]
    assert (
        f"checkpoint_sha256={'ab' * 32}" in back["parameters"] and back["algorithm"]["name"] == "cxrclip model-best.tar"
    )
    assert sorted(back["regions"]) == sorted(yes)
    for n in yes:  # the outline round-trips, closed (TID 1410)
        assert np.allclose(back["regions"][n][:-1], regions[n]) and np.allclose(
            back["regions"][n][0], back["regions"][n][-1]
        )
    assert back["labels"]["NG tube in place"]["finding"] == ("SCT", "17102003", "Nasogastric tube")
    assert back["labels"]["Endotracheal tube malposition"]["finding"][0] == "99CXRCLIP"  # a malposition is no device
    assert len({v["finding"] for v in back["labels"].values()}) == 13
    refused = read_sr(refusal)
    assert not refused["analysed"] and refused["reason"] == LATERAL.reason and refused["gate_score"] == 0.97
    assert "labels" not in refused and refused["source"] == film.SOPInstanceUID


def test_tracking_uids_and_the_sr_uid_are_functions_of_image_model_and_label(film):
    result = answer_of_13()
    a, b = build_sr(film, result, CARD), build_sr(film, result, CARD)
    other = build_sr(film, result, {**CARD, "checkpoint_sha256": "cd" * 32})

    def tracking(ds):
        measurements = next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
        out = {}
        for group in measurements.ContentSequence:
            items = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group.ContentSequence}
            out[items["112039"].TextValue] = items["112040"].UID
        return out

    assert tracking(a) == tracking(b) and len(set(tracking(a).values())) == 13
    assert set(tracking(a).values()).isdisjoint(tracking(other).values())
    assert a.SOPInstanceUID == b.SOPInstanceUID == sr_uids(film.SOPInstanceUID, "ab" * 32)[1] != other.SOPInstanceUID


def test_sr_of_the_template_pacs_already_hold_is_still_read():
    old = read_sr(pydicom.dcmread(GOLDEN / "sr_before_tid1500.dcm"))
    assert old["analysed"] and old["labels"] == {
        "Pneumothorax": {"finding": ("SCT", "36118008", "Pneumothorax"), "probability": 0.1234, "threshold": 0.31,
                         "rule": "youden", "present": False, "calibrated": True, "uncalibrated_probability": 0.4567},
        "Chest tube in place": {"finding": old["labels"]["Chest tube in place"]["finding"], "probability": 0.9,
                                "threshold": 0.5, "rule": "fixed=0.5", "present": True, "calibrated": False,
                                "uncalibrated_probability": 0.9},
    }  # fmt: skip
    assert f"checkpoint_sha256={'ab' * 32}" in old["parameters"] and "not for diagnostic use" in old["notice"]
    refused = read_sr(pydicom.dcmread(GOLDEN / "sr_refusal_before_tid1500.dcm"))
    assert not refused["analysed"] and refused["reason"] == LATERAL.reason and refused["gate_score"] == 0.97


def test_the_segmentation_lies_on_the_film_and_passes_both_validators(film, tmp_path):
    maps = {"Pneumothorax": gaussian(320, 256, 100, 80, 30), "NG tube in place": gaussian(320, 256, 250, 200, 15)}
    seg = build_saliency_seg(film, maps, CARD)  # BINARY: where each map is at least half its maximum
    assert seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns) == (film.Rows, film.Columns)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Pneumothorax saliency", "NG tube in place saliency"]
    ng = seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0]
    assert (ng.CodeValue, seg.SegmentSequence[1].SegmentedPropertyCategoryCodeSequence[0].CodeMeaning) == (
        "17102003",
        "Physical object",
    )
    source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == film.SOPInstanceUID
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [1, 0, 0, 0, 1, 0]  # the film's own plane (what OHIF compares)
    for frame, m in zip(seg.pixel_array, maps.values()):
        assert np.array_equal(frame.astype(bool), m >= 0.5 * m.max())
    fractional = build_saliency_seg(film, maps, CARD, fractional=True)
    assert fractional.SegmentationType == "FRACTIONAL" and fractional.SegmentationFractionalType == "PROBABILITY"
    frames = fractional.pixel_array.astype(np.float32) / fractional.MaximumFractionalValue
    for frame, m in zip(frames, maps.values()):  # each segment is its map, to 1/255
        assert np.abs(frame - m).max() <= 1 / 255 + 1e-6
    again = build_saliency_seg(film, maps, CARD)
    assert again.SOPInstanceUID == seg.SOPInstanceUID  # the same answer is the same instance
    assert fractional.SOPInstanceUID != seg.SOPInstanceUID  # another document, another instance
    for ds in (seg, fractional):
        assert dciodvfy_errors(ds, tmp_path) == []
        assert pixelmed_iod_errors(ds, tmp_path) == []


def test_a_saliency_outline_is_the_connected_area_around_the_maximum():
    cam = gaussian(200, 300, 80, 120, 12) + 0.9 * gaussian(200, 300, 150, 250, 12)  # two hot spots
    outline = saliency_outline(cam, level=0.5)
    # a Gaussian at half its maximum is the circle of radius σ·√(2 ln 2) ≈ 14.1 px around its centre (col, row)
    centre = np.array([120.5, 80.5])
    radii = np.linalg.norm(outline - centre, axis=1)
    assert 12.5 < radii.min() and radii.max() < 15.5 and len(outline) <= 64
    assert np.all(np.linalg.norm(outline - [250.5, 150.5], axis=1) > 50)  # the second spot is not part of it
    assert saliency_outline(np.zeros((10, 10))).shape == (0, 2)


def test_the_outline_is_the_border_of_the_maximums_labelled_area_point_for_point():
    """The outline is traced without labelling the film's areas; it is the border OpenCV traces around the
    maximum's area alone (labelled by connectedComponents, the straightforward way), point for point — for random
    smooth maps, a single-pixel maximum, an area touching the edge, and a peak inside the hole of a brighter ring."""
    import cv2

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:120, :150]
    ring = np.exp(-((np.hypot(yy - 60, xx - 75) - 30) ** 2) / 20).astype(np.float32) * 0.8
    ring[60, 75] = 1.0  # the maximum: one pixel inside the ring's hole
    maps = [ring, np.pad(gaussian(60, 60, 0, 30, 15), ((0, 60), (0, 90)))]  # the second touches the top edge
    for _ in range(12):
        cam = sum(rng.uniform(0.3, 1) * gaussian(120, 150, *rng.uniform(0, 120, 2), rng.uniform(3, 25))
                  for _ in range(int(rng.integers(1, 6))))  # fmt: skip
        maps.append(cam.astype(np.float32))
    for cam in maps:
        for level in (0.3, 0.5, 0.8):
            mask = (cam >= level * cam.max()).astype(np.uint8)
            _, components = cv2.connectedComponents(mask, connectivity=8)
            row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
            area = (components == components[row, col]).astype(np.uint8)
            contours, _ = cv2.findContours(area, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            (reference,) = contours  # one area, one outer border
            if len(reference) >= 3:  # (fewer: a square instead, checked below)
                expected = reference.reshape(-1, 2).astype(np.float32) + 0.5
                assert np.array_equal(saliency_outline(cam, level, max_points=10**6), expected), level
    assert len(saliency_outline(ring)) == 4  # the single-pixel maximum: its square, not the ring


def test_a_map_on_the_model_input_is_carried_back_onto_the_film():
    spec = PreprocessSpec.create({"Resize": {"size": 64}, "CenterCrop": {"size": 64}}, "imagenet")
    height, width = 300, 200  # portrait: the resize makes it 96 × 64, the crop drops 16 rows top and bottom
    image = np.zeros((height, width), np.uint8)
    image[140:160, 90:110] = 255  # a bright square around (row 150, column 100)
    seen = spec.numpy()(image)[0]  # what the model sees
    back = spec.to_image((seen > seen.min()).astype(np.float32), height, width)
    rows, cols = np.nonzero(back > 0.5)
    assert abs(rows.mean() - 149.5) < 1.5 and abs(cols.mean() - 99.5) < 1.5
    assert back[:30].max() == 0 and back[-30:].max() == 0  # rows the crop cut off carry nothing
    assert np.allclose(spec.image_to_input(height, width) @ [99.5, 149.5, 1], [31.5, 31.5, 1], atol=0.2)


def test_every_snomed_code_named_is_the_one_pydicom_knows():
    from pydicom.sr.codedict import codes

    known = {"36118008": codes.SCT.Pneumothorax, "16838000": codes.SCT.Pneumomediastinum,
             "19227008": codes.SCT.ForeignBody, "26412008": codes.SCT.EndotrachealTube,
             "52124006": codes.SCT.CentralVenousCatheter}  # fmt: skip
    for value, *_ in FINDING_CODES.values():
        if value in known:
            assert known[value].value == value


def test_inference_writes_the_sr_and_the_segmentation_for_a_dicom_film(tiny_clip_checkpoint, demo_data, tmp_path,
                                                                       capsys, minilm_tokenizer):  # fmt: skip
    from PIL import Image

    from cxrclip.infer import main as infer_main

    pixels = np.asarray(Image.open(sorted((demo_data / "images").glob("*.png"))[0]).convert("L"))
    ds = radiograph_dicom(pixels)
    path = tmp_path / "film.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = tmp_path / "answers"
    args = ["--model_path", str(tiny_clip_checkpoint), "--image_path", str(path), "--device", "cpu", "--json"]
    assert infer_main([*args, "--sr_out", str(out), "--heatmap-label", "Pneumothorax"]) == 0
    answer = json.loads(capsys.readouterr().out)
    written = {pydicom.dcmread(p).Modality: pydicom.dcmread(p) for p in out.glob("*.dcm")}
    assert set(written) == {"SR", "SEG"}
    sr = read_sr(written["SR"])
    assert {n: {k: v[k] for k in KEYS} for n, v in sr["labels"].items()} == {
        n: {k: v[k] for k in KEYS} for n, v in answer["labels"].items()
    }
    assert sorted(sr.get("regions", {})) == (["Pneumothorax"] if answer["labels"]["Pneumothorax"]["present"] else [])
    assert [s.SegmentLabel for s in written["SEG"].SegmentSequence] == ["Pneumothorax saliency"]
    with pytest.raises(SystemExit) as stopped:
        infer_main([*args, "--sr_out", str(out), "--heatmap-label", "Cardiomegaly"])
    assert stopped.value.code == 2 and "--heatmap-label ['Cardiomegaly']: not a label" in capsys.readouterr().err
