"""A peaked teacher from a trained one: its final norm's weight scaled by s (logits x s, i.e.
temperature 1/s), and how peaked each is.

    python benchmarks/peaked_teacher.py --teacher /tmp/codec-bench/teacher-run/final --tokens /tmp/codec-bench/tokens.zarr \
        --scale 8 --out /tmp/codec-bench/peaked-x8

A trained multi-billion-parameter LM puts more than 0.99 on one token at a large share of
positions; the small teachers CPU time allows here do not. Scaling the final RMSNorm's
weight multiplies every logit by s (the lm_head is linear and the Llama models made here
have untied embeddings), which sharpens the distribution without changing its ranking:
a stand-in for a real LM's peakedness, not a better model (its perplexity gets worse).
Prints top-1 and top-k mass quantiles over the validation sequences of both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.capture.teachers.hf import HFTeacher  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402


def sharpen(src: str, scale: float, out: Path) -> Path:
    """Save a copy of the model at `src` whose final norm weight is multiplied by `scale`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if model.config.tie_word_embeddings:
        raise SystemExit(f"{src} ties its embeddings: scaling the final norm would not be a pure temperature change")
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def peakedness(teacher: str, cache: Cache, sequences: int, domains: list[str] | None = None) -> dict[str, np.ndarray]:
    """Per position of the first `sequences` validation sequences of each domain (default:
    all): top-1 probability and the mass of the top 16/64/256."""
    t = HFTeacher(teacher, device="cpu", dtype="float32")
    tokens = np.concatenate([cache.tokens(d, "val", np.arange(min(sequences, cache.num_sequences(d, "val"))))
                             for d in domains or cache.domains])
    top1, mass = [], {k: [] for k in (16, 64, 256)}
    nll = []
    for _, logprobs, nxt in t.rows(tokens):
        p = logprobs.exp()
        top = torch.topk(p, 256, -1).values
        top1.append(top[:, 0].numpy())
        for k in mass:
            mass[k].append(top[:, :k].sum(-1).numpy())
        nll.append(-logprobs.gather(-1, nxt[:, None]).squeeze(-1).numpy())
    t.close()
    return {"top1": np.concatenate(top1), **{f"top{k}": np.concatenate(v) for k, v in mass.items()}, "nll": np.concatenate(nll)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--tokens", required=True, help="a cache whose validation sequences are scored")
    ap.add_argument("--scale", type=float, nargs="+", default=[8.0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the sharpened teachers (one sub-folder per scale)")
    ap.add_argument("--sequences", type=int, default=8, help="validation sequences per domain")
    args = ap.parse_args()
    cache = Cache(args.tokens)
    rows = []
    teachers = [("trained", args.teacher)]
    for s in args.scale:
        path = args.out / f"x{s:g}"
        if not path.exists():
            sharpen(args.teacher, s, path)
        teachers.append((f"x{s:g} (final norm scaled)", str(path)))
    for name, path in teachers:
        st = peakedness(path, cache, args.sequences)
        q = lambda a: "/".join(f"{np.quantile(a, x):.3f}" for x in (0.1, 0.5, 0.9))  # noqa: E731
        rows.append((name, f"{np.exp(st['nll'].mean()):.1f}", q(st["top1"]), f"{(st['top1'] > 0.99).mean():.1%}", f"{(st['top1'] > 0.9).mean():.1%}",
                     q(st["top16"]), q(st["top64"]), q(st["top256"])))
    print(f"machine: {machine()}; {len(st['top1']):,} validation positions")
    print_table(("teacher", "val PPL", "top-1 p (10/50/90%)", "top-1 > 0.99", "top-1 > 0.9", "top-16 mass (10/50/90%)",
                 "top-64 mass (10/50/90%)", "top-256 mass (10/50/90%)"), rows)


if __name__ == "__main__":
    main()
