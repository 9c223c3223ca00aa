"""``cxrclip serve``: a local web page and REST API over one loaded model (FastAPI + uvicorn).

Safety by default: it binds 127.0.0.1; another address needs ``--token`` (a bearer token, compared in
constant time) or an explicit ``--insecure``. Uploads are capped (413), typed from their bytes (415), decoded
in memory (422 when they cannot be) and never written to disk or logged. The page ships with the package
and loads nothing from outside (Content-Security-Policy ``'self'``). Model and prompt embeddings are loaded
once; predictions run in a bounded thread pool so the event loop keeps answering.

The pieces: ``service.py`` (the model and what a request does with it), ``routes.py`` (one router per resource),
``deps.py`` (the dependencies: the service, the reader, uploads), ``schemas.py`` (every answer's model).
"""

from __future__ import annotations

import uuid

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxrclip.io import redact_url
from cxrclip.predict.card import DISCLAIMER
from cxrclip.serve.deps import Runtime
from cxrclip.serve.routes import health, pages, v1
from cxrclip.serve.service import ApiError, ServeSettings, Service

__all__ = ["ApiError", "ServeSettings", "Service", "create_app", "serve"]
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
MAX_REVIEW_BODY = 64 * 1024  # bytes of a POST /v1/reviews body: the longest comment, name and verdicts fit


def error(status: int, message: str, request_id: str) -> JSONResponse:
    body = {"error": {"status": status, "message": message}, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers={"X-Request-ID": request_id})


def body_limit(settings: ServeSettings, request: Request) -> JSONResponse | None:
    """Every request body is capped before a byte of it is read: it must declare its length (411), and a review's
    may be 64 KB, an upload's the upload cap (413)."""
    if request.method != "POST" or not request.url.path.startswith("/v1/"):
        return None
    length, rid = request.headers.get("content-length"), request.state.request_id
    review = request.url.path == "/v1/reviews"
    if not (length and length.isdigit()):
        return error(411, f"{'a review' if review else 'an upload'} needs a Content-Length header", rid)
    if review and int(length) > MAX_REVIEW_BODY:
        return error(413, f"review body larger than {MAX_REVIEW_BODY // 1024} KB", rid)
    if int(length) > settings.max_bytes + 1024 * 1024:
        return error(413, f"upload larger than {settings.max_upload_mb:g} MB", rid)
    return None


def add_handlers(app: FastAPI, settings: ServeSettings) -> None:
    """The request id and security headers on every answer, the body limits, and every error as one JSON shape."""

    @app.middleware("http")
    async def envelope(request: Request, call_next):
        request.state.request_id = uuid.uuid4().hex
        response = body_limit(settings, request) or await call_next(request)
        response.headers.update({"X-Request-ID": request.state.request_id, "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})  # fmt: skip
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


def create_app(settings: ServeSettings, service: Service | None = None) -> FastAPI:
    """The FastAPI application (tests pass a ready ``service``)."""
    settings.check()
    service = service or Service(settings)
    app = FastAPI(title="cxrclip", version="1", description=DISCLAIMER)
    app.state.runtime = Runtime(settings, service, anyio.CapacityLimiter(max(1, settings.workers)))
    app.state.service = service
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    add_handlers(app, settings)
    for router in (pages, health, v1):
        app.include_router(router)
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
