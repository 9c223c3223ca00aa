"""kill -9 of `cxrclip pacs` at random moments, many times, against a real Orthanc (started here on 127.0.0.1); then a
restart, and a count: every instance must have exactly one SR (no loss, no duplicate).

    python benchmarks/pacs_chaos.py --model_path BUNDLE_OR_CHECKPOINT [--kills 20] [--instances 60]

Each kill is reported with where it landed: while the worker was loading, while it held a job (the job store says
which), or while it waited for new instances. --report-refusals is on, so an instance the gate refuses gets its SR
too and "exactly one SR each" covers every instance.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import PASSWORD, USER, Orthanc, orthanc_missing  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--instances", type=int, default=120)
    p.add_argument("--max-delay", type=float, default=2.0, help="a kill comes up to this many seconds into the work")
    p.add_argument(
        "--while-loading", type=float, default=0.2, help="the share of kills at a random moment of the start"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if missing := orthanc_missing():
        raise SystemExit(missing)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from PIL import Image

    from cxrclip.pacs.sr import read_sr
    from cxrclip.pacs.store import JobStore
    from cxrclip.synthetic import generate_demo_data, radiograph_dicom

    folder = Path(tempfile.mkdtemp(prefix="pacs-chaos-"))
    generate_demo_data(folder / "films", n_train=1, n_valid=1, n_test=args.instances, image_size=256, seed=9)
    films = [np.asarray(Image.open(f).convert("L")) for f in sorted((folder / "films/images").glob("test_*.png"))]
    orthanc = Orthanc(folder / "orthanc").start()
    pacs = orthanc.client()
    sources = [radiograph_dicom(f) for f in films[: args.instances]]
    for ds in sources:
        pacs.store([ds], ds.StudyInstanceUID)
    db, log = folder / "jobs.sqlite", folder / "worker.log"
    command = [sys.executable, "-m", "cxrclip.pacs.worker", "--dicomweb", orthanc.dicomweb, "--user", USER,
               "--model_path", args.model_path, "--db", str(db), "--since", datetime.date.today().isoformat(),
               "--poll", "0.5", "--report-refusals", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "CXRCLIP_PACS_PASSWORD": PASSWORD}
    rng = random.Random(args.seed)
    landed = collections.Counter()
    try:
        for k in range(args.kills):
            start = log.stat().st_size if log.exists() else 0
            worker = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
            if rng.random() < args.while_loading:  # at a random moment of the start
                time.sleep(rng.uniform(0.3, 5.0))
            else:  # at a random moment of the work: after the worker says it is watching
                deadline = time.monotonic() + 120
                while "watching" not in log.read_bytes()[start:].decode(errors="replace"):
                    if time.monotonic() > deadline or worker.poll() is not None:
                        raise SystemExit(f"the worker did not start: see {log}")
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.05, args.max_delay))
            text = log.read_bytes()[start:].decode(errors="replace")
            holding = 0
            if db.exists():
                holding = sum(1 for r in JobStore(db).rows("working") if f":{worker.pid}:" in (r["worker"] or ""))
            worker.send_signal(signal.SIGKILL)
            worker.wait(30)
            where = "loading" if "watching" not in text else "holding a job" if holding else "between jobs"
            landed[where] += 1
            counts = JobStore(db).counts() if db.exists() else {}
            print(f"kill {k + 1:2d}: {where:<13} job store {dict(sorted(counts.items()))}", flush=True)
        started = time.perf_counter()
        final = subprocess.run([*command, "--once"], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
        print(f"restart with --once: exit {final.returncode} after {time.perf_counter() - started:.1f} s")
        per_source = collections.Counter()
        for row in pacs.find_instances("SR", None):
            per_source[read_sr(pacs.retrieve(row["study_uid"], row["series_uid"], row["sop_uid"]))["source"]] += 1
    finally:
        orthanc.stop()
    counts = JobStore(db).counts()
    histogram = collections.Counter(per_source.get(ds.SOPInstanceUID, 0) for ds in sources)
    print(f"kills: {args.kills} ({', '.join(f'{n} {w}' for w, n in landed.items())})")
    print(f"instances: {len(sources)}; job store: {dict(sorted(counts.items()))}")
    print(f"SRs per instance: {dict(sorted(histogram.items()))}  (exactly one each: {set(histogram) == {1}})")
    print(f"'already on the PACS' recoveries in the log: {log.read_text().count('already on the PACS')}")
    if set(histogram) != {1}:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
