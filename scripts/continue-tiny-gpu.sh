#!/usr/bin/env bash
# Issue 16's GPU continuation of models/tiny-shapes, prepared as one call of a lent GPU machine
# (15 minutes of device time in all, 10 a command): two continuations of the committed weights
# run side by side on the one GPU, the same except that the second draws captions naming two
# objects W times as often (where `local` loses position: models/tiny-shapes/README.md).
#
#   run: command "scripts/continue-tiny-gpu.sh", carry [".train/shapes100k.xz"], timeout_s 600
#   here, after it: for v in plain two; do mkdir -p .train/gpu3-$v; \
#       for t in rest unet device_unet; do tar xf $FILES_AT/$v/$t.tar -C .train/gpu3-$v; done; done
#   then judge both on the validation split: scripts/score-candidate.sh .train/gpu3-plain plain
#
# SECONDS_EACH bounds each run's U-Net stage (the step count is planned from the measured speed,
# so the learning rate still decays to its floor); the two share the GPU (how evenly is not
# measured: no GPU has been lent since the script was written). A smoke run of the plumbing on
# a machine without a GPU (batch 1,024 needs ~19 GB of host memory per run on a CPU):
#   DEVICE=cpu BATCH=32 EXTRA="--unet-steps 3" DATA=small.xz OUT=/tmp/cg scripts/continue-tiny-gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-.train/shapes100k.xz}
SECONDS_EACH=${SECONDS_EACH:-420}
W=${W:-3}
LR=${LR:-3e-4}
BATCH=${BATCH:-1024}
EXTRA=${EXTRA:-}  # more train_tiny.py arguments for both runs (a smoke run: --unet-steps 3)
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

[ -f "$DATA" ] || { echo "no $DATA: pack it with tools/train_tiny.py --pack-to" >&2; exit 2; }
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.used --format=csv,noheader; fi

run() {  # NAME EXTRA_ARGS...
    local name=$1; shift
    "$PY" tools/train_tiny.py --data "$DATA" --out "/tmp/continue-$name" --tar-to "$OUT/$name" \
        --device "$DEVICE" --vae-from models/tiny-shapes/vae --init-from models/tiny-shapes \
        --unet-seconds "$SECONDS_EACH" --lr "$LR" --batch "$BATCH" --warmup 100 --checkpoint-seconds 60 $EXTRA "$@" \
        > "$OUT/$name.log" 2>&1
}
run plain & plain=$!
run two --two-object-weight "$W" & two=$!
status=0
wait $plain || { echo "plain run failed" >&2; status=1; }
wait $two || { echo "two-object run failed" >&2; status=1; }
for name in plain two; do
    echo "== $name"; tr '\r' '\n' < "$OUT/$name.log" | grep -E "^(planned|step|saved|two-object)" | tail -5
done
ls -l "$OUT"/*/
exit $status
