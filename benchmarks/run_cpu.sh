#!/usr/bin/env bash
# The CPU benchmarks (think_cost, train_embed_memory, scaling) at toy sizes, JSON (and the printed tables)
# into the folder given. About 5 minutes on 2 quiet cores (at most ~8); run it when nothing else uses the
# machine, or the figures will say more about the other jobs than about TWN.
#
#   bash benchmarks/run_cpu.sh results/cpu-$(date +%F)
#   SMOKE=1 bash benchmarks/run_cpu.sh /tmp/smoke        # the same commands at tiny sizes (~1 minute)
#
# One toy backbone (the toy recipe's size, random weights: costs do not depend on training) is built first
# and shared. CHECKPOINT=runs/toy/gate uses a trained checkpoint instead (think_cost and scaling).
set -euo pipefail
out=${1:?usage: run_cpu.sh OUTPUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python=${PYTHON:-python}

if [ -n "${SMOKE:-}" ]; then
  think=(--n 8 --batch-size 4 --max-think-tokens 4 --repeats 1)
  train=(--batch-sizes 4 8 --chunks none full 2 --steps 1 --toy-queries 40)
  scale=(--inputs 8 16 --batch-size 4 --max-think-tokens 4 --repeats 1 --pools 1000 3000 --queries 16 --dim 64)
else
  think=(--n 128 --batch-size 16 --max-think-tokens 24 --repeats 3)
  train=(--batch-sizes 16 32 64 --chunks none full 8 --steps 2)
  scale=(--inputs 64 128 256 --batch-size 16 --max-think-tokens 24 --repeats 2 --pools 10000 100000 300000 --queries 256 --dim 1536)
fi

start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" >&2; }

backbone="$out/toy-backbone"
if [ ! -f "$backbone/config.json" ]; then
  stamp "building the toy backbone"
  "$python" -c "import sys; from twn_cli.toyworld.backbone import build_toy_backbone; build_toy_backbone(sys.argv[1])" "$backbone" 2>/dev/null
fi
model=(--backbone "$backbone")
if [ -n "${CHECKPOINT:-}" ]; then model=(--checkpoint "$CHECKPOINT"); fi

stamp "(a)-(c) think_cost"
"$python" "$here/think_cost.py" "${model[@]}" "${think[@]}" --rates 0.25 0.5 0.75 \
  -o "$out/think_cost.json" | tee "$out/think_cost.txt"

stamp "(d) train_embed_memory"
"$python" "$here/train_embed_memory.py" --backbone "$backbone" "${train[@]}" \
  -o "$out/train_embed_memory.json" | tee "$out/train_embed_memory.txt"

stamp "(e) scaling"
"$python" "$here/scaling.py" "${model[@]}" "${scale[@]}" -o "$out/scaling.json" | tee "$out/scaling.txt"

stamp "done: $out"
