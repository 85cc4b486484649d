"""Row arrays: how every large cache array is laid out, written and read.

Each array is a Zarr v3 array of N rows sharded along the row axis: one object per S
rows (a *shard*), and inside it one independently compressed chunk per row, followed by
the shard index (Zarr's `sharding_indexed` codec, index at the end). storage_layout.md
gives the bytes. Zarr creates the arrays' metadata (`zarr.json`), so any Zarr v3 reader
can open a cache; the shard objects themselves are written and read here, because:

  * a writer builds a shard object from rows compressed one by one as they are scored,
    holding compressed bytes only (zarr would want the whole uncompressed shard);
  * a reader fetches only the byte ranges of the rows it needs (one index read per shard,
    then one range per run of adjacent rows) and checks every chunk's CRC32C;
  * an object that should exist and does not is an error naming it (zarr would return the
    fill value: a damaged cache would silently train on zeros).

Inner chunk codecs: bytes (little endian) -> blosc (zstd, byte shuffle) or zstd -> crc32c.
Shard index: per row slot (offset, nbytes) as little-endian uint64 pairs, then a CRC32C
of those bytes; (2^64-1, 2^64-1) marks a slot never written.

A *bundle* (format 5) keeps several per-sequence arrays in one object per shard: a uint8
array [N, A, C] whose inner chunk [1, 1, C] is one sequence's row of one *plane* (tokens,
the loss mask, the targets frame...; each row's bytes zero-padded to C). The object holds
each plane's chunks together (plane 0's rows, then plane 1's...), so the rows of one plane
are still one range read: tokens are read without fetching or decoding the targets. A
`RowArray` view of one plane reads and writes it as if it were its own typed array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from numcodecs import CRC32C, Blosc

from ..errors import StoreError
from .objects import Objects

EMPTY = 2**64 - 1  # offset and nbytes of an inner chunk that was never written
# Identity trailer between a shard object's chunks and its index (Zarr ignores bytes no index
# entry points at): magic, the build's id, a hash of the object's place (array path and
# shard index), a hash of its chunk bytes. A reader checks it with the index (one read).
TRAILER = 64
TRAILER_MAGIC = b"DDKS"


def identity_trailer(build_id: bytes, path: str, shard: int, body: bytes) -> bytes:
    """The 64-byte trailer of the shard object `shard` of array `path` (storage_layout.md,
    "Row arrays and shard objects"): magic, build id (16 bytes), place (8), content (16), zeros."""
    place = hashlib.blake2b(f"{path}#{shard}".encode(), digest_size=8).digest()
    content = hashlib.blake2b(body, digest_size=16).digest()
    return (TRAILER_MAGIC + build_id[:16].ljust(16, b"\0") + place + content).ljust(TRAILER, b"\0")
COMPRESSORS = ("blosc", "zstd")
PLANES_ATTR = "ddk_cache_planes"  # a bundle's zarr.json attribute: its planes (storage_layout.md)
_CRC = CRC32C(location="end")


_zstd = threading.local()  # python-zstandard contexts are not thread-safe: one per thread


def zstd_padded(data: bytes | memoryview, size: int, level: int) -> bytes:
    """One zstd frame of `data` followed by zeros up to `size` bytes (content size in its
    header, as Zarr's zstd codec writes). The zeros start a block of their own, which zstd
    stores as run-length blocks: a reader rebuilds them by memset, where compressing them
    with the data made it decode them as matches (a padded tokens row decoded 2.6x slower,
    a targets row, padded to its worst case, paid the same). Any zstd decoder reads it."""
    ctxs = getattr(_zstd, "c", None)
    if ctxs is None:
        ctxs = _zstd.c = {}
    cctx = ctxs.get(level)
    if cctx is None:
        cctx = ctxs[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    co = cctx.compressobj(size=size)
    out = co.compress(data)
    if size > len(data):
        out += co.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) + co.compress(bytes(size - len(data)))
    return out + co.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


def zstd_decompress(data: bytes | memoryview) -> bytes:
    """A zstd frame's content (python-zstandard: 2-3x numcodecs' call on short frames)."""
    dctx = getattr(_zstd, "d", None)
    if dctx is None:
        dctx = _zstd.d = zstandard.ZstdDecompressor()
    try:
        return dctx.decompress(data)
    except zstandard.ZstdError:
        if zstandard.frame_content_size(data) != -1:  # the size was there: the frame is damaged
            raise
        return dctx.decompressobj().decompress(data)  # a frame written without its content size


def damaged(what: str) -> StoreError:
    return StoreError(f"{what}: the cache is damaged; run `ddk-cache verify` on it to list every damaged object, "
                      "then restore them from a copy or rebuild the cache")


@dataclass(frozen=True)
class ArraySpec:
    """What an array holds per row: dtype, row shape, and how its chunks are compressed."""

    dtype: str  # numpy dtype name, little-endian on disk
    row_shape: tuple[int, ...]
    compressor: str = "blosc"  # blosc (zstd inside, byte shuffle) or zstd
    level: int = 5
    dims: tuple[str, ...] = ()  # dimension names after "sequence"

    def codecs(self) -> list[Any]:
        """zarr codecs of an inner chunk after `bytes` (what zarr writes into zarr.json)."""
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

        first = BloscCodec(cname="zstd", clevel=self.level, shuffle="shuffle") if self.compressor == "blosc" else ZstdCodec(level=self.level)
        return [first, Crc32cCodec()]


@dataclass(frozen=True)
class RowArray:
    """One sharded row array of a cache: where it lives and how to read and write its rows."""

    path: str  # key prefix, e.g. "news/train/tokens" (a bundle's: "news/train/rows")
    n_rows: int
    row_shape: tuple[int, ...]  # a bundle plane's: the plane's own row (tokens: [L])
    dtype: np.dtype
    shard_rows: int
    compressor: str | None  # blosc, zstd or None
    level: int = 5
    planes: tuple[str, ...] = ()  # a bundle: its planes' names, in order (empty: a plain row array)
    plane: int = 0  # a bundle's view: which plane this one reads and writes
    chunk_bytes: int = 0  # a bundle: C, the bytes of every inner chunk (each plane's row padded to it)
    view: bool = False  # a plane view of a bundle (row_shape and dtype are the plane's)

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape)) * self.dtype.itemsize

    @property
    def n_planes(self) -> int:
        return max(1, len(self.planes))

    @property
    def name(self) -> str:
        """The array's name in its group (a bundle's: "rows"); a plane view's is the plane's."""
        return self.planes[self.plane] if self.view else self.path.rsplit("/", 1)[-1]

    def plane_view(self, name: str, row_shape: tuple[int, ...], dtype: str | np.dtype) -> "RowArray":
        """The bundle's plane `name` as its own typed row array (reads and writes go to the
        bundle's objects)."""
        if name not in self.planes:
            raise StoreError(f"{self.path}: no plane {name!r} (planes: {', '.join(self.planes)})")
        view = dataclasses.replace(self, row_shape=tuple(row_shape), dtype=np.dtype(dtype).newbyteorder("<"), plane=self.planes.index(name),
                                   view=True)
        if view.row_bytes > self.chunk_bytes:
            raise StoreError(f"{self.path}: plane {name!r} needs {view.row_bytes} bytes per row, its chunks hold {self.chunk_bytes}")
        return view

    def object_key(self, shard: int) -> str:
        """Zarr v3's default chunk key of a shard: c/<shard>/0/... (one object across the other axes)."""
        dims = 2 if self.planes else len(self.row_shape)
        return f"{self.path}/c/" + "/".join([str(shard)] + ["0"] * dims)

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_rows, min(self.n_rows, (shard + 1) * self.shard_rows)

    @classmethod
    def from_zarr_json(cls, path: str, meta: dict[str, Any]) -> "RowArray":
        """The RowArray described by an array's zarr.json; StoreError for any other layout."""
        try:
            shape = tuple(meta["shape"])
            sharding = meta["codecs"]
            conf = sharding[0]["configuration"]
            outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            inner = [c["name"] for c in conf["codecs"]]
            planes = tuple(p["name"] for p in (meta.get("attributes") or {}).get(PLANES_ATTR) or ())
            # A bundle [N, A, C]: one inner chunk per row and plane.
            chunk = (1, 1, shape[2]) if planes else (1, *shape[1:])
            ok = (
                meta.get("zarr_format") == 3 and len(sharding) == 1 and sharding[0]["name"] == "sharding_indexed"
                and tuple(conf["chunk_shape"]) == chunk and outer[1:] == shape[1:]
                and (not planes or (len(shape) == 3 and len(planes) == shape[1] and meta["data_type"] == "uint8"
                                    and all(isinstance(p, str) for p in planes)))
                and conf.get("index_location", "end") == "end"
                and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
                and inner[:1] == ["bytes"] and inner[-1:] == ["crc32c"] and len(inner) in (2, 3)
                and (conf["codecs"][0].get("configuration") or {}).get("endian", "little") == "little"
                and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
            )
            compressor = inner[1] if len(inner) == 3 else None
            level = int((conf["codecs"][1].get("configuration") or {}).get("clevel" if compressor == "blosc" else "level", 0)) if compressor else 0
        except (KeyError, IndexError, TypeError):
            ok, compressor, level, planes = False, None, 0, ()
        if not ok or (compressor is not None and compressor not in COMPRESSORS):
            raise StoreError(f"{path}: not a row-sharded array this ddk-cache reads (see storage_layout.md)")
        return cls(path, shape[0], shape[1:], np.dtype(meta["data_type"]).newbyteorder("<"), outer[0], compressor, level,
                   planes=planes, chunk_bytes=shape[2] if planes else 0)

    # ------------------------------------------------------------------ writing
    def encode_row(self, row: np.ndarray | bytes) -> bytes:
        """One row's inner chunk: its little-endian bytes (zero-padded to the row size for
        byte rows), compressed, then its CRC32C."""
        size = self.chunk_bytes if self.view else self.row_bytes  # what the chunk decodes to
        if isinstance(row, (bytes, bytearray, memoryview)):
            used = bytes(row)  # byte rows (packed targets) are zero-padded to the row size
            if len(used) > self.row_bytes:
                raise ValueError(f"{self.path}: a row of {len(used)} bytes does not fit its {self.row_bytes}")
        else:
            arr = np.ascontiguousarray(row, dtype=self.dtype)
            if arr.shape != self.row_shape:
                raise ValueError(f"{self.path}: row of shape {arr.shape}, expected {self.row_shape}")
            if self.compressor == "blosc":  # typed rows, byte-shuffled (never a bundle plane)
                return bytes(_CRC.encode(Blosc(cname="zstd", clevel=self.level, shuffle=Blosc.SHUFFLE).encode(arr)))
            used = arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()  # a bundle plane: zero-padded to the chunk
        if self.compressor == "zstd":
            data = zstd_padded(used, size, self.level)
        elif self.compressor == "blosc":
            padded = np.zeros(size, np.uint8)
            padded[: len(used)] = np.frombuffer(used, np.uint8)
            data = Blosc(cname="zstd", clevel=self.level, shuffle=Blosc.SHUFFLE).encode(padded)
        else:
            data = used + bytes(size - len(used))
        return bytes(_CRC.encode(data))

    def assemble(self, shard: int, chunks: list[bytes], build_id: bytes | None = None) -> bytes:
        """The shard object of `shard` from its rows' inner chunks (in row order); with a
        `build_id`, the identity trailer between the chunks and the index."""
        return self.assemble_planes(shard, [chunks], build_id)

    def assemble_planes(self, shard: int, planes: list[list[bytes]], build_id: bytes | None = None) -> bytes:
        """A bundle's shard object from each plane's inner chunks (planes in order, rows in
        order): plane 0's chunks, then plane 1's, ..., [trailer], index [rows, planes]."""
        start, stop = self.shard_range(shard)
        if len(planes) != self.n_planes:
            raise ValueError(f"{self.path} shard {shard}: {len(planes)} planes, expected {self.n_planes}")
        index = np.full((self.shard_rows, self.n_planes, 2), EMPTY, "<u8")
        offset = 0
        for p, chunks in enumerate(planes):
            if len(chunks) != stop - start:
                raise ValueError(f"{self.path} shard {shard}: {len(chunks)} rows, expected {stop - start}")
            for i, chunk in enumerate(chunks):
                index[i, p] = (offset, len(chunk))
                offset += len(chunk)
        body = b"".join(c for chunks in planes for c in chunks)
        trailer = identity_trailer(build_id, self.path, shard, body) if build_id is not None else b""
        return body + trailer + bytes(_CRC.encode(index.tobytes()))

    def check_trailer(self, trailer: bytes, shard: int, build_id: bytes, where: str) -> None:
        """StoreError unless `trailer` says this object is shard `shard` of this array, written
        by the build `build_id` (an object swapped in from another place or build)."""
        if len(trailer) != TRAILER or trailer[:4] != TRAILER_MAGIC:
            raise damaged(f"{where} has no identity trailer (written by another tool, or not this cache's object)")
        if trailer[4:20] != build_id[:16].ljust(16, b"\0"):
            raise damaged(f"{where} was written by another build of a cache (its build id differs from this cache's)")
        if trailer[20:28] != hashlib.blake2b(f"{self.path}#{shard}".encode(), digest_size=8).digest():
            raise damaged(f"{where} holds another shard's rows (its identity is not {self.path} shard {shard})")

    def open_object(self, blob: bytes, shard: int, build_id: bytes | None, where: str) -> tuple[dict[str, list[bytes]], str | None]:
        """A whole shard object -> (its rows' decoded payloads by array name: a bundle's by
        plane, the hash of its chunk bytes or None without a trailer), after checking its
        index, its identity trailer (with a `build_id`) and that the chunks hash to what the
        trailer records (`verify`)."""
        tail = TRAILER if build_id is not None else 0
        if len(blob) < tail + self.index_bytes():
            raise damaged(f"{where} is truncated")
        try:
            index = np.frombuffer(_CRC.decode(blob[len(blob) - self.index_bytes():]), "<u8").reshape(-1, 2)
        except RuntimeError:
            raise damaged(f"{where}: shard index checksum mismatch") from None
        body_end = len(blob) - self.index_bytes() - tail
        digest = None
        if build_id is not None:
            trailer = blob[body_end: body_end + TRAILER]
            self.check_trailer(trailer, shard, build_id, where)
            digest = hashlib.blake2b(blob[:body_end], digest_size=16).hexdigest()
            if digest != self.content_hash(trailer):
                raise damaged(f"{where}: its chunks do not hash to what its trailer records (changed after it was written)")
        start, stop = self.shard_range(shard)
        index = index.reshape(self.shard_rows, self.n_planes, 2)
        out: dict[str, list[bytes]] = {}
        for p, name in enumerate(self.planes or (self.name,)):
            rows = out.setdefault(name, [])
            label = f" ({name})" if self.planes else ""
            for slot in range(stop - start):
                off, size = int(index[slot, p, 0]), int(index[slot, p, 1])
                if off == EMPTY:
                    raise damaged(f"{where}: row {start + slot}{label} was never written")
                if off + size > body_end:
                    raise damaged(f"{where} is truncated")
                rows.append(self.decode_chunk(blob[off: off + size], f"{where} row {start + slot}{label}"))
        return out, digest

    @staticmethod
    def content_hash(trailer: bytes) -> str:
        """The hex hash of the chunk bytes the trailer records."""
        return trailer[28:44].hex()

    # ------------------------------------------------------------------ reading
    def index_bytes(self) -> int:
        return 16 * self.shard_rows * self.n_planes + 4

    def plane_slots(self, index: np.ndarray) -> np.ndarray:
        """This array's [rows, 2] (offset, nbytes) out of its object's whole index (a bundle's
        holds every plane's)."""
        return index if not self.planes else index.reshape(self.shard_rows, self.n_planes, 2)[:, self.plane]

    def parse_index(self, raw: bytes | None, key: str, objects: Objects) -> np.ndarray:
        if raw is None:
            raise damaged(f"{objects.describe(key)} is missing")
        if len(raw) != self.index_bytes():
            raise damaged(f"{objects.describe(key)} is truncated")
        try:
            return np.frombuffer(_CRC.decode(raw), "<u8").reshape(-1, 2)
        except RuntimeError:
            raise damaged(f"{objects.describe(key)}: shard index checksum mismatch") from None

    def decode_chunk(self, raw: bytes, where: str) -> bytes:
        """An inner chunk's row bytes (uncompressed), after checking its CRC32C."""
        try:
            data = _CRC.decode(raw)
        except RuntimeError:
            raise damaged(f"{where}: checksum mismatch") from None
        try:
            if self.compressor == "blosc":
                out = Blosc().decode(data)
            elif self.compressor == "zstd":
                out = zstd_decompress(data)
            else:
                out = bytes(data)
        except Exception as e:
            raise damaged(f"{where}: does not decompress ({e})") from None
        if self.view and len(out) != self.row_bytes:  # a bundle plane: the row, without the padding to C
            if len(out) != self.chunk_bytes:
                raise damaged(f"{where}: {len(out)} bytes, not the {self.chunk_bytes} of its chunks")
            return bytes(memoryview(out)[: self.row_bytes])
        return out


class RowReader:
    """Reads rows of RowArrays through one Objects store, keeping recent shard indexes.

    The index cache is bounded (`index_cache_bytes`), so a reader over a cache of any size
    holds the same memory; a shard whose index was dropped costs one more small read."""

    def __init__(self, objects: Objects, index_cache_bytes: int = 64 << 20, build_id: bytes | None = None) -> None:
        self.objects = objects
        self.build_id = build_id  # objects carry identity trailers: each is checked with its index
        self._indexes: OrderedDict[str, np.ndarray] = OrderedDict()
        self._budget = index_cache_bytes
        self._held = 0
        self._guard = threading.Lock()

    def index(self, array: RowArray, shard: int) -> np.ndarray:
        key = array.object_key(shard)
        with self._guard:
            found = self._indexes.get(key)
            if found is not None:
                self._indexes.move_to_end(key)
                return array.plane_slots(found)
        if self.build_id is None:
            index = array.parse_index(self.objects.get_range(key, -array.index_bytes(), None), key, self.objects)
        else:
            raw = self.objects.get_range(key, -(TRAILER + array.index_bytes()), None)
            if raw is not None and len(raw) < TRAILER + array.index_bytes():
                raise damaged(f"{self.objects.describe(key)} is truncated")
            index = array.parse_index(None if raw is None else raw[TRAILER:], key, self.objects)
            array.check_trailer(bytes(raw[:TRAILER]), shard, self.build_id, self.objects.describe(key))
        with self._guard:
            self._indexes[key] = index
            self._held += index.nbytes
            while self._held > self._budget and len(self._indexes) > 1:
                self._held -= self._indexes.popitem(last=False)[1].nbytes
        return array.plane_slots(index)

    def raw_rows(self, array: RowArray, rows: np.ndarray | list[int]) -> list[bytes]:
        """The inner-chunk payloads (uncompressed row bytes) of `rows`, in the order given."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= array.n_rows):
            raise IndexError(f"{array.path}: rows out of range 0..{array.n_rows - 1}")
        out: list[bytes | None] = [None] * len(rows)
        order = np.argsort(rows, kind="stable")
        requests, plan = [], []
        i = 0
        while i < len(order):
            # A run: rows of one shard whose chunks sit next to each other -> one range read.
            r0 = int(rows[order[i]])
            shard, within = divmod(r0, array.shard_rows)
            index = self.index(array, shard)
            key = array.object_key(shard)
            members = [order[i]]
            last = within
            j = i + 1
            while j < len(order):
                r = int(rows[order[j]])
                s2, w2 = divmod(r, array.shard_rows)
                if s2 != shard or w2 - last > 1:
                    break
                members.append(order[j])
                last = w2
                j += 1
            slots = [int(rows[m]) - shard * array.shard_rows for m in members]
            if (index[slots, 0] == EMPTY).any():
                bad = slots[int(np.argmax(index[slots, 0] == EMPTY))]
                raise damaged(f"{self.objects.describe(key)}: row {shard * array.shard_rows + bad} was never written")
            start = int(index[slots[0], 0])
            end = int(index[slots[-1], 0] + index[slots[-1], 1])
            requests.append((key, start, end))
            plan.append((members, slots, index, start))
            i = j
        for (key, _, _), data, (members, slots, index, start) in zip(requests, self.objects.get_ranges(requests), plan):
            if data is None:
                raise damaged(f"{self.objects.describe(key)} is missing")
            for m, slot in zip(members, slots):
                off, size = int(index[slot, 0]) - start, int(index[slot, 1])
                if off + size > len(data):
                    raise damaged(f"{self.objects.describe(key)} is truncated")
                out[m] = array.decode_chunk(data[off : off + size], f"{self.objects.describe(key)} row {int(rows[m])}")
        return out  # type: ignore[return-value]

    def rows(self, array: RowArray, rows: np.ndarray | list[int], out: np.ndarray | None = None) -> np.ndarray:
        """Rows as one array [len(rows), *row_shape] (into `out` if given)."""
        raw = self.raw_rows(array, rows)
        result = out if out is not None else np.empty((len(raw), *array.row_shape), array.dtype.newbyteorder("="))
        for i, r in enumerate(raw):
            result[i] = np.frombuffer(r, array.dtype, int(np.prod(array.row_shape))).reshape(array.row_shape)
        return result


def read_zarr_json(objects: Objects, path: str) -> dict[str, Any] | None:
    raw = objects.get(f"{path}/zarr.json")
    return None if raw is None else json.loads(raw)


__all__ = ["ArraySpec", "RowArray", "RowReader", "EMPTY", "PLANES_ATTR", "damaged", "read_zarr_json"]
