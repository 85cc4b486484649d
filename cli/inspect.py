"""`ddk-cache inspect`: what a cache holds, per domain and split."""

from __future__ import annotations

import json

import click

from ddk_cache.store.cache import STATE_BUILDING, TOKENIZER_DIR, Cache, describe_pending, format_bytes
from ddk_cache.table import format_table, number


@click.command()
@click.argument("cache", metavar="CACHE")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@click.option("--fidelity", is_flag=True, help="Re-run the teacher (transformers) on a sample of validation sequences: covered mass, per-position coarse KL of the stored targets vs. the full distribution (mean, p99, max), invalid rows, bytes/token per array.")
@click.option("--sequences", default=4, show_default=True, help="--fidelity: validation sequences per domain.")
@click.option("--teacher", default=None, help="--fidelity: the teacher's path, if it moved since the build.")
@click.option("--device", default="auto", show_default=True, help="--fidelity: torch device for the teacher.")
def inspect(cache: str, as_json: bool, fidelity: bool, sequences: int, teacher: str | None, device: str) -> None:
    """Show a cache's teacher, settings, and per domain/split: sequences, tokens, teacher PPL,
    bytes on disk, bytes/token and mean kept mass. An unfinished cache is shown too, then
    refused (exit 1) with what is missing."""
    c = Cache(cache, require_complete=False)
    meta = c.meta
    if fidelity:
        from ddk_cache.capture.fidelity import fidelity as measure

        report = measure(Cache(cache), sequences=sequences, device=device, teacher=teacher)
        if as_json:
            click.echo(json.dumps(report, indent=2))
            return
        click.echo(f"{cache}: {meta.encoding.name}, {report['targets']}; {report['positions']:,} positions re-scored")
        budget = (f" (budget {report['kl_budget']:.1e} per position)" if report["kl_budget"] else
                  f" (pack-v3: each log-prob within {report['logprob_step']:.2g} of the teacher's)" if report.get("logprob_step") else "")
        click.echo(f"coarse {report['kl_direction']}: mean {report['coarse_kl']:.3e}, p99 {report['coarse_kl_p99']:.3e}, "
                   f"max {report['coarse_kl_max']:.3e} nats{budget}")
        click.echo(f"covered mass {report['covered_mass']:.4f}; invalid rows {report['invalid_share']:.2%}")
        click.echo("bytes/token: " + ", ".join(f"{k} {v:.2f}" for k, v in report["bytes_per_token"].items()))
        for line in report["capture"]:
            click.echo(f"imported capture: {line}")
        return
    if not meta.domains:
        if as_json:
            click.echo(json.dumps({"path": cache, "state": meta.state, "format_version": meta.format_version}, indent=2))
        else:
            click.echo(f"{cache}  (format v{meta.format_version}, state: {meta.state}): the corpus is still being tokenized; no sequences yet")
        _refuse_incomplete(cache, meta.state, [])
        return
    rows = c.summary()
    pending = c.pending() if meta.state == STATE_BUILDING else []
    if as_json:
        click.echo(json.dumps({
            "path": cache, "state": meta.state, "format_version": meta.format_version, "teacher": meta.teacher,
            "tokenizer": meta.tokenizer, "top_k": meta.top_k, "seq_len": meta.seq_len, "encoding": meta.encoding.to_dict(),
            "targets": meta.targets.to_dict(), "targets_description": meta.targets.describe(), "pending_shards": len(pending),
            "row_start": meta.row_start, "row_start_description": meta.describe_row_start(),
            "imported_from": meta.corpus.get("imported_from"), "capture": meta.corpus.get("capture"),
            "rows": rows,
        }, indent=2))
        _refuse_incomplete(cache, meta.state, pending)
        return
    t = meta.teacher
    click.echo(f"{cache}  (format v{meta.format_version}, {meta.encoding.name}, state: {meta.state})")
    if c.has_targets and t.get("architecture") is None:  # an import that did not record its teacher
        click.echo(f"teacher: {t['name_or_path']}  [model not recorded]")
    elif c.has_targets:
        click.echo(f"teacher: {t['name_or_path']}  [{t.get('architecture')}, {t.get('num_parameters') or 0:,} params, {t.get('dtype')}, {t.get('backend')}]")
    if meta.corpus.get("imported_from"):
        click.echo(f"imported from: {meta.corpus['imported_from']} ({meta.corpus.get('format')}; `ddk-cache import`): the "
                   "targets as that capture held them, stored again with " + meta.encoding.name)
        for line in meta.describe_capture():
            click.echo(f"  {line}")
    stored = c.objects.get(f"{TOKENIZER_DIR}/zarr.json") is not None
    click.echo(f"targets: {meta.targets.describe()}; seq-len {meta.seq_len}, vocab {meta.vocab_size}, "
               f"tokenizer {meta.tokenizer.get('fingerprint', 'unknown')[:19]} ({'its files in the cache' if stored else 'files not in the cache'})")
    click.echo(f"row start: {meta.describe_row_start()}")
    header = ("domain", "split", "sequences", "tokens", "teacher PPL", "teacher bits/byte", "on disk", "bytes/token", "kept mass")
    table = [
        (
            r["domain"] + (" (samples)" if c.is_sampled(r["domain"]) else " (chat)" if c.is_chat(r["domain"]) else ""), r["split"], f"{r['sequences']:,}", f"{r['tokens']:,}",
            number(r["teacher_ppl"]), "n/a" if r["teacher_bits_per_byte"] is None else f"{r['teacher_bits_per_byte']:.4f}",
            format_bytes(r["bytes"]), f"{r['bytes_per_token']:.1f}", number(r["mean_topk_mass"], 4),
        )
        for r in rows
    ]
    click.echo(format_table(header, table, left=2))
    skipped = [f"{d}/{s} {info.split(s).nonfinite:,}" for d, info in meta.domains.items() for s in ("train", "val") if info.split(s).nonfinite]
    if skipped:
        click.echo("sequences with label-only targets (non-finite teacher output, --on-nonfinite skip): " + ", ".join(skipped))
    _refuse_incomplete(cache, meta.state, pending)


def _refuse_incomplete(cache: str, state: str, pending: list) -> None:
    if state != "complete":
        missing = describe_pending(pending) if pending else (
            "the corpus is still being tokenized" if state == "initializing" else "every shard is written but the cache is not finalized")
        raise click.ClickException(
            f"INCOMPLETE cache {cache} ({missing}); rerun the same `ddk-cache build` command(s), "
            f"or `ddk-cache build --out {cache} --finalize` once all shards are written"
        )
