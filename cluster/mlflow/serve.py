#!/usr/bin/env python3
"""The team MLflow server: schema migrations, then `mlflow server` with basic-auth and proxied artifacts.

The Compose file, the Kubernetes manifests and tests/test_team_mlflow.py all run this script, so
the commands a test checks are the commands the recipes ship.

    python serve.py migrate          # tracking and auth databases to the installed MLflow's schema
                                     # (dumped first when an upgrade is pending and
                                     # MLFLOW_BACKUP_DESTINATION is set)
    python serve.py serve            # exec `mlflow server` (after `migrate`, once, not per replica)
    python serve.py bucket migrate   # steps run in the order given; `bucket` creates the s3://
                                     # bucket of MLFLOW_ARTIFACTS_DESTINATION if it is missing (MinIO)
    python serve.py all              # migrate, then serve

Settings come from the environment only (secrets included), never from arguments:

    MLFLOW_BACKEND_STORE_URI        postgresql://mlflow:PASSWORD@HOST:5432/mlflow        (required)
    MLFLOW_AUTH_DATABASE_URI        postgresql://mlflow:PASSWORD@HOST:5432/mlflow_auth   (required)
    MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/mlflow-artifacts                         (required)
    MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, used when the admin is first created (required)
    MLFLOW_FLASK_SERVER_SECRET_KEY  a random string, the same on every replica (required)
    MLFLOW_AUTH_ADMIN_USERNAME      default admin
    MLFLOW_DEFAULT_PERMISSION       what every user may do on others' experiments: READ (default),
                                    EDIT, MANAGE or NO_PERMISSIONS
    MLFLOW_HOST / MLFLOW_PORT / MLFLOW_WORKERS   default 0.0.0.0 / 5000 / 2
    MLFLOW_ALLOWED_HOSTS            Host headers the server answers, e.g. "mlflow,mlflow.team.svc,*.lab.org"
                                    (MLflow's default: localhost and private IPs)
    MLFLOW_BACKUP_DESTINATION       a folder or s3://bucket/prefix for the pre-upgrade dump (optional)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 (MinIO)   the artifact bucket;
                                    leave the keys unset to use the instance identity / IRSA

Clients need only the tracking URI and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD:
artifacts travel through the server (`mlflow-artifacts:`), so they need no bucket credentials.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REQUIRED = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_ARTIFACTS_DESTINATION",
            "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


def drop_empty_settings() -> None:
    """An empty AWS_* or endpoint variable (a Compose or Kubernetes default left blank, e.g. for a
    cloud bucket reached through the instance identity) means unset, not an empty value."""
    for name in [n for n in os.environ if n.startswith("AWS_") or n == "MLFLOW_S3_ENDPOINT_URL"]:
        if not os.environ[name].strip():
            del os.environ[name]


class SetupError(RuntimeError):
    """A setting is missing or wrong; the message says which."""


def setting(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise SetupError(f"{name} is not set (see the top of {Path(__file__).name})")
    return default


def check_settings() -> None:
    missing = [name for name in REQUIRED if not os.environ.get(name, "").strip()]
    if missing:
        raise SetupError(f"not set: {', '.join(missing)} (see the top of {Path(__file__).name})")
    permission = setting("MLFLOW_DEFAULT_PERMISSION", "READ")
    if permission not in PERMISSIONS:
        raise SetupError(f"MLFLOW_DEFAULT_PERMISSION={permission!r} is not one of {', '.join(PERMISSIONS)}")
    if not setting("MLFLOW_ARTIFACTS_DESTINATION").startswith(("s3://", "gs://", "/")):
        raise SetupError("MLFLOW_ARTIFACTS_DESTINATION must be s3://..., gs://... or an absolute folder")


# ---------------------------------------------------------------------------------------------
# migrations
# ---------------------------------------------------------------------------------------------

def _alembic_state(url: str, script_dir: Path, version_table: str) -> str:
    """"empty", "current", "older", or "newer" (a revision this MLflow does not know: the database
    was written by a newer MLflow)."""
    import sqlalchemy
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    scripts = ScriptDirectory(str(script_dir))
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            has_tables = bool(sqlalchemy.inspect(conn).get_table_names())
            current = MigrationContext.configure(conn, opts={"version_table": version_table}).get_current_revision()
    finally:
        engine.dispose()
    if current in scripts.get_heads():
        return "current"
    if current is not None:
        try:
            scripts.get_revision(current)
        except CommandError:
            return "newer"
    return "older" if has_tables else "empty"


def schema_states() -> list[tuple[str, str]]:
    """(database, state) for the tracking and the auth database (states: see _alembic_state)."""
    import mlflow.server.auth.db.utils as auth_db
    import mlflow.store.db_migrations as tracking_migrations

    checks = [("tracking", setting("MLFLOW_BACKEND_STORE_URI"), Path(tracking_migrations.__file__).parent,
               "alembic_version"),
              ("auth", setting("MLFLOW_AUTH_DATABASE_URI"), Path(auth_db._get_alembic_dir()), "alembic_version_auth")]
    return [(name, _alembic_state(url, script_dir, table)) for name, url, script_dir, table in checks]


def migrate() -> None:
    """Bring both databases to the installed MLflow's schema: create the tables of an empty one,
    upgrade an older one (dumping the databases first when MLFLOW_BACKUP_DESTINATION is set), leave
    a current one alone. Safe to run on every start."""
    check_settings()
    import mlflow

    states = schema_states()
    newer = [name for name, state in states if state == "newer"]
    if newer:
        raise SetupError(f"the {' and '.join(newer)} database has a schema newer than MLflow {mlflow.__version__} "
                         "knows (written by a newer MLflow): run that MLflow's image, or restore a dump")
    older = [name for name, state in states if state == "older"]
    if older:
        print(f"serve.py: schema upgrade pending for the {' and '.join(older)} database", flush=True)
        destination = os.environ.get("MLFLOW_BACKUP_DESTINATION", "").strip()
        if destination:
            sys.path.insert(0, str(Path(__file__).parent))
            import backup

            for uri in backup.database_uris():
                print(f"serve.py: dumped {backup.dump(uri, destination, label='pre-upgrade')}", flush=True)
        else:
            print("serve.py: MLFLOW_BACKUP_DESTINATION is not set: upgrading without a dump", flush=True)
    # `mlflow db upgrade URL` and `python -m mlflow.server.auth db upgrade --url URL`, run in this
    # process (the URLs hold a password: no command line shows them). The first creates the
    # tracking tables on an empty database too.
    from mlflow.db import upgrade as tracking_upgrade
    from mlflow.server.auth.db.cli import upgrade as auth_upgrade

    commands = {"tracking": (tracking_upgrade, [setting("MLFLOW_BACKEND_STORE_URI")]),
                "auth": (auth_upgrade, ["--url", setting("MLFLOW_AUTH_DATABASE_URI")])}
    for name, state in states:
        if state == "current":
            print(f"serve.py: the {name} database is at the current schema", flush=True)
            continue
        command, args = commands[name]
        try:
            command.main(args, prog_name=f"{name} upgrade", standalone_mode=False)
        except Exception as err:  # noqa: BLE001 - any failure of a migration stops the start-up
            raise SetupError(f"migrating the {name} database ({state}) failed: {type(err).__name__}: {err}") from None
        print(f"serve.py: the {name} database was {state}, now at the current schema", flush=True)


# ---------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------

def auth_config_file() -> Path:
    """Write the basic-auth ini (it names the auth database, password included) into a private
    temporary folder, readable by this user only. MLflow reads its path from MLFLOW_AUTH_CONFIG_PATH."""
    folder = Path(tempfile.mkdtemp(prefix="mlflow-auth-"))
    path = folder / "basic_auth.ini"
    text = "\n".join([
        "[mlflow]",
        f"default_permission = {setting('MLFLOW_DEFAULT_PERMISSION', 'READ')}",
        f"database_uri = {setting('MLFLOW_AUTH_DATABASE_URI').replace('%', '%%')}",
        f"admin_username = {setting('MLFLOW_AUTH_ADMIN_USERNAME', 'admin')}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "",
    ])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def server_command() -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--app-name", "basic-auth",
           "--serve-artifacts",
           "--host", setting("MLFLOW_HOST", "0.0.0.0"),
           "--port", setting("MLFLOW_PORT", "5000"),
           "--workers", setting("MLFLOW_WORKERS", "2")]
    # --backend-store-uri and --artifacts-destination are read by `mlflow server` from
    # MLFLOW_BACKEND_STORE_URI and MLFLOW_ARTIFACTS_DESTINATION, so no password is on a command line.
    allowed = os.environ.get("MLFLOW_ALLOWED_HOSTS", "").strip()
    if allowed:
        cmd += ["--allowed-hosts", allowed]
    return cmd


def serve() -> None:
    check_settings()
    env = dict(os.environ)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config_file())
    env.setdefault("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    # MinIO and other S3-compatible stores: MLflow's S3 client reads MLFLOW_S3_ENDPOINT_URL.
    if env.get("AWS_ENDPOINT_URL_S3") and not env.get("MLFLOW_S3_ENDPOINT_URL"):
        env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL_S3"]
    # MLflow 3.17 otherwise starts a job runner (GenAI scorers and judges) that diffcraft never uses.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = server_command()
    print("serve.py: " + " ".join(cmd[1:]), flush=True)
    os.execve(cmd[0], cmd, env)


def make_bucket() -> None:
    """Create the bucket of an s3:// MLFLOW_ARTIFACTS_DESTINATION if it does not exist (a fresh
    MinIO has none; a cloud bucket is made once by its owner and is left alone here)."""
    import boto3
    from botocore.exceptions import ClientError

    destination = setting("MLFLOW_ARTIFACTS_DESTINATION")
    if not destination.startswith("s3://"):
        raise SetupError(f"`bucket` is for s3:// destinations, not {destination}")
    bucket = destination[len("s3://"):].split("/", 1)[0]
    client = boto3.client("s3")
    try:
        client.head_bucket(Bucket=bucket)
        print(f"serve.py: bucket {bucket} exists", flush=True)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise SetupError(f"bucket {bucket}: {err}") from None
        client.create_bucket(Bucket=bucket)
        print(f"serve.py: created bucket {bucket}", flush=True)


STEPS = {"bucket": make_bucket, "migrate": migrate, "serve": serve}


def main(argv: list[str]) -> int:
    drop_empty_settings()
    steps = ["migrate", "serve"] if argv == ["all"] else argv
    if not steps or any(step not in STEPS for step in steps) or "serve" in steps[:-1]:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    try:
        for step in steps:
            STEPS[step]()
    except SetupError as err:
        print(f"serve.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
