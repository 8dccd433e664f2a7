"""clusterkit: real multi-node Ray clusters, a local S3 server and an MLflow server for tests.

Everything runs on this one machine, but a Ray *worker node* runs inside its own mount namespace
(``unshare -m --propagation private``) with a private, empty tmpfs over every path listed in
``hidden``; so it cannot see what the test (the "launcher machine", which is also the head node)
keeps there, which is what a second machine without a shared filesystem would be like.

Rules this module keeps, because other people run Ray on the same machine:

* Never ``ray stop``. Every process tree is started in its own process group
  (``start_new_session=True``) and stopped with ``killpg`` of that group.
* Ray task/actor worker processes leave the node's process group (each calls ``setpgid``), and
  rename themselves ``ray::IDLE`` / ``ray::<task>``, which also overwrites what
  ``/proc/<pid>/environ`` shows. They do stay in the node's *session* (every leader is started
  with ``start_new_session=True``, so its pid is the session id). ``stop()`` and ``kill_worker()``
  therefore SIGKILL the group, then SIGKILL by pid whatever is left in the session, or carries
  ``CLUSTERKIT_ID=<marker>`` in its environment (set on every process this module starts), or
  has the cluster's temp dir in its command line; the leaders are reaped only after that, so
  their pids (= session ids) cannot have been reused meanwhile.
* SIGTERM alone does not stop a Ray node: ``ray start --block`` shuts down slowly, and 15 s after
  SIGTERM its leader, gcs_server, log monitor and idle workers were still running. ``stop()``
  gives SIGTERM ``grace`` seconds (default 1) and then uses SIGKILL.
* Each Ray node gets its own ``--temp-dir`` ``/tmp/ck-ray-<id>/<node>`` (short, because Ray's unix
  socket paths must stay under 107 bytes), so ``ray_current_cluster`` and the session dirs never
  touch ``/tmp/ray`` (a local ``ray.init(address="local")`` elsewhere does not see us, and two
  clusters do not collide); it is removed by ``stop()``. Every port is chosen free; the dashboard
  agent's fixed default port (52365) and the Ray client server's (10001) are replaced by free ones.
  Node output goes to ``<tmp_path>/clusterkit-<id>/<node>.log``; Ray's own logs are under the temp
  dir while the cluster runs (``keep_temp=True`` keeps them).
* Token authentication is on: each cluster has its own random token, given to head, workers and
  drivers as ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``; ``~/.ray/auth_token`` is neither read
  (the env var wins) nor written.

Typical use::

    ok, why = mount_namespaces_allowed()
    if not ok:
        pytest.skip(why)
    with S3Server() as s3, MlflowServer(tmp_path / "mlflow", s3=s3) as ml, \\
         RayCluster(tmp_path, workers=2, hidden=[tmp_path / "launcher"], env=s3.env) as cluster:
        proc = run_driver([sys.executable, "-m", "diffcraft.cli", ...],
                          env={**cluster.env, **ml.env}, timeout=300, cwd=tmp_path / "launcher")
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import weakref
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest

MARK_VAR = "CLUSTERKIT_ID"
NODE_VAR = "CLUSTERKIT_NODE"

__all__ = [
    "ClusterKitError", "free_port", "mount_namespaces_allowed", "no_leftover_processes",
    "kill_group", "start_driver", "run_driver", "read_output", "wait_for_output",
    "S3Server", "MlflowServer", "RayCluster",
    "require_mount_namespaces", "s3_server", "mlflow_server", "mlflow_server_s3", "ray_cluster_factory",
    "shared_ray_cluster",
]


class ClusterKitError(RuntimeError):
    """A service or cluster could not be started (or stopped) as asked."""


# Safety net: whatever is still running when this Python process exits normally (including after
# an exception or Ctrl-C) is stopped. A SIGKILLed test process cannot clean up: then look for
# processes with CLUSTERKIT_ID in their environment or /tmp/ck-ray-* in their command line.
_live: "weakref.WeakSet" = weakref.WeakSet()


_scratch: Path | None = None


def _scratch_dir() -> Path:
    """A folder for this process's default log files, removed when the process exits."""
    global _scratch
    if _scratch is None:
        _scratch = Path(tempfile.mkdtemp(prefix=f"ck-scratch-{os.getpid()}-"))
    return _scratch


@atexit.register
def _stop_all_live() -> None:
    for obj in list(_live):
        try:
            obj.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    if _scratch is not None:
        shutil.rmtree(_scratch, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# ports, mount namespaces
# --------------------------------------------------------------------------------------------

_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (bound to port 0 by the kernel, then released).

    Never hands out the same port twice within this process.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise ClusterKitError("could not find a free port")


def _port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def mount_namespaces_allowed() -> tuple[bool, str]:
    """Whether ``unshare -m --propagation private`` + ``mount -t tmpfs`` works here.

    Returns ``(True, "")`` or ``(False, reason)``. Checks that the tmpfs really hides a file that
    exists outside, and that what is written inside does not show outside.
    """
    if sys.platform != "linux":
        return False, f"mount namespaces need Linux (this is {sys.platform})"
    unshare = shutil.which("unshare")
    if unshare is None:
        return False, "the `unshare` command (util-linux) is not installed"
    probe = Path(tempfile.mkdtemp(prefix="ck-ns-"))
    try:
        (probe / "outside").write_text("x")
        script = 'mount -t tmpfs tmpfs "$1" && test ! -e "$1/outside" && touch "$1/inside"'
        try:
            r = subprocess.run([unshare, "-m", "--propagation", "private", "sh", "-c", script, "sh", str(probe)],
                               capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"unshare -m failed: {e}"
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip() or f"exit code {r.returncode}"
            return False, f"unshare -m --propagation private + mount -t tmpfs failed (needs root/CAP_SYS_ADMIN): {why}"
        if (probe / "inside").exists() or not (probe / "outside").exists():
            return False, "a tmpfs mounted in a private mount namespace was visible outside it"
        return True, ""
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgid, sid, start time in clock ticks since boot) of a pid, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[2]), int(fields[3]), int(fields[19])


def _now_ticks() -> int:
    """Now, in the unit of /proc/<pid>/stat start times (clock ticks since boot), rounded up."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")) + 1


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _environ(pid: int) -> bytes:
    try:
        return b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ps_line(pid: int) -> str:
    st = _proc_stat(pid)
    if st is None:
        return f"{pid} (gone)"
    return f"{pid} pgid={st[1]} sid={st[2]} {st[0]} {_cmdline(pid)[:300]}"


def _find(marker: str | None = None, sids: Iterable[int] | Mapping[int, int | None] = (),
          env_var: str | None = None) -> list[int]:
    """Live (non-zombie) pids other than this process that are in one of the sessions ``sids``,
    or whose command line contains ``marker``, or whose environment holds ``<env_var>=<marker>``
    (any occurrence of ``marker`` when env_var is None).

    ``sids`` may map a session id to the time (clock ticks) its leader was reaped: after that the
    pid can be reused, so only processes started before then count as members."""
    me = os.getpid()
    sids = dict(sids) if isinstance(sids, Mapping) else dict.fromkeys(sids)
    needle_env = None
    if marker:
        needle_env = (f"\0{env_var}={marker}\0" if env_var else marker).encode()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        st = _proc_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        if st[2] in sids and (sids[st[2]] is None or st[3] <= sids[st[2]]):
            found.append(pid)
        elif marker and (marker in _cmdline(pid) or needle_env in _environ(pid)):
            found.append(pid)
    return found


def no_leftover_processes(marker) -> list[str]:
    """``ps``-like lines of the live (non-zombie) processes that contain ``marker`` in their
    command line or environment. Empty means nothing is left.

    ``marker`` may also be a :class:`RayCluster`, :class:`S3Server` or :class:`MlflowServer`: then
    it also counts processes in the sessions it started. That matters for Ray: task/actor workers
    rename themselves (``ray::IDLE``), which also overwrites the environment that ``/proc`` shows,
    so only their session id still ties them to their node."""
    if hasattr(marker, "processes"):
        return [_ps_line(pid) for pid in marker.processes()]
    return [_ps_line(pid) for pid in _find(str(marker))]


def _group_pids(pgid: int) -> list[int]:
    out = []
    for pid in _pids():
        st = _proc_stat(pid)
        if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def _exited(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has exited, *without* reaping it (``waitid(WNOWAIT)``): as long as the
    leader is not reaped its pid (= its process group and session id) cannot be reused."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        proc.poll()
        return True


def kill_group(proc: subprocess.Popen | int, sig: int = signal.SIGKILL, session: bool | None = None) -> None:
    """Send ``sig`` to the whole process group of ``proc`` (a Popen started with
    ``start_new_session=True``, or a pgid). A group that is already gone is fine.

    ``session`` (default: only for SIGKILL, and only for a Popen) also sends it, by pid, to the
    rest of the Popen's session: e.g. the task workers of a local Ray that the command started,
    which leave its process group. SIGINT/SIGTERM go to the group only, as from a terminal.

    Call it before ``proc.wait()``/``poll()`` has reaped the leader: after that the pid may
    belong to someone else, so a reaped Popen is left alone."""
    if isinstance(proc, subprocess.Popen):
        if proc.returncode is not None:
            return
        pgid = proc.pid
    else:
        pgid = int(proc)
        session = False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if session if session is not None else sig == signal.SIGKILL:
        for pid in _find(None, [pgid]):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _terminate(popens: Sequence[subprocess.Popen | None], grace: float, marker: str | None = None,
               env_var: str | None = None, timeout: float = 15.0) -> list[int]:
    """Stop what ``popens`` started (each with ``start_new_session=True``):

    1. SIGTERM each process group, wait up to ``grace`` s for the groups to empty
       (``grace <= 0``: no SIGTERM at all);
    2. SIGKILL each group;
    3. SIGKILL, by pid, every process still in one of their *sessions* (Ray workers leave the
       group but not the session) or tagged with ``marker`` (see :func:`_find`), until none is
       left or ``timeout``;
    4. only then reap the leaders: while a leader is an unreaped zombie its pid, and so the
       session id, cannot be reused by an unrelated process.

    Returns the pids still alive before reaping (normally none).
    """
    popens = [p for p in popens if p is not None]
    # an already reaped leader's pid may be reused from now on: only older processes count
    sids = {p.pid: (_now_ticks() if p.returncode is not None else None) for p in popens}
    live = [p for p in popens if p.returncode is None]
    if grace > 0:
        for p in live:
            kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_pids(p.pid) for p in live):
            time.sleep(0.1)
    for p in live:
        kill_group(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        pids = _find(marker, sids, env_var)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.1)
    for p in live:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return pids


def _tail(path: Path | str | None, n: int = 40) -> str:
    if path is None:
        return ""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])


def _merged_env(env: Mapping[str, str] | None, inherit_env: bool) -> dict[str, str]:
    base = dict(os.environ) if inherit_env else {}
    base.update({k: str(v) for k, v in (env or {}).items()})
    return base


def start_driver(args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 *, inherit_env: bool = True, log_path: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start a command in its own process group, stdout+stderr going to a log file.

    ``env`` is laid over ``os.environ`` (``inherit_env=False``: used alone). The returned Popen has
    ``.log_path``; read it with :func:`read_output` / :func:`wait_for_output`; stop it with
    :func:`kill_group` (``kill_group(p, signal.SIGKILL)``) and then ``p.wait()``.
    """
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="driver-", suffix=".log", dir=_scratch_dir())
        os.close(fd)
    log_path = Path(log_path)
    with open(log_path, "ab") as log:
        p = subprocess.Popen(list(map(str, args)), cwd=cwd, env=_merged_env(env, inherit_env),
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    p.log_path = log_path  # type: ignore[attr-defined]
    return p


def read_output(proc: subprocess.Popen) -> str:
    """Everything a :func:`start_driver` process has written so far."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_for_output(proc: subprocess.Popen, pattern: str, timeout: float = 120.0) -> re.Match:
    """Wait until the output of a :func:`start_driver` process matches the regex ``pattern``.
    Raises ClusterKitError (with the output's tail) if the process exits first or on timeout."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while True:
        text = read_output(proc)
        m = rx.search(text)
        if m:
            return m
        if _exited(proc):
            raise ClusterKitError(f"driver exited before printing {pattern!r}:\n{text[-4000:]}")
        if time.monotonic() > deadline:
            raise ClusterKitError(f"driver did not print {pattern!r} within {timeout}s:\n{text[-4000:]}")
        time.sleep(0.2)


def run_driver(args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300.0,
               cwd: str | os.PathLike | None = None, *, inherit_env: bool = True,
               check: bool = False) -> subprocess.CompletedProcess:
    """Run a command to completion in its own process group (like ``subprocess.run(...,
    capture_output=True, text=True)``).

    ``env`` is laid over ``os.environ`` (``inherit_env=False``: used alone). Output goes through
    temporary files (not pipes), so grandchildren that keep the descriptors open cannot hang it.
    On timeout the whole group gets SIGKILL and ``subprocess.TimeoutExpired`` (with ``.output``
    and ``.stderr``) is raised. When the command ends, whatever is left of its group is killed.
    ``check=True`` raises ``subprocess.CalledProcessError`` on a non-zero exit.
    """
    args = list(map(str, args))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(args, cwd=cwd, env=_merged_env(env, inherit_env), stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not _exited(p) and time.monotonic() < deadline:
                time.sleep(0.05)
            timed_out = not _exited(p)
        finally:
            kill_group(p, signal.SIGKILL)  # the command, on timeout, or what it left behind
            p.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if timed_out:
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
    cp = subprocess.CompletedProcess(args, p.returncode, stdout, stderr)
    if check:
        cp.check_returncode()
    return cp


def _sibling_exe(name: str) -> str:
    cand = Path(sys.executable).with_name(name)
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise ClusterKitError(f"`{name}` executable not found next to {sys.executable} or on PATH")
    return found


def _http(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0,
          method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    """(status, body); HTTP error statuses are returned, connection errors raise OSError."""
    req = urllib.request.Request(url, headers=dict(headers or {}), method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _Service:
    """One long-running server process in its own process group, with a log file."""

    name = "service"

    def __init__(self, log_dir: str | os.PathLike | None, start_timeout: float):
        self.marker = f"ck-{self.name}-{secrets.token_hex(4)}"
        self.log_dir = Path(log_dir) if log_dir is not None else _scratch_dir() / self.marker
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._sessions: dict[int, int | None] = {}
        self.startup_seconds: float | None = None

    # subclasses: _command(), _env(), _ready() -> bool, host, port
    def _spawn(self, wait: bool = True) -> None:
        if self.proc is not None and not _exited(self.proc):
            raise ClusterKitError(f"{self.name} already running")
        if _port_open(self.port, self.host):
            raise ClusterKitError(f"{self.name}: port {self.port} is already in use on {self.host}")
        env = {**os.environ, **self._env(), MARK_VAR: self.marker}
        self._t0 = time.monotonic()
        self.startup_seconds = None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._sessions[self.proc.pid] = None
        _live.add(self)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float | None = None) -> "_Service":
        """Wait until the server answers (after ``start(wait=False)``); idempotent. On failure
        the server is stopped and ClusterKitError carries its log's tail."""
        if self.startup_seconds is not None:
            return self
        if self.proc is None:
            raise ClusterKitError(f"{self.name} was not started")
        deadline = self._t0 + (self.start_timeout if timeout is None else timeout)
        while True:
            if _exited(self.proc):
                self._kill()
                code = self.proc.returncode
                raise ClusterKitError(f"{self.name} exited with code {code} while starting "
                                      f"({' '.join(self._command())}):\n{_tail(self.log_path)}")
            if self._ready():
                break
            if time.monotonic() > deadline:
                self._kill()
                raise ClusterKitError(f"{self.name} not ready within {self.start_timeout}s:\n{_tail(self.log_path)}")
            time.sleep(0.1)
        self.startup_seconds = time.monotonic() - self._t0
        return self

    def _kill(self, grace: float = 2.0) -> list[str]:
        left = _terminate([self.proc], grace=grace, marker=self.marker, env_var=MARK_VAR)
        if self.proc is not None:
            self._sessions[self.proc.pid] = _now_ticks()
        return [_ps_line(pid) for pid in left]

    def processes(self) -> list[int]:
        """Live pids of this server (its sessions, or tagged with its marker)."""
        return _find(self.marker, self._sessions, MARK_VAR)

    def start(self, wait: bool = True):
        """Start the server; with ``wait=False`` return at once (call :meth:`wait_ready` later)."""
        self._spawn(wait)
        return self

    def stop(self) -> list[str]:
        """Stop the process group (SIGTERM, then SIGKILL). Returns leftover ps lines (normally [])."""
        left = self._kill()
        self.proc = None
        _live.discard(self)
        return left

    @property
    def running(self) -> bool:
        return self.proc is not None and not _exited(self.proc)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class S3Server(_Service):
    """A moto S3 server: ``python -m moto.server -H 127.0.0.1 -p PORT`` in its own process group.

    ``.endpoint`` = ``http://127.0.0.1:PORT``; ``.env`` holds ``AWS_ENDPOINT_URL``,
    ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
    ``AWS_DEFAULT_REGION`` (boto3 >= 1.28 and pyarrow's S3 filesystem honour these).
    """

    name = "s3"

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_dir: str | os.PathLike | None = None,
                 *, region: str = "us-east-1", access_key: str = "testing", secret_key: str = "testing",
                 start_timeout: float = 60.0):
        super().__init__(log_dir, start_timeout)
        self.host, self.port = host, port or free_port(host)
        self.region, self.access_key, self.secret_key = region, access_key, secret_key

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def _env(self) -> dict[str, str]:
        return {}

    def _ready(self) -> bool:
        try:
            _http(self.endpoint + "/", timeout=1.0)
            return True
        except OSError:
            return False

    def client(self):
        """A boto3 S3 client for this server (explicit endpoint and keys, ignores the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def create_bucket(self, name: str) -> str:
        """Create a bucket (no error if it exists). Returns ``s3://name``."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def pyarrow_fs(self):
        """A ``pyarrow.fs.S3FileSystem`` for this server (for Ray's ``storage_filesystem``)."""
        from pyarrow import fs

        return fs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region=self.region,
                               access_key=self.access_key, secret_key=self.secret_key)

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        _http(self.endpoint + "/moto-api/reset", method="POST", data=b"")


class MlflowServer(_Service):
    """``mlflow server`` (SQLite backend, ``--serve-artifacts``, 1 worker) in its own process group.

    Artifacts go to ``<root>/artifacts`` or, given an :class:`S3Server`, to
    ``s3://<bucket>/<prefix>`` (the bucket is created; the server gets the S3 env, clients need
    none because artifacts are proxied through ``mlflow-artifacts:``). ``.uri`` is the tracking URI,
    ``.env`` is ``{"MLFLOW_TRACKING_URI": uri}``. ``restart()`` keeps the database and the port.

    The server runs with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: MLflow 3.17 otherwise starts a
    job runner with 7 huey consumer processes (and a /dev/shm dir) that tests do not need.
    """

    name = "mlflow"

    def __init__(self, root: str | os.PathLike, s3: S3Server | None = None, *, bucket: str = "mlflow",
                 prefix: str = "artifacts", artifacts_destination: str | None = None, port: int | None = None,
                 host: str = "127.0.0.1", extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 start_timeout: float = 180.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        super().__init__(self.root, start_timeout)
        self.host, self.port = host, port or free_port(host)
        self.s3, self.bucket, self.prefix = s3, bucket, prefix.strip("/")
        self.extra_args, self.extra_env = list(extra_args), dict(env or {})
        if artifacts_destination is not None:
            self.artifacts_destination = artifacts_destination
        elif s3 is not None:
            self.artifacts_destination = f"s3://{bucket}/{self.prefix}"
        else:
            self.artifacts_destination = str(self.root / "artifacts")
        self.db_path = self.root / "mlflow.db"
        self.restart_seconds: float | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri}

    def _command(self) -> list[str]:
        return [_sibling_exe("mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db_path}",
                "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
                "--host", self.host, "--port", str(self.port), "--workers", "1", *self.extra_args]

    def _env(self) -> dict[str, str]:
        tmp = self.root / "tmp"  # MLflow leaves db_init_lock-* files in the temp dir
        tmp.mkdir(exist_ok=True)
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "TMPDIR": str(tmp)}
        if self.s3 is not None:
            env.update(self.s3.env)
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3.endpoint
        env.update(self.extra_env)
        return env

    def _ready(self) -> bool:
        try:
            return _http(self.uri + "/health", timeout=2.0)[0] == 200
        except OSError:
            return False

    def start(self, wait: bool = True):
        """Start the server; with ``wait=False`` return at once (call :meth:`wait_ready` later,
        e.g. after starting a Ray cluster meanwhile)."""
        if self.s3 is not None and self.artifacts_destination.startswith("s3://"):
            self.s3.create_bucket(self.artifacts_destination[5:].split("/", 1)[0])
        self._spawn(wait)
        return self

    def restart(self) -> "MlflowServer":
        """Stop and start again: same database, same artifact store, same port."""
        t0 = time.monotonic()
        self.stop()
        deadline = time.monotonic() + 30
        while _port_open(self.port, self.host) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._spawn()
        self.restart_seconds = time.monotonic() - t0
        return self

    def client(self):
        """An ``mlflow.MlflowClient`` for this server (imports mlflow in the calling process)."""
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------

class _Node:
    def __init__(self, name: str, index: int | None, resources: dict, cpus: float, hidden: list[Path],
                 temp_dir: Path, log_path: Path):
        self.name, self.index, self.resources, self.cpus = name, index, resources, cpus
        self.hidden, self.temp_dir, self.log_path = hidden, temp_dir, log_path
        self.proc: subprocess.Popen | None = None
        self.node_id: str | None = None
        self.killed = False


class RayCluster:
    """A Ray cluster of real ``ray start`` processes on this machine: one head node and
    ``workers`` worker nodes, each worker in its own mount namespace with a private tmpfs over
    every path in ``hidden``.

    * head: ``ray start --head --block`` with the dashboard (Jobs API) on ``127.0.0.1:<free port>``,
      custom resource ``{"node_head": 1}``.
    * worker i: ``unshare -m --propagation private bash -c "mount -t tmpfs tmpfs H... && exec ray start
      --address=127.0.0.1:P --block ..."``, custom resource ``{"node_w<i>": 1}``. Pin work with
      e.g. ``f.options(resources={"node_w0": 0.01})``.
    * ``env`` is given to every node (so tasks see it) *and* is part of ``.env`` for drivers.
    * Nodes see the host's IP (Ray replaces 127.0.0.1 by it); all nodes share it.

    ``fast_failure_detection`` sets ``RAY_health_check_*`` on the head so a killed node is marked
    DEAD in ~3 s (with Ray's defaults it took 14 s here).
    """

    def __init__(self, tmp_path: str | os.PathLike, head_cpus: float = 1, workers: int = 2, worker_cpus: float = 1,
                 hidden: Iterable[str | os.PathLike] = (), env: Mapping[str, str] | None = None, *,
                 object_store_memory: int = 300_000_000, head_resources: Mapping[str, float] | None = None,
                 worker_resources: Mapping[str, float] | None = None, port: int | None = None,
                 dashboard_port: int | None = None, start_timeout: float = 120.0,
                 fast_failure_detection: bool = True, grace: float = 1.0, keep_temp: bool = False):
        self.id = secrets.token_hex(4)
        self.marker = f"ck-ray-{self.id}"
        self.tmp_path = Path(tmp_path)
        self.head_cpus, self.n_workers, self.worker_cpus = head_cpus, workers, worker_cpus
        self.hidden = [Path(h).absolute() for h in hidden]
        self.user_env = {k: str(v) for k, v in (env or {}).items()}
        self.object_store_memory = object_store_memory
        self.head_resources = dict(head_resources or {})
        self.worker_resources = dict(worker_resources or {})
        self.port = port or free_port()
        self.dashboard_port = dashboard_port or free_port()
        self.start_timeout, self.fast_failure_detection = start_timeout, fast_failure_detection
        self.grace, self.keep_temp = grace, keep_temp
        self.token = secrets.token_hex(32)
        # short root for --temp-dir: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store)
        # must fit in 107 bytes
        self.temp_root = Path(f"/tmp/{self.marker}")
        self.log_dir = self.tmp_path / f"clusterkit-{self.id}"
        self.head: _Node | None = None
        self.workers: list[_Node] = []
        self.startup_seconds: float | None = None
        self.leftovers: list[str] = []
        self._sessions: dict[int, int | None] = {}
        self._started = False

    # ---- addresses and environments ------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def env(self) -> dict[str, str]:
        """Environment for driver subprocesses: lay it over os.environ (run_driver does)."""
        return {**self.user_env, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token}

    def _node_env(self, node: _Node) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(k, None)
        env.update(self.user_env)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                    MARK_VAR: self.marker, NODE_VAR: f"{self.marker}-{node.name}"})
        if node.index is None and self.fast_failure_detection:
            # the GCS checks each raylet every second; a killed raylet refuses the connection at
            # once, so 3 failures mark it DEAD in ~3-4 s, while a live raylet slowed down by a
            # busy machine still gets Ray's default 10 s per check before one counts as failed
            env.setdefault("RAY_health_check_initial_delay_ms", "1000")
            env.setdefault("RAY_health_check_period_ms", "1000")
            env.setdefault("RAY_health_check_timeout_ms", "10000")
            env.setdefault("RAY_health_check_failure_threshold", "3")
        return env

    # ---- start ---------------------------------------------------------------------------
    def _head_command(self, node: _Node) -> list[str]:
        return [_sibling_exe("ray"), "start", "--head", "--block", f"--port={self.port}",
                f"--num-cpus={self.head_cpus}", f"--object-store-memory={self.object_store_memory}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                "--disable-usage-stats", f"--temp-dir={node.temp_dir}",
                f"--resources={json.dumps(node.resources)}"]

    def _worker_command(self, node: _Node) -> list[str]:
        ray_cmd = [_sibling_exe("ray"), "start", f"--address={self.address}", "--block",
                   f"--num-cpus={node.cpus}", f"--object-store-memory={self.object_store_memory}",
                   f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
                   f"--temp-dir={node.temp_dir}", f"--resources={json.dumps(node.resources)}"]
        if not node.hidden:
            return ray_cmd
        steps = [f"mount -t tmpfs -o size=1g tmpfs {shlex.quote(str(h))}" for h in node.hidden]
        steps.append(f"mkdir -p {shlex.quote(str(node.temp_dir))}")
        steps.append("exec " + shlex.join(ray_cmd))
        return [shutil.which("unshare") or "unshare", "-m", "--propagation", "private",
                "bash", "-c", " && ".join(steps)]

    def _spawn(self, node: _Node, cmd: list[str]) -> None:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen(cmd, env=self._node_env(node), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._sessions[node.proc.pid] = None

    def _new_worker(self, cpus: float | None, resources: Mapping[str, float] | None,
                    hidden: Iterable[str | os.PathLike] | None) -> _Node:
        i = len(self.workers)
        name = f"w{i}"
        res = {f"node_{name}": 1, **self.worker_resources, **dict(resources or {})}
        hid = self.hidden if hidden is None else [Path(h).absolute() for h in hidden]
        for h in hid:
            if h.exists() and not h.is_dir():
                raise ClusterKitError(f"hidden path {h} is not a directory (a tmpfs can only cover a directory)")
            h.mkdir(parents=True, exist_ok=True)
        node = _Node(name, i, res, self.worker_cpus if cpus is None else cpus, hid,
                     self.temp_root / name, self.log_dir / f"{name}.log")
        self.workers.append(node)
        return node

    def start(self) -> "RayCluster":
        if self._started:
            raise ClusterKitError("cluster already started")
        self._started = True
        _live.add(self)
        t0 = time.monotonic()
        try:
            if self.hidden and self.n_workers:
                ok, why = mount_namespaces_allowed()
                if not ok:
                    raise ClusterKitError(f"cannot hide folders from worker nodes: {why}")
            for p in (self.port, self.dashboard_port):
                if _port_open(p):
                    raise ClusterKitError(f"port {p} is already in use on 127.0.0.1")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.temp_root.mkdir(parents=True, exist_ok=True)
            self.head = _Node("head", None, {"node_head": 1, **self.head_resources}, self.head_cpus, [],
                              self.temp_root / "head", self.log_dir / "head.log")
            self._spawn(self.head, self._head_command(self.head))
            # the GCS must answer before workers try to join
            deadline = t0 + self.start_timeout
            while not _port_open(self.port):
                self._check_alive(self.head, "starting", scan_logs=True)
                if time.monotonic() > deadline:
                    raise ClusterKitError(f"Ray head GCS port {self.port} not open within {self.start_timeout}s")
                time.sleep(0.1)
            for _ in range(self.n_workers):
                node = self._new_worker(None, None, None)
                self._spawn(node, self._worker_command(node))
            self.wait_nodes(1 + self.n_workers, timeout=max(1.0, deadline - time.monotonic()),
                            _scan=[self.head, *self.workers])
            self.startup_seconds = time.monotonic() - t0
        except BaseException as e:
            logs = self._logs_summary()
            self.stop()
            if isinstance(e, ClusterKitError):
                raise ClusterKitError(f"{e}\n{logs}") from None
            raise
        return self

    _FATAL = re.compile(r"Check failed|Failed to bind to .* already occupied|Failed to start the dashboard"
                        r"|Address already in use|AuthenticationError|InvalidAuthToken")

    def _startup_problem(self, node: _Node) -> str | None:
        """A fatal line from the node's own output or its GCS/raylet logs, if any: Ray keeps
        retrying for a minute after a port clash, and runs on without a dashboard whose port
        is taken, so waiting alone would only time out."""
        files = [node.log_path]
        for name in ("gcs_server", "raylet"):
            files += node.temp_dir.glob(f"session_*/logs/{name}.out")
            files += node.temp_dir.glob(f"session_*/logs/{name}.err")
        for f in files:
            try:
                text = Path(f).read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if self._FATAL.search(line):
                    return f"{f.name}: {line.strip()[:600]}"
        return None

    def _check_alive(self, node: _Node, doing: str, scan_logs: bool = False) -> None:
        if node.proc is None or node.killed:
            return
        problem = self._startup_problem(node) if scan_logs else None
        if problem:
            raise ClusterKitError(f"Ray node {node.name} failed while {doing}: {problem}")
        if _exited(node.proc):
            raise ClusterKitError(f"Ray node {node.name} exited while {doing} "
                                  f"({self._startup_problem(node) or 'see ' + str(node.log_path)})")

    def _logs_summary(self, n: int = 25) -> str:
        parts = []
        for node in [self.head, *self.workers]:
            if node is not None:
                parts.append(f"--- {node.name} ({node.log_path}) ---\n{_tail(node.log_path, n)}")
        return "\n".join(parts)

    # ---- state ---------------------------------------------------------------------------
    def nodes(self, timeout: float = 10.0) -> list[dict]:
        """All nodes from the State API (``/api/v0/nodes``): dicts with node_id, state
        ("ALIVE"/"DEAD"), is_head_node, resources_total, ... Raises OSError if the dashboard does
        not answer."""
        status, body = _http(f"{self.dashboard}/api/v0/nodes?detail=1&limit=1000", self.auth_headers, timeout=timeout)
        if status != 200:
            raise OSError(f"dashboard answered {status}: {body[:300]!r}")
        data = json.loads(body)
        return data["data"]["result"]["result"]

    def wait_nodes(self, n: int, timeout: float = 60.0, *, _scan: Iterable[_Node] = ()) -> list[dict]:
        """Wait until at least ``n`` nodes are ALIVE; returns the alive nodes. Also records each
        node's Ray node id (by its ``node_<name>`` resource)."""
        deadline = time.monotonic() + timeout
        last = "dashboard not answering yet"
        scan = list(_scan)
        while True:
            for node in [self.head, *self.workers]:
                if node is not None:
                    self._check_alive(node, f"waiting for {n} nodes", scan_logs=node in scan)
            try:
                alive = [x for x in self.nodes(timeout=5) if x.get("state") == "ALIVE"]
                self._record_ids(alive)
                if len(alive) >= n:
                    return alive
                last = f"{len(alive)} of {n} nodes alive"
            except (OSError, ValueError, KeyError) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise ClusterKitError(f"Ray cluster: {last} after {timeout:.0f}s")
            time.sleep(0.25)

    def _record_ids(self, alive: list[dict]) -> None:
        for node in [self.head, *self.workers]:
            if node is None or node.killed:
                continue
            for x in alive:
                if f"node_{node.name}" in (x.get("resources_total") or {}):
                    node.node_id = x["node_id"]

    def node_id(self, name: str) -> str | None:
        """Ray node id of "head" or "w<i>" (known once it has joined)."""
        for node in [self.head, *self.workers]:
            if node is not None and node.name == name:
                return node.node_id
        raise KeyError(name)

    # ---- faults and growth ---------------------------------------------------------------
    def kill_worker(self, i: int, timeout: float = 60.0) -> float:
        """SIGKILL worker node ``i`` like a machine crash: its whole process group plus the Ray
        workers it started (they leave the group), then wait until Ray marks the node DEAD.
        Returns the seconds from the kill until Ray reported it dead."""
        node = self.workers[i]
        if node.proc is None:
            raise ClusterKitError(f"worker {i} was never started")
        node_id = node.node_id
        t0 = time.monotonic()
        node.killed = True
        _terminate([node.proc], grace=0, marker=f"{self.marker}-{node.name}", env_var=NODE_VAR, timeout=10)
        self._sessions[node.proc.pid] = _now_ticks()
        if node_id is None:
            raise ClusterKitError(f"worker {node.name} was killed, but it had never joined the cluster")
        deadline = t0 + timeout
        while True:
            try:
                states = {x["node_id"]: x.get("state") for x in self.nodes(timeout=5)}
                if node_id is not None and states.get(node_id) == "DEAD":
                    return time.monotonic() - t0
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise ClusterKitError(f"Ray did not mark worker {node.name} ({node_id}) dead within {timeout}s")
            time.sleep(0.25)

    def add_worker(self, cpus: float | None = None, resources: Mapping[str, float] | None = None,
                   hidden: Iterable[str | os.PathLike] | None = None, wait: bool = True,
                   timeout: float = 90.0) -> int:
        """Start one more worker node (named ``w<len(workers)>``, resource ``node_w<i>``; hidden
        paths default to the cluster's). Returns its index; with ``wait`` it has joined."""
        if self.head is None:
            raise ClusterKitError("cluster not started")
        if self.hidden if hidden is None else list(hidden):
            ok, why = mount_namespaces_allowed()
            if not ok:
                raise ClusterKitError(f"cannot hide folders from worker nodes: {why}")
        node = self._new_worker(cpus, resources, hidden)
        alive_before = sum(1 for n in [self.head, *self.workers] if n.proc is not None and not n.killed)
        self._spawn(node, self._worker_command(node))
        if wait:
            try:
                self.wait_nodes(alive_before + 1, timeout=timeout, _scan=[node])
            except ClusterKitError as e:
                raise ClusterKitError(f"{e}\n--- {node.name} ---\n{_tail(node.log_path)}") from None
        return node.index

    # ---- stop ----------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Stop every node (idempotent): SIGTERM each process group, SIGKILL after ``grace`` s,
        then SIGKILL (by pid) any process still in one of the nodes' sessions (Ray task/actor
        workers leave the node's process group, not its session) or tagged with this cluster's
        marker. Removes the temp dirs. Returns leftover ps lines (normally []); also kept in
        ``.leftovers``."""
        popens = [n.proc for n in [self.head, *self.workers] if n is not None and n.proc is not None]
        left = _terminate(popens, grace=self.grace, marker=self.marker, env_var=MARK_VAR, timeout=15)
        now = _now_ticks()
        for p in popens:
            self._sessions[p.pid] = self._sessions.get(p.pid) or now
        self.leftovers = [_ps_line(pid) for pid in left]
        if self.leftovers:
            warnings.warn(f"RayCluster {self.marker}: processes survived stop():\n" + "\n".join(self.leftovers))
        if not self.keep_temp:
            shutil.rmtree(self.temp_root, ignore_errors=True)
        _live.discard(self)
        return self.leftovers

    def processes(self) -> list[int]:
        """Live pids of this cluster: in the sessions of its nodes, or tagged with its marker
        (``CLUSTERKIT_ID`` in the environment, or the temp dir in the command line)."""
        return _find(self.marker, self._sessions, MARK_VAR)

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module or conftest: `from clusterkit import ...`)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def require_mount_namespaces() -> None:
    """Skip the test (with the reason) when private mount namespaces are not available."""
    ok, why = mount_namespaces_allowed()
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session."""
    with S3Server() as s3:
        yield s3


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow server for the session (SQLite, local artifact folder, proxied artifacts)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server_s3(tmp_path_factory, s3_server):
    """One MLflow server for the session whose artifacts live in the session's S3 server."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow_s3"), s3=s3_server) as server:
        yield server


@pytest.fixture
def ray_cluster_factory(tmp_path, require_mount_namespaces):
    """``make(**RayCluster kwargs) -> started RayCluster`` (tmp_path defaults to the test's);
    every cluster made is stopped at teardown, and the test fails if a process of it survives."""
    made: list[RayCluster] = []

    def make(**kwargs) -> RayCluster:
        cluster = RayCluster(kwargs.pop("tmp_path", tmp_path), **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    leftovers = [line for c in reversed(made) for line in c.stop()]
    assert not leftovers, "processes of a test cluster survived its stop():\n" + "\n".join(leftovers)


@pytest.fixture(scope="session")
def shared_ray_cluster(tmp_path_factory, s3_server):
    """One head + 2 worker cluster for the whole session (start-up is paid once), with the
    session's S3 server in every node's environment. ``.launcher`` is a folder that only the head
    (and the test process) can see: use it as the launcher's working folder. Tests sharing it
    must not kill its workers (use ``ray_cluster_factory`` for that)."""
    ok, why = mount_namespaces_allowed()
    if not ok:
        pytest.skip(why)
    launcher = tmp_path_factory.mktemp("launcher")
    cluster = RayCluster(tmp_path_factory.mktemp("ray"), head_cpus=1, workers=2, worker_cpus=1,
                         hidden=[launcher], env=s3_server.env)
    cluster.launcher = launcher
    with cluster:
        yield cluster
    assert not cluster.leftovers, "processes of the shared cluster survived:\n" + "\n".join(cluster.leftovers)
