"""`ddk-cache export`: a cache's sequences and teacher targets as plain Parquet."""

from __future__ import annotations

import click
from tqdm.auto import tqdm

from ddk_cache.export import COLUMNS, export_parquet


def _columns_help() -> str:
    return "\n".join(f"  {name}: {text}" for name, text in COLUMNS.items())


@click.command(epilog="\b\nColumns (one row per sequence of L tokens, P = L - 1 positions):\n" + _columns_help())
@click.argument("cache", metavar="CACHE")
@click.option("--out", required=True, help="Output directory on this machine (empty, or an interrupted export of the same cache to resume).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "hf", "axolotl"]), default="parquet", show_default=True,
              help="parquet: the Parquet parts and export.json. hf: also README.md, whose `configs` make OUT a Hugging Face "
                   "dataset: datasets.load_dataset(OUT) (every domain; splits train and validation), or (OUT, 'DOMAIN'). "
                   "axolotl: the pre-tokenized columns of axolotl's KD plugin instead (input_ids, attention_mask, labels, "
                   "target_token_ids, target_logprobs renormalised over the kept ids, target_mask; top-k caches), "
                   "with the card.")
@click.option("--domains", default=None, help="Comma-separated domains to export (default: all).")
@click.option("--splits", default="train,val", show_default=True, help="Comma-separated splits to export.")
@click.option("--rows-per-file", default=4096, show_default=True, help="Sequences per Parquet file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(cache: str, out: str, fmt: str, domains: str | None, splits: str, rows_per_file: int, quiet: bool) -> None:
    """Write CACHE's sequences and decoded teacher targets as Parquet files under OUT, one
    row per sequence, in plain columns any Parquet reader understands (no ddk-cache needed
    to read them): OUT/DOMAIN/SPLIT/part-NNNNN.parquet, OUT/export.json (what it holds: the
    cache's fingerprint, the targets, the teacher PPL table) and, with --format hf,
    OUT/README.md (a dataset card). Position t is the teacher's distribution after input_ids[0..t]; it predicts
    input_ids[t + 1]. Values are the cache's decoded targets, float32, unchanged.

    Streams: memory is one batch of decoded sequences. Parts are renamed into place when
    complete and export.json is rewritten last: after an interruption run the same command
    again; it keeps the parts already written."""
    bar = None

    def progress(total: int):  # noqa: ANN202
        nonlocal bar
        bar = tqdm(total=total, desc="export", unit=" seq", disable=quiet)
        return bar

    m = export_parquet(cache, out, domains=domains.split(",") if domains else None, splits=splits.split(","),
                       rows_per_file=rows_per_file, card=fmt != "parquet", layout="axolotl" if fmt == "axolotl" else "ddk",
                       progress=progress)
    if bar is not None:
        bar.close()
    rows = sum(m["files"].values())
    if fmt == "axolotl":
        click.echo(f"{out}: {rows:,} sequences in {len(m['files'])} Parquet file(s) in axolotl's KD layout; point a "
                   "pre-tokenized axolotl dataset at it (see README, 'Taking the targets to other stacks')")
        return
    click.echo(f"{out}: {rows:,} sequences in {len(m['files'])} Parquet file(s) ({m['targets']}); "
               f"{'load with datasets.load_dataset(' + repr(out) + ')' if fmt == 'hf' else 'see export.json'}")
