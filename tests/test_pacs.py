"""The PACS worker against a real Orthanc (Debian's orthanc + orthanc-dicomweb, started here on 127.0.0.1): every kind
of instance, SRs read back and compared with inference.py --json, dciodvfy, kill -9 at random points and right after
the store, the PACS going down and coming back, and two workers on one PostgreSQL job table."""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from cxrclip.pacs.dicomweb import Credentials, DicomWeb, PacsRejected, PacsUnavailable, credentials
from cxrclip.pacs.sr import build_sr, read_sr, sr_uids
from cxrclip.pacs.store import JobStore
from cxrclip.predict import PredictorOptions
from cxrclip.predict.answer import Answer, GateVerdict
from cxrclip.synthetic import radiograph_dicom
from tests.servers import PASSWORD, USER, Orthanc, orthanc_missing

pytestmark = pytest.mark.usefixtures("minilm_tokenizer")
TODAY = time.strftime("%Y-%m-%d")
LABEL_KEYS = ("probability", "threshold", "rule", "present", "calibrated", "uncalibrated_probability")


def need(reason: str | None) -> None:
    """A missing server is a skip with its reason, and a failure where .ci/run installed it
    (CXRCLIP_REQUIRE_SERVERS=1): there a PACS test never skips silently."""
    if reason:
        (pytest.fail if os.environ.get("CXRCLIP_REQUIRE_SERVERS") else pytest.skip)(reason)


@pytest.fixture
def orthanc(tmp_path):
    need(orthanc_missing())
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


def films(demo_data, n: int) -> list[np.ndarray]:
    paths = sorted((demo_data / "images").glob("*.png"))[:n]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


def broken_dicom(pixels) -> pydicom.Dataset:
    """A DX whose pixel data claims JPEG Baseline but holds no decodable JPEG."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = radiograph_dicom(pixels)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20])
    ds["PixelData"].VR = "OB"
    return ds


def upload(pacs: DicomWeb, datasets) -> None:
    for ds in datasets:
        pacs.store([ds], ds.StudyInstanceUID)


def srs_by_source(pacs: DicomWeb) -> dict[str, list[dict]]:
    """Every SR on the PACS, read back, grouped by the instance it answers."""
    out: dict[str, list[dict]] = {}
    for row in pacs.find_instances("SR", None):
        ds = pacs.retrieve(row["study_uid"], row["series_uid"], row["sop_uid"])
        sr = read_sr(ds)
        sr["dataset"] = ds
        out.setdefault(sr["source"], []).append(sr)
    return out


def inference_json(ckpt, ds, tmp_path, capsys) -> dict:
    from cxrclip.infer import main as infer_main

    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    capsys.readouterr()
    assert infer_main(["--model_path", str(ckpt), "--image_path", str(path), "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def dciodvfy_errors(ds, tmp_path) -> list[str]:
    path = tmp_path / "check.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def worker_in_process(ckpt, orthanc: Orthanc, db: Path, **options):
    from cxrclip.pacs.worker import WorkerSettings, make_worker

    model = PredictorOptions(str(ckpt), device="cpu")
    settings = WorkerSettings(dicomweb=orthanc.dicomweb, model=model, db=str(db), once=True, poll_s=0.1, **options)
    return make_worker(settings, orthanc.client(), JobStore(db))


def test_sr_holds_every_value_and_passes_dciodvfy(tmp_path):
    source = radiograph_dicom(np.arange(64 * 64).reshape(64, 64) % 251)
    card = {"name": "model-best.tar", "checkpoint_sha256": "ab" * 32, "image_size": 224, "gate": {"fitted": False}}
    labels = {
        "Pneumothorax": {"probability": 0.1234, "threshold": 0.31, "rule": "youden", "present": False,
                         "calibrated": True, "uncalibrated_probability": 0.4567},
        "Chest tube in place": {"probability": 0.9, "threshold": 0.5, "rule": "fixed=0.5", "present": True,
                                "calibrated": False, "uncalibrated_probability": 0.9},
        "Chest tube malposition": {"probability": 0.0001, "threshold": 0.5, "rule": "given", "present": False,
                                   "calibrated": True, "uncalibrated_probability": 0.0002},
    }  # fmt: skip
    frontal = GateVerdict(analysed=True, kind="frontal", stage="image", score=0.02, threshold=0.4)
    sr = build_sr(source, Answer(analysed=True, gate=frontal, labels=labels), card)
    back = read_sr(pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(sr))))
    assert back["analysed"] and back["source"] == source.SOPInstanceUID
    assert {n: {k: v[k] for k in LABEL_KEYS} for n, v in back["labels"].items()} == labels
    assert back["labels"]["Pneumothorax"]["finding"] == ("SCT", "36118008", "Pneumothorax")
    codes = {v["finding"][1] for v in back["labels"].values()}
    assert len(codes) == 3  # two "Chest tube ..." labels get two private codes
    assert f"checkpoint_sha256={'ab' * 32}" in back["parameters"] and "not for diagnostic use" in back["notice"]
    assert sr.SOPInstanceUID == sr_uids(source.SOPInstanceUID, "ab" * 32)[1]  # a function of image and model
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    reason = "lateral view (gate score 0.97)"
    lateral = GateVerdict(analysed=False, kind="lateral", reason=reason, stage="image", score=0.97, threshold=0.4)
    refusal = build_sr(source, Answer(analysed=False, reason=reason, gate=lateral), card)
    back = read_sr(refusal)
    assert not back["analysed"] and back["reason"] == "lateral view (gate score 0.97)" and back["gate_score"] == 0.97
    assert "labels" not in back
    if not shutil.which("dciodvfy"):
        need("Debian's dicom3tools (dciodvfy) is not installed")
    assert dciodvfy_errors(sr, tmp_path) == [] and dciodvfy_errors(refusal, tmp_path) == []


def _bytes(ds) -> bytes:
    from io import BytesIO

    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_worker_answers_each_kind_and_its_sr_equals_inference_json(
    orthanc, tiny_clip_checkpoint, demo_data, tmp_path, capsys
):
    a, b, c, d = films(demo_data, 4)
    dx = radiograph_dicom(a, modality="DX")
    cr = radiograph_dicom(b, modality="CR", photometric="MONOCHROME1")
    lateral = radiograph_dicom(c, modality="DX", view="LL")
    ct = radiograph_dicom(d, modality="CT", view=None, body_part="CHEST")
    broken = broken_dicom(a)
    pacs = orthanc.client()
    upload(pacs, [dx, cr, lateral, ct, broken])

    db = tmp_path / "jobs.sqlite"
    worker = worker_in_process(tiny_clip_checkpoint, orthanc, db, since=time.strftime("%Y%m%d"),
                               modalities=("CR", "DX", "CT"), report_refusals=True,
                               heatmap_labels=("Pneumothorax",), heatmap_format="both")  # fmt: skip
    worker.run()
    rows = {r["sop_uid"]: r for r in JobStore(db).rows()}
    assert {u: rows[u]["state"] for u in rows} == {
        dx.SOPInstanceUID: "done", cr.SOPInstanceUID: "done", lateral.SOPInstanceUID: "refused",
        ct.SOPInstanceUID: "refused", broken.SOPInstanceUID: "failed",
    }  # fmt: skip
    assert "cannot decode DICOM" in rows[broken.SOPInstanceUID]["error"]
    assert rows[lateral.SOPInstanceUID]["reason"] == "DICOM ViewPosition LL: lateral view"
    assert "Modality CT" in rows[ct.SOPInstanceUID]["reason"]

    found = srs_by_source(pacs)
    assert sorted(found) == sorted(u for u, r in rows.items() if r["state"] in ("done", "refused"))
    for source in (dx, cr):
        (sr,) = found[source.SOPInstanceUID]
        expected = inference_json(tiny_clip_checkpoint, source, tmp_path, capsys)
        assert {n: {k: v[k] for k in LABEL_KEYS} for n, v in sr["labels"].items()} == {
            n: {k: v[k] for k in LABEL_KEYS} for n, v in expected["labels"].items()
        }
        assert sr["dataset"].StudyInstanceUID == source.StudyInstanceUID
        assert rows[source.SOPInstanceUID]["sr_uid"] == sr["sop_instance_uid"]
        assert json.loads(rows[source.SOPInstanceUID]["result"]) == expected["labels"]
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sr["dataset"], tmp_path) == []
    # inference.py --sr_out: the same SR file without a server (same UID, same values)
    offline = tmp_path / "sr_out"
    source_file = tmp_path / f"{dx.SOPInstanceUID}.dcm"
    from cxrclip.infer import main as infer_main

    args = ["--model_path", str(tiny_clip_checkpoint), "--image_path", str(source_file), "--device", "cpu"]
    assert infer_main([*args, "--sr_out", str(offline)]) == 0
    (written,) = offline.glob("*.dcm")
    again = read_sr(pydicom.dcmread(written))
    (stored,) = found[dx.SOPInstanceUID]
    assert again["sop_instance_uid"] == stored["sop_instance_uid"] and again["labels"] == stored["labels"]
    png = tmp_path / "film.png"
    Image.fromarray(a).save(png)
    args[3] = str(png)
    with pytest.raises(SystemExit) as stopped:
        infer_main([*args, "--sr_out", str(offline)])
    assert stopped.value.code == 2
    assert "--sr_out: no DICOM input" in capsys.readouterr().err
    (refusal,) = found[lateral.SOPInstanceUID]
    assert refusal["reason"] == "DICOM ViewPosition LL: lateral view" and "labels" not in refusal
    assert inference_json(tiny_clip_checkpoint, lateral, tmp_path, capsys)["reason"] == refusal["reason"]
    captures = pacs.find_instances("OT", None)  # the Grad-CAM secondary captures, one per analysed image
    assert len(captures) == 2 and {r["study_uid"] for r in captures} == {dx.StudyInstanceUID, cr.StudyInstanceUID}
    capture = pacs.retrieve(captures[0]["study_uid"], captures[0]["series_uid"], captures[0]["sop_uid"])
    assert capture.SeriesDescription == "cxrclip Grad-CAM Pneumothorax - not for diagnostic use"
    assert capture.pixel_array.shape[-1] == 3 and capture.pixel_array.std() > 0  # an RGB overlay, not a blank frame
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(capture, tmp_path) == []
    segs = pacs.find_instances("SEG", None)  # where the model looked, a Segmentation a viewer overlays
    assert len(segs) == 2 and {r["study_uid"] for r in segs} == {dx.StudyInstanceUID, cr.StudyInstanceUID}
    seg = pacs.retrieve(segs[0]["study_uid"], segs[0]["series_uid"], segs[0]["sop_uid"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Pneumothorax saliency"]
    assert seg.SegmentationType == "BINARY" and seg.pixel_array.max() > 0
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(seg, tmp_path) == []

    # a second pass answers nothing again
    worker_in_process(tiny_clip_checkpoint, orthanc, db, modalities=("CR", "DX", "CT")).run()
    assert {k: len(v) for k, v in srs_by_source(pacs).items()} == {k: 1 for k in found}


def days_ago(n: int) -> str:
    return (datetime.date.today() - datetime.timedelta(days=n)).strftime("%Y%m%d")


@pytest.mark.parametrize("trigger", ["changes", "qido"])
def test_nothing_is_lost_after_downtime_or_during_warm_up_and_late_studies_are_skipped_with_a_reason(
    trigger, orthanc, tiny_clip_checkpoint, demo_data, tmp_path, capsys
):
    from cxrclip.pacs.worker import main as pacs_main

    pixels = films(demo_data, 7)
    pacs = orthanc.client()
    before = radiograph_dicom(pixels[0])
    upload(pacs, [before])
    db = tmp_path / "jobs.sqlite"
    # 1. the first start: what is there is left alone; a film that arrives while the model warms up is answered
    during = radiograph_dicom(pixels[1])
    worker = worker_in_process(tiny_clip_checkpoint, orthanc, db, trigger=trigger)
    warm_up = worker.warm_up
    worker.warm_up = lambda: (upload(pacs, [during]), warm_up())
    worker.run()
    # 2. stopped; meanwhile films of three days ago arrive (a weekend), one of them a late send of an old study
    weekend = [radiograph_dicom(p, study_date=days_ago(3)) for p in pixels[2:4]]
    too_old = radiograph_dicom(pixels[4], study_date=days_ago(30))
    upload(pacs, [*weekend, too_old])
    worker_in_process(tiny_clip_checkpoint, orthanc, db, trigger=trigger).run()
    # 3. QIDO: down for ten days (its last search ten days ago): a film of then is answered, from a window that
    #    starts at the last search. The change feed knows the real arrival (today), so there it is a late send.
    JobStore(db).put("swept_at", days_ago(10) + "T180000")
    long_ago = radiograph_dicom(pixels[5], study_date=days_ago(10))
    upload(pacs, [long_ago])
    worker_in_process(tiny_clip_checkpoint, orthanc, db, trigger=trigger).run()

    states = {r["sop_uid"]: r["state"] for r in JobStore(db).rows()}
    answered = [during, *weekend] + ([long_ago] if trigger == "qido" else [])
    assert {u: states.get(u) for u in (a.SOPInstanceUID for a in answered)} == {
        a.SOPInstanceUID: "done" for a in answered
    }
    assert sorted(srs_by_source(pacs)) == sorted(a.SOPInstanceUID for a in answered)
    assert states.get(before.SOPInstanceUID) == ("baseline" if trigger == "qido" else None)
    if trigger == "changes":  # the feed sees every arrival: the old study is recorded, with its reason
        assert states[too_old.SOPInstanceUID] == states[long_ago.SOPInstanceUID] == "skipped"
        capsys.readouterr()
        assert pacs_main(["--status", "--skipped", "--db", str(db)]) == 0
        out = capsys.readouterr().out
        assert "skipped 2" in out and "10 days before it reached the PACS" in out
        assert f"skipped {too_old.SOPInstanceUID}" in out and "30 days before it reached the PACS" in out
    else:  # QIDO searches by StudyDate: a study older than --accept-late-days is outside every search
        assert too_old.SOPInstanceUID not in states


def test_a_trigger_the_server_lacks_is_a_clear_error(orthanc, tiny_clip_checkpoint, tmp_path):
    from cxrclip.exceptions import ConfigError

    worker = worker_in_process(
        tiny_clip_checkpoint, orthanc, tmp_path / "jobs.sqlite", trigger="changes", changes_url=orthanc.url + "/nowhere"
    )
    with pytest.raises(ConfigError, match="has no change feed"):
        worker.run()


def start_worker(ckpt, orthanc: Orthanc, db, log: Path, *extra: str, env=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "cxrclip.pacs.worker", "--dicomweb", orthanc.dicomweb, "--user", USER,
               "--model_path", str(ckpt), "--db", str(db), "--since", TODAY, "--device", "cpu", "--poll", "0.2",
               *extra]  # fmt: skip
    environment = {**os.environ, "CXRCLIP_PACS_PASSWORD": PASSWORD, **(env or {})}
    return subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=environment)


def wait_for(condition, timeout: float, what: str, log: Path | None = None) -> None:
    """``log``: a worker's log, whose end the failure shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    tail = f"; the worker's log ends:\n{log.read_text()[-3000:]}" if log and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def test_kill_minus_9_at_random_points_then_restart_gives_exactly_one_sr_each(
    orthanc, tiny_clip_checkpoint, demo_data, tmp_path
):
    pacs = orthanc.client()
    sources = [radiograph_dicom(f) for f in films(demo_data, 10)]
    upload(pacs, sources)
    db, log = tmp_path / "jobs.sqlite", tmp_path / "worker.log"
    # 1. killed right after the 2nd SR reached the PACS, before the job store heard of it
    p = start_worker(tiny_clip_checkpoint, orthanc, db, log, env={"CXRCLIP_PACS_FAULT": "stored:2"})
    assert p.wait(120) == -signal.SIGKILL
    assert len(srs_by_source(pacs)) == 2 and JobStore(db).counts().get("done") == 1
    # 2. kill -9 at random moments (while loading, searching, predicting or storing)
    rng = random.Random(0)
    for _ in range(3):
        p = start_worker(tiny_clip_checkpoint, orthanc, db, log)
        time.sleep(rng.uniform(0.5, 6.0))
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    # 3. a restart finishes the rest
    p = start_worker(tiny_clip_checkpoint, orthanc, db, log, "--once")
    assert p.wait(180) == 0, log.read_text()[-3000:]
    found = srs_by_source(pacs)
    assert sorted(found) == sorted(s.SOPInstanceUID for s in sources)
    assert all(len(v) == 1 for v in found.values()), {k: len(v) for k, v in found.items()}
    rows = JobStore(db).rows()
    assert {r["state"] for r in rows} == {"done"} and len(rows) == 10
    assert all(r["sr_uid"] == found[r["sop_uid"]][0]["sop_instance_uid"] for r in rows)
    assert "already on the PACS (stored before a restart)" in log.read_text()


def test_pacs_down_the_worker_retries_keeps_running_and_catches_up(orthanc, tiny_clip_checkpoint, demo_data, tmp_path):
    first, second = films(demo_data, 2)
    pacs = orthanc.client()
    db, log = tmp_path / "jobs.sqlite", tmp_path / "worker.log"
    a = radiograph_dicom(first)
    upload(pacs, [a])
    p = start_worker(tiny_clip_checkpoint, orthanc, db, log)
    try:
        wait_for(lambda: JobStore(db).counts().get("done") == 1, 120, "the first SR", log)
        orthanc.stop()
        wait_for(lambda: "PACS unavailable" in log.read_text(), 30, "the worker to notice the outage", log)
        time.sleep(1.5)
        assert p.poll() is None, "the worker stopped when the PACS went down:\n" + log.read_text()[-3000:]
        orthanc.start()
        b = radiograph_dicom(second)
        upload(orthanc.client(), [b])
        wait_for(lambda: JobStore(db).counts().get("done") == 2, 120, "the SR after the outage", log)
        assert "PACS reachable again" in log.read_text()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, log.read_text()[-3000:]
    assert sorted(srs_by_source(orthanc.client())) == sorted([a.SOPInstanceUID, b.SOPInstanceUID])


class _Answer(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):  # noqa: N802
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, error", [(503, PacsUnavailable), (502, PacsUnavailable), (401, PacsRejected)])
def test_http_errors_are_sorted_into_retry_and_give_up(status, error):
    handler = type("Handler", (_Answer,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pacs = DicomWeb(f"http://127.0.0.1:{server.server_port}/dicom-web")
        with pytest.raises(error, match=f"HTTP {status}"):
            pacs.find_instances("DX", None)
    finally:
        server.shutdown()
        server.server_close()
    closed = DicomWeb(f"http://127.0.0.1:{server.server_port}/dicom-web", timeout=5)
    with pytest.raises(PacsUnavailable, match="cannot reach"):
        closed.find_instances("DX", None)


class _BrokenOff(BaseHTTPRequestHandler):
    """A PACS stopped mid-reply: the headers promise 1,000 bytes, 12 come, the connection closes."""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'[{"00080060"')
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_an_answer_broken_off_mid_reply_is_an_outage_not_a_crash():
    """A worker polling while the PACS stops can get the first bytes of an answer and then a closed connection:
    the worker must wait and try again (PacsUnavailable), not die of an exception it does not expect."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BrokenOff)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pacs = DicomWeb(f"http://127.0.0.1:{server.server_port}/dicom-web", timeout=5)
        with pytest.raises(PacsUnavailable, match="broke off"):
            pacs.find_instances("DX", None)
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_never_come_from_the_command_line(tmp_path, monkeypatch):
    from cxrclip.exceptions import ConfigError

    monkeypatch.delenv("CXRCLIP_PACS_PASSWORD", raising=False)
    monkeypatch.delenv("CXRCLIP_PACS_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="--password-file FILE or \\$CXRCLIP_PACS_PASSWORD"):
        credentials("reader", None, None)
    (tmp_path / "pw").write_text("s3cret\n")
    assert credentials("reader", str(tmp_path / "pw"), None) == Credentials(user="reader", password="s3cret")
    monkeypatch.setenv("CXRCLIP_PACS_TOKEN", "tok")
    assert credentials(None, None, None).token == "tok"
    pacs = DicomWeb("https://pacs.example/dicom-web", Credentials(token="tok"))
    assert pacs.client._session.verify is True and pacs.client._session.headers["Authorization"] == "Bearer tok"


def test_wrong_password_stops_the_worker_with_a_clear_error(orthanc, tiny_clip_checkpoint, tmp_path):
    env = {**os.environ, "CXRCLIP_PACS_PASSWORD": "wrong"}
    done = subprocess.run(
        [sys.executable, "-m", "cxrclip.pacs.worker", "--dicomweb", orthanc.dicomweb, "--user", USER, "--model_path",
         str(tiny_clip_checkpoint), "--db", str(tmp_path / "j.sqlite"), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "HTTP 401" in done.stderr and "check the credentials" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_reads_the_job_store_without_a_model_or_a_server(tmp_path, capsys):
    from cxrclip.pacs.worker import main as pacs_main

    store = JobStore(tmp_path / "j.sqlite")
    store.add([{"sop_uid": "1.2.3", "study_uid": "1.2", "series_uid": "1.2.0", "modality": "DX"}])
    store.finish("1.2.3", "failed", error="cannot decode DICOM instance 1.2.3")
    assert pacs_main(["--status", "--db", str(tmp_path / "j.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "job store: failed 1" in out and "failed 1.2.3: cannot decode DICOM instance 1.2.3" in out
    with pytest.raises(SystemExit) as stopped:  # without --status, the worker needs both
        pacs_main(["--db", str(tmp_path / "j.sqlite"), "--dicomweb", "http://127.0.0.1:9/dicom-web"])
    assert stopped.value.code == 2 and "--model_path" in capsys.readouterr().err


def test_job_store_claims_are_exclusive_and_dead_workers_release(tmp_path):
    one, two = JobStore(tmp_path / "j.sqlite"), JobStore(tmp_path / "j.sqlite")
    rows = [{"sop_uid": f"1.2.{i}", "study_uid": "1.2", "series_uid": "1.2.0", "modality": "DX"} for i in range(6)]
    assert one.add(rows) == 6 and two.add(rows[:3] + [{**rows[0], "sop_uid": "1.2.9"}]) == 1
    taken = []
    for store in (one, two, one, two, one, two, one):
        job = store.claim("host:1:1", 60, max_attempts=3)
        if job:
            taken.append(job.sop_uid)
    assert sorted(taken) == sorted(r["sop_uid"] for r in rows) + ["1.2.9"] and len(set(taken)) == 7
    assert one.claim("w", 60, 3) is None
    # a worker of this host whose process is gone gives its jobs back at once; a live one keeps them
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    one.add([{**rows[0], "sop_uid": "1.3.1"}, {**rows[0], "sop_uid": "1.3.2"}])
    assert one.claim(f"{socket.gethostname()}:{dead.pid}:0", 600, 3).sop_uid == "1.3.1"
    assert one.claim(f"{socket.gethostname()}:{os.getpid()}:0", 600, 3).sop_uid == "1.3.2"
    assert one.release_stale() == 1
    assert {r["sop_uid"]: r["state"] for r in one.rows("pending")} == {"1.3.1": "pending"}
    # attempts run out: failed, with the last error
    job = one.claim("w", 600, max_attempts=3)
    assert job.sop_uid == "1.3.1" and job.attempts == 2  # claimed once by the dead worker
    one.retry(job.sop_uid, "boom", 0.0)
    assert one.claim("w", 600, max_attempts=3).attempts == 3
    one.retry(job.sop_uid, "boom again", 0.0)
    assert one.claim("w", 600, max_attempts=3) is None
    (failed,) = one.rows("failed")
    assert failed["sop_uid"] == "1.3.1" and failed["error"] == "gave up after 3 attempts: boom again"


def test_workers_starting_together_on_a_fresh_postgresql_create_the_tables_once(postgres):
    url = postgres.new_database("race")
    code = f"from cxrclip.pacs.store import JobStore; print(JobStore({url!r}).counts())"
    starts = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(6)]  # fmt: skip
    assert [p.wait(60) for p in starts] == [0] * 6, [p.stderr.read()[-300:] for p in starts]


def test_two_workers_on_one_postgresql_table_take_different_instances(
    postgres, orthanc, tiny_clip_checkpoint, demo_data, tmp_path
):
    pacs = orthanc.client()
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [start_worker(tiny_clip_checkpoint, orthanc, postgres.url, log) for log in logs]
    try:
        wait_for(lambda: all(log.exists() and "watching" in log.read_text() for log in logs), 120,
                 "both workers to start")  # fmt: skip
        sources = [radiograph_dicom(f) for f in films(demo_data, 12)]
        upload(pacs, sources)
        store = JobStore(postgres.url)
        wait_for(lambda: store.counts().get("done") == 12, 180, "12 SRs")
    finally:
        for p in workers:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
    rows = store.rows()
    assert len(rows) == 12 and {r["state"] for r in rows} == {"done"}
    assert len({r["worker"] for r in rows}) == 2, "one worker took every instance"
    found = srs_by_source(pacs)
    assert sorted(found) == sorted(s.SOPInstanceUID for s in sources) and all(len(v) == 1 for v in found.values())
    store.close()


def decoded_name(ds) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(ds.get("PatientName") or "")


def test_every_archive_variant_gets_an_sr_or_a_one_line_reason_from_inference_py(
    tiny_clip_checkpoint, tmp_path, capsys
):
    from cxrclip.infer import main as infer_main
    from tests.dicom_variants import variants

    need(None if shutil.which("dciodvfy") else "dciodvfy (Debian dicom3tools) is not installed")
    folder, out = tmp_path / "films", tmp_path / "srs"
    folder.mkdir()
    corpus = dict(variants())
    no_uid = radiograph_dicom(np.eye(64) * 1000)
    del no_uid.SOPInstanceUID  # a file no answer can reference
    corpus["no_sop_instance_uid"] = no_uid
    for name, ds in corpus.items():
        ds.save_as(folder / f"{name}.dcm", enforce_file_format=name != "no_sop_instance_uid")
    capsys.readouterr()
    code = infer_main(["--model_path", str(tiny_clip_checkpoint), "--image_path", str(folder), "--sr_out", str(out),
                       "--json", "--device", "cpu", "--output", str(tmp_path / "p.csv")])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "Traceback" not in captured.err
    results = {Path(r["image"]).stem: r for r in json.loads(captured.out)}
    assert sorted(results) == sorted(corpus)
    assert (
        results["no_sop_instance_uid"]["sr_error"] == "the image has no SOPInstanceUID; an answer cannot reference it"
    )
    for name, result in results.items():
        assert result["analysed"] or result["reason"], name
        if name == "no_sop_instance_uid":
            continue
        sr = pydicom.dcmread(result["sr"])
        assert dciodvfy_errors(sr, tmp_path) == [], name
        source = corpus[name]
        assert read_sr(sr)["source"] == source.SOPInstanceUID
        assert sr.SpecificCharacterSet == "ISO_IR 192"
        assert decoded_name(sr) == decoded_name(source), name  # transcoded, not mangled
        for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "PatientID", "AccessionNumber"):
            assert keyword in sr, (name, keyword)  # Type 2: present, empty where the source lacks it
    assert decoded_name(pydicom.dcmread(results["korean_iso2022_ir149"]["sr"])) == "Hong^Gildong=洪^吉洞=홍^길동"
    assert pydicom.dcmread(results["type2_absent"]["sr"]).PatientBirthDate == ""
    assert pydicom.dcmread(results["malformed_dates"]["sr"]).StudyDate == ""  # "2026-12-07" is no DA value
    assert "malformed Window Center / Width (VOI LUT) not applied" in " ".join(results["malformed_window"]["warnings"])


def test_every_archive_variant_through_the_worker_is_answered_or_refused_with_a_reason(
    orthanc, tiny_clip_checkpoint, tmp_path, caplog
):
    from tests.dicom_variants import variants

    corpus = dict(variants())
    pacs = orthanc.client()
    upload(pacs, corpus.values())
    db = tmp_path / "jobs.sqlite"
    worker = worker_in_process(tiny_clip_checkpoint, orthanc, db, since="19000101", report_refusals=True,
                               heatmap_labels=("Pneumothorax",))  # fmt: skip
    worker.run()
    rows = {r["sop_uid"]: r for r in JobStore(db).rows()}
    states = {name: rows[ds.SOPInstanceUID]["state"] for name, ds in corpus.items()}
    assert set(states.values()) <= {"done", "refused"}, states
    assert "unexpected error" not in caplog.text
    found = srs_by_source(pacs)
    for name, ds in corpus.items():
        (sr,) = found[ds.SOPInstanceUID]
        assert dciodvfy_errors(sr["dataset"], tmp_path) == [], name
        assert decoded_name(sr["dataset"]) == decoded_name(ds), name
        if states[name] == "done":
            assert sr["analysed"] and set(sr["labels"]) == set(worker.predictor.label_names)
        else:
            assert sr["reason"] == rows[ds.SOPInstanceUID]["reason"]


def test_the_warm_up_runs_grad_cam_and_the_segmentation_when_heatmaps_are_asked(
    orthanc, tiny_clip_checkpoint, tmp_path, caplog, monkeypatch
):
    """With --heatmap, the first real film must not pay for Grad-CAM's first call (a bundle loads its PyTorch encoder
    then) nor for the Segmentation builder's: the warm-up makes one of each, whatever the gate says of its film."""
    from cxrclip.pacs import worker as worker_module

    worker = worker_in_process(tiny_clip_checkpoint, orthanc, tmp_path / "jobs.sqlite", heatmap_labels=("yes",))
    maps, segs = [], []
    saliency, build = worker.predictor.saliency_of, worker_module.build_saliency_seg
    monkeypatch.setattr(worker.predictor, "saliency_of", lambda image, n: maps.append(n) or saliency(image, n))
    monkeypatch.setattr(worker_module, "build_saliency_seg", lambda *a, **k: segs.append(build(*a, **k)) or segs[-1])
    worker.warm_up()
    assert maps == [worker.predictor.label_names[0]] and "warm-up failed" not in caplog.text
    (seg,) = segs
    assert (seg.Rows, seg.Columns, seg.NumberOfFrames, seg.SegmentationType) == (256, 256, 1, "BINARY")


OLD_JOB_STORE = """
CREATE TABLE cxrclip_pacs_jobs (id INTEGER PRIMARY KEY, sop_uid VARCHAR(64) NOT NULL UNIQUE,
    study_uid VARCHAR(64) NOT NULL, series_uid VARCHAR(64) NOT NULL, modality VARCHAR(16), state VARCHAR(16) NOT NULL,
    attempts INTEGER NOT NULL, worker VARCHAR(128), lease_until FLOAT, not_before FLOAT NOT NULL, sr_uid VARCHAR(64),
    reason TEXT, error TEXT, result TEXT, found_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME,
    updated_at DATETIME NOT NULL);
CREATE TABLE cxrclip_pacs_cursor (name VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL, updated_at DATETIME NOT NULL);
INSERT INTO cxrclip_pacs_jobs (sop_uid, study_uid, series_uid, modality, state, attempts, not_before, sr_uid, found_at,
    updated_at) VALUES ('1.2.3', '1.2', '1.2.9', 'DX', 'done', 1, 0, '2.25.7', '2026-11-30 08:00:00',
    '2026-11-30 08:00:01');
INSERT INTO cxrclip_pacs_cursor VALUES ('since', '20261130', '2026-11-30 08:00:00')
"""


def test_a_job_store_made_before_migrations_is_upgraded_in_place_and_a_newer_one_refused(tmp_path, capsys):
    """A job store written by cxrclip before the store had migrations (tables made directly, no version row) is
    adopted as revision 0001, upgraded in place (0002 adds study_date) and keeps its jobs and cursor."""
    import sqlalchemy as sa

    from cxrclip.exceptions import ConfigError
    from cxrclip.migrate import head_revision
    from cxrclip.pacs.store import MIGRATIONS
    from cxrclip.pacs.worker import main as pacs_main

    db = tmp_path / "old-jobs.sqlite"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # the tables as the old create_all made them, one job and the cursor
        for statement in OLD_JOB_STORE.strip().split(";\n"):
            conn.execute(sa.text(statement))
    engine.dispose()

    store = JobStore(db)
    assert store.revision == head_revision(MIGRATIONS) == "0003_shadow"
    (row,) = store.rows()
    assert (row["sop_uid"], row["state"], row["sr_uid"], row["study_date"]) == ("1.2.3", "done", "2.25.7", None)
    assert store.get("since") == "20261130"
    late = {"sop_uid": "1.2.4", "study_uid": "1.2", "series_uid": "1.2.9", "modality": "DX", "study_date": "19980312"}
    store.add([{**late, "reason": "too old"}], state="skipped")
    store.close()
    assert pacs_main(["--status", "--skipped", "--db", str(db)]) == 0
    assert "skipped 1.2.4 (study 1.2, StudyDate 19980312): too old" in capsys.readouterr().out
    assert JobStore(db).revision == "0003_shadow"  # reopened: nothing to do
    with sa.create_engine(f"sqlite:///{db}").begin() as conn:
        conn.execute(sa.text("UPDATE cxrclip_pacs_alembic_version SET version_num = '0099_from_the_future'"))
    with pytest.raises(ConfigError, match="job store .* has schema revision 0099_from_the_future, newer than"):
        JobStore(db)


def test_a_review_of_a_pacs_image_goes_back_to_the_pacs_as_a_verified_sr_exactly_once(
    orthanc, tiny_clip_checkpoint, demo_data, tmp_path, capsys
):
    import hashlib
    from io import BytesIO

    from fastapi.testclient import TestClient

    from cxrclip.cli import main as cli_main
    from cxrclip.pacs.assessment import review_uids
    from cxrclip.pacs.dicomweb import Connection
    from cxrclip.serve.app import ServeSettings, Service, create_app
    from tests.validators import pixelmed_sr_findings

    (pixels,) = films(demo_data, 1)
    film = radiograph_dicom(pixels)
    pacs = orthanc.client()
    upload(pacs, [film])
    worker_in_process(tiny_clip_checkpoint, orthanc, tmp_path / "jobs.sqlite", since="19000101").run()
    (ai_row,) = pacs.find_instances("SR", None)
    assert ai_row["sop_uid"] == JobStore(tmp_path / "jobs.sqlite").rows()[0]["sr_uid"]
    connection = Connection(orthanc.dicomweb, Credentials(user=USER, password=PASSWORD))
    db = tmp_path / "reviews.sqlite"
    settings = ServeSettings(model=PredictorOptions(str(tiny_clip_checkpoint), device="cpu"), db=str(db),
                             pacs=connection)  # fmt: skip
    client = TestClient(create_app(settings, Service(settings)))
    data = BytesIO()
    film.save_as(data, enforce_file_format=True)  # the reader opened the PACS's film in the page
    shown = client.post("/v1/predict", files={"file": ("film.dcm", data.getvalue(), "application/dicom")}).json()
    said = {n: v["present"] for n, v in shown["labels"].items()}
    agree, disagree = sorted(said)[0], sorted(said)[1]
    verdicts = {agree: "present" if said[agree] else "absent", disagree: "absent" if said[disagree] else "present"}
    body = {"image_sha256": hashlib.sha256(data.getvalue()).hexdigest(), "reviewer": "Dr. Lin",
            "verdicts": verdicts, "comment": "tip 3 cm above the carina"}  # fmt: skip
    saved = client.post("/v1/reviews", json=body).json()["review"]
    assert saved["dicom"] == {"study": film.StudyInstanceUID, "series": film.SeriesInstanceUID,
                              "sop": film.SOPInstanceUID, "sop_class": film.SOPClassUID}  # fmt: skip
    sr_uid = review_uids(film.SOPInstanceUID, saved["id"])[1]
    assert saved["pacs"] == {"sr_uid": sr_uid, "stored": True, "ai_sr": ai_row["sop_uid"]}
    reviewed = [r for r in pacs.find_instances("SR", None) if r["sop_uid"] == sr_uid]
    assert len(reviewed) == 1 and reviewed[0]["study_uid"] == film.StudyInstanceUID
    sr = pacs.retrieve(film.StudyInstanceUID, reviewed[0]["series_uid"], sr_uid)
    assert sr.VerificationFlag == "VERIFIED" and sr.CompletionFlag == "COMPLETE" and sr.PreliminaryFlag == "FINAL"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Dr. Lin^"
    cited = sr.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert cited.ReferencedSOPInstanceUID == ai_row["sop_uid"]  # the AI SR the reader assessed
    texts = [i.TextValue for i in sr.ContentSequence[-1].ContentSequence if i.ValueType == "TEXT"]
    assert any(t.startswith(f"{agree}: cxrclip said") and t.endswith("; accepted.") for t in texts)
    assert any(t.startswith(f"{disagree}: cxrclip said") and f"rejected (the reader: {verdicts[disagree]})" in t
               for t in texts)  # fmt: skip
    assert "Reader's comment: tip 3 cm above the carina" in texts
    assert any(t.startswith("Not assessed by the reader: ") and agree not in t and disagree not in t for t in texts)
    assert pixelmed_sr_findings(sr, tmp_path) == [] and dciodvfy_errors(sr, tmp_path) == []

    # the PACS down while the next review is saved: the review is kept, the SR follows with reviews to-pacs, once
    orthanc.stop()
    later = client.post("/v1/reviews", json={**body, "verdicts": {agree: "unsure"}, "supersedes": saved["id"]})
    assert later.status_code == 200 and "reviews to-pacs" in later.json()["review"]["pacs"]["error"]
    orthanc.start()
    os.environ["CXRCLIP_PACS_PASSWORD"] = PASSWORD
    try:
        args = ["reviews", "to-pacs", "--db", str(db), "--dicomweb", orthanc.dicomweb, "--user", USER]
        capsys.readouterr()
        assert cli_main(args) == 0
        assert "1 stored as verified SRs, 1 already there" in capsys.readouterr().out
        assert cli_main(args) == 0
        assert "0 stored as verified SRs, 2 already there" in capsys.readouterr().out
    finally:
        del os.environ["CXRCLIP_PACS_PASSWORD"]
    assert len([r for r in pacs.find_instances("SR", None) if r["series_uid"] == reviewed[0]["series_uid"]]) == 2


def test_a_shadow_challenger_in_the_worker_answers_silently_and_never_reaches_the_pacs(
    orthanc, tiny_clip_checkpoint, demo_data, tmp_path
):
    from tests.models import challenger_checkpoint, sha256

    challenger = challenger_checkpoint(tiny_clip_checkpoint, tmp_path / "challenger.tar")
    challenger_sha = sha256(challenger)
    a, b = films(demo_data, 2)
    sources = [radiograph_dicom(a), radiograph_dicom(b, view="LL")]  # one answered, one refused: both shadowed
    pacs = orthanc.client()
    upload(pacs, sources)
    db = tmp_path / "jobs.sqlite"
    worker = worker_in_process(tiny_clip_checkpoint, orthanc, db, since="19000101", report_refusals=True,
                               shadow=str(challenger))  # fmt: skip
    worker.run()
    store = JobStore(db)
    assert {r["state"] for r in store.rows()} == {"done", "refused"}
    shadowed = store.shadow_rows()
    assert sorted(r["sop_uid"] for r in shadowed) == sorted(s.SOPInstanceUID for s in sources)
    assert {r["model_sha256"] for r in shadowed} == {challenger_sha}
    (answered,) = [r for r in shadowed if r["sop_uid"] == sources[0].SOPInstanceUID]
    assert answered["analysed"] and set(answered["labels"]) == set(worker.predictor.label_names)
    champion = worker.card["checkpoint_sha256"]
    srs = pacs.find_instances("SR", None)
    assert sorted(r["sop_uid"] for r in srs) == sorted(sr_uids(s.SOPInstanceUID, champion)[1] for s in sources)
    for s in sources:  # no SR of the challenger exists, on any instance
        assert not pacs.has_instance(s.StudyInstanceUID, sr_uids(s.SOPInstanceUID, challenger_sha)[1])
    worker_in_process(tiny_clip_checkpoint, orthanc, db, since="19000101", shadow=str(challenger)).run()
    assert len(JobStore(db).shadow_rows()) == 2  # a second pass logs nothing twice


def test_the_worker_answers_with_the_champion_the_audit_rows_name_and_rereads_it_on_sighup(
    orthanc, tiny_clip_checkpoint, demo_data, tmp_path
):
    from cxrclip.change.promote import model_in_effect, promote, rollback
    from cxrclip.reviews.store import ReviewStore
    from tests.models import challenger_checkpoint, promotion_verdict
    from tests.models import sha256 as sha

    challenger = challenger_checkpoint(tiny_clip_checkpoint, tmp_path / "challenger.tar")
    reviews = tmp_path / "reviews.sqlite"
    store = ReviewStore(reviews)
    assert model_in_effect(reviews, str(tiny_clip_checkpoint)) == str(tiny_clip_checkpoint)  # nothing promoted yet
    worker = worker_in_process(tiny_clip_checkpoint, orthanc, tmp_path / "jobs.sqlite", champion_db=str(reviews))
    assert worker.card["checkpoint_sha256"] == sha(tiny_clip_checkpoint)
    verdict, plan = promotion_verdict(tmp_path, tiny_clip_checkpoint, challenger)
    promote(store, verdict, plan, challenger, "Dr. Chen")
    worker.reload_requested.set()  # what SIGHUP does
    worker.reload()
    assert worker.card["checkpoint_sha256"] == sha(challenger) and not worker.reload_requested.is_set()
    (pixels,) = films(demo_data, 1)
    film = radiograph_dicom(pixels)
    upload(orthanc.client(), [film])
    worker.s = replace(worker.s, since="19000101")
    worker.run()
    (sr,) = srs_by_source(orthanc.client())[film.SOPInstanceUID]
    assert sr["sop_instance_uid"] == sr_uids(film.SOPInstanceUID, sha(challenger))[1]  # answered by the champion
    rollback(store, "Dr. Lin", "worse on the ward")
    worker.reload()
    assert worker.card["checkpoint_sha256"] == sha(tiny_clip_checkpoint)
