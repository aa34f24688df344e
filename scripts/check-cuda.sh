#!/usr/bin/env bash
# The CUDA server check (issue 20): builds veil-server with the `cuda` feature
# (scripts/build-cuda.sh), starts N shard servers on cuda:0 and N on the CPU (the same binary,
# --device cpu), runs the same `strict` generation over QUIC against each set from a CPU
# `veil` client, and compares the two pictures (`veil compare`, floor MIN_PSNR dB).
#
#   scripts/check-cuda.sh                      # N=4, models/tiny-shapes, 20 steps, 128 px
#   N=2 MODEL=models/tiny-random STEPS=4 SIZE=64 MIN_PSNR=35 scripts/check-cuda.sh
#   GPU_DEVICE=cpu BUILD=cpu scripts/check-cuda.sh   # the script's plumbing, on a machine
#                                                    # without a GPU (CPU against CPU)
#
# Run it whenever a GPU machine is lent and record the result in docs/BENCHMARKS.md. CI builds
# the CPU server only (no GPU there). Prints one line per stage and ends with `psnr_db …`;
# exits non-zero if a stage fails or the PSNR is under the floor. Work files go to $OUT (a temp
# folder by default): the two PNGs, the servers' logs, stats.json of both runs.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-4}
MODEL=${MODEL:-models/tiny-shapes}
STEPS=${STEPS:-20}
SIZE=${SIZE:-128}
MIN_PSNR=${MIN_PSNR:-35}
GPU_DEVICE=${GPU_DEVICE:-cuda:0}
BUILD=${BUILD:-cuda}
PROMPT=${PROMPT:-"a large red circle on the left on a white background"}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

echo "== build: veil-server ($BUILD), veil (CPU)"
if [ "$BUILD" = cuda ]; then
    scripts/build-cuda.sh
else
    cargo build --release -q -p veil-server
fi
cargo build --release -q -p veil-cli
CUDA_ROOT="$PWD/target/cuda-root"
export LD_LIBRARY_PATH="$CUDA_ROOT/lib64:${LD_LIBRARY_PATH:-}"
[[ $GPU_DEVICE == cuda* ]] && { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

token="check-cuda-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# start_servers DEVICE LIST: N servers on DEVICE, their [[server]] tables written to LIST.
start_servers() {
    local device=$1 list=$2
    : >"$list"
    for i in $(seq 1 "$N"); do
        local dir="$OUT/${device/:/}-$i"
        mkdir -p "$dir"
        echo "$token" >"$dir/tokens.txt"
        chmod 600 "$dir/tokens.txt"
        target/release/veil-server --model "$MODEL" --device "$device" --token-file "$dir/tokens.txt" \
            --data-dir "$dir" --listen 127.0.0.1:0 >"$dir/stdout" 2>"$dir/log" &
        pids+=($!)
        for _ in $(seq 1 600); do
            grep -q '^listening ' "$dir/stdout" 2>/dev/null && break
            sleep 0.1
        done
        grep -q '^listening ' "$dir/stdout" || { echo "server $device-$i did not start:"; cat "$dir/log"; exit 1; }
        {
            echo "[[server]]"
            echo "address = \"$(sed -n 's/^listening //p' "$dir/stdout")\""
            echo "fingerprint = \"$(sed -n 's/^fingerprint //p' "$dir/stdout")\""
            echo "token = \"$token\""
        } >>"$list"
    done
}

# generate LIST NAME: the strict generation against the servers of LIST.
generate() {
    target/release/veil generate "$PROMPT" --model "$MODEL" --policy strict \
        --server-list "$1" --steps "$STEPS" --width "$SIZE" --height "$SIZE" --seed 7 \
        --out "$OUT/$2.png" --stats "$OUT/$2.json"
}

echo "== $N servers on $GPU_DEVICE"
start_servers "$GPU_DEVICE" "$OUT/servers-gpu.toml"
time generate "$OUT/servers-gpu.toml" gpu

echo "== $N servers on the CPU"
start_servers cpu "$OUT/servers-cpu.toml"
time generate "$OUT/servers-cpu.toml" cpu

echo "== compare (floor $MIN_PSNR dB); files in $OUT"
target/release/veil compare "$OUT/cpu.png" "$OUT/gpu.png" --min-psnr "$MIN_PSNR"
