"""Train the codec benchmark's teacher: a 32k-vocabulary Llama on ../shared/corpora/dev.

    python benchmarks/codec_teacher.py --corpus ../shared/corpora/dev --work /tmp/codec-bench

Steps (each skipped when its output exists): BPE tokenizer (32,768 ids) trained on the
corpus + a randomly initialised Llama (`make_model_dir`); a tokens-only cache
(`build --top-k 0`); plain language modelling on it (`distill --kd-loss none`). Prints the
teacher's validation perplexity per domain beside the uniform baseline (= vocabulary size).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import machine, teacher

from ddk_cache.capture.build import BuildConfig, build
from ddk_cache.train.distill import DistillConfig, distill
from ddk_cache.train.report import read_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="../shared/corpora/dev")
    ap.add_argument("--work", type=Path, default=Path("/tmp/codec-bench"))
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens-per-domain", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    init = teacher(args.corpus, args.work, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                   layers=args.layers, heads=args.hidden_size // 64, context=max(512, args.seq_len + 1))
    tokens = args.work / "tokens.zarr"
    build(BuildConfig(tokenizer=str(init), data=args.corpus, out=str(tokens), top_k=0, seq_len=args.seq_len, backend="hf",
                      max_tokens_per_domain=args.tokens_per_domain, val_tokens=8 * args.seq_len, device="cpu", dtype="float32"))
    run = args.work / "teacher-run"
    if not (run / "final").exists():
        distill(DistillConfig(cache=str(tokens), student=str(init), out=str(run), kd_loss="none", mixing="natural",
                              max_steps=args.steps, batch_size=args.batch_size, lr=3e-3, warmup_steps=20,
                              ddk_interval=args.steps, save_every=50, device="cpu", resume=(run / "checkpoints").exists()))
    _, evals = read_metrics(run)
    print(f"machine: {machine()}")
    print(f"teacher {run / 'final'}: vocabulary {args.vocab_size}, uniform PPL {args.vocab_size}")
    for d, ppl in evals[-1]["ppl_student"].items():
        print(f"  {d}: val PPL {evals[0]['ppl_student'][d]:.0f} at step 0 -> {ppl:.1f} ({math.log(ppl):.2f} nats)")
    print(json.dumps({"teacher": str(run / "final")}))


if __name__ == "__main__":
    main()
