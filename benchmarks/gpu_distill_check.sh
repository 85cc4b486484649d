#!/usr/bin/env bash
# bash benchmarks/gpu_distill_check.sh CORPUS WORK
# On a GPU: a 164M-param local teacher's cache (seq-len 1024, top-64), then one ~50M student
# trained 60 steps in bf16 autocast with each of --kd-loss none/fkl/rkl; prints median
# tokens/s (steps 11-60) and peak GPU memory per loss.
set -euo pipefail
CORPUS=$1; WORK=$2
mkdir -p "$WORK"; cd "$WORK"
python3 -m ddk_cache init-model --corpus "$CORPUS" --out teacher --vocab-size 32768 --hidden-size 768 --layers 12 --heads 12
python3 -m ddk_cache build --teacher teacher --data "$CORPUS" --out cache.zarr --top-k 64 --seq-len 1024 --backend hf \
    --max-tokens-per-domain 300000 --batch-size 16 --quiet
python3 - <<'PY'
from ddk_cache.models import ModelSpec, init_model
from ddk_cache.capture.tokenization import load_tokenizer
tok = load_tokenizer("teacher")
init_model(ModelSpec(vocab_size=32768, hidden_size=512, layers=8, heads=8, seed=1), tok).save_pretrained("student")
tok.save_pretrained("student")
PY
for loss in none fkl rkl; do
  python3 -m ddk_cache distill --cache cache.zarr --student student --out runs/$loss --kd-loss $loss --max-steps 60 \
      --batch-size 16 --ddk-interval 30 --warmup-steps 5 --lr 1e-3 --quiet
done
python3 - <<'PY'
import json, statistics
print("| --kd-loss | median tokens/s (steps 11-60) | peak GPU memory | loss step 1 -> 60 | mean val PPL start -> end |")
print("|---|---|---|---|---|")
for loss in ("none", "fkl", "rkl"):
    rows = [json.loads(l) for l in open(f"runs/{loss}/metrics.jsonl")]
    st = [r for r in rows if r["type"] == "step"]; ev = [r for r in rows if r["type"] == "eval"]
    mean = lambda e: sum(e["ppl_student"].values()) / len(e["ppl_student"])
    print(f"| {loss} | {statistics.median(r['tokens_per_s'] for r in st[10:]):,.0f} | {max(r['peak_mem_gib'] for r in st):.2f} GiB | "
          f"{st[0]['loss']:.3f} -> {st[-1]['loss']:.3f} | {mean(ev[0]):.1f} -> {mean(ev[-1]):.1f} |")
PY
