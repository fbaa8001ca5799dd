#!/usr/bin/env bash
# The demo reader (checkpoints/demo-reader/): two pretraining stages that stand in for EVA-CLIP and Vicuna, then
# InfiMM-HD's four stages (tiny presets, training/stages.py; all at 112 px) on a synthetic corpus, then the held-out evaluation.
#   training/demo_recipe.sh [WORKDIR]     (default runs/demo-reader; run from the repository root)
#   TRAIN_ARGS="--gpu" training/demo_recipe.sh    (extra `infimm-hd train` flags for every stage, e.g. one GPU each)
# A stage whose output exists is skipped, so a rerun continues where an interrupted one stopped.
set -euo pipefail
W=${1:-runs/demo-reader}
SEED=${SEED:-0}
export OMP_WAIT_POLICY=PASSIVE
[ -e "$W/corpus-train/manifest.jsonl" ] ||
    python -m training.corpus "$W/corpus-train" --n 12000 --seed "$SEED" --kinds word --layout fixed --jitter 4
[ -e "$W/corpus-heldout/manifest.jsonl" ] ||
    python -m training.corpus "$W/corpus-heldout" --n 200 --seed 12345 --kinds word --layout fixed --jitter 4
T=(--data "$W/corpus-train/manifest.jsonl" --eval-data "$W/corpus-heldout/manifest.jsonl" --threads 1 --seed "$SEED"
    --checkpoint-every 100 --log-every 20 --diag-every 100 ${TRAIN_ARGS:-})
stage() {  # stage OUTPUT ARGS...: run one stage unless its output is there
    local out=$1; shift
    [ -e "$W/$out/config.json" ] || python -m cli.main train "$@" "${T[@]}" --output "$W/$out" --run-name "$out"
}
stage vit --stage vit --init demo          # the ViT learns which words are on a page (stand-in for EVA-CLIP)
stage lm --stage lm --from "$W/vit"          # the decoder learns the corpus's text (stand-in for Vicuna)
stage s1-pt --stage 1 --from "$W/lm"         # PT: cross-attention (+ input embeddings) against the frozen LLM
stage s2-cpt --stage 2 --from "$W/s1-pt"     # CPT: the ViT unfrozen
stage s3-dra --stage 3 --from "$W/s2-cpt"    # DRA: thumbnail + 2x2 windows of a 224 px page
stage s4-ift --stage 4 --from "$W/s3-dra"    # IFT: cross-attention + LLM, the ViT frozen
python -m training.package "$W" checkpoints/demo-reader --stages vit,lm,s1-pt,s2-cpt,s3-dra,s4-ift
python benchmarks/train_eval.py --checkpoint checkpoints/demo-reader --heldout "$W/corpus-heldout/manifest.jsonl" \
    --out checkpoints/demo-reader/eval.json
