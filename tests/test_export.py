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
    commands = [block.split("#")[0].split() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]
    assert [c[:2] for c in commands] == [["ddk-cache", "export"], ["ddk-cache", "import"]]
    monkeypatch.chdir(tmp_path)
    domain = Cache(str(built_cache)).domains[0]
    for command in commands:
        result = CliRunner().invoke(main, [str(built_cache) if a == "cache.zarr" else a for a in command[1:]] + ["--quiet"])
        assert result.exit_code == 0, result.output
    assert_same_within_pack_v3(built_cache, tmp_path / "again.zarr")
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


# ---------------------------------------------------------------- import (the way back)


def assert_same_within_pack_v3(a_path: Path, b_path: Path) -> None:
    """Every sequence of b equals a's: tokens, masks and kept ids exactly; log-probs within
    pack-v3's bound (log-ratios to the top-1); the teacher PPL table."""
    from ddk_cache.store.encodings import PackV3

    a, b = Cache(str(a_path)), Cache(str(b_path))
    enc = PackV3()
    assert a.domains == b.domains
    for d in a.domains:
        for s in ("train", "val"):
            x, y = a.read(d, s, 0, 10**6), b.read(d, s, 0, 10**6)
            assert np.array_equal(x.tokens, y.tokens)
            assert (x.loss_mask is None) == (y.loss_mask is None) and (x.loss_mask is None or np.array_equal(x.loss_mask, y.loss_mask))
            kept = np.isfinite(x.topk_logprobs)
            assert np.array_equal(np.isfinite(y.topk_logprobs), kept) and np.array_equal(x.topk_ids[kept], y.topk_ids[kept])
            r = np.where(kept, x.topk_logprobs[..., :1] - x.topk_logprobs, 0).astype(np.float64)
            q = np.where(kept, y.topk_logprobs[..., :1] - y.topk_logprobs, 0).astype(np.float64)
            assert (np.abs(q - r) <= 2 * enc.step * np.maximum(1, r / enc.knee) + 1e-5).all()
            np.testing.assert_allclose(y.target_logprob, x.target_logprob, atol=0.02)  # kept targets: as their entry
            # From the exported target log-probs: exact from plain-v1, within pack-v3's bound from a pack-v3 source.
            exact = a.encoding.name == "plain-v1"
            assert a.teacher_ppl(d, s) == pytest.approx(b.teacher_ppl(d, s), rel=1e-6 if exact else 1e-3)


def test_import_of_an_export_gives_the_cache_back(built_cache: Path, chat_cache: Path, adaptive_cache: Path, tmp_path: Path):
    from ddk_cache.importer import import_capture
    from ddk_cache.store.verify import verify_cache

    for i, src in enumerate((built_cache, chat_cache, adaptive_cache)):
        export_parquet(str(src), str(tmp_path / f"e{i}"), rows_per_file=7)
        meta = import_capture(str(tmp_path / f"e{i}"), str(tmp_path / f"c{i}.zarr"), shard_sequences=3)  # shards across files
        assert meta.state == "complete" and meta.corpus["imported_from"].endswith(f"e{i}")
        assert_same_within_pack_v3(src, tmp_path / f"c{i}.zarr")
        problems, _ = verify_cache(str(tmp_path / f"c{i}.zarr"))
        assert problems == []
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "c1.zarr")])
    assert "imported from:" in result.output and "e1" in result.output


def test_an_interrupted_import_resumes(built_cache: Path, tmp_path: Path, monkeypatch):
    from ddk_cache.importer import import_capture

    from .helpers import import_interrupted_then_resumed

    export_parquet(str(built_cache), str(tmp_path / "e"), rows_per_file=7)

    def building():
        assert Cache(str(tmp_path / "c.zarr"), require_complete=False).meta.state == "building"

    resumed = import_interrupted_then_resumed(
        monkeypatch, lambda: import_capture(str(tmp_path / "e"), str(tmp_path / "c.zarr"), shard_sequences=3), 3, building)
    assert resumed == len(Cache(str(tmp_path / "c.zarr")).shards()) - 3  # the three written before are kept
    assert_same_within_pack_v3(built_cache, tmp_path / "c.zarr")


@pytest.mark.parametrize("damage, message", [
    (lambda t, pa: t.drop(["target_logprob"]), "missing column"),
    (lambda t, pa: t.set_column(t.column_names.index("input_ids"), "input_ids",
                                pa.array([r[:-1] if i == 2 else r for i, r in enumerate(t.column("input_ids").to_pylist())])),
     "row 2, column input_ids: 31 values where the rows before it have 32"),
    (lambda t, pa: t.set_column(t.column_names.index("topk_logprobs"), "topk_logprobs",
                                pa.array([[[float("nan")] + e[1:] if (i, j) == (1, 4) else e for j, e in enumerate(r)]
                                          for i, r in enumerate(t.column("topk_logprobs").to_pylist())])),
     "row 1, column topk_logprobs: a log-probability that is not finite"),
    (lambda t, pa: t.set_column(t.column_names.index("topk_ids"), "topk_ids",
                                pa.array([[[400] + e[1:] if (i, j) == (3, 0) else e for j, e in enumerate(r)]
                                          for i, r in enumerate(t.column("topk_ids").to_pylist())])),
     "row 3, column topk_ids: an id outside the vocabulary"),
])
def test_import_refuses_bad_input_naming_file_row_and_column(built_cache: Path, tmp_path: Path, damage, message):
    """Nothing is written when any file is bad: the check runs over every file first."""
    import pyarrow as pa

    from ddk_cache.importer import import_capture

    export_parquet(str(built_cache), str(tmp_path / "e"), rows_per_file=7)
    victim = tmp_path / "e" / "beta" / "train" / "part-00001.parquet"
    pq.write_table(damage(pq.read_table(victim), pa), victim, row_group_size=2)  # rows 2 and 3 in a later row group
    with pytest.raises(DDKCacheError, match=message) as err:
        import_capture(str(tmp_path / "e"), str(tmp_path / "c.zarr"))
    assert str(victim) in str(err.value)
    assert not (tmp_path / "c.zarr").exists()


def test_import_without_a_manifest_needs_the_vocabulary_and_tokenizer(built_cache: Path, teacher_dir: Path, tmp_path: Path):
    from ddk_cache.importer import import_capture

    export_parquet(str(built_cache), str(tmp_path / "e"))
    (tmp_path / "e" / "export.json").unlink()
    with pytest.raises(DDKCacheError, match="pass --vocab-size"):
        import_capture(str(tmp_path / "e"), str(tmp_path / "c.zarr"))
    with pytest.raises(DDKCacheError, match="pass --tokenizer"):
        import_capture(str(tmp_path / "e"), str(tmp_path / "c.zarr"), vocab_size=400)
    result = CliRunner().invoke(main, ["import", str(tmp_path / "e"), "--out", str(tmp_path / "c.zarr"), "--vocab-size", "400",
                                       "--tokenizer", str(teacher_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    assert Cache(str(tmp_path / "c.zarr")).meta.tokenizer == Cache(str(built_cache)).meta.tokenizer


def test_import_refuses_an_export_of_sampled_targets(teacher_dir: Path, corpus_dir: Path, tmp_path: Path):
    from ddk_cache.importer import import_capture

    out = tmp_path / "s.zarr"
    build(small_config(teacher_dir, corpus_dir, out, encoding="pack", targets="sampled", samples=4), progress=False)
    export_parquet(str(out), str(tmp_path / "e"))
    with pytest.raises(DDKCacheError, match="import takes top-k targets"):
        import_capture(str(tmp_path / "e"), str(tmp_path / "c.zarr"))
