#!/usr/bin/env bash
# Scores a candidate tiny-shapes model on a validation split of held-out captions, so that a
# retraining choice is never made on the test split (`veil eval`'s default seed 7, whose 200
# captions are issue 16's numbers).
#
#   scripts/score-candidate.sh CANDIDATE NAME [PROMPTS=100] [SEED=9]
#
# CANDIDATE is a model folder, or a train_tiny.py output: the parts it lacks come from
# models/tiny-shapes, and so does the tokenizer always (train_tiny.py writes models/tiny-random's,
# the same vocabulary without padding to 77 in tokenizer.json; the committed model keeps its
# own). Runs `veil eval --sections adherence` (local and the device U-Net alone, 20 DDIM
# steps, guidance 5) on a copy of docs/EVAL.md, under $WORK (default /tmp/score-candidate), and
# prints the utility and by-scene tables. Uses target/release/veil (cargo build --release -p
# veil-cli first). NO_DEVICE=1 leaves the device U-Net out (half the
# time; for a candidate that only retrained the server U-Net).
set -euo pipefail
cd "$(dirname "$0")/.."

CANDIDATE=${1:?usage: score-candidate.sh CANDIDATE NAME [PROMPTS] [SEED]}
NAME=${2:?usage: score-candidate.sh CANDIDATE NAME [PROMPTS] [SEED]}
PROMPTS=${3:-100}
SEED=${4:-9}
WORK=${WORK:-/tmp/score-candidate}
VEIL=${VEIL:-target/release/veil}

MODEL=$WORK/model-$NAME
rm -rf "$MODEL"
mkdir -p "$MODEL" "$WORK/figures-$NAME"
cp -r models/tiny-shapes/tokenizer "$MODEL/"
PARTS="model_index.json scheduler text_encoder unet vae"
[ -n "${NO_DEVICE:-}" ] || PARTS="$PARTS device_unet"
for part in $PARTS; do
    if [ -e "$CANDIDATE/$part" ]; then src=$CANDIDATE/$part; else src=models/tiny-shapes/$part; fi
    cp -r "$src" "$MODEL/"
done
"$VEIL" manifest "$MODEL" > /dev/null
REPORT=$WORK/EVAL-$NAME.md
cp docs/EVAL.md "$REPORT"
"$VEIL" eval --model "$MODEL" --out "$REPORT" --figures "$WORK/figures-$NAME" \
    --sections adherence --prompts "$PROMPTS" --policy-prompts 0 --seed "$SEED" 2>&1 | tail -2
sed -n '/^| policy | prompts/,/^$/p' "$REPORT"
sed -n '/^| pictures | prompts/,/^$/p' "$REPORT"
