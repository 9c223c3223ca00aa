"""End-to-end throughput of `cxrclip pacs` through a real Orthanc (started here on 127.0.0.1): instances per minute,
seconds from an instance's arrival to its SR being stored, peak RSS per worker; one worker and two. Beside it, in the
same run, the floor: the model's own per-image time (the same predictor, in this process, on the same images).

    python benchmarks/pacs_throughput.py --model_path BUNDLE_OR_CHECKPOINT [--burst 60] [--paced 20 --interval 2]

Two phases per worker count, each on a fresh Orthanc and job store:
  paced  one instance every --interval seconds: arrival → SR latency (p50/p95) without a queue in front;
  burst  --burst instances at once: instances/minute from the first arrival to the last SR.
"Arrival" is when the instance's STOW-RS returned; "SR stored" is when the worker's STOW-RS of the SR returned (the job
store's finished_at) — Orthanc serves an instance as soon as STOW-RS returns, and every SR is read back at the end.
Images: the synthetic demo films at --size px (default 512), or --images DIR of PNG/JPEG films.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import PASSWORD, USER, Orthanc, Postgres, orthanc_missing, postgres_missing  # noqa: E402


def films(args) -> list[np.ndarray]:
    from PIL import Image

    if args.images:
        paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        return [np.asarray(Image.open(p).convert("L")) for p in paths[: args.burst]]
    from cxrclip.synthetic import generate_demo_data

    folder = Path(tempfile.mkdtemp(prefix="pacs-bench-films-"))
    generate_demo_data(folder, n_train=1, n_valid=1, n_test=args.burst, image_size=args.size, seed=5)
    return [np.asarray(Image.open(p).convert("L")) for p in sorted((folder / "images").glob("test_*.png"))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_workers(args, orthanc: Orthanc, db: str, n: int, folder: Path) -> list[subprocess.Popen]:
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "CXRCLIP_PACS_PASSWORD": PASSWORD}
    procs, logs = [], []
    for i in range(n):
        log = folder / f"worker{i}.log"
        logs.append(log)
        command = [sys.executable, "-m", "cxrclip.pacs.worker", "--dicomweb", orthanc.dicomweb, "--user", USER,
                   "--model_path", args.model_path, "--db", db, "--since", datetime.date.today().isoformat(),
                   "--poll", str(args.poll), "--threads", str(threads)]  # fmt: skip
        if args.device:
            command += ["--device", args.device]
        if args.heatmap:
            command += ["--heatmap", "yes"]  # each answer: the SR with outlines and the Segmentation
        procs.append(subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + 300
    while not all(log.exists() and "watching" in log.read_text() for log in logs):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit("a worker did not start:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
        time.sleep(0.2)
    return procs


def run_phase(args, images, n_workers: int, paced: bool) -> dict:
    from cxrclip.pacs.store import JobStore
    from cxrclip.synthetic import radiograph_dicom

    folder = Path(tempfile.mkdtemp(prefix=f"pacs-bench-{n_workers}w-"))
    orthanc = Orthanc(folder / "orthanc").start()
    pg = None
    if n_workers > 1 and not postgres_missing():
        pg = Postgres(Path(tempfile.mkdtemp(prefix="pacs-bench-pg-"))).start()
    db = pg.url if pg else str(folder / "jobs.sqlite")
    procs = start_workers(args, orthanc, db, n_workers, folder)
    store = JobStore(db)
    pacs = orthanc.client()
    count = args.paced if paced else args.burst
    arrival: dict[str, float] = {}
    try:
        for i in range(count):
            ds = radiograph_dicom(images[i % len(images)])
            pacs.store([ds], ds.StudyInstanceUID)
            arrival[ds.SOPInstanceUID] = time.time()
            if paced:
                time.sleep(args.interval)
        deadline = time.monotonic() + args.timeout
        while sum(store.counts().get(k, 0) for k in ("done", "refused", "failed")) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {store.counts()}")
            time.sleep(0.2)
        rows = [r for r in store.rows() if r["finished_at"] is not None]
        states = store.counts()
        rss = [peak_rss_mb(p.pid) for p in procs]
    finally:
        for p in procs:
            p.terminate()
            p.wait(60)
    readable = len(pacs.find_instances("SR", None))
    segs = len(pacs.find_instances("SEG", None))
    orthanc.stop()
    if pg:
        pg.stop()
    finished = {r["sop_uid"]: r["finished_at"].replace(tzinfo=datetime.timezone.utc).timestamp() for r in rows}
    latency = sorted(finished[u] - arrival[u] for u in arrival)
    span = max(finished.values()) - min(arrival.values())
    workers_used = len({r["worker"] for r in rows})
    return {
        "workers": n_workers, "phase": "paced" if paced else "burst", "n": count, "srs_readable": readable,
        "segs": segs, "per_min": 60 * count / span, "p50": statistics.median(latency),
        "p95": latency[min(len(latency) - 1, int(round(0.95 * (len(latency) - 1))))],
        "rss": max(rss), "store": "postgresql" if pg else "sqlite", "workers_used": workers_used, "states": states,
    }  # fmt: skip


def floor(args, images) -> dict:
    """The model alone, in this process: decode + predict one image at a time (median of the images), and the SR:
    built from its shape's template (what the worker does), item by item by highdicom (the reference, and what the
    first answer of a shape costs), and encoded as STOW-RS sends it."""
    import io

    import pydicom
    import torch

    from cxrclip.data.images import dicom_image
    from cxrclip.pacs.answer import answer_datasets
    from cxrclip.pacs.seg import build_saliency_seg, highdicom_seg
    from cxrclip.pacs.sr import build_sr, highdicom_sr, image_header
    from cxrclip.predict import load_predictor
    from cxrclip.predict.gradcam import saliency_outline
    from cxrclip.synthetic import radiograph_dicom

    def encode(ds) -> None:
        pydicom.dcmwrite(io.BytesIO(), ds)  # what dicomweb-client does before it posts

    torch.set_num_threads(os.cpu_count() or 1)
    predictor = load_predictor(args.model_path, device=args.device, gate=not args.no_gate)
    card = predictor.card()
    dss = [radiograph_dicom(images[i % len(images)]) for i in range(20)]
    times: dict[str, list[float]] = {k: [] for k in ("decode", "predict", "sr", "encode", "sr_highdicom",
                                                     "encode_highdicom", "decode_predict_sr")}  # fmt: skip
    heat: dict[str, list[float]] = {}  # --heatmap: per film with a YES label
    for ds in dss:
        start = time.perf_counter()
        facts: dict = {}
        image = dicom_image(ds, facts)
        t0 = time.perf_counter()
        result = predictor.predict_arrays([ds.SOPInstanceUID], [image], [facts])[0]
        t1 = time.perf_counter()
        sr = build_sr(ds, result, card)
        t2 = time.perf_counter()
        encode(sr)
        t3 = time.perf_counter()
        reference = highdicom_sr(ds, result, card)
        t4 = time.perf_counter()
        encode(reference)
        t5 = time.perf_counter()
        for key, value in (
            ("decode", t0 - start),
            ("predict", t1 - t0),
            ("sr", t2 - t1),
            ("encode", t3 - t2),
            ("sr_highdicom", t4 - t3),
            ("encode_highdicom", t5 - t4),
            ("decode_predict_sr", t3 - start),
        ):
            times[key].append(value)  # fmt: skip
        if args.heatmap and result.yes:  # --heatmap yes: Grad-CAM, Segmentation and outlines per YES label
            t6 = time.perf_counter()
            saliency = {label: predictor.saliency_of(image, label) for label in result.yes}
            t7 = time.perf_counter()
            header = image_header(ds)  # as answer_datasets does: the film decoded once for both documents
            t7b = time.perf_counter()
            seg = build_saliency_seg(header, saliency, card)  # from its shape's template
            t8 = time.perf_counter()
            outlines = {label: saliency_outline(m) for label, m in saliency.items()}
            t9 = time.perf_counter()
            build_sr(header, result, card, regions={label: o for label, o in outlines.items() if len(o) >= 3})
            t10 = time.perf_counter()
            answer_datasets(predictor, card, ds, image, result, ("yes",))  # all of it, as the worker does
            t11 = time.perf_counter()
            encode(seg)
            t12 = time.perf_counter()
            reference = highdicom_seg(ds, saliency, card)  # item by item (what every Segmentation cost before)
            t13 = time.perf_counter()
            encode(reference)
            t14 = time.perf_counter()
            for key, value in (
                ("gradcam_per_yes", (t7 - t6) / len(result.yes)),
                ("header", t7b - t7),
                ("seg", t8 - t7b),
                ("outlines", t9 - t8),
                ("sr_regions", t10 - t9),
                ("heatmap_answer", t11 - t10),
                ("seg_encode", t12 - t11),
                ("seg_highdicom", t13 - t12),
                ("seg_encode_highdicom", t14 - t13),
                ("yes_per_image", len(result.yes)),
            ):
                heat.setdefault(key, []).append(value)  # fmt: skip
    out = {k: statistics.median(v[2:]) for k, v in times.items()}
    out["sr_first"] = times["sr"][0]  # the first answer of its shape: highdicom from markers + the template made
    if len(heat.get("seg", [])) > 2:  # the first two films warm up, as above
        out.update({k: statistics.median(v[2:]) for k, v in heat.items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="an export bundle (the deployment form) or a checkpoint")
    p.add_argument("--images", help="a folder of PNG/JPEG films (default: synthetic demo films)")
    p.add_argument("--size", type=int, default=512, help="synthetic film size in pixels")
    p.add_argument("--burst", type=int, default=60)
    p.add_argument("--paced", type=int, default=20)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between paced arrivals")
    p.add_argument("--poll", type=float, default=1.0, help="the workers' --poll")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--device", help="passed to the workers (a bundle without it runs ONNX Runtime, with it PyTorch)")
    p.add_argument("--heatmap", action="store_true", help="also time --heatmap yes (Grad-CAM, Segmentation and "
                   "outline per YES label) in the floor, and run the workers with it")  # fmt: skip
    p.add_argument("--floor-only", action="store_true", help="the in-process floor only (no Orthanc phases)")
    no_gate = "floor: answer what the gate refuses (the demo model's gate knows only synthetic films)"
    p.add_argument("--no-gate", action="store_true", help=no_gate)
    args = p.parse_args()
    missing = orthanc_missing()
    if missing:
        raise SystemExit(missing)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    images = films(args)
    print(f"model {args.model_path} (device {args.device or 'default'}); {len(images)} films of {images[0].shape}; "
          f"{os.cpu_count()} CPUs; poll {args.poll} s; paced arrivals every {args.interval} s", flush=True)  # fmt: skip
    base = floor(args, images)
    ms = {k: v * 1000 for k, v in base.items()}
    print(f"floor (this process, same images, median ms/image): decode {ms['decode']:.1f}, predict "
          f"{ms['predict']:.1f}, build SR {ms['sr']:.1f} (from its template; {ms['sr_highdicom']:.1f} item by item by "
          f"highdicom, {ms['sr_first']:.0f} for the first answer of a shape), encode it for STOW {ms['encode']:.1f} "
          f"(highdicom's dataset {ms['encode_highdicom']:.1f}); decode + predict + SR + encode "
          f"{ms['decode_predict_sr']:.1f} = {60000 / ms['decode_predict_sr']:.0f} images/min; the model alone "
          f"{60000 / ms['predict']:.0f} images/min", flush=True)  # fmt: skip
    if "seg" in base:
        print(f"--heatmap yes (median {base['yes_per_image']:.0f} YES labels per image): Grad-CAM "
              f"{ms['gradcam_per_yes']:.1f} per YES label; the film's header {ms['header']:.1f} (once for both "
              f"documents); the Segmentation {ms['seg']:.1f} from its template "
              f"({ms['seg_highdicom']:.1f} by highdicom; encoded for STOW {ms['seg_encode']:.1f} / "
              f"{ms['seg_encode_highdicom']:.1f}); the outlines {ms['outlines']:.1f}; the SR with an outline per YES "
              f"label {ms['sr_regions']:.1f}; the whole answer (maps, Segmentation, SR) {ms['heatmap_answer']:.1f}; "
              f"header + Segmentation + SR with outlines = "
              f"{(ms['header'] + ms['seg'] + ms['sr_regions']) / ms['predict']:.2f}x predict",
              flush=True)  # fmt: skip
    if args.floor_only:
        return
    print("workers  phase  n   store       inst/min  p50 s  p95 s  peak RSS MB  SRs read back  SEGs  workers used  "
          "states")  # fmt: skip
    for n in args.workers:
        for paced in (True, False):
            r = run_phase(args, images, n, paced)
            print(f"{r['workers']:>7}  {r['phase']:<5}  {r['n']:<3} {r['store']:<10}  {r['per_min']:8.1f}  "
                  f"{r['p50']:5.2f}  {r['p95']:5.2f}  {r['rss']:11.0f}  {r['srs_readable']:>13}  {r['segs']:>4}  "
                  f"{r['workers_used']:>12}  {r['states']}", flush=True)  # fmt: skip
    if missing := postgres_missing():
        print(f"(two workers shared a SQLite job store: {missing})")


if __name__ == "__main__":
    main()
