"""Atomic writes and fsspec paths. Nothing is ever left half-written: write beside, then rename."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import fsspec


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def open_uri(uri: str, mode: str = "rb", **storage_options):
    """Open a local path or a URL (s3://...) through fsspec. S3 settings come from the
    usual AWS_* env vars; a custom endpoint from AWS_ENDPOINT_URL (moto, MinIO)."""
    return fsspec.open(uri, mode, **_storage_options(uri, storage_options))


def filesystem(uri: str):
    fs, path = fsspec.core.url_to_fs(uri, **_storage_options(uri, {}))
    return fs, path


def download_directory(uri: str, local: str | Path) -> None:
    """Copy a directory (local path or URL) into the existing local directory `local`."""
    fs, path = filesystem(uri)
    fs.get(path.rstrip("/") + "/", str(local), recursive=True)


def upload_directory(local: str | Path, uri: str, last: str = "meta.json") -> None:
    """Copy the files of the local directory `local` into the directory `uri` (local path or URL), `last` last:
    a reader that takes the presence of `last` for a complete copy never sees one cut short."""
    fs, path = filesystem(uri)
    for file in sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: p.name == last):
        target = f"{path.rstrip('/')}/{file.relative_to(local).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # local storage; a no-op on object stores
        fs.put_file(str(file), target)


# botocore's legacy retries took ~13 s to give up on an endpoint that refuses connections; 3 attempts in
# "standard" mode (exponential backoff, also on throttling) give up in ~3 s and still ride out a blip.
S3_CONFIG = {"connect_timeout": 10, "retries": {"max_attempts": 3, "mode": "standard"}}


def _storage_options(uri: str, given: dict) -> dict:
    if not uri.startswith("s3://"):
        return given
    options = {"config_kwargs": S3_CONFIG, **given}
    if "client_kwargs" not in given and os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return options


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: the file gets the mode any other would (shared storage)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.
    On failure the previous contents of `path` are untouched."""
    path = Path(path)
    for parent in (path.parent, *path.parent.parents):  # "File exists" would not say which part is in the way
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: a model directory others on shared storage cannot read
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
