"""The review workflow of a server: what it showed for each image it predicted (so a review records the server's own
answer, never what a client claims), the reviewed images it keeps, and saving a review into the store."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from cxrclip.data.images import sniff_format
from cxrclip.exceptions import InputError
from cxrclip.io import atomic_write_bytes
from cxrclip.reviews.store import ReviewStore

RECENT_PREDICTIONS = 1000  # images whose shown answer is kept for a review
SHOWN_FIELDS = ("probability", "threshold", "rule", "present", "calibrated")


class NotShown(InputError):
    """A review of an image this server did not predict (recently)."""


class ReviewDesk:
    """One server's reviews: ``remember`` what was shown, ``review`` saves a reader's verdicts against it."""

    def __init__(self, store: ReviewStore, keep_images: str | None = None):
        self.store, self.keep_images = store, str(Path(keep_images).resolve()) if keep_images else None
        if keep_images:
            Path(keep_images).mkdir(parents=True, exist_ok=True)
        self._recent: OrderedDict[str, dict] = OrderedDict()  # image SHA-256 → what was shown, for its review
        self._seen: OrderedDict[str, None] = OrderedDict()  # images already logged for the monitor
        self._lock = threading.Lock()

    def first_sight(self, sha: str) -> bool:
        """True the first time an image is seen (the monitor counts each image once)."""
        with self._lock:
            if sha in self._seen:
                return False
            self._seen[sha] = None
            while len(self._seen) > 10 * RECENT_PREDICTIONS:
                self._seen.popitem(last=False)
            return True

    def remember(self, sha: str, name: str, data: bytes, labels: Mapping, dicom: Mapping | None = None) -> None:
        """What was shown for an image (``dicom``: its DICOM UIDs, when it is a DICOM file: its review can go back
        to the PACS)."""
        shown = {n: {k: v[k] for k in SHOWN_FIELDS} for n, v in labels.items()}
        entry = {"name": name, "shown": shown, "data": data if self.keep_images else None, "dicom": dicom}
        with self._lock:
            self._recent[sha] = entry
            self._recent.move_to_end(sha)
            while len(self._recent) > RECENT_PREDICTIONS:
                self._recent.popitem(last=False)

    def recent_images(self) -> list[str]:
        """The images (SHA-256) whose shown answer this desk still holds."""
        with self._lock:
            return list(self._recent)

    def queue(self, reviewed: set[str], shadow: Mapping[str, Mapping[str, bool]] | None = None,
              limit: int = 50) -> list[dict]:  # fmt: skip
        """The images this server showed recently and nobody reviewed, those a review would teach most first: each
        label the shadow challenger called differently counts 1, plus how near the closest label's probability is
        to its threshold (1 on it, 0 at half a unit away)."""
        with self._lock:
            entries = [(sha, e) for sha, e in self._recent.items() if sha not in reviewed]
        out = []
        for sha, entry in entries:
            shown = entry["shown"]
            margins = {n: abs(v["probability"] - v["threshold"]) for n, v in shown.items()}
            nearest = min(margins, key=margins.get)
            calls = (shadow or {}).get(sha) or {}
            disagree = sorted(n for n, v in shown.items() if n in calls and bool(calls[n]) != bool(v["present"]))
            score = len(disagree) + 1.0 - min(margins[nearest] / 0.5, 1.0)
            out.append({"image_sha256": sha, "image_name": entry["name"], "score": round(score, 4),
                        "nearest_label": nearest, "margin": round(margins[nearest], 4),
                        "disagree": disagree})  # fmt: skip
        out.sort(key=lambda r: (-r["score"], r["image_sha256"]))
        return out[:limit]

    def review(self, sha: str, reviewer: str, verdicts: dict, comment: str | None, supersedes: int | None, *,
               model_sha256: str, calibration: str, labels) -> dict:  # fmt: skip
        """Save a reader's verdicts on an image this server predicted; :class:`NotShown` when it did not."""
        with self._lock:
            entry = self._recent.get(sha)
        if entry is None:
            raise NotShown(f"image {sha[:12]}…: not predicted by this server (recently); predict it, then review")
        path = None
        if entry["data"] is not None:
            kind = (sniff_format(entry["data"]) or "bin").lower().replace("jpeg", "jpg").replace("dicom", "dcm")
            path = str(atomic_write_bytes(Path(self.keep_images) / f"{sha}.{kind}", entry["data"]))
        return self.store.add(
            reviewer=reviewer, image_sha256=sha, model_sha256=model_sha256, calibration=calibration,
            shown=entry["shown"], verdicts=verdicts, labels=labels, comment=comment, image_name=entry["name"],
            image_path=path, supersedes=supersedes, dicom=entry["dicom"],
        )  # fmt: skip
