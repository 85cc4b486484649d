"""`ddk-cache build`: run the teacher over a corpus and write the cache."""

from __future__ import annotations

import click

from ddk_cache.build import BuildConfig, build as run_build
from ddk_cache.teachers import BACKENDS


@click.command()
@click.option("--teacher", required=True, help="Teacher model: a local transformers directory or a hub id.")
@click.option("--data", required=True, type=click.Path(), help="Corpus directory (one domain per .jsonl/.jsonl.gz/.txt/.parquet file or sub-folder) or a .yaml/.toml spec mapping domain -> globs.")
@click.option("--out", required=True, help="Cache path (a .zarr directory). An unfinished cache of the same build is resumed.")
@click.option("--top-k", default=64, show_default=True, help="Log-probabilities kept per position.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per packed sequence (at most the teacher's context).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help="Teacher engine; auto picks the best installed one.")
@click.option("--text-field", default="text", show_default=True, help="JSON/parquet field holding each document's text.")
@click.option("--val-sequences", default=8, show_default=True, help="Held-out validation sequences per domain (DDK evaluates on them).")
@click.option("--max-tokens-per-domain", type=int, default=None, help="Cap each domain at this many tokens (documents shuffled first).")
@click.option("--seed", default=0, show_default=True, help="Seed of the per-domain document shuffle.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="Teacher dtype; auto = bfloat16 on GPU, float32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="Torch device for the hf backend (cpu, cuda, cuda:1, auto).")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per teacher forward pass.")
@click.option("--shard-sequences", default=0, show_default=True, help="Sequences per shard, the unit of work and of resume; 0 = about 16 MiB of log-probs.")
@click.option("--revision", default=None, help="Teacher revision (hub ids only).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the teacher's own Python code to run (off unless you ask).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(quiet: bool, **options: object) -> None:
    """Score a corpus with a teacher and write its top-k log-probabilities to a Zarr cache.

    Resumable: run the same command again after an interruption and it finishes the work
    without redoing completed shards. A cache built with other arguments is refused.
    """
    result = run_build(BuildConfig(**options), progress=not quiet)
    meta = result.meta
    if result.already_complete:
        click.echo(f"{options['out']} is already complete ({len(meta['domains'])} domains); nothing to do.")
        return
    share = result.write_seconds / result.teacher_seconds if result.teacher_seconds else 0.0
    click.echo(
        f"wrote {options['out']}: {len(meta['domains'])} domains, {result.shards_written} shards, "
        f"{result.tokens_scored:,} tokens in {result.seconds:.1f}s ({result.tokens_per_second:,.0f} tok/s overall; "
        f"teacher {result.teacher_seconds:.1f}s, writing {result.write_seconds:.1f}s = {share:.1%} of teacher time, overlapped)"
    )
    click.echo(f"next: ddk-cache inspect {options['out']}")
