"""`ddk-cache build`: run the teacher over a corpus and write the cache."""

from __future__ import annotations

import click

from ddk_cache.capture.build import BuildConfig, build as run_build, finalize
from ddk_cache.config import click_options


@click.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML or TOML file of options (keys as the flags, - or _); flags override it.")
@click.option("--finalize", "finalize_only", is_flag=True, help="Only finalize --out: compute the PPL table once every worker's shards are written.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click_options(BuildConfig)
def build(config_file: str | None, finalize_only: bool, quiet: bool, **options: object) -> None:
    """Score a corpus with a teacher and write its top-k log-probabilities to a Zarr cache.

    Resumable: run the same command again after an interruption (at any point, also
    while the corpus is being tokenized) and it finishes the work without redoing
    finished pieces or shards. A cache built with other settings, another teacher,
    tokenizer or corpus is refused, naming the difference.

    \b
    Several workers (processes or machines) share one build:
      ddk-cache build ... --num-shards 4 --shard-index I      # I = 0..3, any order, restartable
      torchrun --nproc-per-node 8 -m ddk_cache build ...      # rank, world size, GPU from the environment
      srun -n 64 python -m ddk_cache build ...                # likewise under Slurm
    Every worker tokenizes a share of the corpus, then scores a share of the shards; the
    last to finish finalizes (`ddk-cache build --out CACHE --finalize` does it by hand).

    \b
    On a Ray cluster (pip install 'ddk-cache[ray]'), Ray schedules the same build:
      ddk-cache build ... --engine ray [--ray-address HOST:6379] [--ray-actors N]
    One teacher engine per actor; a lost actor's shards are scored again elsewhere.
    """
    if finalize_only:
        out = options.get("out")
        if not out:
            raise click.UsageError("--finalize needs --out")
        meta = finalize(str(out))
        click.echo(f"{out} is complete ({len(meta.domains)} domains)")
        return
    cfg = BuildConfig.from_sources(config_file, options)
    for required in ("data", "out"):
        if not getattr(cfg, required):
            raise click.UsageError(f"Missing option '--{required}' (only --finalize works without --data).")
    if quiet:
        from .common import quiet_libraries

        quiet_libraries()
    result = run_build(cfg, progress=not quiet)
    meta = result.meta
    out = cfg.out
    if result.unread:
        from ddk_cache.capture.corpus import DOCUMENT_SUFFIXES

        shown = ", ".join(result.unread[:5]) + (", ..." if len(result.unread) > 5 else "")
        click.echo(f"warning: {len(result.unread)} file(s) in the corpus are not read (not {', '.join(DOCUMENT_SUFFIXES)}): {shown}", err=True)
    if result.already_complete:
        click.echo(f"{out} is already complete ({len(meta.domains)} domains); nothing to do.")
        return
    who = "" if result.worker[1] == 1 else f"worker {result.worker[0]} of {result.worker[1]}: "
    if cfg.tokens_only:
        click.echo(f"{who}wrote {result.shards_written} shards of tokens to {out} ({len(meta.domains)} domains) in {result.seconds:.1f}s")
    else:
        click.echo(
            f"{who}wrote {result.shards_written} shards of {out} ({len(meta.domains)} domains), "
            f"{result.tokens_scored:,} tokens in {result.seconds:.1f}s ({result.tokens_per_second:,.0f} tok/s overall; "
            f"engine busy {result.teacher_seconds:.1f}s, idle {result.engine_idle_share:.1%} of the scoring time; "
            f"writers {result.write_seconds:.1f}s in the background, the teacher waited on them {result.stall_seconds:.1f}s)"
        )
        if result.positions_written:
            from ddk_cache.store.cache import format_bytes

            click.echo(f"{who}stored {format_bytes(result.bytes_written)} in shard objects, "
                       f"{result.bytes_written / result.positions_written:.1f} B/position (tokens and targets)")
    for domain, n in result.chat_cut.items():
        click.echo(f"warning: {domain}: {n:,} chat sample(s) longer than --seq-len {cfg.seq_len}: their ends are not in the cache", err=True)
    for domain, n in result.chat_no_loss.items():
        click.echo(f"warning: {domain}: {n:,} chat sample(s) left out: no assistant token within the first {cfg.seq_len} tokens "
                   "(raise --seq-len to keep them)", err=True)
    if result.pending_elsewhere:
        click.echo(f"{result.pending_elsewhere} shard(s) still pending on other workers; the last worker to finish finalizes the cache.")
    else:
        click.echo(f"complete. next: ddk-cache inspect {out}")
