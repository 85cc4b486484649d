"""`ddk-cache import`: Parquet targets (`ddk-cache export`'s layout) back into a cache."""

from __future__ import annotations

import click
from tqdm.auto import tqdm

from ddk_cache.importer import import_parquet


@click.command("import")
@click.argument("src", metavar="SRC")
@click.option("--from", "source", type=click.Choice(["ddk"]), default="ddk", show_default=True,
              help="The layout of SRC. ddk: `ddk-cache export`'s Parquet (DOMAIN/SPLIT/*.parquet, the columns of "
                   "`ddk-cache export --help`), from this tool or any pipeline that writes them.")
@click.option("--out", required=True, help="The cache to write (new, or an interrupted import of the same SRC to resume).")
@click.option("--vocab-size", type=int, default=None, help="The teacher's vocabulary size (read from SRC/export.json when there).")
@click.option("--tokenizer", default=None, help="The teacher's tokenizer directory (read from SRC/export.json when there): "
              "`distill` checks students against it.")
@click.option("--shard-sequences", default=64, show_default=True, help="Sequences per shard object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_cmd(src: str, source: str, out: str, vocab_size: int | None, tokenizer: str | None, shard_sequences: int,
               quiet: bool) -> None:
    """Write a cache at OUT from the Parquet teacher targets under SRC: one row per sequence
    of one length, top-k ids and log-probs per position (ragged rows allowed), the target
    token's log-prob, and where present the tail and the loss mask. The targets are stored
    with pack-v3 (every value within its bound of SRC's); the teacher perplexity table is
    computed from the target log-probs; `inspect` shows where the cache came from.

    Every file is checked first (columns, lengths, ids within the vocabulary, finite values):
    a bad one is refused with its file, row and column, before anything is written. An
    interrupted import resumes with the same command."""
    bars: list = []

    def progress(total: int):  # noqa: ANN202
        bars.append(tqdm(total=total, desc="import", unit=" seq", disable=quiet))
        return bars[-1]

    meta = import_parquet(src, out, vocab_size=vocab_size, tokenizer=tokenizer, shard_sequences=shard_sequences,
                          progress=progress)
    for bar in bars:
        bar.close()
    n = sum(info.train.sequences + info.val.sequences for info in meta.domains.values())
    click.echo(f"{out}: {n:,} sequences in {len(meta.domains)} domain(s), {meta.targets.describe()}, {meta.encoding.name}; "
               f"see `ddk-cache inspect {out}`")
