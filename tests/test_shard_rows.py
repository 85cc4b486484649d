"""The direct shard reader returns what zarr returns, or declines, and names damage."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from ddk_cache.capture.build import build
from ddk_cache.train.data import SequenceReader
from ddk_cache.store.encodings import PlainEncoding
from ddk_cache.errors import StoreError
from ddk_cache.store.shard_rows import ShardRows
from ddk_cache.store.cache import SPLITS, WRITE_CONFIG, Cache

from .helpers import small_config


@pytest.fixture(scope="module")
def pack_cache(tmp_path_factory, teacher_dir, corpus_dir):
    out = tmp_path_factory.mktemp("pack") / "c.zarr"
    build(small_config(teacher_dir, corpus_dir, out, encoding="pack"), progress=False)
    return out


def sharded_arrays(cache: Cache):
    for domain in cache.domains:
        for split in SPLITS:
            for name, array in cache.root[f"{domain}/{split}"].arrays():
                yield f"{domain}/{split}/{name}", array


@pytest.mark.parametrize("which", ["plain", "pack"])
def test_every_row_equals_zarr(which, built_cache, pack_cache):
    cache = Cache(str(built_cache if which == "plain" else pack_cache))
    checked = 0
    for key, array in sharded_arrays(cache):
        rows = ShardRows.open(array)
        if array.ndim == 1:  # per-sequence vectors are not sharded row by row
            assert rows is None, key
            continue
        assert rows is not None, key
        for i in range(array.shape[0]):
            got, want = rows.row(i), array[i]
            assert got.dtype == want.dtype and got.flags.writeable
            np.testing.assert_array_equal(got, want, err_msg=f"{key}[{i}]")
            checked += 1
    assert checked > 50


def test_loader_reads_the_same_batches_either_way(pack_cache):
    cache = Cache(str(pack_cache))
    fast = SequenceReader(cache, targets=True)
    slow = SequenceReader(cache, targets=True)
    slow.fast = {d: {n: None for n in v} for d, v in slow.fast.items()}
    items = [(d, i) for d in range(len(cache.domains)) for i in range(cache.num_sequences(cache.domains[d], "train"))][::-1]
    for a, b in zip(fast.read(items + items[:3]), slow.read(items + items[:3])):
        np.testing.assert_array_equal(a, b)


def make_array(path, codecs=None, chunks=(1, 6), config=None):
    """The store's own layout (plain-v1's codecs) unless told otherwise; 10 rows in shards of 4."""
    compressors = PlainEncoding().compressors() if codecs is None else codecs
    return zarr.create_array(str(path), shape=(10, 6), dtype="int32", chunks=chunks, shards=(4, 6), compressors=compressors,
                             fill_value=7, config=config or {"write_empty_chunks": False})


def test_unwritten_chunks_and_shards_read_as_fill(tmp_path):
    a = make_array(tmp_path / "a.zarr")
    a[1] = np.arange(6)
    a[2] = 7  # equal to the fill value: not written, so absent from the index
    rows = ShardRows.open(a)
    assert rows is not None
    for i in range(10):  # shard 0 partly written; shards 1 and 2 have no file at all
        np.testing.assert_array_equal(rows.row(i), a[i])
    with pytest.raises(IndexError):
        rows.row(10)


def test_other_layouts_are_left_to_zarr(tmp_path):
    assert ShardRows.open(make_array(tmp_path / "wide.zarr", chunks=(2, 6))) is None  # two rows per chunk
    assert ShardRows.open(make_array(tmp_path / "gzip.zarr", codecs=[zarr.codecs.GzipCodec()])) is None
    unsharded = zarr.create_array(str(tmp_path / "u.zarr"), shape=(10, 6), dtype="int32", chunks=(1, 6))
    assert ShardRows.open(unsharded) is None
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(10, 6), dtype="int32", chunks=(1, 6), shards=(4, 6))
    assert ShardRows.open(in_memory) is None


def test_damage_is_named(tmp_path):
    a = make_array(tmp_path / "d.zarr", config=WRITE_CONFIG)
    a[:] = np.arange(60).reshape(10, 6)
    shard = tmp_path / "d.zarr" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF  # inside row 0's chunk
    shard.write_bytes(bytes(data))
    rows = ShardRows.open(zarr.open_array(str(tmp_path / "d.zarr"), mode="r"))
    with pytest.raises(StoreError, match=r"d.zarr/c/0/0: checksum mismatch in row 0; run `ddk-cache verify`"):
        rows.row(0)
    data = bytearray(shard.read_bytes())
    data[-6] ^= 0xFF  # inside the shard index
    shard.write_bytes(bytes(data))
    rows = ShardRows.open(zarr.open_array(str(tmp_path / "d.zarr"), mode="r"))
    with pytest.raises(StoreError, match="shard index checksum mismatch"):
        rows.row(1)
