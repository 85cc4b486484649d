"""`ddk-cache build`: run the teacher over a corpus and write the cache."""

from __future__ import annotations

import click
import yaml

from ddk_cache.capture.build import BuildConfig, build as run_build, finalize


def _engine_args(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        out[key.replace("-", "_")] = yaml.safe_load(raw)  # 1 -> int, true -> bool, '{...}' -> dict
    return out


@click.command()
@click.option("--teacher", help="Teacher model: a local transformers directory or a hub id.")
@click.option("--data", type=click.Path(), help="Corpus directory (one domain per .jsonl/.jsonl.gz/.txt/.parquet file or sub-folder) or a .yaml/.toml spec mapping domain -> globs.")
@click.option("--out", required=True, help="Cache path (a .zarr directory) or fsspec URL (s3://bucket/c.zarr). An unfinished cache of the same build is resumed.")
@click.option("--top-k", default=64, show_default=True, help="Log-probabilities kept per position (at most, with --min-mass/--min-prob; unique ids, with --targets sampled).")
@click.option("--targets", type=click.Choice(["topk", "sampled"]), default="topk", show_default=True, help="topk: the most probable ids and a tail bucket; sampled: --samples ids drawn from the teacher per position, stored with counts (unbiased targets).")
@click.option("--min-mass", type=float, default=None, help="Adaptive top-k: keep entries until their probability sums to this (0-1], at most --top-k; the top-1 is always kept.")
@click.option("--min-prob", type=float, default=None, help="Adaptive top-k: drop entries with probability below this (the top-1 is always kept).")
@click.option("--samples", default=50, show_default=True, help="--targets sampled: draws per position (1-255).")
@click.option("--sample-temperature", default=1.0, show_default=True, help="--targets sampled: draw from softmax(logits / T); T != 1 stores log-probs for importance weights.")
@click.option("--sample-pool", type=int, default=None, help="--targets sampled: draw from the top-N log-probs only (default: the full distribution with --backend hf, the top-256 with vllm, which returns no more).")
@click.option("--encoding", type=click.Choice(["pack", "plain"]), default="pack", show_default=True, help="pack: the pack-v1 codec (ids exact, log-probs quantised within --kl-budget; ~4x smaller than plain at k=64); plain: exact float32 + int32 (plain-v1).")
@click.option("--kl-budget", default=1e-4, show_default=True, help="pack: KL (nats per position) the log-prob quantisation may add.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per packed sequence (at most the teacher's context; vLLM needs one more).")
@click.option("--backend", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True, help="Teacher engine; auto = vllm when installed, else hf (transformers).")
@click.option("--text-field", default="text", show_default=True, help="JSON/parquet field holding each document's text.")
@click.option("--val-sequences", default=8, show_default=True, help="Held-out validation sequences per domain (DDK evaluates on them).")
@click.option("--max-tokens-per-domain", type=int, default=None, help="Cap each domain at this many tokens (documents shuffled first).")
@click.option("--seed", default=0, show_default=True, help="Seed of the per-domain document shuffle.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="Teacher dtype; auto = bfloat16 on GPU, float32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="Torch device for the hf backend (cpu, cuda, cuda:1; auto = cuda:LOCAL_RANK when present).")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per forward pass (hf backend).")
@click.option("--shard-sequences", default=0, show_default=True, help="Sequences per shard, the unit of work and of resume; 0 = about 16 MiB of log-probs.")
@click.option("--revision", default=None, help="Teacher revision (hub ids only).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the teacher's own Python code to run (off unless you ask).")
@click.option("--num-shards", type=int, default=None, help="Split the build across this many workers (default: WORLD_SIZE under torchrun, SLURM_NTASKS under srun, else 1).")
@click.option("--shard-index", type=int, default=None, help="This worker's index in 0..num-shards-1 (default: RANK / SLURM_PROCID). Worker 0 creates the store.")
@click.option("--wait-timeout", default=7200.0, show_default=True, help="Seconds a worker other than 0 waits for worker 0 to create the store.")
@click.option("--writer-threads", default=0, show_default=True, help="Shards encoded and written in parallel with the teacher; 0 = half the CPU cores (1 to 8).")
@click.option("--finalize", "finalize_only", is_flag=True, help="Only finalize --out: compute the PPL table once every worker's shards are written.")
@click.option("--tensor-parallel-size", default=1, show_default=True, help="vLLM: GPUs per engine.")
@click.option("--gpu-memory-utilization", type=float, default=None, help="vLLM: share of GPU memory to use (on the CPU build, of host RAM; default 0.9 on GPU, 0.3 on CPU).")
@click.option("--max-num-batched-tokens", type=int, default=None, help="vLLM: tokens per engine step.")
@click.option("--logprobs-format", type=click.Choice(["flat", "dict"]), default="flat", show_default=True, help="vLLM: how prompt log-probs come back; flat lists convert far faster.")
@click.option("--engine-arg", "engine_args", multiple=True, callback=_engine_args, metavar="KEY=VALUE", help="vLLM: any other engine argument, repeatable (e.g. --engine-arg enforce_eager=true).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(quiet: bool, finalize_only: bool, **options: object) -> None:
    """Score a corpus with a teacher and write its top-k log-probabilities to a Zarr cache.

    Resumable: run the same command again after an interruption and it finishes the work
    without redoing completed shards. A cache built with other arguments is refused.

    \b
    Several workers (processes or machines) can share one build:
      ddk-cache build ... --num-shards 4 --shard-index I      # I = 0..3, any order, restartable
      torchrun --nproc-per-node 8 -m ddk_cache build ...      # rank and world size from the environment
    The last worker to finish finalizes the cache; `ddk-cache build --out CACHE --finalize` does it by hand.
    """
    out = str(options["out"])
    if finalize_only:
        meta = finalize(out)
        click.echo(f"{out} is complete ({len(meta['domains'])} domains)")
        return
    for required in ("teacher", "data"):
        if not options[required]:
            raise click.UsageError(f"Missing option '--{required}' (only --finalize works without it).")
    result = run_build(BuildConfig(**options), progress=not quiet)
    meta = result.meta
    if result.already_complete:
        click.echo(f"{out} is already complete ({len(meta['domains'])} domains); nothing to do.")
        return
    who = "" if result.worker[1] == 1 else f"worker {result.worker[0]} of {result.worker[1]}: "
    click.echo(
        f"{who}wrote {result.shards_written} shards of {out} ({len(meta['domains'])} domains), "
        f"{result.tokens_scored:,} tokens in {result.seconds:.1f}s ({result.tokens_per_second:,.0f} tok/s overall; "
        f"teacher {result.teacher_seconds:.1f}s; writers {result.write_seconds:.1f}s in the background, "
        f"teacher stalled on them {result.stall_seconds:.1f}s = {result.stall_seconds / max(result.teacher_seconds, 1e-9):.1%})"
    )
    if result.pending_elsewhere:
        click.echo(f"{result.pending_elsewhere} shard(s) still pending on other workers; the last worker to finish finalizes the cache.")
    else:
        click.echo(f"complete. next: ddk-cache inspect {out}")
