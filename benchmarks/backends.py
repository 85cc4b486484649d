"""vLLM vs transformers teacher on the same model and data; dict vs flat prompt-logprob conversion.

    python benchmarks/backends.py --corpus ../shared/corpora/dev --work /tmp/ddk-bench
    python benchmarks/backends.py --corpus ../shared/corpora/dev --work /tmp/ddk-bench --teacher smollm2 --seq-len 256 \
        --max-tokens-per-domain 4096

Part 1 builds the same cache with each backend and reports tokens/s and the writer's share.
Part 2 scores the same sequences with vLLM returning dicts and flat lists, and splits the
time into the engine's `generate` call (which builds the Python objects) and our conversion.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import machine, print_table, real_teacher, teacher as make_teacher

from ddk_cache.capture.build import BuildConfig, build
from ddk_cache.store.cache import Cache
from ddk_cache.capture.teachers import load_teacher
from ddk_cache.capture.teachers.vllm import dict_to_arrays, flat_to_arrays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--max-tokens-per-domain", type=int, default=40_000)
    p.add_argument("--conversion-sequences", type=int, default=32)
    p.add_argument("--teacher", default=None, help="a model directory or 'smollm2' (default: a random 4-layer Llama, V = 8,192)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = real_teacher(args.teacher) if args.teacher else str(make_teacher(args.corpus, work, vocab_size=8192, hidden_size=256, layers=4, heads=4, context=2048))
    print(f"machine: {machine()}; teacher {path}\n")

    rows, vllm_teacher = [], None
    for backend in ("hf", "vllm"):
        out = work / f"backends-{backend}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        config = BuildConfig(teacher=path, data=args.corpus, out=str(out), top_k=args.top_k, seq_len=args.seq_len,
                             backend=backend, dtype="float32", max_tokens_per_domain=args.max_tokens_per_domain)
        t0 = time.perf_counter()
        teacher = load_teacher(backend, path, top_k=args.top_k, seq_len=args.seq_len, dtype="float32", device="cpu")
        load = time.perf_counter() - t0
        r = build(config, progress=False, teacher=teacher)
        rows.append((backend, r.meta.teacher["backend_version"], f"{load:.1f}", f"{r.tokens_scored:,}", f"{r.tokens_per_second:,.0f}",
                     f"{r.tokens_scored / r.teacher_seconds:,.0f}", f"{r.write_seconds / r.teacher_seconds:.1%}"))
        if backend == "vllm":
            vllm_teacher = teacher
        else:
            teacher.close()
    print(f"Part 1: whole build, seq-len {args.seq_len}, top-k {args.top_k}, float32, {args.max_tokens_per_domain:,} tokens/domain cap\n")
    print_table(("backend", "engine", "load s", "tokens", "build tok/s", "teacher tok/s", "encode+write / teacher"), rows)

    tokens = Cache(str(work / "backends-hf.zarr")).read("code", "train", 0, args.conversion_sequences).tokens
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, k, n_tok = vllm_teacher.llm, args.top_k, tokens.shape[0] * (tokens.shape[1] - 1)
    prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in tokens]
    rows = []
    for fmt, convert in (("dict", dict_to_arrays), ("flat", flat_to_arrays)):
        params = SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=fmt == "flat")
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        for out, row in zip(outs, tokens):
            convert(out.prompt_logprobs, row, k)
        conv = time.perf_counter() - t0
        rows.append((fmt, f"{gen / n_tok * 1e6:.1f}", f"{conv / n_tok * 1e6:.2f}", f"{n_tok / (gen + conv):,.0f}"))
    vllm_teacher.close()
    print(f"\nPart 2: {tokens.shape[0]} sequences x {tokens.shape[1]} tokens, top-k {k}, one generate call each\n")
    print_table(("prompt logprobs as", "generate µs/token", "our conversion µs/token", "tokens/s end to end"), rows)


if __name__ == "__main__":  # vLLM starts engine processes
    main()
