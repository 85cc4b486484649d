"""`ddk-cache generate`: sample a model's responses to prompts as chat records for `build`."""

from __future__ import annotations

import click
from tqdm.auto import tqdm

from ddk_cache.capture.generate import GenerateConfig, generate as run_generate
from ddk_cache.config import click_options


@click.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML or TOML file of options; flags override it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click_options(GenerateConfig)
def generate(config_file: str | None, quiet: bool, **options: object) -> None:
    """Sample responses of --model to --prompts and write them, with the log-prob of every
    sampled token, as chat records that `ddk-cache build` reads (only the response carries
    loss). The first step of a MiniLLM round (README, "MiniLLM").

    \b
      ddk-cache generate --model student/ --prompts prompts.jsonl --out samples/chat.jsonl --max-new-tokens 128
      ddk-cache generate ... --mix-teacher teacher/ --mix-alpha 0.2    # MiniLLM's teacher-mixed sampling
    vLLM samples when installed (--engine), transformers otherwise and with --mix-teacher.
    Seeded per prompt; a run killed midway continues where it stopped.
    """
    cfg = GenerateConfig.from_sources(config_file, options)
    if quiet:
        from .common import quiet_libraries

        quiet_libraries()
    bar = tqdm(desc="generate", unit=" sample", disable=quiet)
    n = run_generate(cfg, progress=bar.update)
    bar.close()
    click.echo(f"{n} samples in {cfg.out}. next: ddk-cache build --teacher TEACHER --data {cfg.out.rsplit('/', 1)[0] or '.'} ...")
