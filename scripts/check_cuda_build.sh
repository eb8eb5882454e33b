#!/usr/bin/env bash
# Compile the extension with its CUDA sources into a temporary folder and fail
# when a .cu file does not compile or link, or when the built library does not
# register a CUDA kernel for every op. Needs nvcc but no GPU.
#
# Environment:
#   PYTHON                 interpreter with torch installed (default: python)
#   TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default: 9.0)
#   MAX_JOBS               parallel compile jobs (default: 1)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  echo "check_cuda_build: nvcc is not on PATH and CUDA_HOME is unset; install the CUDA toolkit" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-1}
unset DISTPROP_NO_CUDA DISTPROP_NO_EXTENSION

cd "$root"
"$python" setup.py build_ext --build-lib "$tmp/lib" --build-temp "$tmp/temp" 2>&1 | tee "$tmp/log"
if ! grep -q "building extension backends: CPU (OpenMP) and CUDA" "$tmp/log"; then
  echo "check_cuda_build: setup.py did not include the CUDA sources (see the log above)" >&2
  exit 1
fi

library=$(ls "$tmp"/lib/distprop_fast/_C*.so)
# A fresh interpreter loads only the new library, so its registrations cannot
# clash with an installed distprop_fast._C.
"$python" - "$library" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = [
    "sample_classes_fwd",
    "sample_classes_bwd",
    "zscore_constraint_fwd",
    "zscore_constraint_bwd",
    "sparse_extra_adagrad_",
]
missing = [
    f"{op} ({key})"
    for op in ops
    for key in ("CPU", "CUDA")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"distprop_fast_C::{op}", key)
]
if missing:
    sys.exit(f"check_cuda_build: the built library has no kernel for: {', '.join(missing)}")
print(f"check_cuda_build: CPU and CUDA kernels registered for {len(ops)} ops")
PY
