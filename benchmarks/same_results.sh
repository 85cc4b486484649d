#!/bin/bash
# Do two revisions of ddk-cache produce the same caches and the same training? For moves and
# refactors that must not change behaviour (issue #24). Builds pack, pack-v2 and plain caches
# of a small corpus with a peaked random teacher, distills fkl/rkl/akl for 6 steps from each
# revision's code, and compares: shard objects byte for byte (but for the build id in the
# identity trailer, the build fingerprint, which two revisions need not share), domain
# metadata, losses and DDK weights.
#
#   bash benchmarks/same_results.sh REV_A REV_B CORPUS_DIR [WORK]
#   bash benchmarks/same_results.sh b44690e HEAD ../shared/corpora/dev
set -euo pipefail
A=$1; B=$2; CORPUS=$3; WORK=${4:-/tmp/ddk-same-results}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
rm -rf "$WORK"; mkdir -p "$WORK/corpus"
for f in "$CORPUS"/*.jsonl; do head -150 "$f" > "$WORK/corpus/$(basename "$f")"; done
"$PY" -m ddk_cache init-model --corpus "$WORK/corpus" --out "$WORK/teacher" --vocab-size 512 --hidden-size 64 --layers 2 >/dev/null 2>&1
"$PY" - "$WORK/teacher" <<'PYEOF'
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    m.model.norm.weight.mul_(40)  # peaked: KD terms far from zero
m.save_pretrained(sys.argv[1])
PYEOF
for side in a b; do
  rev=$([ $side = a ] && echo "$A" || echo "$B")
  tree="$WORK/tree-$side"; out="$WORK/out-$side"; mkdir -p "$tree" "$out"
  git -C "$HERE" archive "$rev" | tar -x -C "$tree"; mv "$tree/cli" "$tree/ddk_cache/cli"
  run() { (cd "$tree" && PYTHONPATH="$tree" "$PY" -c "import sys; sys.argv=['ddk-cache']+sys.argv[1:]; import ddk_cache; assert ddk_cache.__file__.startswith('$tree'); from ddk_cache.cli.main import main; main()" "$@" > "$out/log.txt" 2>&1) || { cat "$out/log.txt"; exit 1; }; }
  for enc in pack pack-v2 plain; do
    run build --teacher "$WORK/teacher" --data "$WORK/corpus" --out "$out/c-$enc.zarr" --seq-len 64 --top-k 16 --encoding $enc \
      --val-tokens 256 --backend hf --shard-sequences 8 --max-tokens-per-domain 8192
  done
  for loss in fkl rkl akl; do
    run distill --cache "$out/c-pack.zarr" --student-config "$WORK/teacher/config.json" --tokenizer "$WORK/teacher" --seed 1 \
      --out "$out/d-$loss" --kd-loss $loss --max-steps 6 --batch-size 4 --mixing ddk --ddk-interval 3
  done
done
"$PY" "$HERE/benchmarks/same_results_compare.py" "$WORK/out-a" "$WORK/out-b"
