# syntax=docker/dockerfile:1
# diffcraft on NVIDIA GPUs: Ray GPU workers (trials), with mamba-ssm's selective-scan kernel compiled
# for the GPUs you name. Build from the repository root:
#
#   docker build -f cluster/docker/gpu.Dockerfile -t REGISTRY/diffcraft:0.1.0-ray2.60.0-py3.12-cu130 .
#   docker build -f cluster/docker/gpu.Dockerfile --build-arg MAMBA_CUDA_ARCHS=90 ...   # H100/H200 only
#   docker build -f cluster/docker/gpu.Dockerfile --build-arg MAMBA_CUDA_ARCHS= ...     # no mamba-ssm
#
# The tag is <diffcraft version>-ray<Ray version>-py<Python version>-cu<CUDA>. torch 2.13.0 on PyPI
# is built for CUDA 13.0, so this image is based on CUDA 13.0 (nvcc compiles the mamba-ssm kernel)
# and the hosts need an NVIDIA driver of the 580 series or newer. mamba-ssm's setup.py hard-codes
# nine architectures and ignores TORCH_CUDA_ARCH_LIST: `build-mamba-ssm.sh` compiles for
# MAMBA_CUDA_ARCHS only (one architecture took 166 s on 16 cores; each adds about as much) and the
# build fails unless the kernel imports. Without it (an empty MAMBA_CUDA_ARCHS) the Mamba scan runs
# on diffcraft's Triton kernel, which was as fast on an H200 (`python benchmarks/scan.py`).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# Ubuntu 24.04's Python; the CPU image must use the same minor version (Ray refuses a mix).
ARG PYTHON_VERSION=3.12
ARG RAY_VERSION=2.60.0
ARG TORCH_VERSION=2.13.0
# The GPUs of the KubeRay overlays and launcher configs: A100 80, L4/L40S 89, H100/H200 90
# (others: T4 75, A10G 86, B200 100). Empty: no mamba-ssm.
ARG MAMBA_CUDA_ARCHS="80;89;90"
ARG MAMBA_SSM_VERSION=2.3.2.post1
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
    MAX_JOBS=${MAX_JOBS}
USER ray
WORKDIR /home/ray

# torch first (PyPI's Linux build is the CUDA 13.0 one; it brings Triton), then the build tools the
# CUDA extension needs without build isolation (it imports torch while building).
RUN pip install "torch==${TORCH_VERSION}" \
 && pip install packaging setuptools wheel ninja

# mamba-ssm's kernel for MAMBA_CUDA_ARCHS, before diffcraft so that a code change does not rebuild it;
# the script fails the build unless selective_scan_cuda imports.
COPY --chown=ray:ray cluster/docker/build-mamba-ssm.sh cluster/docker/mamba_ssm_archs.py /opt/build/
RUN if [ -n "${MAMBA_CUDA_ARCHS}" ]; then \
      MAMBA_CUDA_ARCHS="${MAMBA_CUDA_ARCHS}" MAMBA_SSM_VERSION="${MAMBA_SSM_VERSION}" bash /opt/build/build-mamba-ssm.sh; \
    fi

COPY --chown=ray:ray pyproject.toml README.md /opt/diffcraft/
COPY --chown=ray:ray diffcraft /opt/diffcraft/diffcraft
COPY --chown=ray:ray studies /opt/diffcraft/studies
# psycopg: the PostgreSQL driver for `optuna.storage: postgresql://...` (the team database). The
# last check prints the scan a CUDA trial will run (mamba_ssm where it was built, else triton).
RUN pip install "/opt/diffcraft" "ray[default,tune,train]==${RAY_VERSION}" \
      "torch==${TORCH_VERSION}" "psycopg[binary]==3.3.9" \
 && python -c "import ray, torch, diffcraft; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
 && python -c "from diffcraft.nn.scan import resolve_scan; print('Mamba scan on CUDA:', *resolve_scan('auto', 'cuda'))"

ENTRYPOINT ["tini", "--"]
CMD ["bash"]
