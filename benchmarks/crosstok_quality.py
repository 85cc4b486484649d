"""Students of three tokenizers from one teacher cache (issue #26): held-out bits per byte per
domain after training on the same text, for CE only, same-tokenizer KD, and the
cross-tokenizer losses, with DDK and with the natural mix, over seeds.

    python benchmarks/crosstok_quality.py --cache /tmp/xb/cache.zarr --work /tmp/xb/runs

The cache must hold its teacher's tokenizer (built or imported by ddk-cache >= 0.4). The
three tokenizers: the teacher's own; `bpe8k`, a byte-level BPE of 8,192 ids trained on the
cache's training text (GPT-2 pre-tokenization, like the teacher's but a sixth of its
vocabulary); `digits8k`, 8,192 ids trained on the same text with another pre-tokenization
(every digit apart, no word regex: a word merges with the space after it, not before, so
most token boundaries differ from the teacher's). Every student has the same shape (hidden
128, 2 layers, tied embeddings; the vocabulary is its tokenizer's) and starts from random
weights of its --seed; every run reads the same rows of the cache (equal bytes of text).
Each run is one `ddk-cache distill`, skipped when its final model exists (an interrupted
benchmark continues). Prints one markdown table per mix and a summary of the gap closed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import machine, print_table
from quality import sh

METHODS = {  # name -> (distill flags, which tokenizers)
    "CE": (["--kd-loss", "none"], ("teacher", "bpe8k", "digits8k")),
    "KD (fkl)": (["--kd-loss", "fkl"], ("teacher",)),
    "uld": (["--cross-tokenizer", "uld"], ("teacher", "bpe8k", "digits8k")),
    "hybrid": (["--cross-tokenizer", "hybrid"], ("bpe8k", "digits8k")),  # on the teacher's tokenizer it is KD (tested)
    "prefix": (["--cross-tokenizer", "prefix"], ("bpe8k", "digits8k")),  # likewise
}


def tokenizers(cache_path: str, work: Path) -> dict[str, Path]:
    """The three tokenizers' directories (the teacher's from the cache; two trained here)."""
    import numpy as np

    from ddk_cache.capture.tokenization import cache_tokenizer
    from ddk_cache.models import train_tokenizer
    from ddk_cache.store.cache import Cache
    from ddk_cache.train.crosstok import RowText

    out = {"teacher": work / "tok-teacher", "bpe8k": work / "tok-bpe8k", "digits8k": work / "tok-digits8k"}
    if all(p.exists() for p in out.values()):
        return out
    cache = Cache(cache_path)
    teacher = cache_tokenizer(cache)
    teacher.save_pretrained(out["teacher"])
    rt = RowText(teacher, teacher)
    texts = [rt.text_bytes(row).decode("utf-8", "ignore") for d in cache.domains
             for row in cache.tokens(d, "train", np.arange(cache.num_sequences(d, "train")))]
    train_tokenizer(texts, 8192).save_pretrained(out["bpe8k"])
    train_tokenizer(texts, 8192, digits=True).save_pretrained(out["digits8k"])
    return out


def student_config(tok_dir: Path, out: Path) -> Path:
    """A Llama config of the benchmark's shape for this tokenizer (weights come from --seed)."""
    from transformers import LlamaConfig

    from ddk_cache.capture.tokenization import load_tokenizer

    if not (out / "config.json").exists():
        tok = load_tokenizer(str(tok_dir))
        LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(out)
    return out / "config.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--ddk-interval", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--mixes", nargs="+", default=["ddk", "natural"], choices=["ddk", "natural"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--report-only", action="store_true", help="print the tables from the runs that exist")
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    toks = tokenizers(args.cache, work)
    configs = {t: student_config(d, work / f"student-{t}") for t, d in toks.items()}
    runs = [(seed, mix, tok, m) for seed in args.seeds for mix in args.mixes for m in args.methods for tok in METHODS[m][1]]
    if not args.report_only:
        for i, (seed, mix, tok, method) in enumerate(runs, 1):
            out = work / "runs" / f"{tok}-{method.split()[0].lower()}-{mix}-s{seed}"
            if (out / "final").exists():
                continue
            t0 = time.perf_counter()
            sh(["distill", "--cache", args.cache, "--student-config", str(configs[tok]), "--tokenizer", str(toks[tok]), "--out", str(out),
                *METHODS[method][0], "--mixing", mix, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--warmup-steps", "10", "--kd-weight", str(args.kd_weight), "--ddk-interval", str(args.ddk_interval),
                "--save-every", str(args.steps), "--eval-batch-size", "16", "--seed", str(seed), "--device", "cpu", "--quiet"],
               work / f"{out.name}.log")
            print(f"[{i}/{len(runs)}] {out.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report(args, work, runs)


def report(args: argparse.Namespace, work: Path, runs: list[tuple]) -> None:
    results: dict[tuple, list[dict]] = {}
    for seed, mix, tok, method in runs:
        metrics = work / "runs" / f"{tok}-{method.split()[0].lower()}-{mix}-s{seed}" / "metrics.jsonl"
        if not (metrics.parent / "final").exists():
            continue
        recs = [json.loads(line) for line in open(metrics)]
        final = [r for r in recs if r["type"] == "eval"][-1]
        steps = [r for r in recs if r["type"] == "step"]
        results.setdefault((mix, tok, method), []).append({"bpb": final["bpb_student"], "teacher": final["bpb_teacher"],
                                                           "paired": steps[-1].get("crosstok", {}).get("paired"),
                                                           "mapped": steps[-1].get("crosstok", {}).get("mapped_mass"),
                                                           "targeted": steps[-1].get("crosstok", {}).get("targeted")})
    if not results:
        print("no finished runs yet")
        return
    print(f"machine: {machine()}")
    print(f"cache {args.cache}; {args.steps} steps x {args.batch_size} rows per run (the same text for every student); lr {args.lr}; "
          f"kd weight {args.kd_weight}; DDK interval {args.ddk_interval}; seeds {args.seeds}\n")
    domains = list(next(iter(results.values()))[0]["bpb"])
    teacher = next(iter(results.values()))[0]["teacher"]
    for mix in args.mixes:
        rows = [("teacher", "-", *(f"{teacher[d]:.3f}" for d in domains), f"{statistics.mean(teacher.values()):.3f}", "-", "-", "-")]
        for (m, tok, method), got in sorted(results.items(), key=lambda kv: (list(METHODS).index(kv[0][2]), kv[0][1])):
            if m != mix:
                continue
            per = {d: statistics.mean(g["bpb"][d] for g in got) for d in domains}
            means = [statistics.mean(g["bpb"].values()) for g in got]
            worst = [max(g["bpb"][d] - teacher[d] for d in domains) for g in got]
            sd = f" ± {statistics.stdev(means):.3f}" if len(means) > 1 else ""
            paired = got[0]["targeted"] if got[0].get("targeted") is not None else got[0]["paired"]
            rows.append((method, tok, *(f"{per[d]:.3f}" for d in domains), f"{statistics.mean(means):.3f}{sd}",
                         f"{statistics.mean(worst):.3f} ({max(domains, key=lambda d: per[d] - teacher[d])})",
                         "-" if paired is None else f"{paired:.2f} / {got[0]['mapped']:.2f}", str(len(got))))
        print(f"### mix: {mix} — held-out bits per byte (mean over seeds)\n")
        print_table(("method", "tokenizer", *domains, "mean (± sd over seeds)", "worst domain: bpb - teacher", "with a target / mapped mass", "seeds"), rows)
        print()
    for mix in args.mixes:
        ce, kd = results.get((mix, "teacher", "CE")), results.get((mix, "teacher", "KD (fkl)"))
        if not ce or not kd:
            continue
        mean = lambda got: statistics.mean(statistics.mean(g["bpb"].values()) for g in got)  # noqa: E731
        gap = mean(ce) - mean(kd)
        print(f"{mix}: same-tokenizer KD gains {gap:.3f} bits/byte over CE (teacher's tokenizer).")
        for tok in ("bpe8k", "digits8k"):
            for method in ("hybrid", "prefix", "uld"):
                base, got = results.get((mix, tok, "CE")), results.get((mix, tok, method))
                if base and got and gap > 0:
                    print(f"  {tok} {method}: {mean(base) - mean(got):+.3f} over its CE = {(mean(base) - mean(got)) / gap:.0%} of that gap")


if __name__ == "__main__":
    main()
