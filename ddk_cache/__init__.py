"""ddk-cache: cache a teacher's top-k log-probabilities once, distill many students from it.

The public API (README, "Use it from your own trainer"):

    from ddk_cache import Cache, CacheDataset, DomainWeightedSampler, collate, KDLoss, kd_loss, DDKController

`Cache` reads a cache; `CacheDataset` is a PyTorch dataset over one of its splits
(input_ids, labels with -100 where no loss applies, teacher targets, domain);
`DomainWeightedSampler` draws it by DDK's domain weights; `KDLoss` / `kd_loss` compute
CE + KD on the targets; `DDKController` evaluates a model per domain and moves the
weights; `minillm_loss` is MiniLLM's sequence-level objective on a round's cache.
`ddk_cache.hf` plugs them into transformers' Trainer. The commands' own entry points are
`build` / `BuildConfig` and `distill` / `DistillConfig`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.4.0"

# name -> module that defines it; imported on first use, so `import ddk_cache` stays light.
_EXPORTS = {
    "Cache": "ddk_cache.store.cache",
    "CacheDataset": "ddk_cache.train.dataset",
    "DomainWeightedSampler": "ddk_cache.train.dataset",
    "collate": "ddk_cache.train.dataset",
    "KDLoss": "ddk_cache.train.losses",
    "KDConfig": "ddk_cache.train.losses",
    "kd_loss": "ddk_cache.train.losses",
    "IGNORE_INDEX": "ddk_cache.train.losses",
    "DDKController": "ddk_cache.train.ddk",
    "MiniLLMConfig": "ddk_cache.train.minillm",
    "minillm_loss": "ddk_cache.train.minillm",
    "evaluate_domains": "ddk_cache.train.evaluate",
    "BuildConfig": "ddk_cache.capture.build",
    "build": "ddk_cache.capture.build",
    "DistillConfig": "ddk_cache.train.distill",
    "distill": "ddk_cache.train.distill",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ddk_cache' has no attribute {name!r}")
