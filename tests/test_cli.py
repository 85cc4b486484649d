"""The CLI: build + inspect through click, and one-line errors without tracebacks."""

from __future__ import annotations

import json

from click.testing import CliRunner

import ddk_cache
from ddk_cache.cli.main import main

from .helpers import copy_cache


def test_inspect_table(built_cache):
    result = CliRunner().invoke(main, ["inspect", str(built_cache)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "state: complete" in lines[0]
    header = next(line for line in lines if line.startswith("domain"))
    for col in ("split", "sequences", "tokens", "teacher PPL", "on disk", "bytes/token", "kept mass"):
        assert col in header
    rows = [line.split() for line in lines if line.split()[:1] in (["alpha"], ["beta"], ["gamma"])]
    assert [r[:2] for r in rows] == [[d, s] for d in ("alpha", "beta", "gamma") for s in ("train", "val")]


def test_inspect_json_matches_metadata(built_cache):
    result = CliRunner().invoke(main, ["inspect", str(built_cache), "--json"])
    data = json.loads(result.output)
    assert data["state"] == "complete" and data["top_k"] == 8 and len(data["rows"]) == 6
    from ddk_cache.store.cache import Cache

    meta = Cache(str(built_cache)).meta
    for row in data["rows"]:
        assert row["teacher_ppl"] == meta.ppl(row["domain"], row["split"]).ppl
        assert row["tokens"] == row["sequences"] * 32
        assert 0 < row["mean_topk_mass"] <= 1 and row["bytes"] > 0


def test_build_command_and_rerun(tmp_path, teacher_dir, corpus_dir):
    args = ["build", "--teacher", str(teacher_dir), "--data", str(corpus_dir), "--out", str(tmp_path / "c.zarr"),
            "--top-k", "4", "--seq-len", "16", "--val-tokens", "16", "--device", "cpu", "--backend", "hf", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "3 domains" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already complete" in again.output


def test_build_config_file_and_flags(tmp_path, teacher_dir, corpus_dir):
    """--config takes the same keys as the flags (generated from BuildConfig); flags win;
    an unknown key is named."""
    from ddk_cache.store.cache import Cache

    out = tmp_path / "c.zarr"
    (tmp_path / "build.yaml").write_text(
        f"teacher: {teacher_dir}\ndata: {corpus_dir}\nout: {out}\ntop-k: 4\nseq_len: 16\nval-tokens: 16\n"
        "backend: hf\ndevice: cpu\nencoding: plain\n")
    result = CliRunner().invoke(main, ["build", "--config", str(tmp_path / "build.yaml"), "--top-k", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = Cache(str(out)).meta
    assert meta.top_k == 3 and meta.seq_len == 16 and meta.encoding.name == "plain-v1"
    (tmp_path / "bad.yaml").write_text("teacher: x\ntopk: 3\n")
    bad = CliRunner().invoke(main, ["build", "--config", str(tmp_path / "bad.yaml")])
    assert bad.exit_code == 1 and "unknown key 'topk'" in bad.output
    wrong = CliRunner().invoke(main, ["build", "--config", str(tmp_path / "build.yaml"), "--top-k", "x"])
    assert wrong.exit_code == 2 and "'x' is not a valid integer" in wrong.output


def test_user_error_is_one_line_without_traceback(tmp_path, teacher_dir):
    result = CliRunner().invoke(main, ["build", "--teacher", str(teacher_dir), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "c.zarr")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: corpus path {tmp_path / 'missing'} does not exist; pass a directory or a .yaml/.toml spec to --data"


def test_inspect_refuses_non_cache(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "is not a ddk-cache store" in result.output and "Traceback" not in result.output


def test_inspect_refuses_unknown_format_version(tmp_path, built_cache):
    copy = copy_cache(built_cache, tmp_path / "c.zarr", edit=lambda meta: meta.update(format_version=99))
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 1
    assert "has cache format version 99; this ddk-cache " + ddk_cache.__version__ + " reads versions 1, 2, 3, 4, 5; upgrade ddk-cache" in result.output


def test_help_explains_every_command():
    for cmd in ("build", "inspect", "init-model"):
        result = CliRunner().invoke(main, [cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_eval_table_stays_aligned_for_any_magnitude(built_cache, monkeypatch, teacher_dir):
    """A freshly pruned student can have a 9-digit perplexity, a diverged one an infinite one."""
    import ddk_cache.train.evaluate as evaluate

    fake = {"alpha": (123456789012.5, 27.1), "beta": (float("inf"), None), "gamma": (3.25, 0.5)}
    monkeypatch.setattr(evaluate, "evaluate_scores", lambda *a, **k: {d: {"ppl": p, "bits_per_byte": b} for d, (p, b) in fake.items()})
    result = CliRunner().invoke(main, ["eval", "--cache", str(built_cache), "--model", str(teacher_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = result.stdout[result.stdout.index("domain"):]  # after the loaders' progress bars
    lines = [line for line in table.splitlines() if line.strip()]
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1, table  # every column ends where its header does
    assert "1.235e+11" in result.output and " inf" in result.output


def test_ppl_past_float_range_is_inf():
    from ddk_cache.train.evaluate import ppl

    assert ppl(800.0 * 10, 10) == float("inf")
    assert ppl(20.0, 10) == __import__("math").exp(2.0)
