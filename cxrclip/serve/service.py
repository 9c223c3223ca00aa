"""What the server does with one loaded model: predict an uploaded image (with its preview, heatmap and free text),
and hand reviews and the monitor to the review layer. Runs in worker threads; knows nothing of HTTP but
:class:`ApiError`'s status codes."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from cxrclip.change.promote import options_in_effect
from cxrclip.data.images import ImageReadError, UnsupportedImageError, decode_image_bytes
from cxrclip.exceptions import ConfigError, InputError
from cxrclip.pacs.assessment import send_review
from cxrclip.pacs.dicomweb import Connection, PacsRejected, PacsUnavailable
from cxrclip.predict import PredictorOptions, open_predictor
from cxrclip.predict.gradcam import overlay, png_bytes
from cxrclip.reviews.desk import NotShown, ReviewDesk
from cxrclip.reviews.monitor import monitor_report, shadow_report, validation_prevalence
from cxrclip.reviews.store import ReviewStore


@dataclass(frozen=True)
class ServeSettings:
    model: PredictorOptions
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    users: tuple[tuple[str, str], ...] = ()  # (name, token): each reader's own token; a review is signed by its name
    insecure: bool = False
    max_upload_mb: float = 50.0
    workers: int = 2
    cors_origins: tuple[str, ...] = ()
    db: str | None = None  # the review store (a SQLite file or a PostgreSQL URL); None: reviews are off
    keep_images: str | None = None  # a folder: reviewed images are kept there (by SHA-256); None: only their hash
    pacs: Connection | None = None  # reviews of DICOM images from this PACS are stored back there as verified SRs
    shadow: str | None = None  # a challenger answering every image silently: logged for the monitor, never shown
    champion_db: str | None = None  # serve the champion these audit rows name (else model.model_path), read at start

    def check(self) -> None:
        local = self.host in ("127.0.0.1", "localhost", "::1")
        if not local and not self.token and not self.users and not self.insecure:
            raise ConfigError(
                f"--host {self.host} exposes the server beyond this machine: give --token TOKEN (clients send "
                "'Authorization: Bearer TOKEN'), or --insecure if the network is protected otherwise"
            )

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def dicom_identity(data: bytes) -> dict | None:
    """A DICOM file's study, series, instance and SOP class UIDs (where its review goes back), or None."""
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # already decoded once: a header pydicom cannot read again has no identity to keep
        return None
    keywords = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "sop": "SOPInstanceUID",
                "sop_class": "SOPClassUID"}  # fmt: skip
    uids = {k: str(ds.get(keyword, "") or "") for k, keyword in keywords.items()}
    return uids if all(uids.values()) else None


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Service:
    """The loaded model and what a request does with it."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        # the champion cxrclip promote / rollback recorded (--champion-db), else --model_path
        self.predictor = open_predictor(options_in_effect(settings.model, settings.champion_db))
        self.card = self.predictor.card()
        self.reviews = ReviewStore(settings.db) if settings.db else None
        self.desk = ReviewDesk(self.reviews, settings.keep_images) if self.reviews is not None else None
        self.pacs = settings.pacs.open() if settings.pacs is not None else None
        self.shadow = None
        if settings.shadow:  # opened like the model (device, precision), with its own calibration
            self.shadow = open_predictor(settings.model.for_model(settings.shadow))
            self.shadow_card = self.shadow.card()

    def store(self) -> ReviewStore:
        """The review store, or 503 when the server runs without one (``--no-reviews``)."""
        if self.reviews is None:
            raise ApiError(503, "reviews are off: start cxrclip serve with --db FILE_OR_URL")
        return self.reviews

    def review(self, sha: str, reviewer: str, verdicts: dict, comment: str | None, supersedes: int | None) -> dict:
        """Save a reader's verdicts on an image this server predicted (what it showed comes from its own record)."""
        self.store()
        try:
            saved = self.desk.review(
                sha, reviewer, verdicts, comment, supersedes, model_sha256=self.card["checkpoint_sha256"],
                calibration=self.predictor.calibration_name, labels=self.predictor.label_names,
            )  # fmt: skip
        except NotShown as e:
            raise ApiError(409, str(e)) from e
        except InputError as e:
            raise ApiError(422, str(e)) from e
        if self.pacs is not None and "dicom" in saved:  # a PACS image: its review goes back beside the AI's answer
            try:
                saved["pacs"] = send_review(self.pacs, saved)
            except (PacsUnavailable, PacsRejected) as e:  # the review is saved; cxrclip reviews to-pacs stores it later
                saved["pacs"] = {"error": f"{e}; the review is saved: cxrclip reviews to-pacs stores it later"}
        return saved

    def review_queue(self, limit: int) -> list[dict]:
        """Unreviewed images this server showed, those a review would teach most first (:meth:`ReviewDesk.queue`)."""
        store, recent = self.store(), self.desk.recent_images()  # only the images the desk holds: not the whole store
        reviewed = store.reviewed_images(recent)
        shadow = None
        if self.shadow is not None:
            logged = store.predictions(role="shadow", images=recent)
            shadow = {p["image_sha256"]: {n: bool(v[1]) for n, v in p["labels"].items()} for p in logged}
        return self.desk.queue(reviewed, shadow, limit)

    def monitor(self, period: str) -> dict:
        store = self.store()
        report = monitor_report(
            store.predictions(), store.current(), self.predictor.label_names,
            validation_prevalence(self.predictor.calibration), period,
        )  # fmt: skip
        out = {"model": self.card["name"], "calibration": self.predictor.calibration_name, **report}
        if self.shadow is not None:
            out["shadow"] = shadow_report(store.predictions(), store.predictions(role="shadow"), store.current(),
                                          self.predictor.label_names)  # fmt: skip
        return out

    def predict(self, data: bytes, name: str, heatmap: str | None, texts: Sequence[str]) -> dict:
        """One upload → the answer the page shows: the prediction, the input's facts, a preview, and on request a
        label's Grad-CAM and free-text similarities (never for an input the gate refused)."""
        if heatmap and heatmap not in self.predictor.label_names:
            raise ApiError(422, f"heatmap: unknown label {heatmap!r}")
        try:
            image, facts = decode_image_bytes(data, name)
        except UnsupportedImageError as e:
            raise ApiError(415, str(e)) from e
        except ImageReadError as e:
            raise ApiError(422, str(e)) from e
        answer = self.predictor.predict_arrays([name], [image], [facts])[0].to_json()
        answer.pop("image")
        sha = hashlib.sha256(data).hexdigest()
        out = {"input": facts, "image_sha256": sha, **answer,
               "preview": data_url(png_bytes(self.predictor.picture_of(image)))}  # fmt: skip
        if self.desk is not None and self.desk.first_sight(sha):  # the monitor counts each image once
            self.reviews.log_prediction(sha, self.card["checkpoint_sha256"], self.predictor.calibration_name, answer)
            if self.shadow is not None:  # the challenger's answer goes to the log only: never into this response
                silent = self.shadow.predict_arrays([name], [image], [facts])[0].to_json()
                self.reviews.log_prediction(sha, self.shadow_card["checkpoint_sha256"],
                                            self.shadow.calibration_name, silent, role="shadow")  # fmt: skip
        if not answer["analysed"]:  # refused by the input gate: no label, free-text or heatmap answer
            return out
        if self.desk is not None:
            dicom = dicom_identity(data) if facts.get("format") == "DICOM" else None
            self.desk.remember(sha, name, data, answer["labels"], dicom)
        if texts:
            with self._tokenizer_lock:
                out["texts"] = self.predictor.texts_of(image, texts)
        if heatmap:
            cam = self.predictor.heatmap_of(image, heatmap)
            picture = self.predictor.picture_of(image, heatmap)
            out["heatmap"] = {"label": heatmap, "png": data_url(png_bytes(overlay(picture, cam)))}
        return out
