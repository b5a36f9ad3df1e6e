#!/usr/bin/env bash
# The toy pipeline, offline on a CPU: build the toy backbone, then embed real photographs that ship inside
# scikit-image. Later stages (prepare synthetic, train-embed, train-gate, train-rl, eval) join as they land.
#
#   bash recipes/toy/pipeline.sh [RUN_DIR]      (default RUN_DIR: runs/toy)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
run="${1:-runs/toy}"
mkdir -p "$run"
export HF_HUB_OFFLINE=1

backbone=$(twn toy-backbone -o "$run/backbone" --seed 0 --recipe "$here/toy-backbone.yaml")

images=$(python -c "import pathlib, skimage.data; print(pathlib.Path(skimage.data.__file__).parent)")
# scikit-image's data folder also holds a TIFF that Pillow cannot decode: --skip-bad reports it and goes on.
embeddings=$(twn embed "$images" --backbone "$backbone" --think always --max-think-tokens 16 --skip-bad \
    -o "$run/sample-images.safetensors")

python - "$embeddings" <<'PY'
import sys
from twn_cli.data.embedding_files import read_embeddings
ids, vectors, meta = read_embeddings(sys.argv[1])
print(f"{len(ids)} images -> {tuple(vectors.shape)} embeddings ({meta['think_mode']} think, normalized={meta['normalized']}, skipped {len(meta['skipped'])})")
similarity = vectors @ vectors.T
similarity.fill_diagonal_(-1)
for i in range(min(5, len(ids))):
    print(f"  {ids[i]:<28} nearest: {ids[int(similarity[i].argmax())]}")
PY
echo "$embeddings"
