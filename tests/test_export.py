"""`ddk-cache export`: a cache's sequences and decoded targets as plain Parquet (issue #28).

Every exported value is compared with what the cache's own reader decodes, read back with
plain pyarrow (no ddk-cache code on the reading side)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddk_cache.capture.build import build
from ddk_cache.cli.main import main
from ddk_cache.errors import DDKCacheError
from ddk_cache.export import export_parquet, tail_logprob
from ddk_cache.store.cache import Cache

from .helpers import small_config

pq = pytest.importorskip("pyarrow.parquet")


def read_back(out: Path) -> dict[tuple[str, str, int], dict]:
    """Every exported row, keyed by (domain, split, sequence), read with plain pyarrow."""
    manifest = json.loads((out / "export.json").read_text())
    rows = {}
    for rel in manifest["files"]:
        for r in pq.read_table(out / rel).to_pylist():
            rows[(r["domain"], r["split"], r["sequence"])] = r
    return rows


def assert_matches_cache(out: Path, cache_path: Path) -> int:
    """Each exported row equals the cache's decoded sequence exactly (float32)."""
    cache, rows = Cache(str(cache_path)), read_back(out)
    checked = 0
    for domain in cache.domains:
        for split in ("train", "val"):
            n = cache.num_sequences(domain, split)
            b = cache.read(domain, split, 0, n)
            for i in range(n):
                r = rows.pop((domain, split, i))
                assert r["input_ids"] == b.tokens[i].tolist()
                mask = b.loss_mask[i] if b.loss_mask is not None else np.ones_like(b.tokens[i])
                assert r["loss_mask"] == mask.tolist()
                kept = np.isfinite(b.topk_logprobs[i])
                for t in range(b.tokens.shape[1] - 1):
                    assert r["topk_ids"][t] == b.topk_ids[i, t][kept[t]].tolist()
                    np.testing.assert_array_equal(np.float32(r["topk_logprobs"][t]), b.topk_logprobs[i, t][kept[t]])
                tail = b.tail_logprob[i] if b.tail_logprob is not None else tail_logprob(b.topk_logprobs[i])
                np.testing.assert_array_equal(np.float32(r["tail_logprob"]), tail)
                np.testing.assert_array_equal(np.float32(r["target_logprob"]), b.target_logprob[i])
                checked += 1
    assert rows == {}, "rows exported that the cache does not hold"
    return checked


@pytest.fixture(scope="module")
def adaptive_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, corpus_dir: Path) -> Path:
    """pack-v3 (the default encoding, tail stored) with adaptive k: rows of different widths
    (the tiny teacher is near uniform, p ~ 0.003 for its top entries)."""
    out = tmp_path_factory.mktemp("adaptive") / "c.zarr"
    build(small_config(teacher_dir, corpus_dir, out, encoding="pack", min_prob=0.0032), progress=False)
    return out


def test_export_equals_the_caches_decoded_targets(built_cache: Path, tmp_path: Path):
    m = export_parquet(str(built_cache), str(tmp_path / "out"), rows_per_file=5, batch=3)
    assert m["state"] == "complete" and m["position_convention"] == "position t predicts input_ids[t + 1]"
    assert assert_matches_cache(tmp_path / "out", built_cache) == sum(m["files"].values()) > 10
    assert all(n <= 5 for n in m["files"].values())
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_adaptive_pack_v3_rows_export_their_kept_entries_and_stored_tail(adaptive_cache: Path, tmp_path: Path):
    export_parquet(str(adaptive_cache), str(tmp_path / "out"))
    assert assert_matches_cache(tmp_path / "out", adaptive_cache) > 0
    widths = {len(entry) for r in read_back(tmp_path / "out").values() for entry in r["topk_ids"]}
    assert len(widths) > 1 and max(widths) <= 8  # ragged rows stay ragged: no padding is exported
    assert Cache(str(adaptive_cache)).read("alpha", "val", 0, 1).tail_logprob is not None


def test_chat_prompt_masks_are_exported(chat_cache: Path, tmp_path: Path):
    export_parquet(str(chat_cache), str(tmp_path / "out"))
    assert_matches_cache(tmp_path / "out", chat_cache)
    masks = [m for r in read_back(tmp_path / "out").values() for m in r["loss_mask"]]
    assert 0 in masks and 1 in masks


def test_an_interrupted_export_resumes_to_the_same_files(built_cache: Path, tmp_path: Path):
    """Stopped after its first part, nothing half-written looks complete; the rerun keeps the
    finished part (not rewritten) and ends equal to an export that was never stopped."""

    class Stop(Exception):
        pass

    class Bar:
        def __init__(self, total: int) -> None:
            self.done = 0

        def update(self, n: int) -> None:
            self.done += n
            if self.done > 5:  # inside the second part
                raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        export_parquet(str(built_cache), str(out), rows_per_file=5, batch=3, progress=Bar)
    assert json.loads((out / "export.json").read_text())["state"] == "exporting"
    finished = sorted(out.rglob("*.parquet"))
    assert len(finished) == 1 and pq.ParquetFile(finished[0]).metadata.num_rows == 5
    stamp = finished[0].stat().st_mtime_ns
    m = export_parquet(str(built_cache), str(out), rows_per_file=5, batch=3)
    assert m["state"] == "complete" and finished[0].stat().st_mtime_ns == stamp
    export_parquet(str(built_cache), str(tmp_path / "whole"), rows_per_file=5, batch=3)
    for rel in m["files"]:
        assert pq.read_table(out / rel).equals(pq.read_table(tmp_path / "whole" / rel))


def test_export_refuses_what_it_cannot_do_cleanly(built_cache: Path, adaptive_cache: Path, tmp_path: Path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DDKCacheError, match="not empty and holds no export.json"):
        export_parquet(str(built_cache), str(tmp_path / "busy"))
    export_parquet(str(built_cache), str(tmp_path / "out"), domains=["alpha"])
    with pytest.raises(DDKCacheError, match="already holds another export"):
        export_parquet(str(adaptive_cache), str(tmp_path / "out"), domains=["alpha"])
    with pytest.raises(DDKCacheError, match="has no domain 'nope'"):
        export_parquet(str(built_cache), str(tmp_path / "x"), domains=["nope"])
    with pytest.raises(DDKCacheError, match="unknown split 'test'"):
        export_parquet(str(built_cache), str(tmp_path / "y"), splits=["test"])


def test_the_command_writes_a_dataset_card(built_cache: Path, tmp_path: Path):
    """`--format hf`: README.md's `configs` name every domain's train and validation files."""
    out = tmp_path / "hf"
    result = CliRunner().invoke(main, ["export", str(built_cache), "--out", str(out), "--format", "hf", "--domains", "alpha,beta",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "sequences in" in result.output
    card = (out / "README.md").read_text()
    assert "- config_name: all\n  default: true" in card and "- config_name: beta" in card and "gamma" not in card.split("---")[1]
    assert "alpha/train/*.parquet" in card and "split: validation" in card
    again = CliRunner().invoke(main, ["export", str(built_cache), "--out", str(out), "--format", "hf", "--domains", "alpha,beta",
                                      "--quiet"])
    assert again.exit_code == 0, again.output  # already complete: nothing rewritten, same answer


def test_readme_export_section_runs(built_cache: Path, tmp_path: Path, monkeypatch):
    """README's "Taking the targets to other stacks": the command, then its Python block."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Taking the targets to other stacks"):]
    section = section[: section.index("\n## ", 1)]
    command = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)[0].split("#")[0].split()
    assert command[:2] == ["ddk-cache", "export"]
    monkeypatch.chdir(tmp_path)
    domain = Cache(str(built_cache)).domains[0]
    result = CliRunner().invoke(main, [str(built_cache) if a == "cache.zarr" else a for a in command[1:]] + ["--quiet"])
    assert result.exit_code == 0, result.output
    for code in re.findall(r"```python\n(.*?)```", section, re.DOTALL):
        exec(compile(code.replace("targets/code/", f"targets/{domain}/"), "README.md", "exec"), {})


def test_axolotl_layout_aligns_targets_labels_and_masks(chat_cache: Path, tmp_path: Path):
    """--format axolotl: fixed-k rows of L positions; position t holds the renormalised kept
    targets predicting input_ids[t + 1], masked where that token is not a label; labels are
    input_ids with -100 off the labels; the last position is padding."""
    m = export_parquet(str(chat_cache), str(tmp_path / "ax"), layout="axolotl")
    assert m["layout"] == "axolotl" and "renormalised" in m["values"]
    cache = Cache(str(chat_cache))
    checked = 0
    for rel in m["files"]:
        domain, split = rel.split("/")[:2]
        table = pq.read_table(tmp_path / "ax" / rel)
        assert table.column_names == ["input_ids", "attention_mask", "labels", "target_token_ids", "target_logprobs", "target_mask"]
        start = int(rel.split("part-")[1].split(".")[0]) * 4096
        b = cache.read(domain, split, start, start + table.num_rows)
        loss_mask = b.loss_mask if b.loss_mask is not None else np.ones_like(b.tokens)
        for i, r in enumerate(table.to_pylist()):
            ids, lps, mask = np.array(r["target_token_ids"]), np.array(r["target_logprobs"], np.float32), np.array(r["target_mask"])
            L, K = ids.shape
            assert L == b.tokens.shape[1] and K == b.topk_ids.shape[-1] and r["input_ids"] == b.tokens[i].tolist()
            assert r["labels"] == np.where(loss_mask[i] == 1, b.tokens[i], -100).tolist()
            kept = np.isfinite(b.topk_logprobs[i])
            want = b.topk_logprobs[i].astype(np.float64)
            want = np.where(kept, want - np.logaddexp.reduce(np.where(kept, want, -np.inf), -1, keepdims=True), -np.inf)
            np.testing.assert_array_equal(lps[:-1], want.astype(np.float32))
            assert np.array_equal(ids[:-1], np.where(kept, b.topk_ids[i], 0))
            assert np.array_equal(mask[:-1], (kept & (loss_mask[i, 1:, None] == 1)).astype(int))
            assert (mask[-1] == 0).all() and np.isneginf(lps[-1]).all()
            np.testing.assert_allclose(np.exp(lps[:-1].astype(np.float64)).sum(-1), 1.0, rtol=1e-5)
            checked += 1
    assert checked == sum(m["files"].values()) > 0
    masked = [np.array(r["target_mask"]).any(-1).mean() for rel in m["files"] for r in pq.read_table(tmp_path / "ax" / rel).to_pylist()]
    assert 0 < np.mean(masked) < 1  # chat prompts masked, responses not


def test_axolotl_layout_refuses_sampled_targets(teacher_dir: Path, corpus_dir: Path, tmp_path: Path):
    out = tmp_path / "s.zarr"
    build(small_config(teacher_dir, corpus_dir, out, encoding="pack", targets="sampled", samples=4), progress=False)
    with pytest.raises(DDKCacheError, match="axolotl layout holds top-k targets"):
        export_parquet(str(out), str(tmp_path / "ax"), layout="axolotl")
    export_parquet(str(out), str(tmp_path / "plain"))  # the plain layout takes them: ids and log weights, no tail
    row = read_back(tmp_path / "plain")[("alpha", "val", 0)]
    assert row["tail_logprob"] is None and abs(np.exp(np.array(row["topk_logprobs"][3], np.float64)).sum() - 1) < 1e-5
