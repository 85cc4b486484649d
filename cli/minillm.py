"""`ddk-cache minillm`: MiniLLM's on-policy rounds (generate -> build -> distill --kd-loss minillm)."""

from __future__ import annotations

import click

from ddk_cache.config import click_options
from ddk_cache.minillm_rounds import RoundsConfig, run_rounds


@click.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML or TOML file of options; flags override it.")
@click.option("--quiet", is_flag=True, help="No progress bars (the round lines stay).")
@click_options(RoundsConfig)
def minillm(config_file: str | None, quiet: bool, **options: object) -> None:
    """MiniLLM (arXiv 2306.08543) in rounds from a cache: each round the student samples
    responses to --prompts, the teacher scores them into a cache, and the student trains on
    that cache with MiniLLM's loss (README, "MiniLLM"). The teacher is never resident next to
    the student. Run the same command again to continue a stopped run.

    \b
      ddk-cache minillm --student student/ --teacher teacher/ --prompts prompts.jsonl --out runs/minillm --rounds 3
      ... --mix-alpha 0.2 --pretrain-cache pretrain.zarr    # teacher-mixed sampling, pre-training LM term
    """
    cfg = RoundsConfig.from_sources(config_file, options)
    if quiet:
        from .common import quiet_libraries

        quiet_libraries()
    final = run_rounds(cfg, progress=not quiet, say=lambda line: click.echo(line, err=True))
    click.echo(f"final student: {final}. next: ddk-cache eval --cache CACHE --model {final}")
