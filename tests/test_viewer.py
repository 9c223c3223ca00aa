"""What the radiologist sees: a film, the worker's answer (the TID 1500 SR and the Segmentation of where the model
looked) stored in a real Orthanc, the study opened in the real OHIF Viewer (the pinned npm dist, no build) in
Debian's chromium — the SR's findings listed with their probabilities and outlined on the film, the Segmentation laid
over it (the pixels differ from the bare film's). ``CXRCLIP_SCREENSHOTS=DIR`` keeps the screenshots (docs/images)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrclip.data.images import dicom_image
from cxrclip.pacs.assessment import build_review_sr
from cxrclip.pacs.sr import read_sr
from cxrclip.pacs.store import JobStore
from cxrclip.predict import PredictorOptions, open_predictor
from cxrclip.synthetic import radiograph_dicom
from tests import ohif
from tests.servers import PASSWORD, USER, Orthanc, orthanc_missing
from tests.validators import need

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")
# WebGL through SwiftShader: OHIF renders with WebGL, and headless chromium has no GPU
BROWSER_ARGS = ["--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"]  # fmt: skip
SIDE = 512  # the film as the viewer shows it (the demo's 64-pixel films, enlarged)


def film_with_a_yes(ckpt, demo_data):
    """A demo film, enlarged, of which the model calls at least one label YES (what the viewer must show)."""
    predictor = open_predictor(PredictorOptions(str(ckpt), device="cpu"))
    for path in sorted((demo_data / "images").glob("*.png"))[:40]:
        pixels = np.asarray(Image.open(path).convert("L").resize((SIDE, SIDE), Image.BILINEAR))
        ds = radiograph_dicom(pixels.astype(np.uint16) * 16)
        if predictor.predict_arrays(["film"], [dicom_image(ds)], [{}])[0].yes:
            return ds
    pytest.fail("no demo film with a label called YES: the test needs one to check what the viewer draws")


def canvas(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator('[data-cy="viewport-pane"]').screenshot())).convert("RGB"))


def keep(page, folder: str | None, name: str) -> None:
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def test_the_radiologist_sees_the_findings_the_outline_and_the_map_in_ohif(tiny_clip_checkpoint, demo_data, tmp_path):
    need(orthanc_missing())
    need(ohif.missing())
    chromium = shutil.which("chromium")
    need(None if chromium else "Debian's chromium is not installed (.ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    from cxrclip.pacs.worker import WorkerSettings, make_worker

    film = film_with_a_yes(tiny_clip_checkpoint, demo_data)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        pacs = orthanc.client()
        pacs.store([film], film.StudyInstanceUID)
        settings = WorkerSettings(dicomweb=orthanc.dicomweb, model=PredictorOptions(str(tiny_clip_checkpoint),
                                  device="cpu"), db=str(tmp_path / "jobs.sqlite"), once=True, poll_s=0.1,
                                  since="19000101", heatmap_labels=("yes",))  # fmt: skip
        make_worker(settings, orthanc.client(), JobStore(tmp_path / "jobs.sqlite")).run()
        (sr_row,) = pacs.find_instances("SR", None)
        (seg_row,) = pacs.find_instances("SEG", None)
        ai_sr = pacs.retrieve(sr_row["study_uid"], sr_row["series_uid"], sr_row["sop_uid"])
        answer = read_sr(ai_sr)
        yes = {n: v["probability"] for n, v in answer["labels"].items() if v["present"]}
        assert yes and answer["regions"] and set(answer["regions"]) <= set(yes)  # a map that is zero has no outline
        first = sorted(yes)[0]  # a reader's review of it, stored as the server stores it (tests/test_pacs.py)
        shown = {n: {k: v[k] for k in ("probability", "threshold", "rule", "present", "calibrated")}
                 for n, v in answer["labels"].items()}  # fmt: skip
        review = {"id": 1, "reviewer": "Dr. Lin", "created_at": "2026-12-07T10:00:00+00:00", "shown": shown,
                  "verdicts": {first: "absent"}, "comment": "a skin fold", "model_sha256": "ab" * 32}  # fmt: skip
        pacs.store([build_review_sr(film, review, ai_sr)], film.StudyInstanceUID)
        shots = os.environ.get("CXRCLIP_SCREENSHOTS")
        with ohif.Viewer(orthanc.dicomweb, USER, PASSWORD) as viewer, playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            failures: list[str] = []
            page.on("pageerror", lambda e: failures.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(viewer.url) or r.url.startswith("data:") or
                    r.url.startswith("blob:") else failures.append(f"left 127.0.0.1: {r.url}"))  # fmt: skip
            page.goto(viewer.study(film.StudyInstanceUID))
            page.get_by_text("Skip all").click(timeout=90_000)  # the first-visit tour
            page.wait_for_timeout(2_000)
            bare = canvas(page)
            keep(page, shots, "ohif_film.png")

            page.get_by_text("cxrclip AI findings - not for diagnostic use").dblclick()
            page.get_by_text("Probability:").first.wait_for(timeout=60_000)
            page.wait_for_timeout(2_000)
            text = page.locator('[data-cy="viewport-pane"]').inner_text()
            for name, probability in yes.items():  # each YES finding, its probability beside its outline
                assert f"Probability: {probability:.2f}" in text, (name, text)
            with_sr = canvas(page)
            keep(page, shots, "ohif_sr.png")

            page.get_by_text("cxrclip where the model looked").dblclick()
            page.get_by_text("Do you want to open this Segmentation?").wait_for(timeout=60_000)
            page.wait_for_timeout(3_000)
            with_seg = canvas(page)
            keep(page, shots, "ohif_seg.png")

            page.get_by_text("reviewed by a reader").dblclick()  # the reader's verified SR, as a report
            page.get_by_text("Reader's comment: a skin fold").wait_for(timeout=60_000)
            report = page.locator('[data-cy="viewport-pane"]').inner_text()
            assert f"{first}: cxrclip said present" in report and "rejected (the reader: absent)." in report
            keep(page, shots, "ohif_review.png")
            browser.close()
        assert not [f for f in failures if "left 127.0.0.1" in f], failures
        assert not [f for f in failures if "Error" in f or "TypeError" in f], failures
        changed = lambda a, b: int((np.abs(a.astype(int) - b.astype(int)).sum(axis=2) > 60).sum())  # noqa: E731
        assert bare.shape == with_sr.shape == with_seg.shape
        assert changed(bare, with_sr) > 200  # the outlines (and the film's frame) are drawn
        assert changed(bare, with_seg) > 2_000  # the map is laid over the film: filled areas
        for row, label in ((sr_row, "SR"), (seg_row, "SEG")):
            assert row["study_uid"] == film.StudyInstanceUID, label
    finally:
        orthanc.stop()
