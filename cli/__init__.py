"""Click commands of `ddk-cache` (installed as the `ddk_cache.cli` package)."""
