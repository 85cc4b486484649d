"""`verify` passes on a good cache and names the array and chunk of a damaged one."""

from __future__ import annotations

from click.testing import CliRunner

from ddk_cache.cli.main import main

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
