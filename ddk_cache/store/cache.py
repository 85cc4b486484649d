"""The on-disk cache: every array and attribute name lives here (see storage_layout.md).

A cache (format 5) is a Zarr v3 group:

    /                        attrs["ddk_cache"] = root metadata (meta.CacheMeta)
    /<domain>/<split>/       split is "train" or "val"
        rows            uint8 [N, A, C] packed encodings: the arrays below as planes of one
                                        bundle, one object per shard (shards.py)
        tokens          int32 [N, L]    the packed (or padded) sequences
        loss_mask       uint8 [N, L]    chat domains only: 1 where tokens[t] is a label
        sample_logprob  float32 [N, L]  generated samples only: log-prob of tokens[t] under the
                                        distribution that drew it (0 off the response)
        <target arrays>                 as the encoding declares (encodings.py): pack-v2's
                                        `targets` rows, or plain-v1's three arrays
    /_build/                 build state: logs of finished shards, staged tokens

Every array is a row array (shards.py): one object per S sequences, one compressed chunk
per sequence; in a bundle, every array of a shard shares one object. The builder writes
whole shards, one writer per shard, and records a shard in its log only after its objects
exist, so a build can stop anywhere and resume.
Readers go through `Cache`; nothing else opens the arrays.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreError, StoreVersionError
from .encodings import Encoding, Targets
from .log import LOG_DIR, LogWriter, ShardRecord, read_records, shard_key
from .meta import (
    CHAT, FORMAT_VERSION, SAMPLED_FORMAT_VERSION, SPLITS, STATE_BUILDING, STATE_COMPLETE, STATE_INITIALIZING, CacheMeta, DomainInfo, PPLEntry,
)
from .objects import Objects, is_url
from .shards import PLANES_ATTR, TRAILER, ArraySpec, RowArray, RowReader, damaged, read_zarr_json
from .targets import TargetSpec

ROOT_ATTR = "ddk_cache"
TOKENS = "tokens"
LOSS_MASK = "loss_mask"
SAMPLE_LOGPROB = "sample_logprob"
BUNDLE = "rows"  # format 5, packed encodings: every per-sequence array as a plane of this one
BUILD_DIR = "_build"
TOKENIZER_DIR = "_tokenizer"  # the teacher's tokenizer files (ddk-cache 0.4 on); its zarr.json is written last
PIECES_DIR = "_build/pieces"
# Format 1-2 only: per-shard completion flags (format 3 keeps build logs instead).
LEGACY_SHARD_DONE = "shard_done"

__all__ = ["BUNDLE", "TOKENIZER_DIR", "Cache", "CacheBatch", "CacheWriter", "Shard", "SPLITS", "TOKENS", "LOSS_MASK", "SAMPLE_LOGPROB", "ROOT_ATTR", "FORMAT_VERSION",
           "STATE_BUILDING", "STATE_COMPLETE", "STATE_INITIALIZING", "is_url", "format_bytes", "describe_pending", "read_root_meta"]


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

    @property
    def key(self) -> str:
        return shard_key(self.domain, self.split, self.index)


@dataclass(frozen=True)
class CacheBatch:
    """Sequences [start, stop) of one split with their teacher targets.

    tokens int32 [n, L]; topk_ids int32 / topk_logprobs float32 [n, L-1, K] (None for a
    tokens-only cache); target_logprob float32 [n, L-1]; loss_mask uint8 [n, L] or None
    (every position carries loss); sample_logprob float32 [n, L] or None (not generated
    samples); tail_logprob float32 [n, L-1] or None: the teacher's log mass outside the kept
    ids, where the encoding stores it (pack-v3)."""

    tokens: np.ndarray
    topk_ids: np.ndarray | None
    topk_logprobs: np.ndarray | None
    target_logprob: np.ndarray | None
    loss_mask: np.ndarray | None = None
    sample_logprob: np.ndarray | None = None
    tail_logprob: np.ndarray | None = None


def group_json(attributes: dict[str, Any] | None = None) -> bytes:
    """A Zarr v3 group's zarr.json."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}, indent=1).encode()


def read_root_meta(path: str, objects: Objects | None = None) -> CacheMeta:
    """The root metadata of the cache at `path`, after checking it is a cache this version reads."""
    objects = objects or Objects.open(path)
    raw = objects.get("zarr.json")
    if raw is None:
        raise StoreError(f"{path} is not a ddk-cache store (no Zarr group there)")
    try:
        node = json.loads(raw)
    except ValueError:
        raise StoreError(f"{path}/zarr.json is not valid JSON: the cache is damaged or not a ddk-cache store") from None
    meta = (node.get("attributes") or {}).get(ROOT_ATTR) if isinstance(node, dict) else None
    if not isinstance(meta, dict):
        raise StoreError(f"{path} is a Zarr group but not a ddk-cache store (no {ROOT_ATTR!r} attribute)")
    return CacheMeta.from_dict(meta, where=path)


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


class _CacheNode:
    """What reader and writer share: the metadata, the arrays and the shard bookkeeping."""

    def __init__(self, path: str, objects: Objects | None = None) -> None:
        self.path = str(path)
        self.objects = objects or Objects.open(self.path)
        self.meta = read_root_meta(self.path, self.objects)
        self.reader = RowReader(self.objects, build_id=self.meta.build_id)
        self._arrays: dict[tuple[str, str, str], RowArray] = {}

    @property
    def encoding(self) -> Encoding:
        return self.meta.encoding

    @property
    def targets(self) -> TargetSpec:
        return self.meta.targets

    @property
    def layout(self) -> Any:
        return self.meta.layout()

    @property
    def domains(self) -> list[str]:
        return list(self.meta.domains)

    @property
    def seq_len(self) -> int:
        return self.meta.seq_len

    @property
    def top_k(self) -> int:
        return self.meta.top_k

    @property
    def has_targets(self) -> bool:
        return bool(self.target_arrays)

    @property
    def target_arrays(self) -> tuple[str, ...]:
        """The arrays holding the teacher targets under this cache's encoding."""
        return tuple(self.encoding.arrays(self.layout))

    def is_chat(self, domain: str) -> bool:
        return self.meta.domains[domain].data == CHAT

    def is_sampled(self, domain: str) -> bool:
        """Whether the domain holds generated samples with their sampling log-probs."""
        return self.meta.domains[domain].sampled

    def num_sequences(self, domain: str, split: str) -> int:
        return self.meta.domains[domain].split(split).sequences

    def array_names(self, domain: str) -> list[str]:
        """Every array of a domain's splits: tokens, the loss mask (chat), the sampling log-probs
        (generated samples), the target arrays."""
        return ([TOKENS] + ([LOSS_MASK] if self.is_chat(domain) else []) + ([SAMPLE_LOGPROB] if self.is_sampled(domain) else [])
                + list(self.target_arrays))

    def array(self, domain: str, split: str, name: str) -> RowArray:
        """The RowArray `<domain>/<split>/<name>`, from its zarr.json (read once); in a bundled
        cache, the view of that plane of `<domain>/<split>/rows`."""
        key = (domain, split, name)
        if key not in self._arrays and self.meta.bundled and name != BUNDLE:
            spec = self.array_specs(domain).get(name)
            if spec is None:
                raise StoreError(f"{self.path}: {domain}/{split} has no array {name!r}")
            self._arrays[key] = self.array(domain, split, BUNDLE).plane_view(name, spec.row_shape, spec.dtype)
        if key not in self._arrays:
            if domain not in self.meta.domains:
                raise StoreError(f"{self.path} has no domain {domain!r} (domains: {', '.join(self.domains)})")
            path = f"{domain}/{split}/{name}"
            meta = read_zarr_json(self.objects, path)
            if meta is None:
                raise damaged(f"{self.objects.describe(path + '/zarr.json')} is missing")
            array = RowArray.from_zarr_json(path, meta)
            spec = self.bundle_spec(domain) if name == BUNDLE else self.array_specs(domain).get(name)
            want = (self.num_sequences(domain, split), *(spec.row_shape if spec else array.row_shape))
            if (array.n_rows, *array.row_shape) != want:
                raise damaged(f"{self.objects.describe(path + '/zarr.json')} gives the shape {(array.n_rows, *array.row_shape)}, "
                              f"the cache's metadata {want} (edited after the build?)")
            if name == BUNDLE and meta.get("attributes", {}).get(PLANES_ATTR) != self.plane_attrs(domain):
                raise damaged(f"{self.objects.describe(path + '/zarr.json')} lists the planes {meta.get('attributes', {}).get(PLANES_ATTR)}, "
                              f"the cache's metadata {self.plane_attrs(domain)} (edited after the build?)")
            self._arrays[key] = array
        return self._arrays[key]

    def bundle_spec(self, domain: str) -> ArraySpec:
        """A bundled cache's `rows` array: [A, C] bytes per sequence, A planes (array_specs'
        arrays, in order) of C bytes, the largest plane's row; zstd as the targets had."""
        specs = self.array_specs(domain).values()
        C = max(int(np.prod(s.row_shape)) * np.dtype(s.dtype).itemsize for s in specs)
        return ArraySpec("uint8", (len(specs), C), "zstd", 1, ("plane", "byte"))

    def plane_attrs(self, domain: str) -> list[dict[str, Any]]:
        """The `ddk_cache_planes` attribute of a domain's bundles: each plane's name, dtype and
        row shape, in plane order (what a plain Zarr reader needs to cut a row)."""
        return [{"name": name, "data_type": spec.dtype, "shape": list(spec.row_shape)} for name, spec in self.array_specs(domain).items()]

    def shard_arrays(self, domain: str, split: str) -> list[RowArray]:
        """The arrays that own a shard's objects: the bundle, or every array (one object each)."""
        if self.meta.bundled:
            return [self.array(domain, split, BUNDLE)]
        return [self.array(domain, split, name) for name in self.array_names(domain)]

    def array_specs(self, domain: str) -> dict[str, ArraySpec]:
        L = self.seq_len
        specs = {TOKENS: ArraySpec("int32", (L,), "blosc", 5, ("token",))}
        if self.is_chat(domain):
            specs[LOSS_MASK] = ArraySpec("uint8", (L,), "blosc", 5, ("token",))
        if self.is_sampled(domain):
            specs[SAMPLE_LOGPROB] = ArraySpec("float32", (L,), "blosc", 5, ("token",))
        specs.update(self.encoding.arrays(self.layout))
        return specs

    def shards(self) -> list[Shard]:
        """Every shard of the cache, in a fixed order (domain, split, index)."""
        out = []
        s = self.meta.shard_sequences
        for domain, info in self.meta.domains.items():
            for split in SPLITS:
                n = info.split(split).sequences
                out += [Shard(domain, split, i, i * s, min(n, (i + 1) * s)) for i in range(math.ceil(n / s))]
        return out

    def records(self) -> dict[str, ShardRecord]:
        """Finished shards (format 3: from the build logs), by shard key."""
        return read_records(self.objects)

    def pending(self, records: dict[str, ShardRecord] | None = None) -> list[Shard]:
        """Shards not yet written, in `shards()` order."""
        if self.meta.format_version < 3:
            return self._legacy_pending()
        done = self.records() if records is None else records
        return [s for s in self.shards() if s.key not in done]

    def _legacy_pending(self) -> list[Shard]:
        import zarr

        root = zarr.open_group(store=self.path, mode="r")
        done = {(d, sp): root[f"{d}/{sp}/{LEGACY_SHARD_DONE}"][:].astype(bool) for d in self.domains for sp in SPLITS}
        return [s for s in self.shards() if not done[(s.domain, s.split)][s.index]]


class Cache(_CacheNode):
    """Read-only access to a cache: its metadata, domains, sequences and teacher targets.

    Every read checks what it reads: a missing object or row, or a chunk whose checksum
    fails, raises StoreError naming it (never fill values)."""

    def __init__(self, path: str, *, require_complete: bool = True) -> None:
        super().__init__(path)
        state = self.meta.state
        if require_complete and state != STATE_COMPLETE:
            missing = describe_pending(self.pending()) if state == STATE_BUILDING else "its inputs are still being tokenized"
            raise StoreError(
                f"{path} is an incomplete cache (state {state!r}: {missing}); "
                "rerun the same `ddk-cache build` command to finish it"
            )

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher's tokenizer files the cache holds (`_tokenizer/`, by file name), each
        checked against the sha256 the listing records (`capture.tokenization.cache_tokenizer`
        loads them). StoreError for a cache that holds none: built before ddk-cache 0.4, or
        imported without --tokenizer."""
        raw = self.objects.get(f"{TOKENIZER_DIR}/zarr.json")
        if raw is None:
            raise StoreError(f"{self.path} holds no tokenizer (caches hold one since ddk-cache 0.4; an import holds one when given "
                             "--tokenizer): rebuild or re-import it, or give the teacher's tokenizer directory where asked")
        out = {}
        for name, digest in json.loads(raw)["attributes"][TOKENIZER_DIR]["files"].items():
            where = self.objects.describe(f"{TOKENIZER_DIR}/{name}")
            data = self.objects.get(f"{TOKENIZER_DIR}/{name}")
            if data is None:
                raise damaged(f"{where} is missing")
            if hashlib.sha256(data).hexdigest() != digest:
                raise damaged(f"{where} is not the file the build stored (its sha256 differs)")
            out[name] = data
        return out

    def teacher_ppl(self, domain: str, split: str = "val") -> float:
        """The teacher's perplexity on a domain's split, from the stored table."""
        return self.meta.ppl(domain, split).ppl

    def tokens(self, domain: str, split: str, rows: np.ndarray | list[int], out: np.ndarray | None = None) -> np.ndarray:
        """int32 [len(rows), L] token ids."""
        return self.reader.rows(self.array(domain, split, TOKENS), rows, out=out)

    def loss_mask(self, domain: str, split: str, rows: np.ndarray | list[int]) -> np.ndarray | None:
        """uint8 [len(rows), L], 1 where tokens[t] is a label; None for text domains (all are)."""
        if not self.is_chat(domain):
            return None
        return self.reader.rows(self.array(domain, split, LOSS_MASK), rows)

    def sample_logprob(self, domain: str, split: str, rows: np.ndarray | list[int]) -> np.ndarray | None:
        """float32 [len(rows), L]: log-prob of tokens[t] under the distribution that sampled it
        (0 off the response); None unless the domain holds generated samples."""
        if not self.is_sampled(domain):
            return None
        return self.reader.rows(self.array(domain, split, SAMPLE_LOGPROB), rows)

    def targets_of(self, domain: str, split: str, rows: np.ndarray | list[int], out: Targets | None = None) -> Targets | None:
        """The decoded teacher targets of `rows` (None for a tokens-only cache)."""
        if not self.has_targets:
            return None
        raw = {name: self.reader.raw_rows(self.array(domain, split, name), rows) for name in self.target_arrays}
        return self.encoding.decode(raw, self.layout, out=out)

    def read(self, domain: str, split: str, start: int, stop: int) -> CacheBatch:
        """Sequences [start, stop) of one split with their teacher targets."""
        if domain not in self.meta.domains:
            raise StoreError(f"{self.path} has no domain {domain!r} (domains: {', '.join(self.domains)})")
        rows = np.arange(start, min(stop, self.num_sequences(domain, split)))
        t = self.targets_of(domain, split, rows)
        return CacheBatch(self.tokens(domain, split, rows), t.ids if t else None, t.logprobs if t else None,
                          t.target_logprob if t else None, self.loss_mask(domain, split, rows), self.sample_logprob(domain, split, rows),
                          t.tail_logprob if t else None)

    def stored_bytes(self) -> dict[tuple[str, str, str], int]:
        """Bytes on disk per (domain, split, array), from one listing of the store."""
        sizes: dict[tuple[str, str, str], int] = {}
        for key, size in self.objects.list("").items():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] in self.meta.domains and parts[1] in SPLITS:
                k = (parts[0], parts[1], parts[2])
                sizes[k] = sizes.get(k, 0) + size
        return sizes

    def array_bytes(self) -> dict[str, int]:
        """Bytes on disk per array name over the whole cache. A bundle's objects are split by
        plane from their indexes (one small read per shard); their indexes and identity
        trailers count as "index"."""
        per: dict[str, int] = {}
        for (domain, split, name), size in self.stored_bytes().items():
            if name != BUNDLE or not self.meta.bundled:
                per[name] = per.get(name, 0) + size
                continue
            bundle = self.array(domain, split, BUNDLE)
            planes = [self.array(domain, split, plane) for plane in bundle.planes]
            for shard in range(bundle.n_shards):
                start, stop = bundle.shard_range(shard)
                for view in planes:
                    used = int(self.reader.index(view, shard)[: stop - start, 1].sum())
                    per[view.name] = per.get(view.name, 0) + used
                    size -= used
            per["index"] = per.get("index", 0) + size
        return per

    def summary(self) -> list[dict[str, Any]]:
        """One row per domain and split: sizes, teacher PPL, bytes on disk, mean kept mass."""
        stored = self.stored_bytes()
        rows = []
        for domain in self.domains:
            for split in SPLITS:
                n = self.num_sequences(domain, split)
                tokens = n * self.seq_len
                nbytes = sum(v for (d, s, _), v in stored.items() if d == domain and s == split)
                entry = (self.meta.teacher_ppl or {}).get(domain, {}).get(split)
                rows.append({
                    "domain": domain, "split": split, "sequences": n, "tokens": tokens,
                    "teacher_ppl": entry.ppl if entry else None, "bytes": int(nbytes),
                    # NLL in bits per UTF-8 byte of the predicted text (None: not recorded, before ddk-cache 0.4)
                    "teacher_bits_per_byte": entry.bits_per_byte if entry else None,
                    "bytes_per_token": nbytes / max(1, tokens),
                    "mean_topk_mass": entry.kept_mass if entry else None,
                })
        return rows


class CacheWriter(_CacheNode):
    """Creates a cache, writes teacher shards into it and finalizes it.

    Several writers (processes or machines) may write one store as long as each writes
    distinct shards; two writing the same shard write the same bytes (builds are
    deterministic), so even that only wastes work."""

    @staticmethod
    def initialize(path: str, meta: CacheMeta) -> tuple[CacheMeta, bool]:
        """Create the root of a new cache (state initializing) unless one exists; return
        the metadata that is there now (this one, or an earlier or concurrent writer's) and
        whether this call created it."""
        objects = Objects.open(path)
        meta.format_version, meta.state = FORMAT_VERSION, STATE_INITIALIZING
        meta.created_at = meta.created_at or now()
        meta.shard_identity = True
        created = objects.put_if_absent("zarr.json", group_json({ROOT_ATTR: meta.to_dict()}))
        objects.put_if_absent(f"{BUILD_DIR}/zarr.json", group_json({"ddk_cache_build_state": "logs and staged tokens; see storage_layout.md"}))
        return read_root_meta(path, objects), created

    def store_tokenizer(self, tok: Any) -> None:
        """Keep the teacher's tokenizer files in the cache (`_tokenizer/`), so that the cache
        alone says what its token ids are (and their bytes). Each file is written if absent,
        then the group's zarr.json listing them: its presence means every file is there."""
        import tempfile

        if self.objects.get(f"{TOKENIZER_DIR}/zarr.json") is not None:
            return
        files = {}
        with tempfile.TemporaryDirectory(prefix="ddk-tokenizer-") as tmp:
            tok.save_pretrained(tmp)
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    data = f.read()
                key = f"{TOKENIZER_DIR}/{name}"
                if not self.objects.put_if_absent(key, data):  # another worker's copy is there: list what is stored
                    data = self.objects.get(key) or data
                files[name] = hashlib.sha256(data).hexdigest()
        self.objects.put_if_absent(f"{TOKENIZER_DIR}/zarr.json", group_json({TOKENIZER_DIR: {
            "files": files, "fingerprint": self.meta.tokenizer.get("fingerprint"),
            "about": "the teacher's tokenizer (save_pretrained); see storage_layout.md"}}))

    def write_meta(self, meta: CacheMeta) -> None:
        self.objects.put("zarr.json", group_json({ROOT_ATTR: meta.to_dict()}))
        self.meta = meta

    def create_arrays(self, domains: dict[str, DomainInfo]) -> None:
        """Create every domain's groups and arrays (idempotent: arrays already there must
        match), then record the domains and move the state to building."""
        import zarr

        meta = self.meta
        meta.domains = domains
        for domain in domains:
            # Groups by an exclusive create of their zarr.json: several workers may get here at
            # once, and zarr's require_group is check-then-create.
            self.objects.put_if_absent(f"{domain}/zarr.json", group_json())
            for split in SPLITS:
                self.objects.put_if_absent(f"{domain}/{split}/zarr.json", group_json())
                group = zarr.open_group(store=self.path, path=f"{domain}/{split}", mode="r+")
                n = domains[domain].split(split).sequences
                # A split smaller than a shard gets shards of its size: every shard object holds
                # an index slot per row of its shard, which would dwarf a small split's rows.
                shard_rows = meta.shard_rows(n)
                arrays = {BUNDLE: self.bundle_spec(domain)} if meta.bundled else self.array_specs(domain)
                for name, spec in arrays.items():
                    shape = (n, *spec.row_shape)
                    existing = read_zarr_json(self.objects, f"{domain}/{split}/{name}")
                    if existing is not None:
                        if tuple(existing["shape"]) != shape:
                            raise StoreError(f"{self.path}: {domain}/{split}/{name} has shape {tuple(existing['shape'])}, this build needs {shape}")
                        continue
                    # A bundle's inner chunk is one plane of one row: [1, 1, C].
                    chunk = (1, 1, spec.row_shape[1]) if name == BUNDLE else (1, *spec.row_shape)
                    try:
                        group.create_array(name, shape=shape, dtype=spec.dtype, chunks=chunk, shards=(shard_rows, *spec.row_shape),
                                           compressors=spec.codecs(), fill_value=0, dimension_names=("sequence", *spec.dims),
                                           attributes={PLANES_ATTR: self.plane_attrs(domain)} if name == BUNDLE else None)
                    except zarr.errors.ContainsArrayError:
                        pass  # a concurrent worker made it a moment ago
        if meta.state == STATE_INITIALIZING:
            meta.state = STATE_BUILDING
        if any(info.sampled for info in domains.values()):
            meta.format_version = max(meta.format_version, SAMPLED_FORMAT_VERSION)  # see meta.SAMPLED_FORMAT_VERSION
        self.write_meta(meta)

    def put_shard(self, shard: Shard, chunks: dict[str, list[bytes]]) -> tuple[dict[str, int], dict[str, str]]:
        """Write one shard's objects (inner chunks per array, in row order); their sizes and
        content hashes (of the chunk bytes, as their identity trailers record them)."""
        sizes, hashes = {}, {}
        build_id = self.meta.build_id
        want = set(self.array_names(shard.domain))
        if set(chunks) != want:
            raise ValueError(f"{shard.key}: rows for {sorted(chunks)}, the cache stores {sorted(want)}")
        for array in self.shard_arrays(shard.domain, shard.split):
            blob = array.assemble_planes(shard.index, [chunks[name] for name in (array.planes or (array.name,))], build_id)
            self.objects.put(array.object_key(shard.index), blob)
            sizes[array.name] = len(blob)
            if build_id is not None:
                hashes[array.name] = RowArray.content_hash(blob[len(blob) - array.index_bytes() - TRAILER:][:TRAILER])
        return sizes, hashes

    def log_writer(self, worker: tuple[int, int]) -> LogWriter:
        return LogWriter(self.objects, worker)

    def finalize(self, records: dict[str, ShardRecord] | None = None) -> CacheMeta:
        """Compute the teacher perplexity table from the shard records and mark the cache
        complete; then delete the staged tokens. Raises StoreError if a shard is pending."""
        records = self.records() if records is None else records
        pending = self.pending(records)
        if pending:
            raise StoreError(f"{self.path}: cannot finalize, {describe_pending(pending)}")
        meta = self.meta
        table: dict[str, dict[str, PPLEntry]] = {}
        for domain, info in meta.domains.items():
            table[domain] = {}
            for split in SPLITS:
                mine = [records[s.key] for s in self.shards() if s.domain == domain and s.split == split]
                nll = math.fsum(r.nll_sum for r in mine)
                positions = sum(r.positions for r in mine)
                mass = math.fsum(r.kept_mass_sum for r in mine)
                nbytes = sum(r.bytes for r in mine) if mine and all(r.bytes is not None for r in mine) else None
                info.split(split).loss_positions = positions
                info.split(split).nonfinite = sum(len(r.nonfinite) for r in mine)
                table[domain][split] = PPLEntry(
                    ppl=math.exp(nll / positions) if positions and self.has_targets else float("nan"), nll_sum=nll,
                    predicted_tokens=positions, kept_mass=mass / positions if positions and self.has_targets else None, bytes=nbytes)
        meta.teacher_ppl = table if self.has_targets else None
        meta.state, meta.completed_at = STATE_COMPLETE, now()
        self.write_meta(meta)
        self.objects.delete(PIECES_DIR)
        return meta


__all__ += ["LOG_DIR", "StoreVersionError"]
