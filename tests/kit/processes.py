"""Processes the kit starts and how they stop, free ports, the mount-namespace probe, and drivers
(commands run like a launcher machine would run them) with their output in a log file.

Rules kept here, because other people run Ray on the same machine:

* Never ``ray stop``. Every process tree is started in its own process group
  (``start_new_session=True``) and stopped with ``killpg`` of that group.
* Ray task/actor worker processes leave the node's process group (each calls ``setpgid``), and
  rename themselves ``ray::IDLE`` / ``ray::<task>``, which also overwrites what
  ``/proc/<pid>/environ`` shows. They do stay in the node's *session* (every leader is started
  with ``start_new_session=True``, so its pid is the session id). Stopping therefore SIGKILLs the
  group, then SIGKILLs by pid whatever is left in the session, or carries ``CLUSTERKIT_ID=<marker>``
  in its environment (set on every process the kit starts), or has the marker in its command line;
  the leaders are reaped only after that, so their pids (= session ids) cannot have been reused
  meanwhile.
* Whatever is still running when the Python process exits normally (including after an exception
  or Ctrl-C) is stopped by an ``atexit`` hook. A SIGKILLed test process cannot clean up: then look
  for processes with ``CLUSTERKIT_ID`` in their environment or ``/tmp/ck-ray-*`` in their command line.
"""
from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Iterable, Mapping, Sequence

MARK_VAR = "CLUSTERKIT_ID"
NODE_VAR = "CLUSTERKIT_NODE"


class ClusterKitError(RuntimeError):
    """A service or cluster could not be started (or stopped) as asked."""


_live: "weakref.WeakSet" = weakref.WeakSet()  # what the atexit hook stops (see the module docstring)


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

