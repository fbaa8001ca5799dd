#!/usr/bin/env bash
# The demo reader (checkpoints/demo-reader/): InfiMM-HD's four stages, tiny presets, on a synthetic corpus.
#   training/demo_recipe.sh [WORKDIR]     (default /tmp/infimm-demo-train; run from the repository root)
set -euo pipefail
W=${1:-/tmp/infimm-demo-train}
SEED=${SEED:-0}
export OMP_WAIT_POLICY=PASSIVE
python -m training.corpus "$W/corpus-train" --n 4000 --seed "$SEED" --kinds word --layout fixed --jitter 4
python -m training.corpus "$W/corpus-heldout" --n 200 --seed 12345 --kinds word --layout fixed --jitter 4
T=(--data "$W/corpus-train/manifest.jsonl" --threads 1 --seed "$SEED" --checkpoint-every 100 --log-every 20)
python -m cli.main train --stage 1 --init demo "${T[@]}" --output "$W/s1-pt"
python -m cli.main train --stage 2 --from "$W/s1-pt" "${T[@]}" --output "$W/s2-cpt"
python -m cli.main train --stage 3 --from "$W/s2-cpt" "${T[@]}" --output "$W/s3-dra"
python -m cli.main train --stage 4 --from "$W/s3-dra" "${T[@]}" --output "$W/s4-ift"
python -m training.package "$W" checkpoints/demo-reader   # official files + all stages' loss history
python benchmarks/train_eval.py --checkpoint checkpoints/demo-reader --out checkpoints/demo-reader/eval.json
