"""`verify` passes on a good cache and names the array and chunk of a damaged one."""

from __future__ import annotations

import pytest

from click.testing import CliRunner

from ddk_cache.cli.main import main
from ddk_cache.store.verify import verify_cache

from .helpers import copy_cache


def copy(built_cache, tmp_path, edit=None):
    return copy_cache(built_cache, tmp_path / "c.zarr", edit)


def test_good_cache_verifies(built_cache):
    result = CliRunner().invoke(main, ["verify", str(built_cache), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK {built_cache}: ")


def test_flipped_byte_names_array_and_chunk(built_cache, tmp_path):
    out = copy(built_cache, tmp_path)
    shard = out / "beta" / "train" / "topk_logprobs" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(out), "--quiet"])
    assert result.exit_code == 1
    assert "BAD beta/train/topk_logprobs/c/1/0/0: does not decode" in result.output
    assert "1 problem(s)" in result.output


def test_deleted_chunk_is_named(built_cache, tmp_path):
    out = copy(built_cache, tmp_path)
    (out / "gamma" / "val" / "target_logprob" / "c" / "0" / "0").unlink()
    result = CliRunner().invoke(main, ["verify", str(out), "--quiet"])
    assert result.exit_code == 1
    assert "BAD gamma/val/target_logprob/c/0/0: object is missing" in result.output


def test_unrecorded_shard_is_named(built_cache, tmp_path):
    """A shard whose log record is gone (its objects may be half-written) is not trusted."""
    import glob

    out = copy(built_cache, tmp_path)
    (log,) = glob.glob(str(out / "_build" / "log" / "*.jsonl"))
    lines = open(log).read().splitlines()
    open(log, "w").write("\n".join(line for line in lines if '"alpha/train/1"' not in line) + "\n")
    result = CliRunner().invoke(main, ["verify", str(out), "--quiet"])
    assert result.exit_code == 1 and "BAD alpha/train/1: shard not recorded as written in the build logs" in result.output


def test_tampered_table_is_caught(built_cache, tmp_path):
    def tamper(meta):
        meta["teacher_ppl"]["alpha"]["val"]["ppl"] *= 1.01

    out = copy(built_cache, tmp_path, tamper)
    result = CliRunner().invoke(main, ["verify", str(out), "--quiet"])
    assert result.exit_code == 1 and "teacher_ppl[alpha/val]" in result.output


def test_swapped_or_foreign_shard_objects_are_refused_by_readers_and_verify(tmp_path, teacher_dir, corpus_dir):
    """An object swapped with another domain's (same array, same shard index, same size of
    shard), or restored from another build of the same layout, used to read as this one's
    (distill then trained on other sequences' targets) and pass verify."""
    import shutil

    from ddk_cache.capture.build import build
    from ddk_cache.errors import StoreError
    from ddk_cache.models import ModelSpec, make_model_dir
    from ddk_cache.store.cache import Cache

    from .helpers import WORDS, make_docs, small_config

    a = tmp_path / "a.zarr"
    build(small_config(teacher_dir, corpus_dir, a, encoding="pack"), progress=False)
    cache = Cache(str(a))
    alpha = cache.array("alpha", "train", "targets").object_key(0)
    beta = cache.array("beta", "train", "targets").object_key(0)
    swapped = tmp_path / "swapped.zarr"
    shutil.copytree(a, swapped)
    shutil.copyfile(a / beta, swapped / alpha)
    with pytest.raises(StoreError, match="holds another shard's rows"):
        Cache(str(swapped)).read("alpha", "train", 0, 2)
    problems, _ = verify_cache(str(swapped))
    assert any(p.where.endswith(alpha) or alpha in p.where for p in problems)

    # Another build of the same corpus and layout (a different teacher): same keys, same shapes.
    other_teacher = make_model_dir([d for dom in WORDS for d in make_docs(dom, 30)], tmp_path / "t2",
                                   ModelSpec(vocab_size=400, hidden_size=32, layers=2, heads=1, max_position_embeddings=64, seed=5))
    b = tmp_path / "b.zarr"
    build(small_config(other_teacher, corpus_dir, b, encoding="pack"), progress=False)
    foreign = tmp_path / "foreign.zarr"
    shutil.copytree(a, foreign)
    shutil.copyfile(b / alpha, foreign / alpha)
    with pytest.raises(StoreError, match="written by another build"):
        Cache(str(foreign)).read("alpha", "train", 0, 2)
    problems, _ = verify_cache(str(foreign))
    assert any("another build" in p.what or "bytes; the build log recorded" in p.what for p in problems)
