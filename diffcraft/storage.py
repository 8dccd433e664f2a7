"""Where studies and feature caches live: a local folder, a shared mount, or an object store.

A location is a string: a path (`studies`, `/mnt/nfs/studies`) or a URI (`s3://bucket/prefix`,
`gs://bucket/prefix`). Every read and write of the project goes through `Location`, so the same
code serves one machine and a cluster whose nodes share nothing but the store. An S3-compatible
endpoint (MinIO, Ceph) is reached through the standard AWS variables, `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, with credentials from the usual AWS chain (variables, instance identity).
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import urlparse

from diffcraft.errors import StorageError

REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_remote(location: str) -> bool:
    return urlparse(str(location)).scheme in REMOTE_SCHEMES


def absolute(location: str, root: Path | None = None) -> str:
    """A URI unchanged; a path made absolute against `root` (default: the working directory)."""
    check_location_shape(location)
    if is_remote(location):
        return str(location).rstrip("/")
    return str(((root or Path.cwd()) / Path(location).expanduser()).resolve())


def check_location_shape(location: str) -> None:
    """Raise StorageError unless `location` is a path or a URI this project reads with a bucket
    (`s3://bucket/prefix`, `gs://bucket/prefix`)."""
    location = str(location)
    if "://" not in location:
        return
    parsed = urlparse(location)
    if parsed.scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{location}: unsupported storage scheme {parsed.scheme!r} (use a path, s3://BUCKET/PREFIX "
                           "or gs://BUCKET/PREFIX)")
    if not parsed.netloc:
        raise StorageError(f"{location}: no bucket (write {parsed.scheme}://BUCKET/PREFIX)")


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(location: str):
    """(pyarrow filesystem, path inside it) for a location; what Ray's `storage_filesystem` takes."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return pafs.LocalFileSystem(), absolute(location)
    parsed = urlparse(location)
    path = f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "s3":
        endpoint = s3_endpoint()
        kwargs = {"allow_delayed_open": True}  # small objects in one PUT, no multipart round trips
        if endpoint:
            url = urlparse(endpoint)
            kwargs.update(endpoint_override=url.netloc or url.path, scheme=url.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), path
    fs, _ = pafs.FileSystem.from_uri(location)
    return fs, path


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a local file whole or not at all: `write(handle)` fills a temporary file beside
    `path`, which is fsynced and renamed over it, so a kill leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class Location:
    """A folder in some store; `/` joins a child. Writes of whole files are atomic: a local file
    is written beside its target and renamed, an object is put in one request."""

    uri: str

    @classmethod
    def of(cls, location: str, root: Path | None = None) -> "Location":
        return cls(absolute(location, root))

    def __truediv__(self, child: str) -> "Location":
        return Location(f"{self.uri.rstrip('/')}/{child}" if is_remote(self.uri) else str(Path(self.uri) / child))

    def __str__(self) -> str:
        return self.uri

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def _fs(self):
        return filesystem(self.uri)

    def _fail(self, what: str, err: Exception) -> StorageError:
        return StorageError(f"{self.uri}: cannot {what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        fs, path = self._fs()
        try:
            return fs.get_file_info(path).type != pafs.FileType.NotFound
        except OSError as err:
            raise self._fail("check it", err) from None

    def read_bytes(self) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        fs, path = self._fs()
        try:
            with fs.open_input_stream(path) as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "nosuchkey" in str(err).lower():
                return None
            raise self._fail("read it", err) from None

    def read_text(self) -> str | None:
        data = self.read_bytes()
        return None if data is None else data.decode()

    def write_bytes(self, data: bytes) -> None:
        if not self.remote:
            write_atomically(Path(self.uri), lambda handle: handle.write(data))
            return
        fs, path = self._fs()
        try:
            with fs.open_output_stream(path) as handle:
                handle.write(data)
        except OSError as err:
            raise self._fail("write it", err) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        """Remove the file or folder if it is there."""
        import pyarrow.fs as pafs

        fs, path = self._fs()
        try:
            kind = fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                fs.delete_file(path)
        except OSError as err:
            raise self._fail("delete it", err) from None

    def list_info(self) -> dict[str, tuple[int, int]]:
        """Every file below this folder: relative path -> (size in bytes, modification time in ns)."""
        import pyarrow.fs as pafs

        fs, path = self._fs()
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError as err:
            raise self._fail("list it", err) from None
        return {posixpath.relpath(i.path, path): (i.size, i.mtime_ns or 0) for i in infos
                if i.type == pafs.FileType.File}

    def download(self, local: Path) -> Path:
        """Copy this file or folder to `local` (a folder's files below it)."""
        import pyarrow.fs as pafs

        fs, path = self._fs()
        local = Path(local)
        try:
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                local.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            else:
                data = self.read_bytes()
                if data is None:
                    raise FileNotFoundError(path)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
        except OSError as err:
            raise self._fail(f"download it to {local}", err) from None
        return local

    def local_path(self) -> Path | None:
        """The folder on this machine's disk, or None for an object store."""
        return None if self.remote else Path(self.uri)


def probe_writable(location: Location) -> None:
    """Write, read back and delete a small object: raises StorageError naming what failed."""
    import socket
    import uuid

    probe = location / f".probe-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    probe.write_text("ok")
    if probe.read_text() != "ok":
        raise StorageError(f"{probe}: wrote a probe but could not read it back")
    probe.delete()


def node_scratch(*parts: str) -> Path:
    """A folder on this node's own disk for staged copies (`DIFFCRAFT_SCRATCH`, else
    ~/.cache/diffcraft)."""
    root = Path(os.environ.get("DIFFCRAFT_SCRATCH") or Path.home() / ".cache" / "diffcraft")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

