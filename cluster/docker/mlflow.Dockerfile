# syntax=docker/dockerfile:1
# The team MLflow server: `mlflow server` with basic-auth and proxied artifacts, PostgreSQL's
# client tools for backups, and the three scripts of cluster/mlflow/ that the Compose file, the
# Kubernetes manifests and tests/test_team_mlflow.py run. Build from the repository root:
#
#   docker build -f cluster/docker/mlflow.Dockerfile -t REGISTRY/diffcraft-mlflow:3.17.2 .
#
# The tag is the MLflow version of cluster/mlflow/requirements.txt.
FROM python:3.12-slim-bookworm

# postgresql-client: pg_dump / pg_restore 15 (Debian 12), matching the postgres:15 server of the recipes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1001 --shell /usr/sbin/nologin mlflow

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY cluster/mlflow/requirements.txt /opt/mlflow/requirements.txt
RUN pip install -r /opt/mlflow/requirements.txt
COPY cluster/mlflow/serve.py cluster/mlflow/backup.py cluster/mlflow/postgres-init.sh /opt/mlflow/

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["tini", "--", "python", "/opt/mlflow/serve.py"]
CMD ["all"]
