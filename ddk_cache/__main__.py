"""`python -m ddk_cache ...` is the same as the `ddk-cache` command."""

from ddk_cache.cli.main import main

if __name__ == "__main__":
    main()
