"""Run a `ddk-cache` command in this process and print its peak RSS and wall time as JSON on
stderr at exit (benchmarks/scale.py runs one of these per worker).

    python benchmarks/rss_run.py build --teacher ... [--stop-after-init]

`--stop-after-init` ends the build once the first shard can be scored (after tokenization,
the plan and the arrays): initialization time, without the teacher's work."""

from __future__ import annotations

import atexit
import json
import resource
import sys
import time

START = time.perf_counter()


def report() -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"max_rss_mib": peak, "seconds": time.perf_counter() - START}), file=sys.stderr, flush=True)


def main() -> None:
    argv = sys.argv[1:]
    stop = "--stop-after-init" in argv
    argv = [a for a in argv if a != "--stop-after-init"]
    import ddk_cache.cli.build as cli_build
    from ddk_cache.cli.main import main as cli

    if stop:
        real = cli_build.run_build

        def until_init(config, progress=True, **kw):  # noqa: ANN001, ANN202
            def hook(event, info):  # noqa: ANN001, ANN202
                if event == "store_created":
                    raise SystemExit(0)

            return real(config, progress=progress, hook=hook)

        cli_build.run_build = until_init
    atexit.register(report)
    cli.main(args=argv, prog_name="ddk-cache")


if __name__ == "__main__":
    main()
