#!/usr/bin/env bash
# Build the extension with its CUDA kernels, run the CUDA and Triton correctness
# tests, and print timing tables of the three ops on the GPU. The tables compare
# the cuda and triton backends with the reference and give the fraction of a
# same-size device-to-device copy's bandwidth that each kernel reaches.
#
# Usage, from anywhere inside the repository, on a machine with an NVIDIA GPU:
#   benchmarks/gpu_check.sh
# Environment:
#   PYTHON     interpreter with torch, triton, pytest and hypothesis (default: python3)
#   CUDA_HOME  CUDA toolkit root; found from nvcc on PATH or /usr/local/cuda when unset
#   BUDGET     seconds of timed runs per op case (default: 0.3)
# Exits non-zero when the build, a test or the timing run fails.
# NOTE: written without a GPU at hand and checked with `bash -n` only; the aim of
# finishing in under 5 minutes on one GPU and 16 cores is an estimate, not a measurement.
set -euo pipefail

PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-0.3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

fail() {
    echo "gpu_check: $*" >&2
    exit 1
}

find_cuda_home() {
    if [[ -n "${CUDA_HOME:-}" ]]; then
        echo "$CUDA_HOME"
        return
    fi
    local nvcc
    if nvcc=$(command -v nvcc); then
        # The toolkit root is two levels above the real binary: ROOT/bin/nvcc.
        dirname "$(dirname "$(readlink -f "$nvcc")")"
        return
    fi
    for candidate in /usr/local/cuda /usr/local/cuda-*; do
        if [[ -x "$candidate/bin/nvcc" ]]; then
            echo "$candidate"
            return
        fi
    done
    return 1
}

echo "== GPU"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'EOF' || fail "torch sees no CUDA device; run this on a machine with an NVIDIA GPU"
import torch
assert torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF

echo "== build"
CUDA_HOME=$(find_cuda_home) || fail "no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH"
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 1))"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    # Build only for the GPU in this machine, which keeps the build short.
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c \
        "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
fi
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip install --no-build-isolation --no-deps -q -e . \
    || fail "the extension failed to build"
"$PYTHON" - <<'EOF' || fail "the extension was built without CUDA kernels; check the build log"
from distprop_fast.ops._backend import extension_has

missing = [
    op
    for op in ("sample_classes_fwd", "zscore_constraint_fwd", "sparse_extra_adagrad_")
    if not extension_has(op, "CUDA")
]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for all three ops")
EOF

echo "== correctness tests"
"$PYTHON" -m pytest -q -x -p no:cacheprovider \
    tests/test_sampling.py \
    tests/test_zscore_constraint.py \
    tests/test_sparse_extra_adagrad.py \
    tests/test_triton_kernels.py \
    || fail "a correctness test failed"

echo "== timing"
"$PYTHON" benchmarks/compare.py --device cuda --sections sampling,zscore,sparse --budget "$BUDGET" \
    || fail "the timing run failed"
echo "gpu_check: all passed"
