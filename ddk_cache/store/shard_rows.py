"""Reads single rows of the cache's sharded arrays straight from their shard files.

Why: training reads random sequences, one chunk (= one row) each. zarr 3.1 spends 1.7-2.6
ms per such read, mostly Python (indexing, codec pipeline, a hop to its event-loop thread),
while reading, checking and decompressing the chunk's bytes takes 0.11-0.15 ms
(`benchmarks/row_read.py`), so zarr capped the loader. This module decodes exactly the layout `store.CacheWriter` writes (Zarr
v3 `sharding_indexed`, one row per inner chunk, index at the shard's end behind a crc32c,
inner codecs bytes -> blosc or zstd -> crc32c, default "/" chunk keys, a local store) and
answers None for anything else, so callers fall back to zarr. The layout is the Zarr v3
sharding specification, described for this tool in storage_layout.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from numcodecs import CRC32C, Blosc, Zstd

from ..errors import StoreError
from .cache import object_key

_EMPTY = 2**64 - 1  # offset and nbytes of an inner chunk that was never written
_COMPRESSORS = {"blosc": Blosc, "zstd": Zstd}  # both decode from self-describing frames


def _local_dir(array: zarr.Array) -> Path | None:
    store = array.store_path.store
    root = getattr(store, "root", None)  # LocalStore only; remote stores go through zarr
    if not isinstance(store, zarr.storage.LocalStore) or root is None:
        return None
    return Path(root) / array.store_path.path


class ShardRows:
    """Row `i` of a 2-D+ sharded array whose inner chunks are single rows, read without zarr.

    Shard indexes are read once and kept (16 bytes per row). Every chunk's crc32c is checked,
    as zarr does; a chunk that was never written reads as the fill value, as in zarr.
    """

    def __init__(self, directory: Path, shape: tuple[int, ...], dtype: np.dtype, fill_value: object,
                 shard_rows: int, compressor: str | None) -> None:
        self.directory, self.shape, self.dtype = directory, shape, dtype
        self.fill = np.full(shape[1:], fill_value, dtype=dtype)
        self.shard_rows = shard_rows
        self.decompress = _COMPRESSORS[compressor]().decode if compressor else None
        self.crc = CRC32C(location="end")
        self.indexes: dict[int, np.ndarray | None] = {}

    @classmethod
    def open(cls, array: zarr.Array) -> "ShardRows | None":
        """A reader for `array`, or None when its layout is not the one this module decodes."""
        directory = _local_dir(array)
        meta = array.metadata.to_dict()
        if directory is None or meta.get("zarr_format") != 3 or len(array.shape) < 2:
            return None
        if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
            return None
        codecs = list(meta["codecs"])
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        row_shape = (1, *array.shape[1:])
        if tuple(conf["chunk_shape"]) != row_shape or shard_shape[1:] != row_shape[1:] or conf.get("index_location", "end") != "end":
            return None
        index_codecs = [{"name": c["name"], **({"configuration": c["configuration"]} if c.get("configuration") else {})} for c in conf["index_codecs"]]
        if index_codecs != [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]:
            return None
        inner = [c["name"] for c in conf["codecs"]]
        endian = (conf["codecs"][0].get("configuration") or {}).get("endian", "little")
        if inner[:1] != ["bytes"] or inner[-1:] != ["crc32c"] or len(inner) > 3 or endian != "little":
            return None
        compressor = inner[1] if len(inner) == 3 else None
        if compressor is not None and compressor not in _COMPRESSORS:
            return None
        dtype = np.dtype(array.dtype).newbyteorder("<")
        return cls(directory, tuple(array.shape), dtype, array.fill_value, shard_shape[0], compressor)

    def _path(self, shard: int) -> Path:
        return self.directory / object_key(len(self.shape), shard)

    def _index(self, shard: int) -> np.ndarray | None:
        """[rows, 2] uint64 (offset, nbytes) of a shard's chunks; None if the shard file is absent."""
        if shard not in self.indexes:
            path = self._path(shard)
            size = self.shard_rows * 16 + 4
            try:
                with open(path, "rb") as f:
                    f.seek(-size, os.SEEK_END)
                    raw = f.read(size)
            except FileNotFoundError:
                self.indexes[shard] = None
                return None
            except OSError as e:
                raise StoreError(f"{path}: cannot read the shard index ({e}); run `ddk-cache verify` on the cache") from e
            try:
                self.indexes[shard] = np.frombuffer(self.crc.decode(raw), "<u8").reshape(-1, 2)
            except RuntimeError as e:
                raise StoreError(f"{path}: shard index checksum mismatch; run `ddk-cache verify` on the cache") from e
        return self.indexes[shard]

    def row(self, i: int) -> np.ndarray:
        """Row `i` (shape = array.shape[1:]), as zarr's `array[i]` would return it."""
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"row {i} out of range for {self.directory} with {self.shape[0]} rows")
        shard, within = divmod(i, self.shard_rows)
        index = self._index(shard)
        if index is None or index[within, 0] == _EMPTY:
            return self.fill.copy()
        offset, nbytes = (int(v) for v in index[within])
        path = self._path(shard)
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
        try:
            data = self.crc.decode(raw)
        except RuntimeError as e:
            raise StoreError(f"{path}: checksum mismatch in row {i}; run `ddk-cache verify` on the cache") from e
        if self.decompress is not None:
            data = self.decompress(data)
        return np.frombuffer(data, self.dtype).reshape(self.shape[1:]).astype(self.dtype.newbyteorder("="))
