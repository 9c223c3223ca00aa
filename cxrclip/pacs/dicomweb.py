"""The DICOMweb side of the PACS worker: QIDO-RS to find instances, WADO-RS to fetch one, STOW-RS to store the
answer (dicomweb-client over a requests session). Credentials come from a file or an environment variable, never
from the command line; TLS certificates are verified unless the user says otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cxrclip.exceptions import ConfigError

PASSWORD_ENV = "CXRCLIP_PACS_PASSWORD"
TOKEN_ENV = "CXRCLIP_PACS_TOKEN"
# DICOM JSON tags (PS3.18 F.2)
TAG = {
    "study_uid": "0020000D",
    "series_uid": "0020000E",
    "sop_uid": "00080018",
    "modality": "00080060",
    "sop_class": "00080016",
    "study_date": "00080020",
}


def _first(item: dict, tag: str):
    """The first value of one attribute of a DICOM JSON object (None when absent or empty)."""
    return ((item.get(tag) or {}).get("Value") or [None])[0]


class PacsUnavailable(Exception):
    """The server cannot be reached or answers 5xx / 429 / 408: worth trying again later."""


class PacsRejected(Exception):
    """The server answered with a 4xx other than 408/429: retrying the same request will not help."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Credentials:
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def describe(self) -> str:
        if self.token:
            return "bearer token"
        return f"HTTP basic as {self.user}" if self.user else "no authentication"


def _secret(file: str | None, env: str, what: str) -> str | None:
    if file:
        try:
            return Path(file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"cannot read the {what} file {file}: {e}") from e
    return os.environ.get(env) or None


def credentials(user: str | None, password_file: str | None, token_file: str | None) -> Credentials:
    """HTTP basic (``--user`` with the password from ``--password-file`` or $CXRCLIP_PACS_PASSWORD) or a bearer token
    (``--token-file`` or $CXRCLIP_PACS_TOKEN)."""
    token = _secret(token_file, TOKEN_ENV, "token")
    if user:
        password = _secret(password_file, PASSWORD_ENV, "password")
        if password is None:
            raise ConfigError(f"--user {user}: give the password in --password-file FILE or ${PASSWORD_ENV}")
        if token:
            raise ConfigError("give either --user (HTTP basic) or a bearer token, not both")
        return Credentials(user=user, password=password)
    if password_file:
        raise ConfigError("--password-file needs --user")
    return Credentials(token=token)


def add_connection_arguments(parser, *, what: str = "the PACS") -> None:
    """How to reach a DICOMweb server, as one argument group (the same names and help everywhere)."""
    g = parser.add_argument_group(f"{what} (DICOMweb)")
    g.add_argument("--dicomweb", help="the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    g.add_argument("--user", help=f"HTTP basic user; the password from --password-file or ${PASSWORD_ENV}")
    g.add_argument("--password-file", help="a file holding the HTTP basic password")
    g.add_argument("--token-file", help=f"a file holding a bearer token (or ${TOKEN_ENV})")
    g.add_argument("--ca-bundle", help="CA certificates to verify the server's TLS certificate with")
    g.add_argument("--no-verify-tls", action="store_true", help="do not verify the TLS certificate (unsafe)")


@dataclass(frozen=True)
class Connection:
    """Where a DICOMweb server is and how to authenticate to it (read from :func:`add_connection_arguments`)."""

    url: str
    creds: Credentials = Credentials()
    verify: bool | str = True

    @classmethod
    def from_args(cls, args) -> Connection:
        if args.no_verify_tls:
            import logging

            logging.getLogger("cxrclip.pacs").warning(
                "--no-verify-tls: the server's identity is not checked; use only on a trusted network"
            )
        verify = False if args.no_verify_tls else (args.ca_bundle or True)
        return cls(args.dicomweb, credentials(args.user, args.password_file, args.token_file), verify)

    def open(self) -> DicomWeb:
        return DicomWeb(self.url, self.creds, verify=self.verify)


class DicomWeb:
    """One DICOMweb server. Every network failure comes out as :class:`PacsUnavailable` or :class:`PacsRejected`."""

    def __init__(self, url: str, creds: Credentials = Credentials(), *, verify: bool | str = True, timeout=30.0):
        import requests
        from dicomweb_client.api import DICOMwebClient

        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"--dicomweb {url}: expected an http:// or https:// URL (e.g. http://127.0.0.1:8042/dicom-web)"
            )
        self.url = url.rstrip("/")
        session = requests.Session()
        session.verify = verify
        if creds.user:
            session.auth = (creds.user, creds.password)
        if creds.token:
            session.headers["Authorization"] = f"Bearer {creds.token}"
        self.session, self.timeout = session, timeout
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # the worker retries, with backoff, and says so in its log

    def _call(self, what: str, fn, *args, **kwargs):
        import requests

        try:
            response = fn(*args, **kwargs)
            if isinstance(response, requests.Response):
                response.raise_for_status()
            return response
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            message = f"{what}: HTTP {status} from {self.url}"
            if status >= 500 or status in (408, 429):
                raise PacsUnavailable(message) from e
            raise PacsRejected(message + (" (check the credentials)" if status in (401, 403) else ""), status) from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise PacsUnavailable(f"{what}: cannot reach {self.url} ({type(e).__name__})") from e
        except requests.RequestException as e:  # the answer broken off (a PACS stopping mid-reply): try again later
            raise PacsUnavailable(f"{what}: the answer from {self.url} broke off ({type(e).__name__}: {e})") from e

    def find_instances(self, modality: str, date_from: str | None, page: int = 500) -> list[dict]:
        """Instances of one modality with a StudyDate on or after ``date_from`` (YYYYMMDD), every page."""
        filters = {"Modality": modality}
        if date_from:
            filters["StudyDate"] = f"{date_from}-"
        found, offset = [], 0
        while True:
            batch = self._call(
                "QIDO-RS search",
                self.client.search_for_instances,
                search_filters=filters,
                fields=["Modality", "StudyDate", "StudyInstanceUID", "SeriesInstanceUID"],
                limit=page,
                offset=offset,
            )
            for item in batch:
                row = {k: _first(item, tag) for k, tag in TAG.items()}
                if row["sop_uid"] and row["study_uid"] and row["series_uid"]:
                    found.append(row)
            if len(batch) < page:
                return found
            offset += len(batch)

    def has_instance(self, study_uid: str, sop_uid: str) -> bool:
        found = self._call(
            "QIDO-RS search",
            self.client.search_for_instances,
            study_instance_uid=study_uid,
            search_filters={"SOPInstanceUID": sop_uid},
        )
        return any(_first(item, TAG["sop_uid"]) == sop_uid for item in found)

    def retrieve(self, study_uid: str, series_uid: str, sop_uid: str):
        return self._call("WADO-RS retrieve", self.client.retrieve_instance, study_uid, series_uid, sop_uid)

    def store(self, datasets, study_uid: str):
        return self._call(
            "STOW-RS store", self.client.store_instances, datasets=list(datasets), study_instance_uid=study_uid
        )


class OrthancChanges:
    """Orthanc's change feed (``GET /changes``, REST API beside DICOMweb): every stored instance once, in order, by a
    sequence number — no date window, so a late send or a study with an old or absent StudyDate is seen too.
    PACS-specific: :func:`changes_feed` tells whether the server has one."""

    def __init__(self, pacs: DicomWeb, root: str):
        self.pacs, self.root = pacs, root.rstrip("/")

    def _get(self, what: str, path: str, **params):
        return self.pacs._call(
            what, self.pacs.session.get, f"{self.root}{path}", params=params, timeout=self.pacs.timeout
        ).json()

    def last(self) -> int:
        """The sequence number of the newest change (0 on an empty server)."""
        return int(self._get("change feed", "/changes", last="")["Last"])

    def since(self, seq: int, limit: int = 200) -> tuple[list[tuple[str, str]], int, bool]:
        """``([(instance id, arrival time), ...], last sequence read, done)`` of the new instances after ``seq``."""
        page = self._get("change feed", "/changes", since=seq, limit=limit)
        new = [(c["ID"], c.get("Date", "")) for c in page["Changes"] if c.get("ChangeType") == "NewInstance"]
        return new, int(page["Last"]), bool(page["Done"])

    def instance(self, orthanc_id: str) -> dict | None:
        """The UIDs, modality and StudyDate of one instance (None when it was deleted since it arrived)."""
        try:
            tags = self._get("instance tags", f"/instances/{orthanc_id}/tags", short="")
        except PacsRejected as e:
            if e.status == 404:
                return None
            raise
        row = {k: _short(tags.get(f"{tag[:4]},{tag[4:]}".lower())) for k, tag in TAG.items()}
        return row if row["sop_uid"] and row["study_uid"] and row["series_uid"] else None


def _short(value):
    """One value of Orthanc's ``?short`` tags (a string, a list for multi-valued text, None)."""
    if isinstance(value, list):
        value = value[0] if value and isinstance(value[0], str) else None
    return value.strip() or None if isinstance(value, str) else None


def changes_feed(pacs: DicomWeb, root: str | None = None) -> OrthancChanges | None:
    """The server's change feed when it has one (Orthanc: ``/changes`` at the REST root, by default the DICOMweb
    URL's parent), else None — then the worker searches with QIDO-RS."""
    if root is None:
        root = pacs.url.rsplit("/", 1)[0]
    feed = OrthancChanges(pacs, root)
    try:
        feed.last()
    except PacsRejected as e:
        if e.status in (401, 403):
            raise
        return None
    except (ValueError, KeyError, TypeError):  # not JSON, or not Orthanc's answer
        return None
    return feed
