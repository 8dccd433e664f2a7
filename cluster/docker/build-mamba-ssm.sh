#!/usr/bin/env bash
# Builds mamba-ssm's selective-scan CUDA kernel into the active Python environment for the GPUs named
# in MAMBA_CUDA_ARCHS (compute capabilities without the dot, ';'-separated; default 80;89;90: A100,
# L4/L40S, H100/H200), and fails unless the kernel imports. Needs nvcc and the CUDA torch installed.
#
#   MAMBA_CUDA_ARCHS=90 MAX_JOBS=16 bash cluster/docker/build-mamba-ssm.sh
#
# Measured: sm_90 alone took 166 s on a 16-core H200 machine (MAX_JOBS=10); each architecture adds
# about as much again. Optional: without mamba-ssm diffcraft's Triton kernel runs the scan, and on an
# H200 it was as fast (1.80 ms forward + backward both, `python benchmarks/scan.py`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=${MAMBA_SSM_VERSION:-2.3.2.post1}
archs=${MAMBA_CUDA_ARCHS:-80;89;90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the sdist's metadata step imports torch: no build isolation, and no CUDA build for the download
MAMBA_SKIP_CUDA_BUILD=TRUE python -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
    -d "$work" "mamba-ssm==$version"
tar xzf "$work"/mamba_ssm-*.tar.gz -C "$work"
cd "$work"/mamba_ssm-*/
python "$here/mamba_ssm_archs.py" setup.py "$archs"
start=$(date +%s)
# --no-deps: its other requirements (tilelang, quack-kernels, transformers) serve Mamba-2/3, not the scan
MAMBA_FORCE_BUILD=TRUE python -m pip install --no-build-isolation --no-deps --no-cache-dir .
python -m pip install --no-cache-dir einops huggingface_hub
python -c "import torch, selective_scan_cuda
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn"
echo "mamba-ssm $version: selective_scan_cuda built for $archs in $(( $(date +%s) - start )) s and imports"
