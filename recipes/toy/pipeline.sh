#!/usr/bin/env bash
# The toy pipeline, offline on a CPU: a pre-trained toy backbone, the toy reasoning world, train-embed,
# train-gate, a global negatives cache and train-rl, and an evaluation that sweeps from never thinking to
# always thinking; then real photographs that ship inside scikit-image are embedded adaptively.
#
#   bash recipes/toy/pipeline.sh [RUN_DIR [RECIPE_DIR]]
#
# RUN_DIR defaults to runs/toy; RECIPE_DIR (default: this folder) holds toy-backbone.yaml, pretrain.yaml,
# train-embed.yaml, train-gate.yaml and train-rl.yaml; TOY_WORLD_SIZE (default 4000) sets the number of
# queries of the toy world, TOY_SEED (default 0) the seed of the toy backbone and the world (another draw);
# the validation split, which train-gate learns from and chooses τ on, holds 3/5 as many queries (three times
# test's size, in blocks with pools like test's).
# The test suite runs the same script with a reduced recipe folder and world.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
run="${1:-runs/toy}"
recipes="${2:-$here}"
world_size="${TOY_WORLD_SIZE:-4000}"
seed="${TOY_SEED:-0}"
mkdir -p "$run"
export HF_HUB_OFFLINE=1

step() { printf '\n== %s\n' "$*" >&2; }

step "toy backbone: a tiny Qwen2-VL, pre-trained on the toy world"
backbone=$(twn toy-backbone -o "$run/backbone" --seed "$seed" --recipe "$recipes/toy-backbone.yaml" \
    --pretrain --pretrain-recipe "$recipes/pretrain.yaml")

step "the toy reasoning world as a prepared dataset"
data=$(twn prepare synthetic -o "$run/data" --n "$world_size" --seed "$seed" --validation-size $((world_size * 3 / 5)))

step "train-embed: reasoning adapter (SFT on teacher CoT) + embedding adapter (two-view InfoNCE)"
embed_run=$(twn train-embed "$data" --backbone "$backbone" -o "$run/embed" --recipe "$recipes/train-embed.yaml")

step "train-gate: self-supervised labels (does thinking help this input?), gate MLP, threshold"
gate_run=$(twn train-gate "$data" --checkpoint "$embed_run" -o "$run/gate" --recipe "$recipes/train-gate.yaml")

step "the global negatives cache: every candidate of the dataset, embedded without thinking"
cache=$(twn embed "$data" --checkpoint "$gate_run" -o "$run/cache.pt")

step "train-rl: GRPO on the reasoning adapter, rewarded in the embedding space against the cache"
rl_run=$(twn train-rl "$data" --checkpoint "$gate_run" --negatives-cache "$cache" -o "$run/rl" --recipe "$recipes/train-rl.yaml")

step "eval on the test split (unseen combinations and clue phrasings): never, always and gate thresholds"
report=$(twn eval "$data" --checkpoint "$rl_run" -o "$run/report" --mode sweep)
echo "report: $report/report.md" >&2

step "embed real photographs with the trained model, thinking where the gate says so"
images=$(python -c "import pathlib, skimage.data; print(pathlib.Path(skimage.data.__file__).parent)")
# scikit-image's data folder also holds a TIFF that Pillow cannot decode: --skip-bad reports it and goes on.
twn embed "$images" --checkpoint "$rl_run" --adaptive --skip-bad -o "$run/sample-images.safetensors"
