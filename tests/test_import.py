"""`ddk-cache import --from distillkit|axolotl` (issue #28): other tools' captures become caches.

The captures are written here from the tools' own schemas (DistillKit's
`compressed_logit_schema` and `LogprobCompressor`, axolotl's KD rows), by writers in this
file that follow their code; neither tool is imported. `benchmarks/distillkit_import.py`
checks the decoder against DistillKit's own decompressor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from ddk_cache.capture.tokenization import cache_tokenizer, tokenizer_fingerprint
from ddk_cache.cli.main import main
from ddk_cache.errors import ConfigError, DDKCacheError
from ddk_cache.export import export_parquet
from ddk_cache.sources import decode_distillkit, unpack_bits
from ddk_cache.store.cache import Cache
from ddk_cache.train.losses import KDConfig, sparse_kd

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

EXACT = {"d": 400, "k": 8, "exact_k": 8, "exact_dtype": "float32", "polynomial_terms": None, "term_dtype": "float32",
         "residual_bins": [], "delta_encoding": False, "error_diffusion": False, "normalize_t": False}
LOSSY = {"d": 400, "k": 8, "exact_k": 2, "exact_dtype": "bfloat16", "polynomial_terms": [0, 1, "sqrt"],
         "term_dtype": "float32", "residual_bins": [{"scale_dtype": "float16", "element_bits": 5, "num_elements": 6}],
         "delta_encoding": False, "error_diffusion": False, "normalize_t": False}
DELTA = {**LOSSY, "exact_dtype": "float32", "exact_k": 3, "delta_encoding": True,
         "residual_bins": [{"scale_dtype": "float16", "element_bits": 3, "num_elements": 5}]}


# -- DistillKit's writer, after distillkit/compression (its schema and arithmetic) -------------

def pack_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """DistillKit's pack_to_bytes: [..., n] integers, `bits` each, MSB first, zero-padded to bytes."""
    planes = (x[..., None] >> np.arange(bits - 1, -1, -1)) & 1
    return np.packbits(planes.reshape(*x.shape[:-1], -1).astype(np.uint8), axis=-1)


def to_bf16_bytes(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)).view(np.uint8).reshape(*x.shape[:-1], -1)


def design(terms: list, t: int) -> np.ndarray:
    pts = np.arange(t, dtype=np.float64)
    return np.stack([pts ** i if isinstance(i, int) else np.sqrt(pts) for i in terms], -1)


def dk_compress(ids: np.ndarray, lps: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """LogprobCompressor.compress_from_sparse: sort descending, delta-code, exact_k floats, a
    least-squares polynomial over the rest and its residuals quantised per bin."""
    order = np.argsort(-lps, -1, kind="stable")
    lps, ids = np.take_along_axis(lps, order, -1).astype(np.float32), np.take_along_axis(ids, order, -1)
    x = np.concatenate([lps[:, :1], lps[:, 1:] - lps[:, :-1]], -1) if cfg["delta_encoding"] else lps
    e = cfg["exact_k"]
    chunks = [to_bf16_bytes(x[:, :e]) if cfg["exact_dtype"] == "bfloat16" else x[:, :e].astype(np.float32).view(np.uint8)]
    residual = x[:, e:].astype(np.float64)
    if cfg["polynomial_terms"]:
        X = design(cfg["polynomial_terms"], cfg["k"] - e)
        coeffs = np.ascontiguousarray((np.linalg.pinv(X) @ residual.T).T, np.float32)
        chunks.append(coeffs.view(np.uint8))
        residual = residual - (X @ coeffs.astype(np.float64).T).T
    at = 0
    for b in cfg["residual_bins"]:
        vals, bits = residual[:, at: at + b["num_elements"]], b["element_bits"]
        scale = np.abs(vals).max(-1, keepdims=True) / 2 ** (bits - 1)
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        q = np.clip(np.round(vals / scale.astype(np.float64)), -2 ** (bits - 1), 2 ** (bits - 1) - 1) + 2 ** (bits - 1)
        chunks += [np.ascontiguousarray(scale).view(np.uint8), pack_bits(q.astype(np.int64), bits)]
        at += b["num_elements"]
    return np.concatenate(chunks, -1), pack_bits(ids.astype(np.int64), math.ceil(math.log2(cfg["d"])))


def reference_decode(cfg: dict, raw: np.ndarray) -> np.ndarray:
    """The decode in float64, from the format as written above (no ddk-cache code)."""
    e, k, at = cfg["exact_k"], cfg["k"], 0
    if cfg["exact_dtype"] == "bfloat16":
        exact = (raw[:, : 2 * e].copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        at = 2 * e
    else:
        exact, at = raw[:, : 4 * e].copy().view(np.float32).astype(np.float64), 4 * e
    rest = np.zeros((len(raw), k - e))
    if cfg["polynomial_terms"]:
        n = len(cfg["polynomial_terms"])
        coeffs = raw[:, at: at + 4 * n].copy().view(np.float32).astype(np.float64)
        at += 4 * n
        rest += (design(cfg["polynomial_terms"], k - e) @ coeffs.T).T
    col = 0
    for b in cfg["residual_bins"]:
        scale = raw[:, at: at + 2].copy().view(np.float16).astype(np.float64)
        at += 2
        nbytes = (b["num_elements"] * b["element_bits"] + 7) // 8
        bits = np.unpackbits(raw[:, at: at + nbytes], axis=-1)[:, : b["num_elements"] * b["element_bits"]]
        q = bits.reshape(len(raw), b["num_elements"], b["element_bits"]) @ (2 ** np.arange(b["element_bits"] - 1, -1, -1))
        rest[:, col: col + b["num_elements"]] += (q - 2 ** (b["element_bits"] - 1)) * scale
        at, col = at + nbytes, col + b["num_elements"]
    values = np.concatenate([exact, rest], -1)
    return np.cumsum(values, -1) if cfg["delta_encoding"] else values


def write_distillkit(src: Path, cache: Path, cfg: dict, *, rows: int = 12, trim: bool = True, domain_column: bool = False,
                     files: int = 2) -> list[dict]:
    """A DistillKit capture of the first `rows` train sequences of each domain of `cache`
    (their top-k as the teacher's), sequences cut to different lengths when `trim`, in
    DistillKit's schema and file naming; returns the rows written (tokens, ids, log-probs, domain)."""
    src.mkdir(parents=True)
    (src / "compression_config.yaml").write_text(yaml.safe_dump(cfg))
    c = Cache(str(cache))
    written = []
    for domain in c.domains:
        b = c.read(domain, "train", 0, rows)
        for i in range(len(b.tokens)):
            n = len(b.tokens[i]) - (3 * i) % 11 if trim else len(b.tokens[i])
            ids = b.topk_ids[i, : n - 1, : cfg["k"]].astype(np.int64)
            lps = b.topk_logprobs[i, : n - 1, : cfg["k"]].astype(np.float32)
            written.append({"domain": domain, "tokens": b.tokens[i, :n].astype(np.int64), "ids": ids, "lps": lps})
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint64())),
                        pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))]
                       + ([pa.field("domain", pa.string())] if domain_column else []))
    per_file = math.ceil(len(written) / files)
    for f in range(files):
        part = written[f * per_file: (f + 1) * per_file]
        cols = {"input_ids": [r["tokens"].tolist() for r in part], "compressed_logprobs": [], "bytepacked_indices": []}
        for r in part:
            lp_bytes, id_bytes = dk_compress(r["ids"], r["lps"], cfg)
            cols["compressed_logprobs"].append(lp_bytes.tolist())
            cols["bytepacked_indices"].append(id_bytes.tolist())
            r["lp_bytes"] = lp_bytes
        if domain_column:
            cols["domain"] = [r["domain"] for r in part]
        pq.write_table(pa.table(cols, schema=schema), src / f"data_{f}.parquet")
    return written


def test_bit_unpacking_undoes_distillkits_msb_first_packing():
    rng = np.random.default_rng(0)
    for bits in (1, 3, 5, 8, 12, 16, 17):
        x = rng.integers(0, 2 ** bits, (5, 13))
        np.testing.assert_array_equal(unpack_bits(pack_bits(x, bits), bits, 13), x)


def test_distillkit_values_decode_as_its_format_says(built_cache: Path):
    """Each config, against the float64 decode of the same bytes: exact floats bit for bit; the
    lossy ones (bf16 exact values, delta coding, a polynomial, 5-bit residuals) within float32
    rounding."""
    b = Cache(str(built_cache)).read(Cache(str(built_cache)).domains[0], "train", 0, 4)
    ids, lps = b.topk_ids[:, :, :8].reshape(-1, 8).astype(np.int64), b.topk_logprobs[:, :, :8].reshape(-1, 8)
    for cfg, tol in ((EXACT, 0.0), (LOSSY, 2e-6), (DELTA, 2e-6)):
        lp_bytes, id_bytes = dk_compress(ids, lps, cfg)
        got_ids, got = decode_distillkit(cfg, lp_bytes, id_bytes)
        order = np.argsort(-lps, -1, kind="stable")
        np.testing.assert_array_equal(got_ids, np.take_along_axis(ids, order, -1))
        want = reference_decode(cfg, lp_bytes)
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())
        if cfg is not EXACT:  # and the lossy capture is still near the teacher (a check on the writer above)
            assert np.abs(got - np.take_along_axis(lps, order, -1)).max() < 0.1


def test_distillkit_capture_imports_as_its_decoder_gives_it(built_cache: Path, teacher_dir: Path, tmp_path: Path):
    """Every kept value exactly (--encoding plain), sequences of different lengths padded with a
    loss mask, the last rows of each domain held out, the limits recorded and shown."""
    from ddk_cache.importer import import_capture

    written = write_distillkit(tmp_path / "dk", built_cache, EXACT, domain_column=True)
    meta = import_capture(str(tmp_path / "dk"), str(tmp_path / "c.zarr"), layout="distillkit", tokenizer=str(teacher_dir),
                          val_fraction=0.25, encoding="plain", shard_sequences=4)
    c = Cache(str(tmp_path / "c.zarr"))
    L = max(len(r["tokens"]) for r in written)
    assert c.seq_len == L and meta.vocab_size == 400 and c.domains == sorted({r["domain"] for r in written})
    # --tokenizer: its files kept in the cache, and the table's bytes for bits per byte recorded
    assert tokenizer_fingerprint(cache_tokenizer(c)) == meta.tokenizer["fingerprint"] and c.meta.ppl(c.domains[0]).bits_per_byte > 0
    for domain in c.domains:
        mine = [r for r in written if r["domain"] == domain]
        assert (c.num_sequences(domain, "train"), c.num_sequences(domain, "val")) == (9, 3)
        got = [*(c.read(domain, "train", i, i + 1) for i in range(9)), *(c.read(domain, "val", i, i + 1) for i in range(3))]
        for r, g in zip(mine, got):
            n = len(r["tokens"])
            np.testing.assert_array_equal(g.tokens[0, :n], r["tokens"])
            assert (g.tokens[0, n:] == 0).all()
            assert g.loss_mask[0, :n].all() and not g.loss_mask[0, n:].any()
            order = np.argsort(-r["lps"], -1, kind="stable")
            np.testing.assert_array_equal(g.topk_ids[0, : n - 1], np.take_along_axis(r["ids"], order, -1))
            np.testing.assert_array_equal(g.topk_logprobs[0, : n - 1], np.take_along_axis(r["lps"], order, -1))
            # The next token's log-prob where it was kept; the bound elsewhere.
            hit = g.topk_ids[0, : n - 1] == r["tokens"][1:, None]
            kept = hit.any(-1)
            np.testing.assert_array_equal(g.target_logprob[0, : n - 1][kept], g.topk_logprobs[0, : n - 1][hit])
            assert (g.target_logprob[0, : n - 1][~kept] <= g.topk_logprobs[0, : n - 1, -1][~kept]).all()
    capture = meta.corpus["capture"]
    assert capture["tail"] == "derived" and capture["target_logprob"] == "in top-k only"
    assert 0 < capture["target_in_topk"] <= 1
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "c.zarr")]).output
    assert "distillkit" in shown and "teacher PPL is a lower bound" in shown and "not stored by the capture" in shown
    fid = CliRunner().invoke(main, ["inspect", str(tmp_path / "c.zarr"), "--fidelity", "--teacher", str(teacher_dir),
                                    "--device", "cpu"])
    assert fid.exit_code == 0, fid.output
    assert "imported capture: next-token log-prob: only where it is among the kept ids" in fid.output


def test_distillkit_import_gives_the_loss_its_decompressor_gives(built_cache: Path, teacher_dir: Path, tmp_path: Path):
    """The lossy capture imported (plain) and read as distill reads it: the same forward KL, to
    float32 rounding, as the float64 decode of the same bytes feeding the same loss."""
    from ddk_cache.importer import import_capture

    written = write_distillkit(tmp_path / "dk", built_cache, LOSSY, rows=6, trim=False, files=1)
    import_capture(str(tmp_path / "dk"), str(tmp_path / "c.zarr"), layout="distillkit", tokenizer=str(teacher_dir),
                   domain="web", val_fraction=0.2, encoding="plain")
    c = Cache(str(tmp_path / "c.zarr"))
    got = c.read("web", "train", 0, c.num_sequences("web", "train"))
    n = len(got.tokens)
    ids = np.stack([np.take_along_axis(r["ids"], np.argsort(-r["lps"], -1, kind="stable"), -1) for r in written[:n]])
    want = np.stack([reference_decode(LOSSY, r["lp_bytes"]) for r in written[:n]])
    logits = torch.randn(n * ids.shape[1], 400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cfg = KDConfig("fkl")
    mine = sparse_kd(logits.float(), torch.from_numpy(got.topk_ids.reshape(-1, 8)).long(),
                     torch.from_numpy(got.topk_logprobs.reshape(-1, 8)), cfg)
    ref = sparse_kd(logits, torch.from_numpy(ids.reshape(-1, 8)), torch.from_numpy(want.reshape(-1, 8)), cfg)
    torch.testing.assert_close(mine.double().mean(), ref.mean(), rtol=1e-5, atol=1e-6)


def test_axolotl_rows_import_back_as_the_renormalised_targets(chat_cache: Path, teacher_dir: Path, tmp_path: Path):
    """`export --format axolotl` then `import --from axolotl`: per domain folder, the rows, the
    labels' mask and the renormalised targets (within pack-v3's bound); no tail, so distill
    takes only forward KL from it."""
    from ddk_cache.importer import import_capture
    from ddk_cache.train.trainer import _check_targets

    from .helpers import distill_config

    export_parquet(str(chat_cache), str(tmp_path / "ax"), layout="axolotl")
    meta = import_capture(str(tmp_path / "ax"), str(tmp_path / "c.zarr"), layout="axolotl", tokenizer=str(teacher_dir),
                          val_fraction=0.3)
    src, c = Cache(str(chat_cache)), Cache(str(tmp_path / "c.zarr"))
    assert c.domains == src.domains and meta.corpus["capture"]["renormalised"]
    for domain in src.domains:
        a = src.read(domain, "train", 0, src.num_sequences(domain, "train"))
        b = src.read(domain, "val", 0, src.num_sequences(domain, "val"))
        tokens = np.concatenate([a.tokens, b.tokens])
        lps = np.concatenate([a.topk_logprobs, b.topk_logprobs]).astype(np.float64)
        ones = lambda g: g.loss_mask if g.loss_mask is not None else np.ones_like(g.tokens, np.uint8)  # noqa: E731
        mask = np.concatenate([ones(a), ones(b)])
        t, v = c.num_sequences(domain, "train"), c.num_sequences(domain, "val")
        assert t + v == len(tokens) and v == max(1, round(0.3 * len(tokens)))
        got = [c.read(domain, "train", 0, t), c.read(domain, "val", 0, v)]
        np.testing.assert_array_equal(np.concatenate([g.tokens for g in got]), tokens)
        np.testing.assert_array_equal(np.concatenate([ones(g) for g in got]), mask)
        carry = mask[:, 1:] == 1
        renorm = lps - np.logaddexp.reduce(lps, -1, keepdims=True)
        back = np.concatenate([g.topk_logprobs for g in got]).astype(np.float64)
        err = np.abs(np.exp(back) - np.exp(renorm))[carry]
        assert err.max() <= 2 ** -8 * np.exp(renorm)[carry].max()
    for loss, mixing, message in (("rkl", "natural", "renormalised over the kept ids"),
                                  ("fkl", "ddk", "teacher PPL table is a lower bound")):
        with pytest.raises(ConfigError, match=message):
            _check_targets(distill_config(tmp_path / "c.zarr", teacher_dir, tmp_path / "run", kd_loss=loss, mixing=mixing), c)
    _check_targets(distill_config(tmp_path / "c.zarr", teacher_dir, tmp_path / "run", kd_loss="fkl", mixing="natural"), c)


@pytest.mark.parametrize("layout, damage, message", [
    ("distillkit", lambda t: t.set_column(1, "compressed_logprobs", pa.array(
        [[[1, 2, 3]] * (len(r) - 1) for r in t.column("input_ids").to_pylist()], pa.list_(pa.list_(pa.uint8())))),
     "column compressed_logprobs: 3 bytes at a position where compression_config.yaml gives"),
    ("distillkit", lambda t: t.drop_columns(["bytepacked_indices"]), "not a DistillKit capture"),
    ("distillkit", lambda t: t.set_column(0, "input_ids", pa.array(
        [r[:-1] for r in t.column("input_ids").to_pylist()], pa.list_(pa.uint64()))),
     "column compressed_logprobs: .* entries where input_ids gives"),
    ("axolotl", lambda t: t.drop_columns(["target_logprobs"]), "missing column"),
    ("axolotl", lambda t: t.set_column(t.column_names.index("target_logprobs"), "target_logprobs", pa.array(
        [[[float("nan")] + p[1:] for p in r] for r in t.column("target_logprobs").to_pylist()],
        pa.list_(pa.list_(pa.float32())))), "row 0, column target_logprobs: NaN"),
    ("axolotl", lambda t: t.set_column(0, "input_ids", pa.array(
        [[999] + r[1:] for r in t.column("input_ids").to_pylist()], pa.list_(pa.int32()))),
     "row 0, column input_ids: a token id outside the vocabulary"),
    ("axolotl", lambda t: t.set_column(t.column_names.index("labels"), "labels", pa.array(
        [r[:-1] for r in t.column("labels").to_pylist()], pa.list_(pa.int32()))), "row 0, column labels: not one label"),
])
def test_import_refuses_bad_captures_naming_file_row_and_column(built_cache: Path, teacher_dir: Path, tmp_path: Path,
                                                                 layout, damage, message):
    from ddk_cache.importer import import_capture

    if layout == "distillkit":
        write_distillkit(tmp_path / "src", built_cache, EXACT, rows=3, files=1)
        victim = tmp_path / "src" / "data_0.parquet"
    else:
        export_parquet(str(built_cache), str(tmp_path / "src"), layout="axolotl")
        victim = sorted((tmp_path / "src").rglob("*.parquet"))[0]
    pq.write_table(damage(pq.read_table(victim)), victim)
    with pytest.raises(DDKCacheError, match=message) as err:
        import_capture(str(tmp_path / "src"), str(tmp_path / "c.zarr"), layout=layout, tokenizer=str(teacher_dir))
    assert str(victim) in str(err.value) or "not a DistillKit" in str(err.value)
    assert not (tmp_path / "c.zarr").exists()


def test_a_distillkit_capture_needs_its_config(tmp_path: Path, teacher_dir: Path):
    from ddk_cache.importer import import_capture

    (tmp_path / "dk").mkdir()
    with pytest.raises(DDKCacheError, match="compression_config.yaml not found"):
        import_capture(str(tmp_path / "dk"), str(tmp_path / "c.zarr"), layout="distillkit", tokenizer=str(teacher_dir))


def test_an_interrupted_distillkit_import_resumes(built_cache: Path, teacher_dir: Path, tmp_path: Path, monkeypatch):
    """Stopped after two shards, the same call finishes the rest; the cache equals an uninterrupted import."""
    from ddk_cache.importer import import_capture

    from .helpers import import_interrupted_then_resumed

    write_distillkit(tmp_path / "dk", built_cache, LOSSY, domain_column=True)
    args = dict(layout="distillkit", tokenizer=str(teacher_dir), shard_sequences=3)
    import_capture(str(tmp_path / "dk"), str(tmp_path / "whole.zarr"), **args)

    def incomplete():
        assert not Cache(str(tmp_path / "c.zarr"), require_complete=False).meta.complete

    resumed = import_interrupted_then_resumed(
        monkeypatch, lambda: import_capture(str(tmp_path / "dk"), str(tmp_path / "c.zarr"), **args), 2, incomplete)
    assert resumed > 0
    a, b = Cache(str(tmp_path / "whole.zarr")), Cache(str(tmp_path / "c.zarr"))
    for d in a.domains:
        for s in ("train", "val"):
            x, y = a.read(d, s, 0, a.num_sequences(d, s)), b.read(d, s, 0, b.num_sequences(d, s))
            for name in ("tokens", "loss_mask", "topk_ids", "topk_logprobs", "target_logprob"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
    assert a.meta.teacher_ppl == b.meta.teacher_ppl


def test_readme_bring_your_captures_section_runs(built_cache: Path, teacher_dir: Path, tmp_path: Path, monkeypatch):
    """README's "Bring your captures": each command, on captures written here."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Bring your captures"):]
    section = section[: section.index("\n## ", 1)]
    commands = [line.split("#")[0].split() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
                for line in block.strip().splitlines()]
    assert [c[:3] for c in commands] == [["ddk-cache", "import", "dk-capture/"], ["ddk-cache", "import", "kd-rows/"],
                                         ["ddk-cache", "inspect", "from-distillkit.zarr"]]
    monkeypatch.chdir(tmp_path)
    write_distillkit(tmp_path / "dk-capture", built_cache, LOSSY)
    export_parquet(str(built_cache), str(tmp_path / "kd-rows"), layout="axolotl")
    for command in commands:
        argv = [str(teacher_dir) if a == "teacher/" else a for a in command[1:]]
        result = CliRunner().invoke(main, argv + (["--quiet"] if argv[0] == "import" else []))
        assert result.exit_code == 0, result.output
    meta = json.loads(json.dumps(Cache("from-distillkit.zarr").meta.corpus))
    assert meta["format"] == "distillkit" and Cache("from-axolotl.zarr").meta.corpus["format"] == "axolotl"


def test_axolotl_prepared_arrow_files_import_as_their_parquet_does(built_cache: Path, teacher_dir: Path, tmp_path: Path):
    """axolotl's prepared dataset is `datasets`' save_to_disk output: Arrow IPC streams."""
    from ddk_cache.importer import import_capture

    export_parquet(str(built_cache), str(tmp_path / "ax"), layout="axolotl")
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "ax").rglob("*.parquet")))
    (tmp_path / "prepared").mkdir()
    with pa.ipc.new_stream(str(tmp_path / "prepared" / "data-00000-of-00001.arrow"), table.schema) as out:
        for batch in table.to_batches(max_chunksize=7):
            out.write_batch(batch)
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "all.parquet")
    args = dict(layout="axolotl", tokenizer=str(teacher_dir), domain="mixed")
    import_capture(str(tmp_path / "prepared"), str(tmp_path / "a.zarr"), **args)
    import_capture(str(tmp_path / "pq"), str(tmp_path / "b.zarr"), **args)
    a, b = Cache(str(tmp_path / "a.zarr")), Cache(str(tmp_path / "b.zarr"))
    assert a.domains == ["mixed"] and a.num_sequences("mixed", "train") + a.num_sequences("mixed", "val") == table.num_rows
    for s in ("train", "val"):
        x, y = a.read("mixed", s, 0, a.num_sequences("mixed", s)), b.read("mixed", s, 0, b.num_sequences("mixed", s))
        for name in ("tokens", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


def test_a_distillkit_import_distills(built_cache: Path, teacher_dir: Path, tmp_path: Path):
    """The imported cache trains a student (forward KL, natural mixing); the default DDK mixing
    is refused with the reason."""
    from ddk_cache.importer import import_capture
    from ddk_cache.train.distill import distill

    from .helpers import distill_config, make_student

    write_distillkit(tmp_path / "dk", built_cache, LOSSY, domain_column=True)
    import_capture(str(tmp_path / "dk"), str(tmp_path / "c.zarr"), layout="distillkit", tokenizer=str(teacher_dir),
                   val_fraction=0.25)
    student = make_student(teacher_dir, tmp_path / "student", hidden_size=32, layers=1)
    with pytest.raises(ConfigError, match="teacher PPL table is a lower bound"):
        distill(distill_config(tmp_path / "c.zarr", student, tmp_path / "run0", kd_loss="fkl"), progress=False)
    result = distill(distill_config(tmp_path / "c.zarr", student, tmp_path / "run", kd_loss="fkl", mixing="natural"),
                     progress=False)
    assert result.steps == 4 and all(math.isfinite(x) for x in result.losses)
    assert set(result.final_ppl) == set(Cache(str(tmp_path / "c.zarr")).domains)


def test_a_domain_that_cannot_name_a_store_group_is_refused(built_cache: Path, teacher_dir: Path, tmp_path: Path):
    from ddk_cache.importer import import_capture

    write_distillkit(tmp_path / "dk", built_cache, EXACT, rows=2, files=1, domain_column=True)
    victim = tmp_path / "dk" / "data_0.parquet"
    t = pq.read_table(victim)
    pq.write_table(t.set_column(t.column_names.index("domain"), "domain", pa.array(["web/en"] * t.num_rows)), victim)
    with pytest.raises(DDKCacheError, match=r"data_0.parquet, row 0: domain name 'web/en'"):
        import_capture(str(tmp_path / "dk"), str(tmp_path / "c.zarr"), layout="distillkit", tokenizer=str(teacher_dir))
    assert not (tmp_path / "c.zarr").exists()


def test_distillkit_ids_beyond_the_vocabulary_are_refused(built_cache: Path, teacher_dir: Path, tmp_path: Path):
    from ddk_cache.importer import import_capture

    written = write_distillkit(tmp_path / "dk", built_cache, EXACT, rows=3, files=1)
    V = int(max(r["tokens"].max() for r in written)) + 1  # every token fits; some kept ids do not
    assert any(r["ids"].max() >= V for r in written)
    with pytest.raises(DDKCacheError, match=r"data_0.parquet, row \d+, column bytepacked_indices: an id outside the vocabulary"):
        import_capture(str(tmp_path / "dk"), str(tmp_path / "c.zarr"), layout="distillkit", tokenizer=str(teacher_dir),
                       vocab_size=V)
    assert not (tmp_path / "c.zarr").exists()
