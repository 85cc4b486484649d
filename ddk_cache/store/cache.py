"""The on-disk cache format: every array and attribute name lives here (see storage_layout.md).

A cache is a Zarr v3 group:

    /                        attrs["ddk_cache"] = root metadata (format version, teacher, ...)
    /<domain>/<split>/       split is "train" or "val"
        tokens          int32   [N, L]        the packed sequences
        topk_ids        int32   [N, L-1, k]   plain-v1: position t predicts tokens[:, t+1]
        topk_logprobs   float32 [N, L-1, k]   plain-v1 (-inf: entry not kept)
        targets         uint8   [N, C]        pack-v1: each sequence's targets, packed (codec.py)
        target_logprob  float32 [N, L-1]      log p(tokens[:, t+1] | tokens[:, :t+1])
        seq_nll         float64 [N]           -sum over positions of target_logprob
        seq_topk_mass   float64 [N]           sum over positions of sum_k exp(topk_logprobs)
        shard_done      uint8   [ceil(N/S)]   1 once shard s of the arrays above is written

The builder writes whole shards of S sequences, one writer per shard, and marks a shard
done only after its data is written, so a build can stop anywhere and resume.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from .. import __version__
from .encodings import Encoding, PackEncoding, encoding_from_dict
from ..errors import StoreError, StoreVersionError
from .targets import TargetSpec

FORMAT_VERSION = 2
# Version 1 (plain-v1 top-k only, no `targets` attribute) is still read.
READABLE_VERSIONS = (1, 2)
ROOT_ATTR = "ddk_cache"
SPLITS = ("train", "val")

TOKENS = "tokens"
TOPK_IDS = "topk_ids"
TOPK_LOGPROBS = "topk_logprobs"
TARGETS = "targets"
TARGET_LOGPROB = "target_logprob"
SEQ_NLL = "seq_nll"
SEQ_TOPK_MASS = "seq_topk_mass"
SHARD_DONE = "shard_done"

# Chunks equal to the fill value are written too, so a missing chunk always means damage.
WRITE_CONFIG = {"write_empty_chunks": True}

# Root states: arrays being created and tokens written -> teacher shards pending -> done.
STATE_INITIALIZING = "initializing"
STATE_BUILDING = "building"
STATE_COMPLETE = "complete"


def now() -> str:
    """UTC timestamp in ISO 8601, as every time attribute is written."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Shard:
    """One unit of teacher work: sequences [start, stop) of one domain's split."""

    domain: str
    split: str
    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class CacheBatch:
    """Sequences [start, stop) of one split with their teacher targets (see module docstring)."""

    tokens: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprob: np.ndarray


def is_url(path: str) -> bool:
    """fsspec URLs (s3://, gs://, memory://...) go through fsspec; anything else is a local path."""
    return "://" in path


def path_is_empty(path: str) -> bool:
    """True when nothing (or an empty directory) is at `path`, local or remote."""
    if not is_url(path):
        return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return not fs.exists(root) or not fs.ls(root)


def _open_root(path: str, mode: str) -> zarr.Group:
    try:
        return zarr.open_group(store=path, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
        raise StoreError(f"{path} is not a ddk-cache store ({type(e).__name__}: no Zarr group there)") from None


def read_root_meta(path: str) -> dict[str, Any]:
    """The root metadata of the cache at `path`, after checking it is a cache this version reads."""
    attrs = dict(_open_root(path, "r").attrs)
    meta = attrs.get(ROOT_ATTR)
    if not isinstance(meta, dict):
        raise StoreError(f"{path} is a Zarr group but not a ddk-cache store (no {ROOT_ATTR!r} attribute)")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreVersionError(
            f"{path} has cache format version {version}; this ddk-cache {__version__} reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
            + ("; upgrade ddk-cache" if isinstance(version, int) and version > FORMAT_VERSION else "; rebuild the cache")
        )
    encoding_from_dict(meta["encoding"])  # refuses unknown encodings
    return meta


class _CacheNode:
    """What reader and writer share: the root metadata and the shard bookkeeping."""

    def __init__(self, path: str, mode: str) -> None:
        self.path = path
        self.meta = read_root_meta(path)
        self.root = _open_root(path, mode)
        self.encoding = encoding_from_dict(self.meta["encoding"])
        # Version 1 caches predate the attribute: they hold plain top-k targets.
        self.targets = TargetSpec.from_dict(self.meta["targets"]) if "targets" in self.meta else TargetSpec(k=int(self.meta["top_k"]))
        self.packed = isinstance(self.encoding, PackEncoding)
        self.codec = self.encoding.codec(vocab_size=int(self.meta["vocab_size"]), max_entries=self.targets.entries) if self.packed else None

    @property
    def target_arrays(self) -> tuple[str, ...]:
        """The arrays holding the sparse targets under this cache's encoding."""
        return (TARGETS,) if self.packed else (TOPK_IDS, TOPK_LOGPROBS)

    def decode_targets(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Stored target arrays of some sequences -> (ids int64 [n, P, K], log-probs float32 [n, P, K]).

        Entries not kept are padding (log-prob -inf). For sampled targets the log-probs are
        the log target weights (storage_layout.md, "Targets")."""
        if not self.packed:
            return arrays[TOPK_IDS].astype(np.int64), arrays[TOPK_LOGPROBS]
        P = int(self.meta["seq_len"]) - 1
        rows = arrays[TARGETS]
        ids = np.empty((len(rows), P, self.targets.entries), np.int64)
        lps = np.empty((len(rows), P, self.targets.entries), np.float32)
        for i, row in enumerate(rows):
            if self.targets.kind == "sampled":
                ids[i], lps[i] = self.codec.decode_sampled(memoryview(row), P, self.targets.sample_temperature)
            else:
                ids[i], lps[i] = self.codec.decode_topk(memoryview(row), P)
        return ids, lps

    def _group(self, domain: str, split: str) -> zarr.Group:
        return self.root[f"{domain}/{split}"]

    def _array(self, domain: str, split: str, name: str) -> zarr.Array:
        return self.root[f"{domain}/{split}/{name}"].with_config(WRITE_CONFIG)

    def shards(self) -> list[Shard]:
        """Every shard of the cache, in a fixed order (domain, split, index)."""
        out = []
        s = self.meta["shard_sequences"]
        for domain in self.meta["domains"]:
            for split in SPLITS:
                n = self.meta["domains"][domain][split]["sequences"]
                out += [Shard(domain, split, i, i * s, min(n, (i + 1) * s)) for i in range(math.ceil(n / s))]
        return out

    def pending(self) -> list[Shard]:
        """Shards whose `shard_done` entry is not set, in `shards()` order."""
        done = {
            (d, sp): self._group(d, sp)[SHARD_DONE][:].astype(bool) for d in self.meta["domains"] for sp in SPLITS
        }
        return [s for s in self.shards() if not done[(s.domain, s.split)][s.index]]


class CacheWriter(_CacheNode):
    """Creates a cache, writes teacher shards into it and finalizes it.

    Several CacheWriters (processes or machines) may write one store as long as each
    writes distinct shards: a shard's arrays and its `shard_done` entry are whole chunks.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path, "r+")

    @classmethod
    def create(
        cls,
        path: str,
        meta: dict[str, Any],
        splits: dict[str, dict[str, np.ndarray]],
        *,
        targets: TargetSpec,
        shard_sequences: int,
        encoding: Encoding,
    ) -> "CacheWriter":
        """Create the store at `path` (overwriting an unfinished initialization) and write the tokens.

        `meta` is the build's root metadata; `splits[domain][split]` the int32 [N, L] tokens.
        The root's state moves to "building" only once every array exists and every token
        is written, so a crash here leaves a store that the next run re-initializes.
        """
        root_meta = {
            **meta,
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "state": STATE_INITIALIZING,
            "created_at": now(),
            "encoding": encoding.to_dict(),
            "targets": targets.to_dict(),
            "top_k": targets.entries,
            "shard_sequences": shard_sequences,
        }
        top_k = targets.entries
        # pack-v1 rows are as wide as the codec's worst case (the reader derives it the same way).
        capacity = encoding.codec(vocab_size=int(meta["vocab_size"]), max_entries=top_k).capacity(int(meta["seq_len"]) - 1) if isinstance(encoding, PackEncoding) else 0
        root = zarr.create_group(store=path, overwrite=True, attributes={ROOT_ATTR: root_meta})
        for domain, by_split in splits.items():
            dgroup = root.create_group(domain)
            for split in SPLITS:
                tokens = by_split[split]
                n, seq_len = tokens.shape
                group = dgroup.create_group(split)
                s = shard_sequences
                positions = seq_len - 1

                def arr(name: str, shape: tuple, dtype: str, shards: tuple | None, chunks: tuple, dims: tuple) -> Any:
                    return group.create_array(
                        name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                        compressors=encoding.compressors(packed=name == TARGETS), fill_value=0, dimension_names=dims,
                        config=WRITE_CONFIG,
                    )

                arr(TOKENS, (n, seq_len), "int32", (s, seq_len), (1, seq_len), ("sequence", "token"))[:] = tokens
                if capacity:
                    arr(TARGETS, (n, capacity), "uint8", (s, capacity), (1, capacity), ("sequence", "byte"))
                else:
                    arr(TOPK_IDS, (n, positions, top_k), "int32", (s, positions, top_k), (1, positions, top_k), ("sequence", "position", "rank"))
                    arr(TOPK_LOGPROBS, (n, positions, top_k), "float32", (s, positions, top_k), (1, positions, top_k), ("sequence", "position", "rank"))
                arr(TARGET_LOGPROB, (n, positions), "float32", (s, positions), (1, positions), ("sequence", "position"))
                arr(SEQ_NLL, (n,), "float64", None, (s,), ("sequence",))
                arr(SEQ_TOPK_MASS, (n,), "float64", None, (s,), ("sequence",))
                arr(SHARD_DONE, (math.ceil(n / s),), "uint8", None, (1,), ("shard",))
        root_meta["state"] = STATE_BUILDING
        root.update_attributes({ROOT_ATTR: root_meta})
        return cls(path)

    def read_tokens(self, shard: Shard) -> np.ndarray:
        """int32 [stop-start, L] tokens of a shard."""
        return self._group(shard.domain, shard.split)[TOKENS][shard.start : shard.stop]

    def write_shard(self, shard: Shard, topk_ids: np.ndarray, topk_logprobs: np.ndarray, target_logprob: np.ndarray,
                    counts: np.ndarray | None = None) -> None:
        """Write one shard's teacher arrays and per-sequence sums, then mark it done.

        topk_ids/topk_logprobs [n, P, K] in rank order, -inf where an entry is not kept; for
        sampled targets the unique ids, their teacher log-probs and their draw `counts`."""
        sl = slice(shard.start, shard.stop)
        values = {
            **self.encode_targets(topk_ids, topk_logprobs, counts),
            TARGET_LOGPROB: target_logprob,
            SEQ_NLL: sequence_nll(target_logprob),
            SEQ_TOPK_MASS: np.exp(topk_logprobs.astype(np.float64)).sum(axis=(1, 2)),
        }
        for name, value in values.items():
            self._array(shard.domain, shard.split, name)[sl] = value
        # Written last: a crash before this line leaves the shard pending, and it is redone.
        self._array(shard.domain, shard.split, SHARD_DONE)[shard.index : shard.index + 1] = 1

    def encode_targets(self, ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray | None) -> dict[str, np.ndarray]:
        """The stored arrays for [n, P, K] targets under this cache's encoding."""
        if not self.packed:
            return {TOPK_IDS: ids, TOPK_LOGPROBS: np.where(np.isfinite(logprobs), logprobs, -np.inf).astype(np.float32)}
        rows = np.zeros((len(ids), self.codec.capacity(int(self.meta["seq_len"]) - 1)), np.uint8)
        for i in range(len(ids)):
            if self.targets.kind == "sampled":
                blob = self.codec.encode_sampled(ids[i], counts[i], logprobs[i] if self.targets.sample_temperature != 1.0 else None)
            else:
                blob = self.codec.encode_topk(ids[i], logprobs[i])
            rows[i, : len(blob)] = np.frombuffer(blob, np.uint8)
        return {TARGETS: rows}

    def finalize(self) -> dict[str, Any]:
        """Compute the teacher perplexity table from `seq_nll` and mark the cache complete.

        Raises StoreError if any shard is still pending. Returns the final root metadata.
        """
        pending = self.pending()
        if pending:
            raise StoreError(f"{self.path}: cannot finalize, {describe_pending(pending)}")
        table: dict[str, dict[str, Any]] = {}
        for domain in self.meta["domains"]:
            table[domain] = {}
            for split in SPLITS:
                g = self._group(domain, split)
                table[domain][split] = perplexity_entry(g[SEQ_NLL][:], g[TOKENS].shape[1] - 1)
        meta = {**self.meta, "state": STATE_COMPLETE, "completed_at": now(), "teacher_ppl": table}
        self.root.update_attributes({ROOT_ATTR: meta})
        self.meta = meta
        return meta


def sequence_nll(target_logprob: np.ndarray) -> np.ndarray:
    """float64 [N]: each sequence's summed negative log-likelihood, from float32 [N, P] targets."""
    return -target_logprob.astype(np.float64).sum(axis=1)


def perplexity_entry(seq_nll: np.ndarray, positions: int) -> dict[str, Any]:
    """One row of the teacher perplexity table: exp(total NLL / predicted tokens)."""
    predicted = int(len(seq_nll) * positions)
    nll = float(np.sum(seq_nll, dtype=np.float64))
    return {"ppl": math.exp(nll / predicted) if predicted else float("nan"), "nll_sum": nll, "predicted_tokens": predicted}


def object_key(ndim: int, index: int) -> str:
    """Key, relative to an array, of the index-th object along the sequence axis (a shard, or
    a chunk if unsharded): Zarr v3's default chunk keys, one object across the other axes."""
    return "c/" + "/".join([str(index)] + ["0"] * (ndim - 1))


def format_bytes(n: float) -> str:
    """A size for people: 812 B, 4.2 MiB, 1.3 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe_pending(pending: list[Shard], limit: int = 6) -> str:
    """A short description of missing shards, for error messages."""
    by_group: dict[str, list[int]] = {}
    for s in pending:
        by_group.setdefault(f"{s.domain}/{s.split}", []).append(s.index)
    parts = [f"{g} shards {','.join(map(str, idx[:limit]))}{'...' if len(idx) > limit else ''}" for g, idx in by_group.items()]
    return f"{len(pending)} shard(s) not written ({'; '.join(parts)})"


class Cache(_CacheNode):
    """Read-only access to a cache: its metadata, domains, sequences and teacher targets."""

    def __init__(self, path: str, *, require_complete: bool = True) -> None:
        super().__init__(path, "r")
        state = self.meta.get("state")
        if require_complete and state != STATE_COMPLETE:
            missing = describe_pending(self.pending()) if state == STATE_BUILDING else "tokens not yet written"
            raise StoreError(
                f"{path} is an incomplete cache (state {state!r}: {missing}); "
                "rerun the same `ddk-cache build` command to finish it"
            )

    @property
    def domains(self) -> list[str]:
        return list(self.meta["domains"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    def num_sequences(self, domain: str, split: str) -> int:
        return int(self.meta["domains"][domain][split]["sequences"])

    def teacher_ppl(self, domain: str, split: str = "val") -> float:
        """The teacher's perplexity on a domain's split, from the stored table."""
        return float(self.meta["teacher_ppl"][domain][split]["ppl"])

    def read(self, domain: str, split: str, start: int, stop: int) -> CacheBatch:
        """Sequences [start, stop) of one split with their teacher targets."""
        if domain not in self.meta["domains"]:
            raise StoreError(f"{self.path} has no domain {domain!r} (domains: {', '.join(self.domains)})")
        g = self._group(domain, split)
        ids, lps = self.decode_targets({name: g[name][start:stop] for name in self.target_arrays})
        return CacheBatch(g[TOKENS][start:stop], ids, lps, g[TARGET_LOGPROB][start:stop])

    def summary(self) -> list[dict[str, Any]]:
        """One row per domain and split: sizes, teacher PPL, bytes on disk, mean top-k mass."""
        rows = []
        for domain in self.domains:
            for split in SPLITS:
                g = self._group(domain, split)
                n = self.num_sequences(domain, split)
                positions = self.seq_len - 1
                tokens = n * self.seq_len
                stored = sum(g[name].nbytes_stored() for name in g.array_keys())
                mass = float(g[SEQ_TOPK_MASS][:].sum() / max(1, n * positions))
                ppl = self.meta.get("teacher_ppl", {}).get(domain, {}).get(split, {}).get("ppl")
                rows.append({
                    "domain": domain, "split": split, "sequences": n, "tokens": tokens,
                    "teacher_ppl": ppl, "bytes": int(stored), "bytes_per_token": stored / max(1, tokens),
                    "mean_topk_mass": mass,
                })
        return rows
