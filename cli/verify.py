"""`ddk-cache verify`: check a cache's integrity chunk by chunk."""

from __future__ import annotations

import click
from tqdm.auto import tqdm

from ddk_cache.store.verify import verify_cache


@click.command()
@click.argument("cache", metavar="CACHE")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(cache: str, quiet: bool) -> None:
    """Check that every object of CACHE is present and decodes (CRC32C checksums), that
    the metadata matches the arrays, that every decoded target row is a distribution, and
    that each shard's recorded sums and the teacher perplexity table recompute. Exits 1
    and names each bad array and object otherwise. Reads the whole cache, one shard at a
    time (memory: one shard)."""
    problems, checked = verify_cache(cache, progress=lambda it: tqdm(list(it), desc="verify", unit=" shard", disable=quiet))
    if problems:
        for p in problems:
            click.echo(f"BAD {p}", err=True)
        raise click.ClickException(f"{cache}: {len(problems)} problem(s) in {checked} objects checked")
    click.echo(f"OK {cache}: {checked} objects present and intact, targets valid, sums and teacher PPL table recompute")
