"""The API, one router per resource: the model, predictions, reviews, the monitor; and the page's own files."""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from string import Template
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, HTMLResponse
from starlette.datastructures import FormData

from cxrclip.serve.deps import Runtime, read_upload, reader, request_id, runtime, upload_form
from cxrclip.serve.schemas import (
    BatchResponse,
    ErrorResponse,
    Health,
    ModelInfo,
    MonitorReport,
    PredictResponse,
    ReviewIn,
    ReviewList,
    ReviewQueue,
    ReviewSaved,
)
from cxrclip.serve.service import ApiError

STATIC = Path(__file__).parent / "static"
ERRORS = {code: {"model": ErrorResponse} for code in (401, 409, 411, 413, 415, 422, 503)}
RT = Annotated[Runtime, Depends(runtime)]
RequestId = Annotated[str, Depends(request_id)]
Reader = Annotated[str | None, Depends(reader)]
Form = Annotated[FormData, Depends(upload_form)]


def upload_body(batch: bool) -> dict:
    """The multipart body the upload routes read themselves (to keep uploads in memory), for the OpenAPI document."""
    image = {"type": "string", "format": "binary"}
    fields = {"files": {"type": "array", "items": image, "description": "images"}} if batch else {
        "file": {**image, "description": "PNG (8/16-bit), JPEG or DICOM"},
        "heatmap": {"type": "string", "description": "a label: return its Grad-CAM overlay"},
        "texts": {"type": "array", "items": {"type": "string"}, "description": "free-text findings to compare"},
    }  # fmt: skip
    schema = {"type": "object", "properties": fields, "required": ["files" if batch else "file"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


pages = APIRouter(include_in_schema=False)
health = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(reader)], responses=ERRORS)
# Answers are returned as the service made them: a field a model lacks is left out, not written as null.
ANSWER = {"response_model_exclude_unset": True}


def _page(name: str, title: str, script: str) -> HTMLResponse:
    """A page: the one shell (``page.html``: head, style, its script) around its body (``NAME.body.html``)."""
    shell = Template((STATIC / "page.html").read_text(encoding="utf-8"))
    body = (STATIC / f"{name}.body.html").read_text(encoding="utf-8")
    return HTMLResponse(shell.substitute(title=title, script=script, body=body))


@pages.get("/")
async def page():
    return _page("index", "cxrclip — chest X-ray findings", "app.js")


@pages.get("/monitor")
async def monitor_page():
    return _page("monitor", "cxrclip — monitor", "monitor.js")


STATIC_FILES = {
    p.name: p for p in STATIC.iterdir() if p.is_file() and not p.name.endswith(".html")
}  # the page's own files, listed once


@pages.get("/static/{name}")
async def static(name: str):
    if name not in STATIC_FILES:
        raise ApiError(404, f"no static file {name!r}")
    return FileResponse(STATIC_FILES[name])


@health.get("/healthz", response_model=Health)
async def healthz():
    return {"status": "ok"}


@v1.get("/model", response_model=ModelInfo, **ANSWER)
async def model(rt: RT, user: Reader):
    return {**rt.service.card, "reviews": rt.service.reviews is not None, "user": user}


@v1.post("/predict", response_model=PredictResponse, **ANSWER, openapi_extra=upload_body(batch=False))
async def predict(rt: RT, rid: RequestId, form: Form):
    start = time.perf_counter()
    upload = form.get("file")
    if upload is None:
        raise ApiError(422, "invalid request: body.file: Field required")
    data = await read_upload(upload, rt.settings)
    texts = [t for t in form.getlist("texts") if isinstance(t, str) and t.strip()]
    heatmap = form.get("heatmap") or None
    out = await rt.run(rt.service.predict, data, upload.filename or "upload", heatmap, texts)
    return {"request_id": rid, "seconds": round(time.perf_counter() - start, 4), **out}


@v1.post("/predict/batch", response_model=BatchResponse, **ANSWER, openapi_extra=upload_body(batch=True))
async def predict_batch(rt: RT, rid: RequestId, form: Form):
    uploads = form.getlist("files")
    if not uploads:
        raise ApiError(422, "invalid request: body.files: Field required")
    results = []
    for upload in uploads:
        name = getattr(upload, "filename", None)
        try:
            data = await read_upload(upload, rt.settings)
            results.append({"file": name, **await rt.run(rt.service.predict, data, name or "", None, [])})
        except ApiError as e:  # one bad file does not fail the others
            results.append({"file": name, "error": {"status": e.status, "message": e.message}})
    return {"request_id": rid, "results": results}


@v1.post("/reviews", response_model=ReviewSaved, **ANSWER)
async def add_review(rt: RT, rid: RequestId, user: Reader, body: ReviewIn):
    reviewer = user or body.reviewer  # a reader's own token signs the review with their name
    saved = await rt.run(rt.service.review, body.image_sha256, reviewer, dict(body.verdicts), body.comment,
                         body.supersedes)  # fmt: skip
    return {"request_id": rid, "review": saved}


@v1.get("/reviews", response_model=ReviewList, **ANSWER)
async def list_reviews(rt: RT, since: str | None = None, limit: int = 1000):
    store = rt.service.store()
    try:
        after = datetime.datetime.fromisoformat(since) if since else None
    except ValueError as e:
        raise ApiError(422, f"since={since!r}: expected an ISO 8601 time, e.g. 2026-11-29T08:00:00+00:00") from e
    if after is not None and after.tzinfo is None:
        after = after.replace(tzinfo=datetime.timezone.utc)
    return {"reviews": await rt.run(store.list, after, max(1, min(limit, 10000)))}


@v1.get("/review-queue", response_model=ReviewQueue, **ANSWER)
async def review_queue(rt: RT, limit: int = 50):
    """Images shown and not reviewed, those a review would teach most first (near a threshold; where a shadow
    challenger disagrees)."""
    return {"images": await rt.run(rt.service.review_queue, max(1, min(limit, 1000)))}


@v1.get("/monitor", response_model=MonitorReport, **ANSWER)
async def monitor(rt: RT, period: Literal["day", "week"] = "day"):
    return await rt.run(rt.service.monitor, period)
