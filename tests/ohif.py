"""The OHIF Viewer as hospitals put it in front of Orthanc: the prebuilt dist of the npm package ``@ohif/app`` (pinned,
no build), served on 127.0.0.1 with its ``app-config.js`` pointed at the PACS through a same-origin DICOMweb proxy
(which adds the PACS's credentials, as a hospital's reverse proxy does).

``python -m tests.ohif fetch`` downloads the pinned tarball from the npm registry once (``.ci/run`` does), checks its
published SHA-512 and unpacks it under ``.cache/ohif/``; the tests never reach beyond 127.0.0.1. Not vendored: the
dist is 204 MB unpacked (50 MB packed), and the registry is reachable where CI runs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import mimetypes
import shutil
import sys
import tarfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VERSION = "3.13.2"
TARBALL = f"https://registry.npmjs.org/@ohif/app/-/app-{VERSION}.tgz"
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "ohif" / VERSION
DIST = CACHE / "package" / "dist"

CONFIG = """window.config = {
  routerBasename: '/', showStudyList: true, extensions: [], modes: [], customizationService: {},
  showLoadingIndicator: true, showWarningMessageForCrossOrigin: false, showCPUFallbackMessage: false,
  strictZSpacingForVolumeViewport: true, maxNumberOfWebWorkers: 2, defaultDataSourceName: 'orthanc',
  investigationalUseDialog: { option: 'never' },
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb', sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (cxrclip test)', name: 'orthanc',
      wadoUriRoot: '/dicom-web', qidoRoot: '/dicom-web', wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false, imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true, staticWado: false,
      singlepart: 'bulkdata,video', omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
    },
  }],
};
"""


def missing() -> str | None:
    if not (DIST / "index.html").is_file():
        return f"the OHIF Viewer {VERSION} dist is not in {CACHE} (python -m tests.ohif fetch; .ci/run does it)"
    return None


def fetch() -> Path:
    """Download, check and unpack the pinned OHIF dist (once)."""
    if (DIST / "index.html").is_file():
        return DIST
    with urllib.request.urlopen(TARBALL, timeout=300) as response:
        data = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != INTEGRITY:
        raise SystemExit(f"{TARBALL}: SHA-512 {digest} is not the registry's published {INTEGRITY}")
    partial = CACHE.with_name(CACHE.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(CACHE, ignore_errors=True)
    partial.rename(CACHE)
    return DIST


class Viewer:
    """OHIF's dist + a DICOMweb proxy to ``dicomweb`` (with ``user``/``password``), on a free port of 127.0.0.1."""

    def __init__(self, dicomweb: str, user: str, password: str):
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        upstream = dicomweb.rstrip("/")

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.startswith("/dicom-web"):
                    return self.proxy()
                path = self.path.split("?", 1)[0]
                if path == "/app-config.js":
                    return self.reply(200, CONFIG.encode(), "application/javascript")
                file = (DIST / path.lstrip("/")).resolve()
                if not file.is_file() or DIST not in file.parents:
                    file = DIST / "index.html"  # the viewer's own routes (/viewer?StudyInstanceUIDs=...)
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                if file.suffix == ".wasm":
                    kind = "application/wasm"
                return self.reply(200, file.read_bytes(), kind)

            def proxy(self):
                url = upstream + self.path.removeprefix("/dicom-web")
                headers = {"Authorization": auth, "Accept": self.headers.get("Accept", "*/*")}
                request = urllib.request.Request(url, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        body, status = response.read(), response.status
                        kind = response.headers.get("Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as e:
                    body, status, kind = e.read(), e.code, e.headers.get("Content-Type", "text/plain")
                return self.reply(status, body, kind)

            def reply(self, status: int, body: bytes, kind: str):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Viewer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def study(self, study_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch"]:
        print(json.dumps({"ohif": VERSION, "dist": str(fetch())}))
    else:
        raise SystemExit("usage: python -m tests.ohif fetch")
