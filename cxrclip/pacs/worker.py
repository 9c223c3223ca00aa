"""``cxrclip pacs``: a worker that reads new radiographs from a PACS over DICOMweb and writes each answer back as a
DICOM SR (TID 1500, with ``--heatmap`` a Segmentation beside it), exactly once, through crashes and PACS outages.

Finding new instances (``--trigger``): where the PACS has a change feed (Orthanc's ``/changes``) the worker reads
every new instance once, in order, by sequence number — the instances and the sequence number it read up to are
stored in one transaction, so a worker that was down for days reads on from where it stopped. Elsewhere DICOMweb has
no "arrived after" query: the worker lists the instances whose StudyDate is on or after the day of its last
completed search (less ``--lookback-days``), and every ``--late-sweep`` seconds from ``--accept-late-days`` back, so
a late send is found too. Either way every SOP Instance UID it has not seen goes into the job store (a UID is never
fetched twice); a study whose StudyDate is more than ``--accept-late-days`` before it reached the PACS is recorded as
``skipped`` with its reason (``--status --skipped``), never silently left out. On the very first start without
``--since``, what is already on the PACS is recorded as ``baseline`` and left alone — taken before the model warms
up, so that a film arriving during the warm-up is answered.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from cxrclip.change.promote import model_sha256, options_in_effect
from cxrclip.data.images import ImageReadError, dicom_image
from cxrclip.exceptions import ConfigError, exit_on_user_error
from cxrclip.io import database_url
from cxrclip.pacs.answer import EVERY_YES, HEATMAP_FORMATS, answer_datasets
from cxrclip.pacs.dicomweb import (
    Connection,
    Credentials,
    DicomWeb,
    OrthancChanges,
    PacsRejected,
    PacsUnavailable,
    add_connection_arguments,
    changes_feed,
)
from cxrclip.pacs.seg import build_saliency_seg
from cxrclip.pacs.sr import SourceError, build_sr, sr_uids
from cxrclip.pacs.store import Job, JobStore, worker_id
from cxrclip.predict.factory import PredictorOptions, open_predictor

log = logging.getLogger("cxrclip.pacs")
MAX_BACKOFF_S = 60.0


@dataclass
class WorkerSettings:
    dicomweb: str
    model: PredictorOptions
    db: str = "cxrclip-pacs.sqlite"
    poll_s: float = 5.0
    since: str | None = None  # YYYYMMDD
    lookback_days: int = 1  # QIDO: the margin before the last completed sweep's date
    trigger: str = "auto"  # changes | qido | auto (the change feed where the server has one)
    changes_url: str | None = None  # the REST root holding /changes; default: the DICOMweb URL's parent
    accept_late_days: int = 7
    late_sweep_s: float = 600.0
    modalities: tuple[str, ...] = ("CR", "DX")
    report_refusals: bool = False
    heatmap_labels: tuple[str, ...] = ()  # labels whose Grad-CAM is stored; "yes": every label called YES
    heatmap_format: str = "seg"  # seg | fractional (a DICOM Segmentation) | sc (a Secondary Capture) | both
    shadow: str | None = None  # a challenger answering every instance silently: job store only, never the PACS
    champion_db: str | None = None  # answer with the champion these audit rows name; reread on SIGHUP
    lease_s: float = 600.0
    max_attempts: int = 5
    once: bool = False
    verify: bool | str = True
    creds: Credentials = Credentials()


def fault_point(name: str) -> None:
    """Fault injection for the exactly-once tests: ``CXRCLIP_PACS_FAULT=stored:3`` kills this process (SIGKILL, as
    ``kill -9`` would) the 3rd time it reaches ``stored`` — after the SR is on the PACS, before the job store knows."""
    spec = os.environ.get("CXRCLIP_PACS_FAULT", "")
    if not spec.startswith(name + ":"):
        return
    _FAULTS[name] = _FAULTS.get(name, 0) + 1
    if _FAULTS[name] == int(spec.split(":")[1]):
        os.kill(os.getpid(), signal.SIGKILL)


_FAULTS: dict[str, int] = {}


def _today() -> str:
    return datetime.date.today().strftime("%Y%m%d")


def _now_iso() -> str:
    return datetime.datetime.now().strftime("%Y%m%dT%H%M%S")


def _date(text: str) -> datetime.date:
    return datetime.datetime.strptime(text[:8], "%Y%m%d").date()


def _days_before(day: str, days: int) -> str:
    return (_date(day) - datetime.timedelta(days=days)).strftime("%Y%m%d")


def parse_date(text: str) -> str:
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.datetime.strptime(text, fmt).strftime("%Y%m%d")
        except ValueError:
            pass
    raise ConfigError(f"--since {text}: expected a date as YYYY-MM-DD")


class Worker:
    def __init__(self, settings: WorkerSettings, predictor, card: dict, pacs: DicomWeb, store: JobStore):
        self.s, self.predictor, self.card, self.pacs, self.store = settings, predictor, card, pacs, store
        self.id = worker_id()
        self.stop = threading.Event()
        self.outage = 0  # consecutive failed calls to the PACS
        self.late_swept = -float("inf")  # QIDO: when the last search reaching --accept-late-days back ran
        self.shadow, self.shadow_sha = None, None  # --shadow: a challenger answering silently (make_worker)
        self.reload_requested = threading.Event()  # SIGHUP: reread the champion between two instances
        unknown = sorted(set(settings.heatmap_labels) - set(predictor.label_names) - {EVERY_YES})
        if unknown:
            raise ConfigError(f"--heatmap {unknown}: not a label of this model; labels: {predictor.label_names}")

    # --- finding -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Choose the trigger, take the first start's baseline (before the warm-up, so that nothing arriving during
        it is mistaken for baseline), warm up, and take back the jobs of a stopped worker."""
        self.feed = self._trigger()
        if self.s.since:
            if self.store.get("since") != self.s.since:
                for name, value in (
                    ("since", self.s.since),
                    ("swept_at", ""),
                    ("changes_seq", "0"),
                    ("started", _now_iso()),
                ):
                    self.store.put(name, value)
        elif self.store.get("started") is None and self.store.get("since") is None:
            self.baseline()
        self.warm_up()
        released = self.store.release_stale()
        if released:
            log.info("%d job(s) of a stopped worker taken back; each is checked against the PACS first", released)

    def _trigger(self) -> OrthancChanges | None:
        if self.s.trigger == "qido":
            log.info("finding new instances with QIDO-RS searches (StudyDate window from the last completed sweep)")
            return None
        feed = changes_feed(self.pacs, self.s.changes_url)
        if feed is None and self.s.trigger == "changes":
            raise ConfigError(
                f"--trigger changes: {self.s.changes_url or self.pacs.url.rsplit('/', 1)[0]} has no change feed "
                "(Orthanc's /changes); give --changes-url or use --trigger qido"
            )
        log.info("finding new instances %s", f"in the change feed at {feed.root}" if feed else
                 "with QIDO-RS searches (the server has no change feed)")  # fmt: skip
        return feed

    def baseline(self) -> None:
        """The very first start without ``--since``: what is on the PACS now is left alone (``baseline``)."""
        started = _now_iso()
        if self.feed is not None:
            self.store.put("changes_seq", str(self.feed.last()))
            self.store.put("started", started)
            log.info("first start: the change feed is followed from now on; what is on the PACS is left alone")
            return
        window = _days_before(_today(), self.s.accept_late_days)  # as far back as a later late-sweep looks
        found = [row for m in self.s.modalities for row in self.pacs.find_instances(m, window)]
        cursor = {"swept_at": started, "started": started}
        new = self.store.add(found, state="baseline", cursor=cursor)
        log.info("first start: %d instance(s) already on the PACS left alone (baseline); --since analyses them", new)

    def warm_up(self) -> None:
        """One answer to a generated film before watching — the prediction, the SR and, with ``--heatmap``, a
        Grad-CAM and its Segmentation: the first real instance then waits for nothing but itself (the first call of a
        model, of Grad-CAM — a bundle loads its PyTorch encoder for it — and of each document builder costs
        seconds)."""
        from pydicom.dataset import Dataset
        from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

        film = (np.add.outer(np.arange(256), np.arange(256)) // 2).astype(np.uint8)
        ds = Dataset()  # what an answer references, and the grid a Segmentation lies on; the rest left empty
        ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Rows, ds.Columns = film.shape
        build_sr(ds, self.predictor.predict_arrays(["warm-up"], [film], [{}])[0], self.card)
        if self.s.heatmap_labels:  # the film may be refused by the gate: Grad-CAM and the Segmentation called directly
            label = next((n for n in self.s.heatmap_labels if n != EVERY_YES), self.predictor.label_names[0])
            try:
                maps = {label: self.predictor.saliency_of(film, label)}
                if self.s.heatmap_format != "sc":
                    build_saliency_seg(ds, maps, self.card, fractional=self.s.heatmap_format == "fractional")
            except Exception:  # the real answers will say what is wrong, each in its own job
                log.warning("the --heatmap warm-up failed; the first answers will pay for it", exc_info=True)

    def poll(self) -> int:
        """Record the instances not seen before; returns how many are to be answered."""
        found = self._from_changes() if self.feed is not None else self._from_qido()
        if found:
            log.info("found %d new instance(s)", found)
        return found

    def _from_changes(self) -> int:
        """Every new instance after the stored sequence number, exactly once: the instances and the new sequence
        number are recorded in one transaction."""
        seq = int(self.store.get("changes_seq") or 0)
        last = self.feed.last()
        if last < seq:
            log.warning("the change feed restarted (last %d < cursor %d): reading it from the start", last, seq)
            seq = 0
        since, pending = self.store.get("since"), 0
        while True:
            changes, seq, done = self.feed.since(seq)
            rows, before = [], []
            for orthanc_id, arrived in changes:
                row = self.feed.instance(orthanc_id)
                if row is None or (row["modality"] or "").upper() not in self.s.modalities:
                    continue
                older = since and row["study_date"] and row["study_date"] < since
                (before if older else rows).append({**row, "arrived": arrived[:8] or _today()})
            self.store.add(before, state="baseline")  # --since: studies before it are left alone
            pending += self._record(rows, {"changes_seq": str(seq)})
            if done:
                return pending

    def _from_qido(self) -> int:
        """QIDO-RS has no "arrived after": search by StudyDate from the last completed sweep (less
        ``--lookback-days``), and every ``--late-sweep`` seconds from ``--accept-late-days`` back, for late sends."""
        started = _now_iso()
        since = self.store.get("since") or ""
        swept = self.store.get("swept_at") or ""
        window = since or _today()
        cursor = {"swept_at": started}
        if swept:
            window = max(since, _days_before(swept[:8], self.s.lookback_days))
        late = time.monotonic() - self.late_swept >= self.s.late_sweep_s  # and the first search of each start
        if swept and late:
            window = min(window, max(since, _days_before(_today(), self.s.accept_late_days)))
        found = [
            {**row, "arrived": swept[:8] or _today()}
            for m in self.s.modalities
            for row in self.pacs.find_instances(m, window)
        ]
        if late:
            self.late_swept = time.monotonic()
        return self._record(found, cursor)

    def _record(self, rows: list[dict], cursor: dict[str, str]) -> int:
        """New instances go in as pending, or as ``skipped`` when their StudyDate is more than
        ``--accept-late-days`` before they reached the PACS (the earliest they could have, for QIDO); the cursor
        moves in the same transaction."""
        on_time, late = [], []
        since = self.store.get("since")
        for row in rows:
            reason = self._late(row, since)
            (late if reason else on_time).append({**row, "reason": reason} if reason else row)
        skipped = self.store.add(late, state="skipped")
        if skipped:
            log.warning("%d instance(s) skipped (e.g. %s: %s); cxrclip pacs --status --skipped lists them", skipped,
                        late[0]["sop_uid"], late[0]["reason"])  # fmt: skip
        return self.store.add(on_time, cursor=cursor)

    def _late(self, row: dict, since: str | None) -> str | None:
        study, arrived = row.get("study_date"), row.get("arrived")
        if not (study and arrived) or (since and study >= since):  # --since asked for these
            return None
        try:
            days = (_date(arrived) - _date(study)).days
        except ValueError:
            return None  # a malformed StudyDate is not a reason to skip a film
        if days <= self.s.accept_late_days:
            return None
        return (f"StudyDate {study} is {days} days before it reached the PACS ({arrived}); the policy accepts "
                f"{self.s.accept_late_days} (--accept-late-days)")  # fmt: skip

    # --- answering ---------------------------------------------------------------------------------------------
    def process_next(self) -> bool:
        """Claim and answer one job; False when none is due."""
        job = self.store.claim(self.id, self.s.lease_s, self.s.max_attempts)
        if job is None:
            return False
        started = time.perf_counter()
        try:
            self.answer(job, started)
        except PacsUnavailable as e:
            delay = self.backoff(str(e))
            self.store.retry(job.sop_uid, str(e), delay)
            return False
        except (PacsRejected, SourceError) as e:  # retrying will not help: the reason is recorded, in one line
            self.store.finish(job.sop_uid, "failed", error=str(e))
            log.error("instance %s failed: %s", job.sop_uid, e)
        except Exception as e:  # a bug or an unexpected file: recorded, retried up to --max-attempts, never silent
            log.exception("instance %s: unexpected error (attempt %d)", job.sop_uid, job.attempts)
            self.store.retry(job.sop_uid, f"{type(e).__name__}: {e}", min(MAX_BACKOFF_S, 2.0**job.attempts))
        return True

    def answer(self, job: Job, started: float) -> None:
        sr_uid = sr_uids(job.sop_uid, self.card["checkpoint_sha256"])[1]
        if job.attempts > 1 and self.pacs.has_instance(job.study_uid, sr_uid):
            self.store.finish(job.sop_uid, "done", sr_uid=sr_uid, reason="SR found on the PACS after a restart")
            log.info("instance %s: its SR %s is already on the PACS (stored before a restart)", job.sop_uid, sr_uid)
            return
        ds = self.pacs.retrieve(job.study_uid, job.series_uid, job.sop_uid)
        self.outage = 0
        facts: dict = {}
        try:
            image = dicom_image(ds, facts, name=f"instance {job.sop_uid}")
        except ImageReadError as e:
            self.store.finish(job.sop_uid, "failed", error=str(e))
            log.warning("instance %s not analysed: %s", job.sop_uid, e)
            return
        result = self.predictor.predict_arrays([job.sop_uid], [image], [facts])[0]
        if not result.analysed:
            stored = None
            if self.s.report_refusals:
                sr = build_sr(ds, result, self.card)
                self.store.note_sr(job.sop_uid, sr.SOPInstanceUID)
                self.pacs.store([sr], job.study_uid)
                stored = sr.SOPInstanceUID
            self.store.finish(job.sop_uid, "refused", sr_uid=stored, reason=result.reason, worker=self.id)
            log.info("instance %s refused by the input gate: %s%s", job.sop_uid, result.reason,
                     f" (SR {stored})" if stored else "")  # fmt: skip
            self.answer_in_shadow(job.sop_uid, image, facts)
            return
        sr, *extra = answer_datasets(self.predictor, self.card, ds, image, result, self.s.heatmap_labels,
                                     self.s.heatmap_format)  # fmt: skip
        self.store.note_sr(job.sop_uid, sr.SOPInstanceUID)
        self.pacs.store([sr, *extra], job.study_uid)
        fault_point("stored")
        labels = result.to_json()["labels"]  # kept in the job store as inference.py --json gives them
        self.store.finish(job.sop_uid, "done", sr_uid=sr.SOPInstanceUID, result=labels, worker=self.id)
        yes = result.yes
        log.info("instance %s: %d of %d labels YES%s -> SR %s (%.2f s)", job.sop_uid, len(yes), len(labels),
                 f" ({', '.join(yes)})" if yes else "", sr.SOPInstanceUID, time.perf_counter() - started)  # fmt: skip
        self.answer_in_shadow(job.sop_uid, image, facts)

    def reload(self) -> None:
        """SIGHUP with --champion-db: answer from now on with the champion the audit rows name (after a promotion or
        a rollback); the instance in hand, if any, was answered by the model before. A champion that cannot be read
        or opened is logged, and the model in use goes on answering."""
        self.reload_requested.clear()
        if not self.s.champion_db:
            log.info("SIGHUP: no --champion-db, the model stays %s", self.s.model.model_path)
            return
        try:
            options = options_in_effect(self.s.model, self.s.champion_db)
            if model_sha256(options.model_path) == self.card["checkpoint_sha256"]:
                log.info("SIGHUP: the champion is unchanged (%s)", options.model_path)
                return
            predictor = open_predictor(options)
        except Exception:  # a missing store, a moved file: the worker keeps answering with what it has
            log.exception("SIGHUP: the champion could not be opened; still answering with %s", self.card["name"])
            return
        self.predictor, self.card = predictor, predictor.card()
        log.info("SIGHUP: now answering with the champion %s (%s…)", options.model_path,
                 self.card["checkpoint_sha256"][:12])  # fmt: skip

    def answer_in_shadow(self, sop_uid: str, image, facts: dict) -> None:
        """--shadow: the challenger's answer to the same image, after the champion's is stored — logged in the job
        store, never an SR, never in the PACS. A failure of the challenger is logged and changes nothing else."""
        if self.shadow is None:
            return
        try:
            silent = self.shadow.predict_arrays([sop_uid], [image], [dict(facts)])[0]
            self.store.log_shadow(sop_uid, self.shadow_sha, silent.analysed, silent.to_json().get("labels") or {})
        except Exception:  # the shadow must never cost the champion's answer
            log.exception("instance %s: the shadow challenger failed (the champion's answer is stored)", sop_uid)

    def wait_s(self) -> float:
        """Until the next search: the poll interval, doubled per consecutive failed call to the PACS, at most 60 s."""
        return min(MAX_BACKOFF_S, self.s.poll_s * 2 ** max(self.outage - 1, 0))

    def backoff(self, error: str) -> float:
        self.outage += 1
        delay = self.wait_s()
        log.warning("PACS unavailable: %s — attempt %d failed, trying again in %.0f s (the worker keeps running)",
                    error, self.outage, delay)  # fmt: skip
        return delay

    # --- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.start()
                break
            except PacsRejected as e:
                raise ConfigError(f"the PACS refused: {e}") from e
            except PacsUnavailable as e:
                self.stop.wait(self.backoff(str(e)))
        log.info("watching %s for %s every %.0f s (job store %s)", self.pacs.url, "/".join(self.s.modalities),
                 self.s.poll_s, self.store.engine.url.render_as_string(hide_password=True))  # fmt: skip
        while not self.stop.is_set():
            if self.reload_requested.is_set():
                self.reload()
            try:
                self.poll()
            except PacsRejected as e:
                raise ConfigError(f"the PACS refused the search: {e}") from e
            except PacsUnavailable as e:
                self.stop.wait(self.backoff(str(e)))
                continue
            if self.outage:
                log.info("PACS reachable again after %d failed attempt(s)", self.outage)
                self.outage = 0
            while not self.stop.is_set() and not self.reload_requested.is_set() and self.process_next():
                pass  # a SIGHUP is taken between two instances
            if self.s.once and not self.outage:
                break
            self.store.release_stale()
            self.stop.wait(self.wait_s())
        counts = self.store.counts()
        log.info("stopped; job store: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "empty")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxrclip pacs",
        description="Answer new chest radiographs on a PACS (DICOMweb: QIDO-RS, WADO-RS) with a DICOM Comprehensive "
        "SR stored back (STOW-RS), exactly once. Research software: not for diagnostic use.",
    )
    add_connection_arguments(p)
    p.add_argument("--db", default="cxrclip-pacs.sqlite", help="job store: a SQLite file, or postgresql+psycopg://...")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between searches (default 5)")
    p.add_argument("--since", help="analyse studies from this date on (YYYY-MM-DD); default: what arrives after the "
                   "first start")  # fmt: skip
    p.add_argument("--trigger", choices=("auto", "changes", "qido"), default="auto", help="how new instances are "
                   "found: the PACS's change feed (Orthanc /changes: every arrival once, by sequence number) or "
                   "QIDO-RS searches by StudyDate; auto: the feed where the server has one")  # fmt: skip
    p.add_argument("--changes-url", help="the REST root that serves /changes (default: the DICOMweb URL's parent)")
    p.add_argument("--accept-late-days", type=int, default=7, help="answer a study whose StudyDate "
                   "is up to N days before it reached the PACS (default 7); older: recorded as skipped")  # fmt: skip
    p.add_argument("--lookback-days", type=int, default=1, help="QIDO: each search starts this many days before the "
                   "last completed search (default 1)")  # fmt: skip
    p.add_argument("--late-sweep", type=float, default=600.0, help="QIDO: seconds between the searches that reach "
                   "--accept-late-days back, for late sends (default 600)")  # fmt: skip
    p.add_argument("--modality", action="append", help="modalities to answer (repeat; default CR and DX)")
    p.add_argument("--report-refusals", action="store_true", help="store an SR saying why an image was not analysed")
    p.add_argument("--heatmap", action="append", metavar="LABEL", help="also store where the model looked for "
                   "LABEL (repeat; 'yes': every label called YES): a DICOM Segmentation in the study, and an outline "
                   "in the SR where the label is called YES")  # fmt: skip
    p.add_argument("--champion-db", metavar="DB", help="answer with the champion cxrclip promote / rollback "
                   "recorded in this review store (else --model_path); SIGHUP rereads it")  # fmt: skip
    p.add_argument("--shadow", metavar="CHALLENGER", help="a challenger that answers every instance silently, "
                   "after the model's answer is stored: logged in the job store, never stored in the PACS")  # fmt: skip
    p.add_argument("--heatmap-format", choices=HEATMAP_FORMATS, default="seg", help="seg: a BINARY "
                   "Segmentation a viewer overlays (default); fractional: the whole map (OHIF 3.13 cannot show it); "
                   "sc: the Grad-CAM burnt into a Secondary Capture; both: seg and sc")  # fmt: skip
    p.add_argument("--lease", type=float, default=600.0, help="seconds a claimed job stays with a silent worker")
    p.add_argument("--max-attempts", type=int, default=5, help="attempts per instance before it is marked failed")
    p.add_argument("--once", action="store_true", help="search once, answer what is due, then exit")
    p.add_argument("--status", action="store_true", help="print the job store's counts and failures, then exit")
    p.add_argument("--skipped", action="store_true", help="with --status: list the skipped instances and why")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    PredictorOptions.add_arguments(p, required=False)  # --status needs no model
    return p


def print_status(store: JobStore, skipped: bool = False) -> None:
    counts = store.counts()
    print("job store:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "empty")
    for row in store.rows("failed")[-20:]:
        print(f"failed {row['sop_uid']}: {row['error']}")
    if skipped:
        for row in store.rows("skipped"):
            print(
                f"skipped {row['sop_uid']} (study {row['study_uid']}, StudyDate {row['study_date'] or '-'}): "
                f"{row['reason']}"
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("highdicom", "dicomweb_client"):  # one line per module copied / request made
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with exit_on_user_error(debug=args.debug):
        store = JobStore(database_url(args.db, must_exist=True) if args.status else args.db)  # --status creates none
        if args.status:
            print_status(store, skipped=args.skipped)
            return 0
        if not (args.dicomweb and (args.model_path or args.champion_db)):
            raise ConfigError(
                "cxrclip pacs needs --dicomweb URL and --model_path MODEL or --champion-db DB (or --status)"
            )
        connection = Connection.from_args(args)
        model = options_in_effect(PredictorOptions.from_args(args), args.champion_db)  # the champion, else --model_path
        settings = WorkerSettings(
            dicomweb=connection.url, model=model, champion_db=args.champion_db, db=args.db, poll_s=args.poll,
            since=parse_date(args.since) if args.since else None, lookback_days=args.lookback_days,
            trigger=args.trigger, changes_url=args.changes_url, accept_late_days=args.accept_late_days,
            late_sweep_s=args.late_sweep,
            modalities=tuple(m.upper() for m in (args.modality or ("CR", "DX"))), report_refusals=args.report_refusals,
            heatmap_labels=tuple(args.heatmap or ()), heatmap_format=args.heatmap_format,
            lease_s=args.lease, max_attempts=args.max_attempts, shadow=args.shadow,
            once=args.once, verify=connection.verify, creds=connection.creds,
        )  # fmt: skip
        pacs = DicomWeb(settings.dicomweb, settings.creds, verify=settings.verify)
        worker = make_worker(settings, pacs, store)
        signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
        signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: worker.reload_requested.set())
        worker.run()
    return 0


def make_worker(settings: WorkerSettings, pacs: DicomWeb, store: JobStore) -> Worker:
    predictor = open_predictor(settings.model)
    worker = Worker(settings, predictor, predictor.card(), pacs, store)
    if settings.shadow:  # opened like the model (device, precision), with its own calibration
        worker.shadow = open_predictor(settings.model.for_model(settings.shadow))
        worker.shadow_sha = worker.shadow.card()["checkpoint_sha256"]
        log.info("shadow challenger %s (%s…): answers silently, logged in the job store, never stored in the PACS",
                 settings.shadow, worker.shadow_sha[:12])  # fmt: skip
    return worker


if __name__ == "__main__":
    sys.exit(main())
