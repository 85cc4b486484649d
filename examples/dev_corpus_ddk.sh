#!/usr/bin/env bash
# bash examples/dev_corpus_ddk.sh [CORPUS] [WORK]
# The whole story on CPU with the tool's own commands: a local teacher trained on the corpus
# (`distill --kd-loss none` on a cache is plain language modelling), its cache, and two
# differently sized students distilled from that one cache with DDK.
set -euo pipefail
CORPUS=${1:-../shared/corpora/dev}
WORK=${2:-/tmp/ddk-dev}
CAP=100000   # tokens per domain
mkdir -p "$WORK"
cd "$WORK"

# 1. A random-init Llama teacher (4 layers x 256) and a 4096-token BPE tokenizer trained on the corpus.
[ -d teacher0 ] || ddk-cache init-model --corpus "$CORPUS" --out teacher0 --vocab-size 4096 --hidden-size 256 --layers 4
# 2. A tokens-only cache (--top-k 0: no teacher runs) gives the packed tokens; train the teacher on them with CE only.
ddk-cache build --tokenizer teacher0 --data "$CORPUS" --out tokens.zarr --top-k 0 --seq-len 512 --backend hf --max-tokens-per-domain $CAP --quiet
[ -d runs/teacher/final ] || ddk-cache distill --cache tokens.zarr --student teacher0 --out runs/teacher --kd-loss none \
    --mixing natural --max-steps 300 --batch-size 8 --lr 2e-3 --warmup-steps 20 --ddk-interval 100 --save-every 100 --quiet
# 3. The cache of the trained teacher: top-64 log-probs.
ddk-cache build --teacher runs/teacher/final --data "$CORPUS" --out cache.zarr --top-k 64 --seq-len 512 --backend hf --max-tokens-per-domain $CAP --quiet
ddk-cache inspect cache.zarr
# 4. Two students of the teacher's tokenizer, distilled from the one cache with DDK.
for spec in "small 128 2" "large 192 3"; do
  set -- $spec
  [ -d student-$1 ] || python - "$1" "$2" "$3" <<'PY'
import sys
from ddk_cache.models import ModelSpec, init_model
from ddk_cache.capture.tokenization import load_tokenizer
name, hidden, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tok = load_tokenizer("runs/teacher/final")
init_model(ModelSpec(vocab_size=4096, hidden_size=hidden, layers=layers, heads=hidden // 32, seed=1), tok).save_pretrained(f"student-{name}")
tok.save_pretrained(f"student-{name}")
PY
  rm -rf runs/$1
  ddk-cache distill --cache cache.zarr --student student-$1 --out runs/$1 --max-steps 200 --batch-size 8 --lr 2e-3 \
      --warmup-steps 20 --ddk-interval 25 --save-every 100 --quiet
  ddk-cache eval --cache cache.zarr --model runs/$1/final
  ddk-cache report runs/$1
done
