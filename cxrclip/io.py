"""Atomic file writes: a temp file in the same folder, then a rename, so a crash never leaves half a file."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cxrclip.exceptions import ConfigError, OutputError

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one step. A failure (a full disk, a
    read-only folder) removes the temp file, leaves any previous ``path`` untouched and raises
    :class:`~cxrclip.exceptions.OutputError` saying so."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its stream
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"cannot write {path}: {_reason(e, path.parent)}{_kept(path)}") from e
    except BaseException:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files that writes of ``path`` left when their process was killed (``kill -9``
    mid-write); ``path`` itself is always whole. Call it only when no other process writes ``path``."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _kept(path: Path) -> str:
    return "; the previous file is unchanged" if path.exists() else ""


def _reason(e: BaseException, folder: Path) -> str:
    reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return reason
    if getattr(e, "errno", None) != errno.ENOSPC and free < 16 << 20:
        reason += f" (only {free >> 10} KiB free on that disk: is it full?)"
    return reason


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def database_url(db: str | Path, option: str = "--db", must_exist: bool = False) -> str:
    """A database option — the one rule for "a URL or a file": a SQLAlchemy URL (``postgresql+psycopg://...``,
    ``sqlite:///...``) as it is, else a SQLite file path (``must_exist``: one that is already there)."""
    text = str(db)
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if not path.parent.exists():
        raise ConfigError(f"{option} {db}: folder {path.parent} does not exist")
    if must_exist and not path.is_file():
        raise ConfigError(f"{option} {db}: no such database file")
    return f"sqlite:///{path.resolve()}"


def redact_url(url: str) -> str:
    """A database URL without its credentials, for messages and logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
