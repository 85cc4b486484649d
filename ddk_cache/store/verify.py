"""`ddk-cache verify`: is every chunk of a cache present, intact and consistent with its metadata?

Checks, in order: the root metadata (version, encoding, state); every array's shape and
dtype; every chunk (shard) object present; every chunk decodes (each inner chunk carries a
CRC32C, so flipped bytes fail here); per-sequence sums recompute from the stored
log-probabilities; the teacher perplexity table recomputes from the sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import zarr
from zarr.core.sync import sync

from .cache import (
    SEQ_NLL, SEQ_TOPK_MASS, SHARD_DONE, SPLITS, STATE_COMPLETE, TARGET_LOGPROB, TARGETS, TOKENS, TOPK_IDS, TOPK_LOGPROBS,
    Cache, object_key, perplexity_entry, sequence_nll,
)


@dataclass(frozen=True)
class Problem:
    where: str  # array path and chunk key, or "metadata"
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _expected(cache: Cache, n: int) -> dict[str, tuple[tuple[int, ...], str]]:
    meta = cache.meta
    L, k = meta["seq_len"], meta["top_k"]
    if cache.packed:
        targets = {TARGETS: ((n, cache.codec.capacity(L - 1)), "uint8")}
    else:
        targets = {TOPK_IDS: ((n, L - 1, k), "int32"), TOPK_LOGPROBS: ((n, L - 1, k), "float32")}
    return {
        TOKENS: ((n, L), "int32"),
        **targets,
        TARGET_LOGPROB: ((n, L - 1), "float32"),
        SEQ_NLL: ((n,), "float64"),
        SEQ_TOPK_MASS: ((n,), "float64"),
        SHARD_DONE: ((math.ceil(n / meta["shard_sequences"]),), "uint8"),
    }


def _stored_keys(array: zarr.Array) -> set[str]:
    async def collect() -> set[str]:
        return {key async for key in array.store_path.store.list_prefix(array.path + "/c/")}

    return sync(collect())


def _chunk_key(array: zarr.Array, index: int) -> str:
    """Store key of the index-th object along the sequence axis (a shard, or a chunk if unsharded)."""
    return f"{array.path}/{object_key(array.ndim, index)}"


def verify_cache(path: str, progress: Callable[[Iterator], Iterator] = iter) -> tuple[list[Problem], int]:
    """Check the cache at `path`; return the problems found and the number of chunks read."""
    cache = Cache(path, require_complete=False)
    meta = cache.meta
    problems: list[Problem] = []
    if meta.get("state") != STATE_COMPLETE:
        problems.append(Problem("metadata", f"state is {meta.get('state')!r}, not complete"))
    checked = 0
    for domain in progress(cache.domains):
        table = meta.get("teacher_ppl", {}).get(domain, {})
        for split in SPLITS:
            n = cache.num_sequences(domain, split)
            group = cache.root.get(f"{domain}/{split}")
            if group is None:
                problems.append(Problem(f"{domain}/{split}", "group is missing"))
                continue
            arrays: dict[str, np.ndarray] = {}
            for name, (shape, dtype) in _expected(cache, n).items():
                where = f"{domain}/{split}/{name}"
                array = group.get(name)
                if array is None:
                    problems.append(Problem(where, "array is missing"))
                    continue
                if array.shape != shape or str(array.dtype) != dtype:
                    problems.append(Problem(where, f"shape {array.shape} {array.dtype}, expected {shape} {dtype}"))
                    continue
                step = array.shards[0] if array.shards else array.chunks[0]
                keys = _stored_keys(array)
                data = np.zeros(shape, dtype)
                before = len(problems)
                for i in range(math.ceil(shape[0] / step)):
                    key = _chunk_key(array, i)
                    if key not in keys:
                        problems.append(Problem(key, "chunk is missing"))
                        continue
                    try:
                        data[i * step : (i + 1) * step] = array[i * step : (i + 1) * step]
                    except Exception as e:  # crc32c mismatch, truncated blosc frame, bad shard index...
                        problems.append(Problem(key, f"does not decode ({type(e).__name__}: {e})"))
                    checked += 1
                if len(problems) == before:  # value checks only on arrays that fully decoded
                    arrays[name] = data
            if TARGETS in arrays:  # packed rows: the CRC passed, now every row must unpack
                try:
                    decoded = cache.decode_targets({TARGETS: arrays.pop(TARGETS)})
                    arrays[TOPK_IDS] = decoded[0]
                except Exception as e:
                    problems.append(Problem(f"{domain}/{split}/{TARGETS}", f"a packed row does not decode ({type(e).__name__}: {e})"))
            problems += _check_values(f"{domain}/{split}", arrays, meta, table.get(split))
    return problems, checked


def _check_values(where: str, a: dict[str, np.ndarray], meta: dict, ppl: dict | None) -> list[Problem]:
    out = []
    if SHARD_DONE in a and not a[SHARD_DONE].all():
        out.append(Problem(f"{where}/{SHARD_DONE}", f"shards {np.flatnonzero(a[SHARD_DONE] == 0).tolist()[:10]} not marked written"))
    for name in (TOKENS, TOPK_IDS):
        if name in a and a[name].size and (a[name].min() < 0 or a[name].max() >= meta["vocab_size"]):
            out.append(Problem(f"{where}/{name}", f"token ids outside 0..{meta['vocab_size'] - 1}"))
    if TARGET_LOGPROB in a and SEQ_NLL in a and not np.array_equal(sequence_nll(a[TARGET_LOGPROB]), a[SEQ_NLL]):
        out.append(Problem(f"{where}/{SEQ_NLL}", "does not equal -sum(target_logprob) per sequence"))
    # Exact only for plain-v1 (pack-v1 quantises the log-probs; the sum was taken before).
    if TOPK_LOGPROBS in a and SEQ_TOPK_MASS in a and not np.array_equal(np.exp(a[TOPK_LOGPROBS].astype(np.float64)).sum(axis=(1, 2)), a[SEQ_TOPK_MASS]):
        out.append(Problem(f"{where}/{SEQ_TOPK_MASS}", "does not equal the summed top-k probabilities"))
    if ppl is not None and SEQ_NLL in a and perplexity_entry(a[SEQ_NLL], meta["seq_len"] - 1) != ppl:
        out.append(Problem(f"metadata teacher_ppl[{where}]", "does not recompute from seq_nll"))
    return out
