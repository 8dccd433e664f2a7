# syntax=docker/dockerfile:1
# diffcraft on CPU: the Ray head (study drivers run there), CPU workers (data preparation), and
# any machine that only submits studies. Build from the repository root:
#
#   docker build -f cluster/docker/cpu.Dockerfile -t REGISTRY/diffcraft:0.1.0-ray2.60.0-py3.12-cpu .
#
# The tag is <diffcraft version>-ray<Ray version>-py<Python version>-cpu. Every recipe in cluster/
# names images this way, and tests/test_cluster_recipes.py checks that the versions in the tags,
# in the ARGs below and in pyproject.toml agree. Ray needs the same Ray and Python version on every
# node and on the machine that submits: keep PYTHON_VERSION equal to the GPU image's.
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0

# rsync, ssh and sudo: the Ray cluster launcher runs its setup commands in the container through
# them. tini reaps the processes Ray leaves behind when the container is stopped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl openssh-client rsync sudo tini \
 && rm -rf /var/lib/apt/lists/*

# The user `ray` (uid 1000, home /home/ray, passwordless sudo), as in Ray's own images: the cluster
# launcher and KubeRay expect a non-root user with a home directory.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray \
 && echo "ray ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/ray && chmod 0440 /etc/sudoers.d/ray \
 && python -m venv /opt/venv && chown -R ray:ray /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER ray
WORKDIR /home/ray

# torch's CPU build first, from its own index, so that pip keeps it instead of a CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

COPY --chown=ray:ray pyproject.toml README.md /opt/diffcraft/
COPY --chown=ray:ray diffcraft /opt/diffcraft/diffcraft
COPY --chown=ray:ray studies /opt/diffcraft/studies
# psycopg: the PostgreSQL driver for `optuna.storage: postgresql://...` (the team database).
RUN pip install "/opt/diffcraft" "ray[default,tune,train]==${RAY_VERSION}" "torch==${TORCH_VERSION}" \
      "psycopg[binary]==3.3.9" \
 && python -c "import ray, torch, diffcraft; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

ENTRYPOINT ["tini", "--"]
CMD ["bash"]
