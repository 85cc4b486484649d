"""`ddk-cache verify`: is every object of a cache present, intact and consistent with its metadata?

Streams the cache one shard at a time (memory: one shard), in order: the root metadata
(version, encoding, state); every array's metadata (shape, dtype); every shard object
present (one listing of the store); every row's chunk decodes (each carries a CRC32C, so
flipped bytes fail here); every decoded target row is a distribution (finite, ids in the
vocabulary, probabilities in (0, 1], kept mass <= 1); tokens in the vocabulary; each
shard's recorded sums recompute from its rows (exactly for exact encodings; within the
quantisation for pack-v2); the teacher perplexity table recomputes from the records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import StoreError
from .cache import LOSS_MASK, SAMPLE_LOGPROB, SPLITS, STATE_COMPLETE, TOKENIZER_DIR, TOKENS, Cache, Shard
from .log import ShardRecord
from .shards import damaged

# pack-v2 stores a kept target's log-prob as a reference to its quantised entry: the
# recomputed NLL may differ from the exact one by the quantisation (nats per position).
PACKED_NLL_TOLERANCE = 0.05
MASS_SLACK = 1e-5  # float32 rounding of decoded probabilities


@dataclass(frozen=True)
class Problem:
    where: str  # array path and object key, or "metadata"
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _reason(e: Exception) -> str:
    """A read error without the advice to run verify (this is verify)."""
    return str(e).split(": the cache is damaged")[0]


def check_targets(ids: np.ndarray, logprobs: np.ndarray, vocab: int) -> str | None:
    """Why decoded targets [n, P, K] are not valid distributions, or None if they are."""
    kept = np.isfinite(logprobs)
    if np.isnan(logprobs).any() or (logprobs == np.inf).any():
        return "decoded log-probs contain NaN or +inf"
    if (ids[kept] < 0).any() or (ids[kept] >= vocab).any():
        return f"decoded ids outside 0..{vocab - 1}"
    if (logprobs[kept] > 1e-6).any():
        return "a decoded probability exceeds 1"
    if not kept[..., :1].all():
        return "a position keeps no entry"
    mass = np.where(kept, np.exp(logprobs.astype(np.float64)), 0.0).sum(-1)
    if (mass > 1 + MASS_SLACK).any():
        return f"a position's kept mass is {mass.max():.6f} > 1 (negative tail)"
    return None


def verify_cache(path: str, progress: Callable[[Iterator], Iterator] = iter) -> tuple[list[Problem], int]:
    """Check the cache at `path`; return the problems found and the number of objects read."""
    cache = Cache(path, require_complete=False)
    meta = cache.meta
    problems: list[Problem] = []
    if meta.state != STATE_COMPLETE:
        problems.append(Problem("metadata", f"state is {meta.state!r}, not complete"))
    legacy = meta.format_version < 3
    records: dict[str, ShardRecord] = {} if legacy else cache.records()
    stored = cache.objects.list("")
    checked = 0
    arrays_ok: dict[tuple[str, str], bool] = {}
    for domain in cache.domains:
        for split in SPLITS:
            ok = True
            for name in cache.array_names(domain):
                try:
                    array = cache.array(domain, split, name)
                except StoreError as e:
                    problems.append(Problem(f"{domain}/{split}/{name}", str(e)))
                    ok = False
                    continue
                n = cache.num_sequences(domain, split)
                if array.n_rows != n or array.shard_rows != meta.shard_rows(n):
                    problems.append(Problem(f"{domain}/{split}/{name}", f"{array.n_rows} rows in shards of {array.shard_rows}, "
                                            f"expected {n} in shards of {meta.shard_rows(n)}"))
                    ok = False
            arrays_ok[(domain, split)] = ok
    sums: dict[tuple[str, str], list[ShardRecord]] = {}
    for shard in progress(cache.shards()):
        if not arrays_ok[(shard.domain, shard.split)]:
            continue
        record = records.get(shard.key)
        if not legacy and record is None:
            problems.append(Problem(shard.key, "shard not recorded as written in the build logs"))
            continue
        _, n = _check_shard(cache, shard, stored, record, problems)
        checked += n
        if record is not None:
            sums.setdefault((shard.domain, shard.split), []).append(record)
    if cache.objects.get(f"{TOKENIZER_DIR}/zarr.json") is not None:  # the teacher's tokenizer files (ddk-cache 0.4 on)
        try:
            cache.tokenizer_files()
        except StoreError as e:
            problems.append(Problem(TOKENIZER_DIR, f"the stored tokenizer is damaged ({_reason(e)})"))
    if meta.teacher_ppl and not legacy:
        for domain in cache.domains:
            for split in SPLITS:
                mine = sums.get((domain, split), [])
                entry = meta.teacher_ppl.get(domain, {}).get(split)
                if entry is None:
                    problems.append(Problem(f"metadata teacher_ppl[{domain}/{split}]", "missing"))
                    continue
                nll, positions = math.fsum(r.nll_sum for r in mine), sum(r.positions for r in mine)
                ppl = math.exp(nll / positions) if positions else float("nan")
                recorded_bytes = sum(r.bytes for r in mine) if mine and all(r.bytes is not None for r in mine) else None
                if (positions != entry.predicted_tokens or nll != entry.nll_sum or not math.isclose(ppl, entry.ppl, rel_tol=1e-12)
                        or entry.bytes != recorded_bytes):
                    problems.append(Problem(f"metadata teacher_ppl[{domain}/{split}]", "does not recompute from the shard records"))
    return problems, checked


def _check_shard(cache: Cache, shard: Shard, stored: dict[str, int], record: ShardRecord | None, problems: list[Problem]) -> tuple[bool, int]:
    """Check one shard's objects and values; (all present and decodable, objects read)."""
    rows = np.arange(shard.start, shard.stop)
    before = len(problems)
    raw: dict[str, list] = {}
    for array in cache.shard_arrays(shard.domain, shard.split):  # a bundle: every array's rows in one object
        name = array.name
        key = array.object_key(shard.index)
        if key not in stored:
            problems.append(Problem(key, "object is missing"))
            continue
        if record is not None and name in record.objects and stored[key] != record.objects[name]:
            problems.append(Problem(key, f"has {stored[key]:,} bytes; the build log recorded {record.objects[name]:,} "
                                         "(replaced or changed after it was written)"))
            continue
        try:
            blob = cache.objects.get(key)
            if blob is None:
                raise damaged(f"{cache.objects.describe(key)} is missing")
            rows_of, digest = array.open_object(blob, shard.index, cache.meta.build_id, cache.objects.describe(key))
            for plane, rows_ in rows_of.items():  # a bundle's planes come padded to its chunk size
                size = cache.array(shard.domain, shard.split, plane).row_bytes
                raw[plane] = [r[:size] for r in rows_]
            if record is not None and digest is not None and record.hashes.get(name) not in (None, digest):
                problems.append(Problem(key, "its content hash differs from the build log's record (replaced after it was written)"))
        except StoreError as e:
            problems.append(Problem(key, f"does not decode ({_reason(e)})"))
    objects = len(cache.shard_arrays(shard.domain, shard.split))
    if len(problems) > before:
        return False, objects
    vocab = cache.meta.vocab_size
    tokens = np.stack([np.frombuffer(r, "<i4") for r in raw[TOKENS]])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        problems.append(Problem(f"{shard.key}/tokens", f"token ids outside 0..{vocab - 1}"))
    carry = np.ones((len(rows), cache.seq_len - 1), bool)
    if LOSS_MASK in raw:
        mask = np.stack([np.frombuffer(r, np.uint8) for r in raw[LOSS_MASK]])
        if (mask > 1).any():
            problems.append(Problem(f"{shard.key}/loss_mask", "values other than 0 and 1"))
        carry = mask[:, 1:].astype(bool)
    if SAMPLE_LOGPROB in raw:
        lp = np.stack([np.frombuffer(r, "<f4") for r in raw[SAMPLE_LOGPROB]])
        if not np.isfinite(lp).all() or (lp > 1e-3).any():
            problems.append(Problem(f"{shard.key}/sample_logprob", "values that are not finite log-probs (<= 0)"))
    if cache.has_targets:
        try:
            targets = cache.encoding.decode({n: raw[n] for n in cache.target_arrays}, cache.layout)
        except Exception as e:  # a row whose CRC passed but whose packed frame does not unpack
            problems.append(Problem(f"{shard.key}/targets", f"a row does not decode ({type(e).__name__}: {e})"))
            return False, objects
        why = check_targets(targets.ids, targets.logprobs, vocab)
        if why:
            problems.append(Problem(f"{shard.key}/targets", why))
        if not np.isfinite(targets.target_logprob).all():
            problems.append(Problem(f"{shard.key}/targets", "decoded target log-probs contain NaN or infinity"))
        if targets.tail_logprob is not None and (np.isnan(targets.tail_logprob).any() or (targets.tail_logprob > 1e-6).any()):
            problems.append(Problem(f"{shard.key}/targets", "decoded tail log-probs contain NaN or exceed 0"))
        if record is not None:
            carry[record.nonfinite] = False  # label-only rows (--on-nonfinite skip) are not in the sums
            nll = math.fsum(-math.fsum(t.astype(np.float64)[c].tolist()) for t, c in zip(targets.target_logprob, carry))
            positions = int(carry.sum())
            exact = cache.encoding.name == "plain-v1"
            close = nll == record.nll_sum if exact else abs(nll - record.nll_sum) <= PACKED_NLL_TOLERANCE * max(1, positions)
            if positions != record.positions or not close:
                problems.append(Problem(f"{shard.key}", f"recorded NLL {record.nll_sum:.6g} over {record.positions} positions does not "
                                        f"recompute from the rows ({nll:.6g} over {positions})"))
    elif record is not None and int(carry.sum()) != record.positions:
        problems.append(Problem(f"{shard.key}", "recorded positions do not recompute from the rows"))
    return True, objects
