#!/usr/bin/env python3
"""Back up and restore the team server's PostgreSQL databases (MLflow tracking, MLflow auth, Optuna).

    python backup.py dump DEST [--keep N]          # pg_dump -Fc of each database into DEST
    python backup.py restore DUMP DATABASE_URI     # pg_restore a dump into a database (replaces its objects)
    python backup.py list DEST

DEST is a folder or s3://bucket/prefix (AWS_ENDPOINT_URL_S3 for MinIO; keys or instance identity).
Each dump is named <database>-<UTC time>[-label].dump. `--keep N` keeps the newest N dumps of each
database in DEST and deletes older ones.

The databases come from the environment, as the server has them: MLFLOW_BACKEND_STORE_URI,
MLFLOW_AUTH_DATABASE_URI and, if set, OPTUNA_STORAGE (each a postgresql:// URI). Passwords are
handed to pg_dump / pg_restore through PGPASSWORD, never on a command line.

The artifacts are not in these dumps: they live in the bucket (turn on bucket versioning or
replication for them).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from serve import drop_empty_settings  # serve.py sits beside this script (in the image: /opt/mlflow)

DUMP_NAME = re.compile(r"^(?P<db>[A-Za-z0-9_.-]+?)-(?P<stamp>\d{8}T\d{6}(?:\.\d{6})?Z)(?:-(?P<label>[A-Za-z0-9_-]+))?\.dump$")
URI_VARIABLES = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "OPTUNA_STORAGE")


class BackupError(RuntimeError):
    """A backup or restore step failed; the message says which."""


def database_uris() -> list[str]:
    uris = [os.environ[name] for name in URI_VARIABLES if os.environ.get(name, "").strip()]
    if not uris:
        raise BackupError(f"none of {', '.join(URI_VARIABLES)} is set")
    return uris


def libpq_env(uri: str) -> dict[str, str]:
    """postgresql[+driver]://user:password@host:port/db -> PG* variables for the libpq tools."""
    parts = urlsplit(uri)
    if parts.scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise BackupError(f"not a PostgreSQL URI: {parts.scheme}://...")
    database = parts.path.lstrip("/")
    if not database:
        raise BackupError(f"no database name in {parts.scheme}://{parts.hostname}...")
    env = {"PGHOST": parts.hostname or "localhost", "PGPORT": str(parts.port or 5432), "PGDATABASE": database}
    if parts.username:
        env["PGUSER"] = unquote(parts.username)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return env


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (folder / name).exists():
                return str(folder / name)
        raise BackupError(f"`{name}` is not installed (Debian: apt-get install postgresql-client)")
    return found


def _run(cmd: list[str], uri: str) -> None:
    result = subprocess.run(cmd, env={**os.environ, **libpq_env(uri)}, capture_output=True, text=True)
    if result.returncode != 0:
        raise BackupError(f"{Path(cmd[0]).name} of {libpq_env(uri)['PGDATABASE']} failed: {result.stderr.strip()}")


def _s3(destination: str) -> tuple[object, str, str]:
    import boto3

    parts = urlsplit(destination)
    return boto3.client("s3"), parts.netloc, parts.path.strip("/")


def dump(uri: str, destination: str, label: str = "") -> str:
    """pg_dump -Fc of one database into a folder or s3:// prefix; returns where it went."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")  # two dumps in one second stay two
    name = f"{libpq_env(uri)['PGDATABASE']}-{stamp}{'-' + label if label else ''}.dump"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        _run([_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(local)], uri)
        if destination.startswith("s3://"):
            client, bucket, prefix = _s3(destination)
            key = f"{prefix}/{name}" if prefix else name
            client.upload_file(str(local), bucket, key)
            return f"s3://{bucket}/{key}"
        folder = Path(destination)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), folder / name)
        return str(folder / name)


def list_dumps(destination: str) -> list[str]:
    """Dump names in DEST, oldest first."""
    if destination.startswith("s3://"):
        client, bucket, prefix = _s3(destination)
        names = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            names += [obj["Key"].rsplit("/", 1)[-1] for obj in page.get("Contents", [])]
    else:
        folder = Path(destination)
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return sorted((n for n in names if DUMP_NAME.match(n)), key=lambda n: DUMP_NAME.match(n)["stamp"])


def prune(destination: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` dumps of each database; returns the deleted names."""
    by_db: dict[str, list[str]] = {}
    for name in list_dumps(destination):
        by_db.setdefault(DUMP_NAME.match(name)["db"], []).append(name)
    doomed = [name for names in by_db.values() for name in names[:-keep]] if keep > 0 else []
    for name in doomed:
        if destination.startswith("s3://"):
            client, bucket, prefix = _s3(destination)
            client.delete_object(Bucket=bucket, Key=f"{prefix}/{name}" if prefix else name)
        else:
            (Path(destination) / name).unlink()
    return doomed


def restore(source: str, uri: str) -> None:
    """pg_restore a dump (a file or s3:// object) into the database `uri`, replacing what it holds."""
    with tempfile.TemporaryDirectory() as tmp:
        if source.startswith("s3://"):
            parts = urlsplit(source)
            local = Path(tmp) / Path(parts.path).name
            _s3(source)[0].download_file(parts.netloc, parts.path.lstrip("/"), str(local))
        else:
            local = Path(source)
        _run([_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction",
              "--dbname", libpq_env(uri)["PGDATABASE"], str(local)], uri)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="backup.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump", help="dump every database into DEST")
    p.add_argument("destination")
    p.add_argument("--keep", type=int, default=0, help="keep the newest N dumps per database (0: keep all)")
    p = sub.add_parser("restore", help="restore one dump into a database")
    p.add_argument("dump")
    p.add_argument("database_uri")
    p = sub.add_parser("list", help="list the dumps in DEST")
    p.add_argument("destination")
    args = parser.parse_args(argv)
    drop_empty_settings()
    try:
        if args.command == "dump":
            for uri in database_uris():
                print(f"dumped {dump(uri, args.destination)}", flush=True)
            for name in prune(args.destination, args.keep):
                print(f"deleted {name}", flush=True)
        elif args.command == "restore":
            restore(args.dump, args.database_uri)
            print(f"restored {args.dump} into {libpq_env(args.database_uri)['PGDATABASE']}")
        else:
            print("\n".join(list_dumps(args.destination)))
    except BackupError as err:
        print(f"backup.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
