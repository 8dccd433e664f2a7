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
    python serve.py cert serve       # `cert` makes a self-signed certificate at MLFLOW_TLS_CERT /
                                     # MLFLOW_TLS_KEY if none is there (for trying it out)

Settings come from the environment only (secrets included), never from arguments:

    MLFLOW_BACKEND_STORE_URI        postgresql://mlflow:PASSWORD@HOST:5432/mlflow        (required)
    MLFLOW_AUTH_DATABASE_URI        postgresql://mlflow:PASSWORD@HOST:5432/mlflow_auth   (required)
    MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/mlflow-artifacts                         (required)
    MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, used when the admin is first created (required)
    MLFLOW_FLASK_SERVER_SECRET_KEY  a random string, the same on every replica (required)
    MLFLOW_AUTH_ADMIN_USERNAME      default admin
    MLFLOW_DEFAULT_PERMISSION       what every user may do on others' experiments: READ (default),
                                    EDIT, MANAGE or NO_PERMISSIONS
    MLFLOW_HOST / MLFLOW_PORT / MLFLOW_WORKERS   default 127.0.0.1 / 5000 / 2
    MLFLOW_TLS_CERT / MLFLOW_TLS_KEY the server's certificate chain and key (PEM): the server speaks
                                    HTTPS. Without them it serves plain HTTP on loopback only, unless
                                    MLFLOW_PLAIN_HTTP_BEHIND_TLS=1 says a proxy or an Ingress in front
                                    terminates TLS (passwords never cross a network in clear)
    MLFLOW_TLS_NAMES                host names and addresses `cert` writes into the self-signed
                                    certificate (default localhost,127.0.0.1); its CA is ca.pem beside it
    MLFLOW_ALLOWED_HOSTS            Host headers the server answers, e.g. "mlflow,mlflow.team.svc,*.lab.org"
                                    (MLflow's default: localhost and private IPs)
    MLFLOW_BACKUP_DESTINATION       a folder or s3://bucket/prefix for the pre-upgrade dump (optional)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 (MinIO)   the artifact bucket;
                                    leave the keys unset to use the instance identity / IRSA

Clients need only the tracking URI (https://...) and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
(with a self-signed certificate, MLFLOW_TRACKING_SERVER_CERT_PATH=ca.pem as well): artifacts travel
through the server (`mlflow-artifacts:`), so they need no bucket credentials.
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


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def tls_files() -> tuple[str, str] | None:
    """(certificate, key) when the server speaks HTTPS; None for plain HTTP, allowed only on
    loopback or behind a TLS terminator (MLFLOW_PLAIN_HTTP_BEHIND_TLS=1)."""
    cert, key = os.environ.get("MLFLOW_TLS_CERT", "").strip(), os.environ.get("MLFLOW_TLS_KEY", "").strip()
    if bool(cert) != bool(key):
        raise SetupError("MLFLOW_TLS_CERT and MLFLOW_TLS_KEY go together: set both, or neither")
    if cert:
        for name, path in (("MLFLOW_TLS_CERT", cert), ("MLFLOW_TLS_KEY", key)):
            if not Path(path).is_file():
                raise SetupError(f"{name}={path}: no such file (`serve.py cert` makes a self-signed pair)")
        return cert, key
    host = setting("MLFLOW_HOST", "127.0.0.1")
    if host not in LOOPBACK and os.environ.get("MLFLOW_PLAIN_HTTP_BEHIND_TLS", "").strip() != "1":
        raise SetupError(f"MLFLOW_HOST={host} over plain HTTP would send passwords in clear: set MLFLOW_TLS_CERT and "
                         "MLFLOW_TLS_KEY (`serve.py cert` makes a self-signed pair), or terminate TLS in front of "
                         "the server and set MLFLOW_PLAIN_HTTP_BEHIND_TLS=1")
    return None


def make_certificate() -> None:
    """A self-signed CA (ca.pem beside the certificate) and a server certificate for
    MLFLOW_TLS_NAMES at MLFLOW_TLS_CERT / MLFLOW_TLS_KEY, unless a certificate is already there."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cert_path, key_path = Path(setting("MLFLOW_TLS_CERT")), Path(setting("MLFLOW_TLS_KEY"))
    if cert_path.is_file() and key_path.is_file():
        print(f"serve.py: keeping the certificate at {cert_path}", flush=True)
        return
    names = [n.strip() for n in setting("MLFLOW_TLS_NAMES", "localhost,127.0.0.1").split(",") if n.strip()]
    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, issuer_name, public_key, signing_key, ca: bool, sans=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=825))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        else:
            builder = (builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                       .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True))
        return builder

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diffcraft team MLflow CA (self-signed)")])
    ca = build("diffcraft team MLflow CA (self-signed)", ca_name, ca_key.public_key(), ca_key, True).sign(ca_key, hashes.SHA256())
    sans = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    server = (build(names[0], ca.subject, key.public_key(), ca_key, False, sans)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    (cert_path.parent / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    print(f"serve.py: made a self-signed certificate for {', '.join(names)} at {cert_path} "
          f"(clients trust {cert_path.parent / 'ca.pem'})", flush=True)


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
           "--host", setting("MLFLOW_HOST", "127.0.0.1"),
           "--port", setting("MLFLOW_PORT", "5000"),
           "--workers", setting("MLFLOW_WORKERS", "2")]
    # --backend-store-uri and --artifacts-destination are read by `mlflow server` from
    # MLFLOW_BACKEND_STORE_URI and MLFLOW_ARTIFACTS_DESTINATION, so no password is on a command line.
    allowed = os.environ.get("MLFLOW_ALLOWED_HOSTS", "").strip()
    if allowed:
        cmd += ["--allowed-hosts", allowed]
    tls = tls_files()
    if tls:  # uvicorn terminates TLS itself
        cmd += ["--uvicorn-opts", f"--ssl-certfile {tls[0]} --ssl-keyfile {tls[1]}"]
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


STEPS = {"cert": make_certificate, "bucket": make_bucket, "migrate": migrate, "serve": serve}


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
