"""Row arrays (store/shards.py): what the cache's own reader returns equals what zarr reads,
and damage or absence is an error that names the object, never fill values."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from ddk_cache.errors import StoreError
from ddk_cache.store.cache import SPLITS, Cache
from ddk_cache.store.objects import Objects
from ddk_cache.store.shards import ArraySpec, RowArray, RowReader, read_zarr_json

from .helpers import copy_cache, small_config, zarr_view


@pytest.mark.parametrize("which", ["plain", "pack"])
def test_every_row_equals_zarr(which, built_cache, pack_cache):
    path = built_cache if which == "plain" else pack_cache
    cache = Cache(str(path))
    root = zarr.open_group(str(path), mode="r")
    for d in cache.domains:
        for s in SPLITS:
            for name in cache.array_names(d):
                array = cache.array(d, s, name)
                rows = np.arange(array.n_rows)[::-1]  # any order, repeats, runs
                rows = np.concatenate([rows, rows[:3]])
                raw = cache.reader.raw_rows(array, rows)
                expected = zarr_view(root, cache, d, s, name)
                for r, got in zip(rows, raw):
                    assert np.frombuffer(got, array.dtype).reshape(array.row_shape).tobytes() == expected[r].tobytes()


def test_zarr_reads_rows_written_here(tmp_path):
    """A shard object assembled by RowArray is what zarr's sharding codec decodes."""
    spec = ArraySpec("int32", (5,), "blosc", 5, ("token",))
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    group.create_array("x", shape=(7, 5), dtype="int32", chunks=(1, 5), shards=(3, 5), compressors=spec.codecs(), fill_value=0)
    objects = Objects.open(str(tmp_path / "a.zarr"))
    array = RowArray.from_zarr_json("x", read_zarr_json(objects, "x"))
    data = np.arange(35, dtype=np.int32).reshape(7, 5) * 7 - 3
    for shard in range(array.n_shards):
        a, b = array.shard_range(shard)
        objects.put(array.object_key(shard), array.assemble(shard, [array.encode_row(row) for row in data[a:b]]))
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "a.zarr" / "x"), mode="r")[:], data)
    np.testing.assert_array_equal(RowReader(objects).rows(array, [6, 0, 3]), data[[6, 0, 3]])


def test_missing_object_is_an_error_not_zeros(tmp_path, built_cache):
    out = copy_cache(built_cache, tmp_path / "c.zarr")
    (out / "beta" / "train" / "tokens" / "c" / "1" / "0").unlink()
    cache = Cache(str(out))
    with pytest.raises(StoreError, match=r"beta/train/tokens/c/1/0 is missing: the cache is damaged; run `ddk-cache verify`"):
        cache.tokens("beta", "train", [5])
    np.testing.assert_array_equal(cache.tokens("beta", "train", [0]), Cache(str(built_cache)).tokens("beta", "train", [0]))


def test_unwritten_row_is_an_error(tmp_path):
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    group.create_array("x", shape=(4, 3), dtype="int32", chunks=(1, 3), shards=(4, 3),
                       compressors=ArraySpec("int32", (3,)).codecs(), fill_value=0, config={"write_empty_chunks": False})
    arr = zarr.open_array(str(tmp_path / "a.zarr" / "x"), mode="r+")
    arr[:2] = np.ones((2, 3), np.int32)  # rows 2, 3 stay unwritten
    objects = Objects.open(str(tmp_path / "a.zarr"))
    array = RowArray.from_zarr_json("x", read_zarr_json(objects, "x"))
    reader = RowReader(objects)
    np.testing.assert_array_equal(reader.rows(array, [0, 1]), np.ones((2, 3)))
    with pytest.raises(StoreError, match="row 3 was never written"):
        reader.rows(array, [3])


def test_other_layouts_are_refused(tmp_path):
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    group.create_array("flat", shape=(4, 3), dtype="int32", chunks=(2, 3))  # not sharded
    objects = Objects.open(str(tmp_path / "a.zarr"))
    with pytest.raises(StoreError, match="not a row-sharded array"):
        RowArray.from_zarr_json("flat", read_zarr_json(objects, "flat"))


def test_damage_is_named(tmp_path, built_cache):
    out = copy_cache(built_cache, tmp_path / "c.zarr")
    shard = out / "alpha" / "train" / "topk_ids" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"alpha/train/topk_ids/c/0/0/0 row 0: checksum mismatch"):
        Cache(str(out)).targets_of("alpha", "train", [0])
    index_damage = out / "alpha" / "train" / "tokens" / "c" / "0" / "0"
    data = bytearray(index_damage.read_bytes())
    data[-10] ^= 0xFF
    index_damage.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard index checksum mismatch"):
        Cache(str(out)).tokens("alpha", "train", [1])


def test_a_small_split_gets_shards_of_its_size(tmp_path, teacher_dir, corpus_dir):
    """Validation splits of 2 rows in a cache of 64-row shards: their objects index 2 rows, not
    64 (a full index made small splits cost 1,600-6,600 bytes per token)."""
    from ddk_cache.capture.build import build

    out = tmp_path / "c.zarr"
    build(small_config(teacher_dir, corpus_dir, out, shard_sequences=64), progress=False)
    cache = Cache(str(out))
    objects = Objects.open(str(out))
    for domain in cache.domains:
        n = cache.num_sequences(domain, "val")
        assert n < 64
        array = RowArray.from_zarr_json(f"{domain}/val/tokens", read_zarr_json(objects, f"{domain}/val/tokens"))
        assert array.shard_rows == n
        size = len(objects.get(array.object_key(0)))
        assert size < 16 * 64  # smaller than a 64-row index alone


def test_a_bundled_shard_is_one_object_and_tokens_read_alone(pack_cache):
    """Format 5, packed encodings: a shard is one object holding every array's rows (the
    tokens travel with the targets), and reading tokens fetches the tokens' chunks only: not
    one byte of the targets, which are not decoded either."""
    cache = Cache(str(pack_cache))
    assert cache.meta.format_version == 5 and cache.meta.bundled
    listing = cache.objects.list("")
    for d in cache.domains:
        for s in SPLITS:
            data = [k for k in listing if k.startswith(f"{d}/{s}/") and not k.endswith("zarr.json")]
            shards = [sh for sh in cache.shards() if (sh.domain, sh.split) == (d, s)]
            assert sorted(data) == sorted(f"{d}/{s}/rows/c/{sh.index}/0/0" for sh in shards)
    tokens, targets = cache.array("alpha", "train", "tokens"), cache.array("alpha", "train", "targets")
    assert tokens.object_key(0) == targets.object_key(0)
    index = cache.reader.index(tokens, 0)  # fetch the index before counting reads
    fetched = []
    real = cache.objects.get_ranges
    cache.objects.get_ranges = lambda requests: fetched.extend(requests) or real(requests)
    decoded = []
    real_decode = type(cache.encoding).decode
    type(cache.encoding).decode = lambda self, *a, **k: decoded.append(1) or real_decode(self, *a, **k)
    try:
        rows = np.arange(tokens.shard_rows)
        got = cache.tokens("alpha", "train", rows)
    finally:
        type(cache.encoding).decode = real_decode
    assert fetched == [(tokens.object_key(0), int(index[0, 0]), int(index[-1, 0] + index[-1, 1]))] and not decoded
    assert sum(e - b for _, b, e in fetched) == int(index[:, 1].sum())  # tokens chunks only
    np.testing.assert_array_equal(got, cache.read("alpha", "train", 0, tokens.shard_rows).tokens)


def test_a_bundle_plane_damage_is_named(tmp_path, pack_cache):
    out = copy_cache(pack_cache, tmp_path / "c.zarr")
    cache = Cache(str(out))
    targets = cache.array("alpha", "train", "targets")
    offset = int(cache.reader.index(targets, 0)[1, 0])
    key = out / targets.object_key(0)
    data = bytearray(key.read_bytes())
    data[offset + 5] ^= 0xFF  # inside row 1's targets chunk
    key.write_bytes(bytes(data))
    fresh = Cache(str(out))
    np.testing.assert_array_equal(fresh.tokens("alpha", "train", [1]), cache.tokens("alpha", "train", [1]))  # tokens still read
    with pytest.raises(StoreError, match=r"alpha/train/rows/c/0/0/0 row 1: checksum mismatch"):
        fresh.targets_of("alpha", "train", [1])


def test_zstd_chunks_of_any_writer_decode():
    """The reader's zstd (python-zstandard) takes frames with or without their content size
    (another Zarr writer may leave it out) and the padded frames the writer makes; a damaged
    frame is an error."""
    import zstandard

    from ddk_cache.store.shards import zstd_decompress, zstd_padded

    raw = np.arange(1000, dtype=np.int32).tobytes()
    assert zstd_decompress(zstandard.ZstdCompressor(write_content_size=False).compress(raw)) == raw
    padded = zstd_padded(raw, 50_000, 1)
    assert zstd_decompress(padded) == raw + bytes(50_000 - len(raw)) and len(padded) < len(raw) + 100  # the zeros: a few bytes
    from numcodecs import Zstd

    assert bytes(Zstd().decode(padded)) == raw + bytes(50_000 - len(raw))  # what zarr's own codec reads
    with pytest.raises(zstandard.ZstdError):
        zstd_decompress(padded[:-3] + b"xyz")
