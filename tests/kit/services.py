"""Servers the kit starts: a moto S3 API server and an MLflow tracking server, each one process
group with its own log file, stopped (and checked for leftovers) like every process of the kit."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from tests.kit.processes import (MARK_VAR, ClusterKitError, _exited, _find, _http, _live, _now_ticks, _port_open,
                                 _ps_line, _scratch_dir, _sibling_exe, _tail, _terminate, free_port)


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
