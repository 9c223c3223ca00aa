"""The routes' dependencies (FastAPI ``Depends``): the service, the reader's identity, a bounded thread pool, and
uploads parsed in memory under the size cap."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import anyio
from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from cxrclip.serve.service import ApiError, ServeSettings, Service


@dataclass
class Runtime:
    """What the routes share: the settings, the service, and the thread pool predictions run in."""

    settings: ServeSettings
    service: Service
    limiter: anyio.CapacityLimiter

    async def run(self, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def request_id(request: Request) -> str:
    return request.state.request_id


def reader(request: Request) -> str | None:
    """The reader a bearer token names (``--users``), None for the shared ``--token`` or an open server; 401 when a
    token is required and missing or wrong. Every comparison runs (constant time)."""
    settings: ServeSettings = request.app.state.runtime.settings
    if not (settings.token or settings.users):
        return None
    given = request.headers.get("authorization", "").encode()
    accepted, user = False, None
    for name, token in ((None, settings.token), *settings.users):
        if token and hmac.compare_digest(given, f"Bearer {token}".encode()):
            accepted, user = True, user or name
    if not accepted:
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
    return user


class InMemoryParser(MultiPartParser):
    """Starlette spools a part over 1 MB to a temporary file; an accepted upload stays in memory instead (never on
    disk). Set on this parser, not on Starlette's class."""


async def upload_form(request: Request) -> FormData:
    """The multipart form of an upload request, parsed in memory (its length was capped before it was read)."""
    settings: ServeSettings = request.app.state.runtime.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(422, "invalid request: expected multipart/form-data with the image in 'file'")
    parser = InMemoryParser(request.headers, request.stream())
    parser.spool_max_size = settings.max_bytes + (1 << 20)
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise ApiError(422, f"invalid request: {e.message}") from e


async def read_upload(upload, settings: ServeSettings) -> bytes:
    """One uploaded file's bytes: 413 over the cap, 422 when empty or not a file."""
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "invalid request: body.file: expected a file")
    data = await upload.read(settings.max_bytes + 1)
    if len(data) > settings.max_bytes:
        raise ApiError(413, f"{upload.filename}: larger than {settings.max_upload_mb:g} MB")
    if not data:
        raise ApiError(422, f"{upload.filename}: empty file")
    return data
