"""Real multi-node Ray clusters on one machine: a head node and worker nodes of ``ray start``, each
worker in its own mount namespace (``unshare -m --propagation private``) with a private, empty
tmpfs over every hidden path, so it cannot see what the launcher keeps there: what a second
machine without a shared filesystem would be like.

* Each node gets its own ``--temp-dir`` ``/tmp/ck-ray-<id>/<node>`` (short, because Ray's unix
  socket paths must stay under 107 bytes), so ``ray_current_cluster`` and the session dirs never
  touch ``/tmp/ray``, and its own scratch folder below it (``DIFFCRAFT_SCRATCH``, where the node
  stages feature caches), never the user's home; ``stop()`` removes them. Every port is chosen
  free; the dashboard agent's and the Ray client server's fixed default ports are replaced.
  Node output goes to ``<tmp_path>/clusterkit-<id>/<node>.log``; ``keep_temp=True`` keeps Ray's logs.
* SIGTERM alone does not stop a Ray node (15 s after SIGTERM its leader, gcs_server, log monitor
  and idle workers were still running): ``stop()`` gives SIGTERM ``grace`` seconds (default 1),
  then SIGKILLs the node's group and session (``tests.kit.processes``).
* Token authentication is on: each cluster has its own random token, given to head, workers and
  drivers as ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``; ``~/.ray/auth_token`` is neither read
  (the env var wins) nor written.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping

from tests.kit.processes import (MARK_VAR, NODE_VAR, ClusterKitError, _exited, _find, _http, _live, _now_ticks,
                                 _port_open, _ps_line, _sibling_exe, _tail, _terminate, free_port,
                                 mount_namespaces_allowed)

SCRATCH_VAR = "DIFFCRAFT_SCRATCH"  # where diffcraft stages feature caches on a node


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
        """Environment for driver subprocesses: lay it over os.environ (run_driver does). Drivers
        stage caches into the launcher's own scratch folder, never the user's home."""
        return {SCRATCH_VAR: str(self.scratch("launcher")), **self.user_env, "RAY_ADDRESS": self.address,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def scratch(self, name: str) -> Path:
        """The scratch folder (``DIFFCRAFT_SCRATCH``) of node ``name`` ("head", "w<i>"), or of the
        drivers ("launcher"): below the cluster's temp root, removed by ``stop()``."""
        return self.temp_root / name / "scratch"

    def _node_env(self, node: _Node) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(k, None)
        env[SCRATCH_VAR] = str(self.scratch(node.name))  # its own, so per-node cache staging is what runs
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
