"""The study's lease in its storage: one driver at a time, dead holders replaced, stale ones only
when asked."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from diffcraft.storage import Location
from diffcraft.errors import StudyConfigError
from diffcraft.study.lease import LEASE, LEASE_TTL_S, acquire_lease


def write_lease(location: Location, host: str, pid: int, renewed_ago: float) -> None:
    now = time.time()
    (location / LEASE).write_text(json.dumps({"host": host, "pid": pid, "started": now - 3600,
                                              "renewed": now - renewed_ago, "token": "theirs"}))


def test_a_live_lease_is_refused_naming_its_holder_even_with_take_over(tmp_path):
    location = Location.of(str(tmp_path / "study"))
    write_lease(location, "node-a", 1234, renewed_ago=1.0)
    for take_over in (False, True):
        with pytest.raises(StudyConfigError, match=r"another driver is running this study: host node-a \(pid 1234\)"):
            acquire_lease(location, take_over)
    assert json.loads((location / LEASE).read_text())["token"] == "theirs"


def test_a_stale_lease_elsewhere_is_taken_only_when_asked(tmp_path):
    location = Location.of(str(tmp_path / "study"))
    write_lease(location, "node-a", 1234, renewed_ago=LEASE_TTL_S + 5)
    with pytest.raises(StudyConfigError, match="looks stale.*--take-over"):
        acquire_lease(location)
    lease = acquire_lease(location, take_over=True)
    held = json.loads((location / LEASE).read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    lease.release()
    assert not (location / LEASE).exists()


def test_a_lease_of_a_dead_process_on_this_host_is_replaced_at_once(tmp_path):
    location = Location.of(str(tmp_path / "study"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    write_lease(location, socket.gethostname(), int(dead), renewed_ago=1.0)
    lease = acquire_lease(location)
    assert json.loads((location / LEASE).read_text())["pid"] == os.getpid()
    lease.release()
