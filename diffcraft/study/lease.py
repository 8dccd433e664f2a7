"""The study's lease in its storage location, `lease.json`: which driver runs the study now.

The lease keeps two drivers off one study: the holder renews it every few seconds; another driver
is refused with the holder's host, process and start time. A holder that is provably dead (same
host, process gone) is replaced at once; one silent for longer than LEASE_TTL_S on another host
(a driver whose node died) can be taken over explicitly (`--take-over`), which never takes a
lease that is still being renewed.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from diffcraft.errors import StudyConfigError
from diffcraft.storage import Location

LEASE = "lease.json"
LEASE_RENEW_S = 5.0
LEASE_TTL_S = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Lease:
    """This driver's hold on a study; `release()` when done (also on errors)."""
    path: Location
    token: str
    _stop: threading.Event
    _thread: threading.Thread

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=LEASE_RENEW_S * 2)
        held = self.path.read_text()
        if held is not None and json.loads(held).get("token") == self.token:
            self.path.delete()


def _holder_line(held: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held["started"]))
    silent = time.time() - held["renewed"]
    return f"host {held['host']} (pid {held['pid']}) since {started}, last renewed {silent:.0f} s ago"


def acquire_lease(location: Location, take_over: bool = False) -> Lease:
    """Hold the study at `location`, or raise naming who holds it."""
    path = location / LEASE
    text = path.read_text()
    if text is not None:
        held = json.loads(text)
        dead_here = held["host"] == socket.gethostname() and not _pid_alive(held["pid"])
        stale = time.time() - held["renewed"] > LEASE_TTL_S
        if not dead_here and not (stale and take_over):
            raise StudyConfigError(
                f"{location}: another driver is running this study: {_holder_line(held)}. " + (
                    "It looks stale; if that driver is gone, run again with --take-over." if stale else
                    f"Wait for it, or stop it first (a lease not renewed for {LEASE_TTL_S:.0f} s can be "
                    "taken over with --take-over)."))
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": token}

    def write():
        path.write_text(json.dumps({**record, "renewed": time.time()}))

    write()
    held = json.loads(path.read_text() or "{}")
    if held.get("token") != token:  # another driver wrote in the same instant
        raise StudyConfigError(f"{location}: another driver took this study just now: {_holder_line(held)}")
    stop = threading.Event()

    def renew():
        while not stop.wait(LEASE_RENEW_S):
            try:
                write()
            except Exception:  # noqa: BLE001 - a store hiccup must not kill the driver; the next renewal retries
                pass

    thread = threading.Thread(target=renew, name="diffcraft-lease", daemon=True)
    thread.start()
    return Lease(path, token, stop, thread)
