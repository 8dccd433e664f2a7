"""The study's lease in its storage: one driver at a time, dead holders replaced, stale ones only
when asked."""
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from diffcraft.storage import Location
from diffcraft.errors import StudyConfigError
from diffcraft.study import lease as lease_module
from tests.kit import S3Server
from diffcraft.study.lease import LEASE, LEASE_TTL_S, LeaseLost, acquire_lease, lease_store


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


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server (tests/kit) for the object-store leases."""
    with S3Server() as s3:
        yield s3


@pytest.fixture
def quick_lease(monkeypatch):
    """Lease timing shortened to seconds (the module reads its constants at call time)."""
    monkeypatch.setattr(lease_module, "LEASE_TTL_S", 3.0)
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.25)
    return lease_module


def locations(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.create_bucket(f"lease-{uuid.uuid4().hex[:8]}")
    return [Location.of(str(tmp_path / "study")), Location.of(f"{bucket}/studies/s")]


def test_the_lease_is_created_only_where_none_is_and_replaced_only_unchanged(tmp_path, s3_server, monkeypatch):
    for location in locations(tmp_path, s3_server, monkeypatch):
        store = lease_store(location)
        first = store.put({"token": "a"}, None)
        assert first and store.put({"token": "b"}, None) is None, location  # If-None-Match / O_EXCL-like
        second = store.put({"token": "a", "n": 2}, first)
        assert second and store.put({"token": "c"}, first) is None, location  # If-Match on a stale version
        assert store.read() == ({"token": "a", "n": 2}, second)
        assert not store.delete(first) and store.delete(second) and store.read() is None


def test_a_driver_whose_lease_was_taken_stops_and_its_workers_check_fails(tmp_path, s3_server, monkeypatch,
                                                                          quick_lease):
    for location in locations(tmp_path, s3_server, monkeypatch):
        lost = []
        lease = acquire_lease(location, on_lost=lost.append)
        lease.ref.check()  # held and renewed: a worker goes on
        store = lease_store(location)
        held, version = store.read()
        assert store.put({**held, "token": "theirs", "renewed": time.time()}, version)  # a take-over
        deadline = time.time() + 5
        while not lost and time.time() < deadline:
            time.sleep(0.05)
        assert lost and "another driver took this study over" in lost[0], location
        with pytest.raises(LeaseLost, match="another driver runs this study"):
            lease.ref.check()
        lease.release()  # a lost lease is not deleted: it is the other driver's now
        assert store.read()[0]["token"] == "theirs"


def test_a_driver_that_could_not_renew_within_the_ttl_stops(tmp_path, quick_lease):
    lost = []
    lease = acquire_lease(Location.of(str(tmp_path / "study")), on_lost=lost.append)
    lease._stop.set()  # as if paused: no renewal lands
    lease._renewed_at -= quick_lease.LEASE_TTL_S
    lease.fence()
    assert lost and "could not renew its lease" in lost[0]
    with pytest.raises(LeaseLost, match="has not renewed its lease"):
        time.sleep(quick_lease.LEASE_TTL_S - quick_lease.LEASE_RENEW_S)
        lease.ref.check()


def test_two_drivers_racing_for_a_free_study_get_one_lease(tmp_path):
    location = Location.of(str(tmp_path / "study"))
    script = ("import sys, time; from diffcraft.storage import Location; from diffcraft.study.lease import acquire_lease\n"
              "t = float(sys.argv[2]); time.sleep(max(0, t - time.time()))\n"
              "try:\n    acquire_lease(Location(sys.argv[1])); print('held'); time.sleep(2)\n"
              "except Exception as e:\n    print('refused', e)\n")
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", script, location.uri, str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outcomes = [p.communicate(timeout=60)[0].split()[0] for p in procs]
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"], outcomes
