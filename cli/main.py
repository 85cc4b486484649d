"""The `ddk-cache` command group: library errors become one-line messages, not tracebacks."""

from __future__ import annotations

import sys

import click

from ddk_cache import __version__
from ddk_cache.errors import DDKCacheError
from ddk_cache.store.objects import is_disk_full

from . import build, distill, export, generate, import_cmd, init_model, inspect, minillm, quickstart, verify
from .common import quiet_libraries  # noqa: F401  (re-exported: older scripts import it from here)


# What to run after an interruption or a full disk, per command.
_RESUME = {
    "build": "run the same command again: it resumes where it stopped",
    "distill": "run the same command with --resume: it continues from the last complete checkpoint",
    "minillm": "run the same command again: it continues the round it was in",
    "generate": "run the same command again: it keeps the samples already written",
    "export": "run the same command again: it keeps the Parquet files already written",
    "import": "run the same command again: it keeps the shards already written",
}




class _Group(click.Group):
    def resolve_command(self, ctx: click.Context, args: list[str]):  # noqa: ANN201 - click's signature
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta["ddk_command"] = name  # for the resume hint below
        return name, command, rest

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except DDKCacheError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            hint = _RESUME.get(ctx.meta.get("ddk_command", ""), "run the same command again")
            click.echo(f"\ninterrupted; nothing complete was lost: {hint}", err=True)
            sys.exit(130)  # the shell convention for SIGINT
        except PermissionError as e:
            where = e.filename or "the output"
            raise click.ClickException(f"no permission to write {where}: choose a location you can write to (--out)") from None
        except Exception as e:
            if not is_disk_full(e):
                raise
            hint = _RESUME.get(ctx.meta.get("ddk_command", ""), "run the same command again")
            where = getattr(e, "filename", None)
            raise click.ClickException(f"no space left on the device{f' holding {where}' if where else ''}; free space, then {hint}") from None


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
      ddk-cache export cache.zarr --out targets/   # plain Parquet, for other training stacks
    """


def _register() -> None:
    main.add_command(build.build)
    main.add_command(generate.generate)
    main.add_command(minillm.minillm)
    main.add_command(distill.distill)
    main.add_command(distill.eval_cmd)
    main.add_command(distill.report)
    main.add_command(inspect.inspect)
    main.add_command(verify.verify)
    main.add_command(export.export)
    main.add_command(import_cmd.import_cmd)
    main.add_command(init_model.init_model)
    main.add_command(init_model.init_student)
    main.add_command(quickstart.quickstart)


_register()
