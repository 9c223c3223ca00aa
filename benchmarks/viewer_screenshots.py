"""The screenshots of docs/USER_GUIDE.md "What the radiologist sees": a film answered by ``cxrclip pacs --heatmap yes``
(Orthanc + DICOMweb on 127.0.0.1), opened in the OHIF Viewer (tests/ohif.py: the pinned npm dist) in Debian's
chromium. Needs Orthanc, chromium and the OHIF dist (``python -m tests.ohif fetch``).

    python benchmarks/viewer_screenshots.py --model_path demo_out/run/checkpoints/model-best.tar \\
        --image demo_out/data/images/test_00000_0.png --out docs/images
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrclip.pacs.assessment import build_review_sr  # noqa: E402
from cxrclip.pacs.sr import read_sr  # noqa: E402
from cxrclip.pacs.store import JobStore  # noqa: E402
from cxrclip.pacs.worker import WorkerSettings, make_worker  # noqa: E402
from cxrclip.predict import PredictorOptions  # noqa: E402
from cxrclip.synthetic import radiograph_dicom  # noqa: E402
from tests import ohif  # noqa: E402
from tests.servers import PASSWORD, USER, Orthanc  # noqa: E402
from tests.test_viewer import BROWSER_ARGS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--image", required=True, help="a film (PNG); shown at --side pixels")
    p.add_argument("--side", type=int, default=768)
    p.add_argument("--out", default="docs/images")
    args = p.parse_args()
    pixels = np.asarray(Image.open(args.image).convert("L").resize((args.side, args.side), Image.BILINEAR))
    film = radiograph_dicom(pixels.astype(np.uint16) * 16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        orthanc = Orthanc(Path(tmp) / "orthanc").start()
        try:
            pacs = orthanc.client()
            pacs.store([film], film.StudyInstanceUID)
            settings = WorkerSettings(dicomweb=orthanc.dicomweb, model=PredictorOptions(args.model_path, device="cpu"),
                                      db=str(Path(tmp) / "jobs.sqlite"), once=True, since="19000101",
                                      heatmap_labels=("yes",))  # fmt: skip
            make_worker(settings, orthanc.client(), JobStore(Path(tmp) / "jobs.sqlite")).run()
            (row,) = pacs.find_instances("SR", None)
            ai_sr = pacs.retrieve(row["study_uid"], row["series_uid"], row["sop_uid"])
            answer = read_sr(ai_sr)
            yes = {n: v["probability"] for n, v in answer["labels"].items() if v["present"]}
            print("YES:", yes)
            shown = {n: {k: v[k] for k in ("probability", "threshold", "rule", "present", "calibrated")}
                     for n, v in answer["labels"].items()}  # fmt: skip
            first = max(yes, key=yes.get)  # an illustrative review: the reader accepts the likeliest finding
            review = {"id": 1, "reviewer": "Dr. Lin", "created_at": "2026-12-07T10:00:00+00:00", "shown": shown,
                      "verdicts": {first: "present", "Pneumothorax": "absent"}, "comment": "an illustration",
                      "model_sha256": ai_sr.ContributingEquipmentSequence[0].DeviceSerialNumber}  # fmt: skip
            pacs.store([build_review_sr(film, review, ai_sr)], film.StudyInstanceUID)
            from playwright.sync_api import sync_playwright

            with ohif.Viewer(orthanc.dicomweb, USER, PASSWORD) as viewer, sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(viewer.study(film.StudyInstanceUID))
                page.get_by_text("Skip all").click(timeout=90_000)
                page.get_by_text("cxrclip AI findings - not for diagnostic use").dblclick()
                page.get_by_text("Probability:").first.wait_for(timeout=60_000)
                page.wait_for_timeout(2_000)
                page.screenshot(path=str(out / "ohif_sr.png"))
                page.get_by_text("cxrclip where the model looked").dblclick()
                page.get_by_text("Yes", exact=True).click(timeout=60_000)
                page.wait_for_timeout(3_000)
                page.locator('[data-cy="panelSegmentation-btn"]').click()
                page.wait_for_timeout(3_000)
                page.screenshot(path=str(out / "ohif_seg.png"))
                page.get_by_text("reviewed by a reader").dblclick()
                page.get_by_text("Reader's comment").wait_for(timeout=60_000)
                page.screenshot(path=str(out / "ohif_review.png"))
                browser.close()
        finally:
            orthanc.stop()
    print(f"screenshots in {out}: ohif_sr.png, ohif_seg.png, ohif_review.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
