#!/usr/bin/env bash
# TWN on Qwen3-VL-4B with MMEB: prepare MMEB-train and MMEB-V2 eval sets you have downloaded, train the
# adapters on GPUs, train the gate, embed the candidates into a global negatives cache, run train-rl, and
# evaluate never / always / adaptive thinking with a threshold sweep.
#
#   MMEB_TRAIN=/data/MMEB-train MMEB_EVAL=/data/MMEB-V2 GPUS=8 bash recipes/qwen3-vl-4b/pipeline.sh [RUN_DIR]
#
# MMEB_TRAIN: the MMEB-train parquet files with their image folders (image paths resolve beside each file,
# or set IMAGE_ROOT); MMEB_EVAL: the MMEB-V2 eval parquet files (one per task) with their images.
# train-gate picks τ on a validation split, which MMEB-train does not have: hold out part of it as
# validation (shards named validation-00000-of-00001.parquet, or a `split` column) before preparing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
run="${1:-runs/qwen3-vl-4b}"
backbone="${BACKBONE:-Qwen/Qwen3-VL-4B-Instruct}"
gpus="${GPUS:-1}"
: "${MMEB_TRAIN:?set MMEB_TRAIN to the MMEB-train folder}" "${MMEB_EVAL:?set MMEB_EVAL to the MMEB-V2 eval folder}"
mkdir -p "$run"
image_root=(); [ -n "${IMAGE_ROOT:-}" ] && image_root=(--image-root "$IMAGE_ROOT")

step() { printf '\n== %s\n' "$*" >&2; }

step "prepare MMEB-train and the MMEB-V2 eval sets (every image opened; bad records listed, not dropped)"
train_data=$(twn prepare "$MMEB_TRAIN" -o "$run/data/train" --skip-bad "${image_root[@]}")
eval_data=$(twn prepare "$MMEB_EVAL" -o "$run/data/eval" --skip-bad)

step "train-embed on $gpus GPU(s): batch 1024 through the gradient cache, bf16"
embed_run=$(torchrun --nproc_per_node "$gpus" -m twn_cli train-embed "$train_data" --backbone "$backbone" \
    -o "$run/embed" --recipe "$here/train-embed.yaml" --dtype bfloat16)

step "train-gate on $gpus GPU(s): self-supervised labels, gate, threshold on validation Hit@1"
gate_run=$(torchrun --nproc_per_node "$gpus" -m twn_cli train-gate "$train_data" --checkpoint "$embed_run" -o "$run/gate" \
    --recipe "$here/train-gate.yaml" --dtype bfloat16)

step "the global negatives cache: every MMEB-train candidate, embedded without thinking"
cache=$(torchrun --nproc_per_node "$gpus" -m twn_cli embed "$train_data" --checkpoint "$gate_run" -o "$run/cache.safetensors" \
    --dtype bfloat16 --batch-size 64)

step "train-rl on $gpus GPU(s): GRPO on the reasoning adapter against the cache"
rl_run=$(torchrun --nproc_per_node "$gpus" -m twn_cli train-rl "$train_data" --checkpoint "$gate_run" \
    --negatives-cache "$cache" -o "$run/rl" --recipe "$here/train-rl.yaml" --dtype bfloat16)

step "eval on MMEB-V2: never, always, and the gate's thresholds"
torchrun --nproc_per_node "$gpus" -m twn_cli eval "$eval_data" --checkpoint "$rl_run" -o "$run/report" --mode sweep \
    --dtype bfloat16 --batch-size 64
