"""The `ddk-cache` command group: library errors become one-line messages, not tracebacks."""

from __future__ import annotations

import click

from ddk_cache import __version__
from ddk_cache.errors import DDKCacheError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except DDKCacheError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddk-cache")
def main() -> None:
    """Cache a teacher LLM's top-k log-probabilities once; distill students from the cache.

    \b
    First look (about 2 minutes on 2 CPU cores, no downloads):
      ddk-cache quickstart
    Typical use:
      ddk-cache init-model --corpus CORPUS_DIR --out teacher/   # a small local model, if you have none
      ddk-cache build --teacher teacher/ --data CORPUS_DIR --out cache.zarr
      ddk-cache inspect cache.zarr
      ddk-cache distill --cache cache.zarr --student student/ --out runs/s1
      ddk-cache eval --cache cache.zarr --model runs/s1/final
      ddk-cache report runs/s1
    """


def _register() -> None:
    from . import build, distill, init_model, inspect, quickstart, verify

    main.add_command(build.build)
    main.add_command(distill.distill)
    main.add_command(distill.eval_cmd)
    main.add_command(distill.report)
    main.add_command(inspect.inspect)
    main.add_command(verify.verify)
    main.add_command(init_model.init_model)
    main.add_command(quickstart.quickstart)


_register()
