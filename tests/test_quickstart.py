"""The quickstart (reduced scale): corpus from the standard library, teacher, cache, two DDK students."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ddk_cache.cli.main import main


@pytest.mark.slow
def test_quickstart_tiny(tmp_path):
    result = CliRunner().invoke(main, ["quickstart", "--out", str(tmp_path / "qs"), "--scale", "tiny", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    stdout = result.stdout
    for step in ("[1/5] corpus", "[2/5] teacher", "[3/5] cache", "[4/5] student small", "[4/5] student large", "[5/5] done"):
        assert step in result.output
    table = json.loads(stdout[stdout.index("{"):])
    assert table["domains"] == ["code", "docs", "docstrings"]
    for name in ("small", "large"):
        student = table["students"][name]
        for d in table["domains"]:
            assert student["after"][d] < student["before"][d]  # distillation lowered every domain's PPL
        assert any(p.endswith("weights.png") for p in student["plots"])
    assert "teacher PPL" in stdout and "small: before -> after" in stdout and "small: bits/byte" in stdout
    assert all(table["teacher_bpb"][d] > 0 and table["students"]["small"]["after_bpb"][d] > 0 for d in table["domains"])
