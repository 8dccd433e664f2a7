# syntax=docker/dockerfile:1
# diffcraft on NVIDIA GPUs: Ray GPU workers (trials), with the `gpu` extra (mamba-ssm and
# causal-conv1d, compiled here against the installed torch). Build from the repository root:
#
#   docker build -f cluster/docker/gpu.Dockerfile -t REGISTRY/diffcraft:0.1.0-ray2.60.0-py3.12-cu130 .
#
# The tag is <diffcraft version>-ray<Ray version>-py<Python version>-cu<CUDA>. torch 2.13.0 on PyPI
# is built for CUDA 13.0, so this image is based on CUDA 13.0 (nvcc is needed to compile the
# mamba-ssm and causal-conv1d kernels) and the hosts need an NVIDIA driver of the 580 series or
# newer. The build compiles CUDA code: give it a machine with many cores (MAX_JOBS) and expect
# tens of minutes; TORCH_CUDA_ARCH_LIST limits it to the GPUs you have.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# Ubuntu 24.04's Python; the CPU image must use the same minor version (Ray refuses a mix).
ARG PYTHON_VERSION=3.12
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
# T4 7.5, A100 8.0, A10G 8.6, L4/L40S 8.9, H100/H200 9.0, B200 10.0.
ARG TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0;10.0"
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev \
      build-essential git ninja-build ca-certificates curl openssh-client rsync sudo tini \
 && rm -rf /var/lib/apt/lists/*

# The user `ray` (uid 1000, home /home/ray, passwordless sudo), as in the CPU image. Ubuntu's base
# image already has a user `ubuntu` with uid 1000; it is removed first.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --shell /bin/bash ray \
 && echo "ray ALL=(ALL) NOPASSWD:ALL" > /etc/sudoers.d/ray && chmod 0440 /etc/sudoers.d/ray \
 && python${PYTHON_VERSION} -m venv /opt/venv && chown -R ray:ray /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS}
USER ray
WORKDIR /home/ray

# torch first (PyPI's Linux build is the CUDA 13.0 one), then the build tools the CUDA extensions
# need without build isolation (they import torch while building).
RUN pip install "torch==${TORCH_VERSION}" \
 && pip install packaging setuptools wheel ninja

COPY --chown=ray:ray pyproject.toml README.md /opt/diffcraft/
COPY --chown=ray:ray diffcraft /opt/diffcraft/diffcraft
COPY --chown=ray:ray studies /opt/diffcraft/studies
# psycopg: the PostgreSQL driver for `optuna.storage: postgresql://...` (the team database).
RUN pip install --no-build-isolation "/opt/diffcraft[gpu]" "ray[default,tune,train]==${RAY_VERSION}" \
      "torch==${TORCH_VERSION}" "psycopg[binary]==3.3.9" \
 && python -c "import ray, torch, diffcraft; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

ENTRYPOINT ["tini", "--"]
CMD ["bash"]
