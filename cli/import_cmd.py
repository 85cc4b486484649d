"""`ddk-cache import`: teacher captures of other tools (DistillKit, axolotl) or `ddk-cache
export`'s Parquet, written as a cache."""

from __future__ import annotations

import click
from tqdm.auto import tqdm

from ddk_cache.importer import ENCODINGS, LAYOUTS, import_capture


@click.command("import")
@click.argument("src", metavar="SRC")
@click.option("--from", "source", type=click.Choice(LAYOUTS), default="ddk", show_default=True,
              help="The layout of SRC. ddk: `ddk-cache export`'s Parquet (DOMAIN/SPLIT/*.parquet, the columns of "
                   "`ddk-cache export --help`), from this tool or any pipeline that writes them. distillkit: a DistillKit "
                   "capture directory (compression_config.yaml and data_*.parquet from its sample-logits command). "
                   "axolotl: axolotl's tokenized KD rows (input_ids, labels, target_token_ids, target_logprobs, "
                   "target_mask), *.parquet or *.arrow (its prepared dataset, `axolotl preprocess`) under SRC, or SRC itself.")
@click.option("--out", required=True, help="The cache to write (new, or an interrupted import of the same SRC to resume).")
@click.option("--domain", default=None, help="The domain of every row. Default: a `domain` column, else the folder under "
              "SRC that holds the file, else SRC's own name.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="distillkit and axolotl (which have no validation split): the last share of each domain's rows, at "
                   "least one, held out for validation (the teacher PPL table and DDK read it).")
@click.option("--vocab-size", type=int, default=None, help="The teacher's vocabulary size (default: SRC/export.json, "
              "DistillKit's config d, or the tokenizer's size for axolotl).")
@click.option("--tokenizer", default=None, help="The teacher's tokenizer directory (read from SRC/export.json when there): "
              "`distill` checks students against it.")
@click.option("--encoding", type=click.Choice(list(ENCODINGS)), default="pack", show_default=True,
              help="pack: pack-v3 (every value within its relative bound of the capture's); plain: the capture's values "
                   "exactly, as float32 (larger).")
@click.option("--shard-sequences", default=64, show_default=True, help="Sequences per shard object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_cmd(src: str, source: str, out: str, domain: str | None, val_fraction: float, vocab_size: int | None,
               tokenizer: str | None, encoding: str, shard_sequences: int, quiet: bool) -> None:
    """Write a cache at OUT from the teacher captures at SRC: per sequence its tokens and, per
    predicted position, the top-k ids and log-probs (ragged rows allowed). Sequences of
    different lengths are padded to the longest, with a loss mask. The teacher perplexity
    table comes from the captured log-probs of the next tokens.

    What a capture lacks (DistillKit: no log-prob for a next token outside its top-k, so the
    PPL table is a lower bound; axolotl: renormalised top-k, no tail) is recorded: `inspect`
    shows it and `distill` refuses what would be silently wrong on it.

    Every file is checked first (columns, lengths, ids within the vocabulary, finite values):
    a bad one is refused with its file, row and column, before anything is written. An
    interrupted import resumes with the same command.

    \b
      ddk-cache import exported/ --out cache.zarr
      ddk-cache import dk-capture/ --from distillkit --tokenizer teacher/ --domain web --out cache.zarr
      ddk-cache import kd-rows/ --from axolotl --tokenizer teacher/ --out cache.zarr"""
    bars: list = []

    def progress(total: int | None, label: str):  # noqa: ANN202
        if bars:  # the check pass is over
            bars[-1].close()
        bars.append(tqdm(total=total, desc=label, unit=" seq", disable=quiet))
        return bars[-1]

    meta = import_capture(src, out, layout=source, vocab_size=vocab_size, tokenizer=tokenizer, domain=domain,
                          val_fraction=val_fraction, encoding=encoding, shard_sequences=shard_sequences, progress=progress)
    for bar in bars:
        bar.close()
    n = sum(info.train.sequences + info.val.sequences for info in meta.domains.values())
    click.echo(f"{out}: {n:,} sequences in {len(meta.domains)} domain(s), {meta.targets.describe()}, {meta.encoding.name}; "
               f"see `ddk-cache inspect {out}`")
