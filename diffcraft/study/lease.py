"""The study's lease in its storage location, `lease.json`: which driver runs the study now.

One driver per study, by conditional writes: the lease is created only if absent and replaced
only if unchanged since this driver read it (S3 `If-None-Match`/`If-Match`, GCS generation
preconditions, an exclusive `flock` on a local or shared folder). A holder renews it every
LEASE_RENEW_S; another driver is refused with the holder's host, process and start time. A holder
that is provably dead (same host, process gone) is replaced at once; one silent for longer than
LEASE_TTL_S (a driver whose node died, or that was paused or cut off) can be taken over with
`--take-over`. A driver that finds its lease replaced, or cannot renew it within the TTL, stops
at once without writing anything more (`Lease.fence`), and the trial workers of a study check the
lease (`LeaseRef.check`) before each epoch they log.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from diffcraft.errors import DiffcraftError, StorageError, StudyConfigError
from diffcraft.storage import Location, s3_endpoint

LEASE = "lease.json"
LEASE_TTL_S = float(os.environ.get("DIFFCRAFT_LEASE_TTL_S", "60"))  # tests shorten it
LEASE_RENEW_S = LEASE_TTL_S / 12


def held_for(ttl_s: float) -> float:
    """How long a lease counts as held after its last renewal: the TTL less one renewal period,
    so a holder stops before another driver may take the lease over (driver and workers alike)."""
    return ttl_s * 11 / 12
LEASE_LOST_EXIT = 75  # a driver's exit status when it lost its study (EX_TEMPFAIL)


class LeaseLost(DiffcraftError):
    """This process no longer holds the study: another driver took it, or it could not renew."""


# ---- stores: read, create-if-absent, replace-if-unchanged, delete-if-unchanged --------------------
class LocalLeaseStore:
    """lease.json in a folder (local or a shared mount), each change under an exclusive flock."""

    def __init__(self, folder: Path):
        self.path, self.lock = folder / LEASE, folder / f".{LEASE}.lock"

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _current(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[dict, str] | None:
        current = self._current()  # writes are atomic renames: a read needs no lock, and creates nothing
        return None if current is None else (json.loads(current[0]), current[1])

    def put(self, held: dict, version: str | None) -> str | None:
        """Write `held` if the lease is at `version` (None: absent); its new version, or None."""
        data = json.dumps(held).encode()
        with self._locked():
            current = self._current()
            if (current[1] if current else None) != version:
                return None
            Location(str(self.path)).write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._current()
            if current is None or current[1] != version:
                return False
            self.path.unlink()
        return True


class S3LeaseStore:
    """lease.json as an S3 object, changed with `If-None-Match: *` / `If-Match: <ETag>`."""

    def __init__(self, uri: str):
        import boto3

        parsed = urlparse(uri)
        self.bucket, self.key = parsed.netloc, f"{parsed.path.strip('/')}/{LEASE}".lstrip("/")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.s3 = boto3.client("s3", endpoint_url=s3_endpoint(), region_name=region)

    @staticmethod
    def _refused(err) -> bool:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in (409, 412) or err.response.get("Error", {}).get("Code") in (
            "PreconditionFailed", "ConditionalRequestConflict")

    def read(self) -> tuple[dict, str] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(got["Body"].read()), got["ETag"]

    def put(self, held: dict, version: str | None) -> str | None:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            return self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(held).encode(),
                                      **condition)["ETag"]
        except ClientError as err:
            if self._refused(err):
                return None
            raise

    def delete(self, version: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except ClientError as err:
            if self._refused(err) or err.response.get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise
        return True


class GcsLeaseStore:
    """lease.json as a GCS object, changed with generation preconditions (google-cloud-storage)."""

    def __init__(self, uri: str):
        try:
            from google.cloud import storage
        except ImportError:
            raise StudyConfigError(f"{uri}: a study on GCS needs google-cloud-storage for its lease "
                                   "(pip install google-cloud-storage)") from None
        parsed = urlparse(uri)
        self.blob = storage.Client().bucket(parsed.netloc).blob(f"{parsed.path.strip('/')}/{LEASE}".lstrip("/"))

    def read(self) -> tuple[dict, str] | None:
        from google.api_core.exceptions import NotFound

        try:
            data = self.blob.download_as_bytes()
        except NotFound:
            return None
        return json.loads(data), str(self.blob.generation)

    def put(self, held: dict, version: str | None) -> str | None:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.blob.upload_from_string(json.dumps(held), content_type="application/json",
                                         if_generation_match=0 if version is None else int(version))
        except PreconditionFailed:
            return None
        return str(self.blob.generation)

    def delete(self, version: str) -> bool:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.blob.delete(if_generation_match=int(version))
        except (NotFound, PreconditionFailed):
            return False
        return True


def lease_store(location: Location):
    """The conditional-write store of the lease at `location`."""
    scheme = urlparse(location.uri).scheme
    if scheme == "s3":
        return S3LeaseStore(location.uri)
    if scheme in ("gs", "gcs"):
        return GcsLeaseStore(location.uri)
    return LocalLeaseStore(Path(location.uri))


# ---- the lease ------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_line(held: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["started"]))
    silent = time.time() - held["renewed"]
    return f"host {held['host']} (pid {held['pid']}) since {started}, last renewed {silent:.0f} s ago"


def stop_now(message: str) -> None:
    """End this driver at once, writing nothing more (no Tune state, no MLflow call): the study
    belongs to another driver now. Its Ray job's workers end with it."""
    print(f"diffcraft: {message}", file=sys.stderr, flush=True)
    os._exit(LEASE_LOST_EXIT)


@dataclass(frozen=True)
class LeaseRef:
    """What a trial worker needs to check the lease: where it is and the holder's token."""
    uri: str
    token: str
    ttl_s: float  # the driver's LEASE_TTL_S: a node may have another default

    def check(self) -> None:
        """Raise LeaseLost unless the study's driver still holds the lease and renews it."""
        found = lease_store(Location(self.uri)).read()
        held = found[0] if found else {}
        if held.get("token") != self.token:
            raise LeaseLost(f"{self.uri}: another driver runs this study now; this trial stops without logging more")
        if time.time() - held["renewed"] > held_for(self.ttl_s):
            raise LeaseLost(f"{self.uri}: the study's driver has not renewed its lease for "
                            f"{time.time() - held['renewed']:.0f} s; this trial stops without logging more")


@dataclass
class Lease:
    """This driver's hold on a study; `release()` when done (also on errors)."""
    location: Location
    store: object
    held: dict
    version: str
    on_lost: Callable[[str], None] = stop_now
    _renewed_at: float = field(default_factory=time.monotonic)  # the last renewal known to have landed
    _lost: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.location.uri, self.held["token"], LEASE_TTL_S)

    def fence(self) -> None:
        """Stop this driver (`on_lost`) unless the lease is surely still its own: renewed within the
        TTL less one renewal period, and not found taken by another driver."""
        silent = time.monotonic() - self._renewed_at
        if not self._lost and silent > held_for(LEASE_TTL_S):
            self._lost = (f"{self.location}: this driver could not renew its lease for {silent:.0f} s (paused, or "
                          "cut off from the store); another driver may have taken the study over, so this one stops")
        if self._lost:
            self._stop.set()
            self.on_lost(self._lost)

    def _renew_once(self) -> None:
        held = {**self.held, "renewed": time.time()}
        try:
            version = self.store.put(held, self.version)
        except Exception:  # noqa: BLE001 - a store hiccup: the next renewal retries, fence() judges the silence
            return
        if version is None:
            found = self.store.read()
            other = _holder_line(found[0]) if found else "nobody (it was deleted)"
            self._lost = f"{self.location}: another driver took this study over ({other}); this one stops"
            return
        self.held, self.version, self._renewed_at = held, version, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(min(LEASE_RENEW_S, 0.5)):
            if time.monotonic() - self._renewed_at >= LEASE_RENEW_S:
                self._renew_once()
            self.fence()

    def start(self) -> "Lease":
        global _held
        _held = self
        self._thread = threading.Thread(target=self._run, name="diffcraft-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        global _held
        if _held is self:
            _held = None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=LEASE_RENEW_S * 2)
        if not self._lost:
            try:
                self.store.delete(self.version)
            except Exception:  # noqa: BLE001 - a lease left behind goes stale and is taken over
                pass


_held: Lease | None = None  # the lease this process holds (Tune pickles its callbacks: they find it here)


def fence_held() -> None:
    """`Lease.fence` of the lease this process holds, if any: called before the driver writes."""
    if _held is not None:
        _held.fence()


def _refusal(location: Location, held: dict, take_over: bool) -> str | None:
    """Why the lease `held` keeps this driver out, or None when it may be replaced."""
    dead_here = held["host"] == socket.gethostname() and not _pid_alive(held["pid"])
    stale = time.time() - held["renewed"] > held.get("ttl_s", LEASE_TTL_S)
    if dead_here or (stale and take_over):
        return None
    return (f"{location}: another driver is running this study: {_holder_line(held)}. " + (
        "It looks stale; if that driver is gone, run again with --take-over." if stale else
        f"Wait for it, or stop it first (a lease not renewed for {LEASE_TTL_S:.0f} s can be taken over with "
        "--take-over)."))


def check_lease_free(location: Location, take_over: bool = False) -> None:
    """Refuse now, before Ray starts, when another driver holds the study (acquire_lease decides)."""
    try:
        found = lease_store(location).read()
    except (OSError, StorageError) as err:
        raise StorageError(f"{location / LEASE}: cannot read the study's lease ({err})") from None
    if found and (why := _refusal(location, found[0], take_over)):
        raise StudyConfigError(why)


def acquire_lease(location: Location, take_over: bool = False,
                  on_lost: Callable[[str], None] = stop_now) -> Lease:
    """Hold the study at `location` (renewed in the background), or raise naming who holds it."""
    store = lease_store(location)
    found = store.read()
    if found and (why := _refusal(location, found[0], take_over)):
        raise StudyConfigError(why)
    now = time.time()
    held = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now,
            "token": uuid.uuid4().hex, "ttl_s": LEASE_TTL_S}
    version = store.put(held, found[1] if found else None)
    if version is None:  # another driver wrote between our read and our write
        again = store.read()
        raise StudyConfigError(f"{location}: another driver took this study just now"
                               + (f": {_holder_line(again[0])}" if again else ""))
    return Lease(location, store, held, version, on_lost).start()
