#!/usr/bin/env bash
# bash benchmarks/gpu_cost.sh CORPUS WORK: a 164M local teacher, its cache, a ~50M student, then benchmarks/cost.py.
set -euo pipefail
CORPUS=$1; WORK=$2; HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"; cd "$WORK"
[ -d teacher ] || python3 -m ddk_cache init-model --corpus "$CORPUS" --out teacher --vocab-size 32768 --hidden-size 768 --layers 12 --heads 12
python3 -m ddk_cache build --teacher teacher --data "$CORPUS" --out cache.zarr --top-k 64 --seq-len 1024 --backend hf \
    --max-tokens-per-domain 200000 --batch-size 16 --quiet
python3 - <<'PY'
from ddk_cache.models import ModelSpec, init_model
from ddk_cache.capture.tokenization import load_tokenizer
tok = load_tokenizer("teacher")
init_model(ModelSpec(vocab_size=32768, hidden_size=512, layers=8, heads=8, seed=1), tok).save_pretrained("student")
tok.save_pretrained("student")
PY
python3 "$HERE/cost.py" --cache cache.zarr --student student --teacher teacher --batch-size 16 --warmup 3 --steps 10 --loader-batches 50
