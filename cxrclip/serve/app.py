"""``cxrclip serve``: a local web page and REST API over one loaded model (FastAPI + uvicorn).

Safety by default: it binds 127.0.0.1; another address needs ``--token`` (a bearer token, compared in
constant time) or an explicit ``--insecure``. Uploads are capped (413), typed from their bytes (415), decoded
in memory (422 when they cannot be) and never written to disk or logged. The page ships with the package
and loads nothing from outside (Content-Security-Policy ``'self'``). Model and prompt embeddings are loaded
once; predictions run in a bounded thread pool so the event loop keeps answering.
"""

import base64
import datetime
import hashlib
import hmac
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import anyio
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from cxrclip.data.images import ImageReadError, UnsupportedImageError, decode_image_bytes, sniff_format
from cxrclip.exceptions import ConfigError, InputError
from cxrclip.io import atomic_write_bytes, redact_url
from cxrclip.predict import PredictorOptions, open_predictor
from cxrclip.predict.card import DISCLAIMER
from cxrclip.predict.gradcam import overlay, png_bytes
from cxrclip.reviews.monitor import monitor_report, validation_prevalence
from cxrclip.reviews.store import MAX_COMMENT, MAX_REVIEWER, ReviewStore

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


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

    def check(self) -> None:
        local = self.host in ("127.0.0.1", "localhost", "::1")
        if not local and not self.token and not self.users and not self.insecure:
            raise ConfigError(
                f"--host {self.host} exposes the server beyond this machine: give --token TOKEN (clients send "
                "'Authorization: Bearer TOKEN'), or --insecure if the network is protected otherwise"
            )


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


MAX_VERDICTS = 64  # labels per review (a model has 13; unknown ones are refused by name)
MAX_REVIEW_BODY = 64 * 1024  # bytes of a POST /v1/reviews body: the longest comment, name and verdicts fit
RECENT_PREDICTIONS = 1000  # images whose shown answer is kept for a review


class ReviewIn(BaseModel):
    image_sha256: str = Field(description="the image_sha256 /v1/predict returned", max_length=64)
    reviewer: str = Field("", description="who reviews (the page's field); a reader's own token (--users) overrides; "
                          "no control characters", max_length=MAX_REVIEWER)  # fmt: skip
    verdicts: dict[str, Literal["present", "absent", "unsure"]] = Field(
        description="label → verdict", max_length=MAX_VERDICTS
    )
    comment: str | None = Field(None, description="free text; tabs and line breaks, no other control characters",
                                max_length=MAX_COMMENT)  # fmt: skip
    supersedes: int | None = Field(None, description="the id of the review this one corrects")


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Service:
    """The loaded model and what a request does with it (runs in worker threads)."""

    def __init__(self, settings: ServeSettings):

        self.settings = settings
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self.predictor = open_predictor(settings.model)
        self.card = self.predictor.card()
        self.reviews = ReviewStore(settings.db) if settings.db else None
        if settings.keep_images:
            Path(settings.keep_images).mkdir(parents=True, exist_ok=True)
        self._recent: OrderedDict[str, dict] = OrderedDict()  # image SHA-256 → what was shown, for its review
        self._recent_lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()  # images already logged for the monitor

    def _first_sight(self, sha: str) -> bool:
        with self._recent_lock:
            if sha in self._seen:
                return False
            self._seen[sha] = None
            while len(self._seen) > 10 * RECENT_PREDICTIONS:
                self._seen.popitem(last=False)
            return True

    def remember(self, sha: str, name: str, data: bytes, labels: dict) -> None:
        shown = {n: {k: v[k] for k in ("probability", "threshold", "rule", "present", "calibrated")}
                 for n, v in labels.items()}  # fmt: skip
        entry = {"name": name, "shown": shown, "data": data if self.settings.keep_images else None}
        with self._recent_lock:
            self._recent[sha] = entry
            self._recent.move_to_end(sha)
            while len(self._recent) > RECENT_PREDICTIONS:
                self._recent.popitem(last=False)

    def store(self) -> ReviewStore:
        """The review store, or 503 when the server runs without one (``--no-reviews``)."""
        if self.reviews is None:
            raise ApiError(503, "reviews are off: start cxrclip serve with --db FILE_OR_URL")
        return self.reviews

    def review(self, sha: str, reviewer: str, verdicts: dict, comment: str | None, supersedes: int | None) -> dict:
        """Save a reviewer's verdicts on an image this server predicted (what it showed is taken from its own
        record, never from the client)."""
        store = self.store()
        with self._recent_lock:
            entry = self._recent.get(sha)
        if entry is None:
            raise ApiError(409, f"image {sha[:12]}…: not predicted by this server (recently); predict it, then review")
        path = None
        if entry["data"] is not None:
            kind = (sniff_format(entry["data"]) or "bin").lower().replace("jpeg", "jpg").replace("dicom", "dcm")
            path = str(atomic_write_bytes(Path(self.settings.keep_images) / f"{sha}.{kind}", entry["data"]))
        try:
            return store.add(
                reviewer=reviewer, image_sha256=sha, model_sha256=self.card["checkpoint_sha256"],
                calibration=self.predictor.calibration_name, shown=entry["shown"], verdicts=verdicts,
                labels=self.predictor.label_names, comment=comment, image_name=entry["name"], image_path=path,
                supersedes=supersedes,
            )  # fmt: skip
        except InputError as e:
            raise ApiError(422, str(e)) from e

    def monitor(self, period: str) -> dict:
        store = self.store()
        report = monitor_report(
            store.predictions(), store.current(), self.predictor.label_names,
            validation_prevalence(self.predictor.calibration), period,
        )  # fmt: skip
        return {"model": self.card["name"], "calibration": self.predictor.calibration_name, **report}

    def predict(self, data: bytes, name: str, heatmap: str | None, texts: Sequence[str]) -> dict:

        if heatmap and heatmap not in self.predictor.label_names:
            raise ApiError(422, f"heatmap: unknown label {heatmap!r}")
        try:
            image, facts = decode_image_bytes(data, name)
        except UnsupportedImageError as e:
            raise ApiError(415, str(e)) from e
        except ImageReadError as e:
            raise ApiError(422, str(e)) from e
        result = self.predictor.predict_arrays([name], [image], [facts])[0]
        result.pop("image")
        gray = self.predictor.picture_of(image)
        sha = hashlib.sha256(data).hexdigest()
        out = {"input": facts, "image_sha256": sha, **result, "preview": _data_url(png_bytes(gray))}
        if self.reviews is not None and self._first_sight(sha):  # the monitor counts each image once
            self.reviews.log_prediction(sha, self.card["checkpoint_sha256"], self.predictor.calibration_name, result)
        if not result["analysed"]:  # refused by the input gate: no label, free-text or heatmap answer
            return out
        self.remember(sha, name, data, result["labels"])
        if texts:
            with self._tokenizer_lock:
                out["texts"] = self.predictor.texts_of(image, texts)
        if heatmap:
            cam = self.predictor.heatmap_of(image, heatmap)
            picture = self.predictor.picture_of(image, heatmap)
            out["heatmap"] = {"label": heatmap, "png": _data_url(png_bytes(overlay(picture, cam)))}
        return out


def create_app(settings: ServeSettings, service: Service | None = None):
    """The FastAPI application (tests pass a ready ``service``)."""
    settings.check()
    service = service or Service(settings)
    limiter = anyio.CapacityLimiter(max(1, settings.workers))
    max_bytes = int(settings.max_upload_mb * 1024 * 1024)
    # Starlette spools uploads over 1 MB to a temp file on disk; keep every accepted upload in memory instead
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_bytes + (1 << 20))
    app = FastAPI(title="cxrclip", version="1", description=DISCLAIMER)
    app.state.service = service
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip

    def error(status: int, message: str, request_id: str) -> JSONResponse:
        body = {"error": {"status": status, "message": message}, "request_id": request_id}
        return JSONResponse(body, status_code=status, headers={"X-Request-ID": request_id})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        request_id = uuid.uuid4().hex
        request.state.request_id = request_id
        path = request.url.path
        request.state.user = None
        if path.startswith("/v1/") and (settings.token or settings.users):
            given = request.headers.get("authorization", "").encode()
            accepted, user = False, None
            for name, token in ((None, settings.token), *settings.users):  # every comparison runs: constant time
                if token and hmac.compare_digest(given, f"Bearer {token}".encode()):
                    accepted, user = True, user or name
            if not accepted:
                return error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)", request_id)
            request.state.user = user
        length = request.headers.get("content-length")
        if path == "/v1/reviews" and request.method == "POST":  # a review is small: its body is capped on its own
            if not (length and length.isdigit()):
                return error(411, "a review needs a Content-Length header", request_id)
            if int(length) > MAX_REVIEW_BODY:
                return error(413, f"review body larger than {MAX_REVIEW_BODY // 1024} KB", request_id)
        if length and length.isdigit() and int(length) > max_bytes + 1024 * 1024:
            return error(413, f"upload larger than {settings.max_upload_mb:g} MB", request_id)
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error(e.status, e.message, request.state.request_id)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), getattr(request.state, "request_id", uuid.uuid4().hex))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        fields = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        return error(422, f"invalid request: {fields}", request.state.request_id)

    async def read_upload(upload: UploadFile) -> bytes:
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ApiError(413, f"{upload.filename}: larger than {settings.max_upload_mb:g} MB")
        if not data:
            raise ApiError(422, f"{upload.filename}: empty file")
        return data

    async def run_predict(data: bytes, name: str, heatmap: str | None, texts: list[str]) -> dict:
        return await anyio.to_thread.run_sync(service.predict, data, name, heatmap, texts, limiter=limiter)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # the page's own files, listed once

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in files:
            raise ApiError(404, f"no static file {name!r}")
        return FileResponse(files[name])

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model(request: Request):
        return {**service.card, "reviews": service.reviews is not None, "user": request.state.user}

    @app.post("/v1/predict")
    async def predict(
        request: Request,
        file: Annotated[UploadFile, File(description="PNG (8/16-bit), JPEG or DICOM")],
        heatmap: Annotated[str | None, Form(description="a label: return its Grad-CAM overlay")] = None,
        texts: Annotated[list[str] | None, Form(description="free-text findings to compare with the image")] = None,
    ):
        start = time.perf_counter()
        data = await read_upload(file)
        out = await run_predict(data, file.filename or "upload", heatmap, [t for t in texts or [] if t.strip()])
        return {"request_id": request.state.request_id, "seconds": round(time.perf_counter() - start, 4), **out}

    @app.post("/v1/reviews")
    async def add_review(request: Request, body: ReviewIn):
        reviewer = request.state.user or body.reviewer  # a reader's own token signs the review with their name
        saved = await anyio.to_thread.run_sync(
            service.review, body.image_sha256, reviewer, dict(body.verdicts), body.comment, body.supersedes,
            limiter=limiter,
        )  # fmt: skip
        return {"request_id": request.state.request_id, "review": saved}

    @app.get("/monitor", include_in_schema=False)
    async def monitor_page():
        return FileResponse(STATIC / "monitor.html", media_type="text/html")

    @app.get("/v1/monitor")
    async def monitor(period: Literal["day", "week"] = "day"):
        return await anyio.to_thread.run_sync(service.monitor, period, limiter=limiter)

    @app.get("/v1/reviews")
    async def list_reviews(since: str | None = None, limit: int = 1000):
        store = service.store()
        try:
            after = datetime.datetime.fromisoformat(since) if since else None
        except ValueError as e:
            raise ApiError(422, f"since={since!r}: expected an ISO 8601 time, e.g. 2026-11-29T08:00:00+00:00") from e
        if after is not None and after.tzinfo is None:
            after = after.replace(tzinfo=datetime.timezone.utc)
        rows = await anyio.to_thread.run_sync(store.list, after, max(1, min(limit, 10000)))
        return {"reviews": rows}

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request, files: Annotated[list[UploadFile], File(description="images")]):
        results = []
        for upload in files:
            try:
                data = await read_upload(upload)
                results.append({"file": upload.filename, **await run_predict(data, upload.filename or "", None, [])})
            except ApiError as e:  # one bad file does not fail the others
                results.append({"file": upload.filename, "error": {"status": e.status, "message": e.message}})
        return {"request_id": request.state.request_id, "results": results}

    return app


def serve(settings: ServeSettings) -> None:
    """Run the server until Ctrl-C."""
    import torch
    import uvicorn

    # the worker threads share the cores: each prediction gets its share instead of all of them
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, settings.workers)))
    app = create_app(settings)
    print(f"cxrclip serve: http://{settings.host}:{settings.port}/  (API docs at /docs). {DISCLAIMER}", flush=True)
    if settings.db:
        print(
            f"reviews: {redact_url(app.state.service.reviews.url)}"
            + (f"; reviewed images kept in {settings.keep_images}" if settings.keep_images else ""),
            flush=True,
        )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
