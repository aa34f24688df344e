#!/usr/bin/env bash
# Builds veil-server with the `cuda` feature on a machine without a system CUDA toolkit.
#
# candle's CUDA kernels need nvcc at build time. NVIDIA publishes the toolkit pieces on PyPI
# (nvcc, runtime, cuBLAS, cuRAND, NVRTC, CCCL headers); this script installs them into a venv
# under target/, points candle's build at them, and links against a stub libcuda.so (the real
# driver library is loaded at run time on the GPU machine).
#
#   scripts/build-cuda.sh                 # compute capability 90 (H100/H200)
#   CUDA_COMPUTE_CAP=89 scripts/build-cuda.sh
#
# Not run by CI (no GPU there). Status: builds on the 2-core dev VM (2026-11-21: nvcc 13.0.88
# from PyPI, compute capability 90); running it on a GPU is not yet verified (no GPU lent).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/cuda-toolchain
CUDA_PKGS=${CUDA_PKGS:-"nvidia-cuda-nvcc==13.0.* nvidia-cuda-runtime==13.0.* nvidia-cublas==13.0.* nvidia-curand nvidia-cuda-nvrtc==13.0.* nvidia-cuda-cccl==13.0.* nvidia-nvvm==13.0.* nvidia-cuda-crt==13.0.*"}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC2086
"$VENV/bin/pip" install --quiet $CUDA_PKGS

site=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
nvcc=$(find "$site/nvidia" -type f -name nvcc -path '*bin*' | head -n 1)
[ -n "$nvcc" ] || { echo "nvcc not found under $site/nvidia" >&2; exit 1; }
root=$(dirname "$(dirname "$nvcc")")

# Merge the include and lib directories of every wheel into one CUDA_ROOT-shaped tree.
export CUDA_ROOT="$PWD/target/cuda-root"
mkdir -p "$CUDA_ROOT/bin" "$CUDA_ROOT/include" "$CUDA_ROOT/lib64"
ln -sf "$root"/bin/* "$CUDA_ROOT/bin/"
# nvcc finds cicc and libdevice relative to its own (symlinked) location.
[ -d "$root/nvvm" ] && ln -sfn "$root/nvvm" "$CUDA_ROOT/nvvm"
for d in "$site"/nvidia/*/include "$site"/nvidia/*/*/include; do
    [ -d "$d" ] && cp -rs "$d"/. "$CUDA_ROOT/include/" 2>/dev/null || true
done
for d in "$site"/nvidia/*/lib "$site"/nvidia/*/*/lib; do
    [ -d "$d" ] && cp -rs "$d"/. "$CUDA_ROOT/lib64/" 2>/dev/null || true
done
for so in "$CUDA_ROOT"/lib64/*.so.[0-9]*; do
    base=${so%%.so.*}.so
    [ -e "$base" ] || ln -sf "$so" "$base"
done

# A stub libcuda.so so the link step succeeds without a driver: it exports every driver symbol
# (cu*) that the built cudarc references; the real library replaces it at run time.
make_stub() {
    mkdir -p "$CUDA_ROOT/lib64/stubs"
    local syms
    syms=$(nm -u target/release/deps/libcudarc-*.rlib 2>/dev/null | awk '{print $NF}' | grep -E '^cu[A-Z]' | sort -u || true)
    { echo 'void cuInit(void){}'; for f in $syms; do [ "$f" = cuInit ] || echo "void $f(void){}"; done; } \
        | gcc -shared -fPIC -x c - -o "$CUDA_ROOT/lib64/stubs/libcuda.so"
}
make_stub

export CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
export LIBRARY_PATH="$CUDA_ROOT/lib64:$CUDA_ROOT/lib64/stubs:${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib64:${LD_LIBRARY_PATH:-}"
nvcc --version | tail -n 2
# The first build may stop at the link (the stub is made before cudarc exists); then the stub
# is regenerated from cudarc's undefined symbols and the link repeated.
if ! cargo build --release -p veil-server --features cuda; then
    make_stub
    cargo build --release -p veil-server --features cuda
fi
echo "built target/release/veil-server with CUDA (compute capability $CUDA_COMPUTE_CAP)"
echo "run it with: LD_LIBRARY_PATH=$CUDA_ROOT/lib64 target/release/veil-server --device cuda:0 ..."
