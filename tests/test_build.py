"""The build writes exactly what a direct forward pass of the teacher gives, and resumes exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ddk_cache.capture.build import build
from ddk_cache.errors import ConfigError, StoreError, TeacherError
from ddk_cache.store.cache import SPLITS, Cache, CacheWriter

from .helpers import copy_cache, small_config, zarr_view

ARRAYS = ("tokens", "topk_ids", "topk_logprobs", "target_logprob")


def reference(teacher_dir, tokens: np.ndarray, k: int):
    """Direct forward pass, one sequence at a time: log-softmax, top-k, target log-prob."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    ids, lps, tgt = [], [], []
    with torch.inference_mode():
        for row in tokens:
            x = torch.from_numpy(row).long()[None]
            logprobs = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            v, i = logprobs.topk(k, -1)
            ids.append(i.numpy())
            lps.append(v.numpy())
            tgt.append(logprobs.gather(-1, x[0, 1:, None])[:, 0].numpy())
    return np.stack(ids), np.stack(lps), np.stack(tgt)


def all_arrays(path) -> dict:
    """Every array of a cache as zarr reads it (what any Zarr v3 reader sees)."""
    import zarr

    c = Cache(str(path), require_complete=False)
    root = zarr.open_group(str(path), mode="r")
    return {(d, s, a): zarr_view(root, c, d, s, a) for d in c.domains for s in SPLITS for a in c.array_names(d)}


def test_cache_equals_direct_forward_pass(built_cache, teacher_dir):
    cache = Cache(str(built_cache))
    assert cache.domains == ["alpha", "beta", "gamma"]
    for domain in cache.domains:
        for split in SPLITS:
            batch = cache.read(domain, split, 0, cache.num_sequences(domain, split))
            ids, lps, tgt = reference(teacher_dir, batch.tokens, cache.top_k)
            np.testing.assert_array_equal(batch.topk_ids, ids)
            np.testing.assert_array_equal(batch.topk_logprobs, lps)
            np.testing.assert_array_equal(batch.target_logprob, tgt)
            assert batch.topk_ids.shape == (len(batch.tokens), cache.seq_len - 1, cache.top_k)


def test_ppl_table_equals_exp_mean_nll(built_cache, teacher_dir):
    cache = Cache(str(built_cache))
    for domain in cache.domains:
        for split in SPLITS:
            tokens = cache.read(domain, split, 0, cache.num_sequences(domain, split)).tokens
            _, _, tgt = reference(teacher_dir, tokens, cache.top_k)
            expected = math.exp(-tgt.astype(np.float64).mean())
            entry = cache.meta.ppl(domain, split)
            assert entry.ppl == pytest.approx(expected, rel=1e-12)
            assert entry.predicted_tokens == tgt.size
            assert cache.teacher_ppl(domain, split) == entry.ppl


def test_metadata_records_the_build(built_cache, teacher_dir):
    meta = Cache(str(built_cache)).meta
    assert meta.format_version == 5 and meta.state == "complete"
    assert meta.teacher["backend"] == "hf" and meta.teacher["dtype"] == "float32"
    assert meta.teacher["name_or_path"] == str(teacher_dir)
    assert meta.tokenizer["fingerprint"].startswith("sha256:")
    assert meta.top_k == 8 and meta.seq_len == 32 and meta.vocab_size > 8
    assert meta.build_args["top_k"] == 8 and meta.encoding.name == "plain-v1"
    assert len(meta.corpus["sha256"]) == 64 and {f["domain"] for f in meta.corpus["files"]} == {"alpha", "beta", "gamma"}
    for d in ("alpha", "beta", "gamma"):
        assert meta.domains[d].val.sequences == 2  # --val-tokens 64 = 2 sequences of 32
        assert meta.domains[d].train.sequences >= 1


class Crash(Exception):
    pass


@pytest.mark.parametrize("event,count", [("piece_tokenized", 2), ("tokenized", 0), ("store_created", 0), ("shard_written", 1),
                                         ("shard_written", 5), ("before_finalize", 0)])
def test_resume_after_crash_is_value_identical(tmp_path, teacher_dir, corpus_dir, built_cache, event, count):
    out = tmp_path / "c.zarr"
    config = small_config(teacher_dir, corpus_dir, out)

    before: list = []

    def crash(ev, info):
        if ev == "piece_tokenized":
            before.append(info["piece"])
        if ev == event and info.get("count", 0) == count:
            raise Crash(ev)

    with pytest.raises(Crash):
        build(config, progress=False, hook=crash)
    with pytest.raises(StoreError, match="incomplete cache"):
        Cache(str(out))
    writer = CacheWriter(str(out))
    pending = writer.pending() if writer.meta.domains else None
    if event == "shard_written":
        assert count <= len(writer.shards()) - len(pending)
    written, tokenized = [], []

    def record(ev, info):
        if ev == "shard_written":
            written.append(info["shard"])
        elif ev == "piece_tokenized":
            tokenized.append(info["piece"])

    result = build(config, progress=False, hook=record)
    # Only what was pending is done again: finished pieces and shards are never redone.
    assert not set(tokenized) & set(before)
    if event == "piece_tokenized":
        assert len(before) == count and tokenized  # the rest of the pieces, and only those
    if pending is not None:
        assert sorted(written, key=lambda s: s.key) == sorted(pending, key=lambda s: s.key)
    assert result.meta.state == "complete"
    expected, got = all_arrays(built_cache), all_arrays(out)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))
    assert got.keys() == expected.keys()
    assert result.meta.teacher_ppl == Cache(str(built_cache)).meta.teacher_ppl


def test_rerun_of_complete_cache_does_nothing(built_cache, teacher_dir, corpus_dir):
    result = build(small_config(teacher_dir, corpus_dir, built_cache), progress=False)
    assert result.already_complete and result.shards_written == 0


def test_batch_size_and_device_may_change_on_resume(built_cache, teacher_dir, corpus_dir):
    result = build(small_config(teacher_dir, corpus_dir, built_cache, batch_size=7), progress=False)
    assert result.already_complete


@pytest.mark.parametrize(
    "override,message",
    [
        ({"seq_len": 16}, r"--seq-len: 32 in the cache, 16 here"),
        ({"top_k": 4}, r"--top-k: 8 in the cache, 4 here"),
        ({"seed": 1}, r"--seed: 0 in the cache, 1 here"),
        ({"row_start": "bos"}, r"--row-start: 'none' in the cache, 'bos' here"),
        ({"val_tokens": 128}, r"--val-tokens: 64 in the cache, 128 here"),
    ],
)
def test_store_of_another_build_is_refused(built_cache, teacher_dir, corpus_dir, override, message):
    with pytest.raises(StoreError, match=message):
        build(small_config(teacher_dir, corpus_dir, built_cache, **override), progress=False)


def test_vllm_engine_options_are_in_the_fingerprint():
    """A vLLM build resumed with other engine options is another build (an hf build refuses
    them outright: test_vllm_only_options_are_refused_for_the_hf_backend)."""
    from ddk_cache import config as cfgmod
    from ddk_cache.capture.build import BuildConfig

    values = cfgmod.fingerprint_values(BuildConfig(teacher="t", data="d", out="o"))
    assert {"max_num_batched_tokens", "engine_args", "tensor_parallel_size"} <= set(values)
    assert not {"gpu_memory_utilization", "logprobs_format", "batch_size", "device"} & set(values)


def test_changed_corpus_is_refused(tmp_path, built_cache, teacher_dir, corpus_dir):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    with open(corpus / "alpha.jsonl", "a") as f:
        f.write('{"text": "one more document"}\n')
    with pytest.raises(StoreError, match="corpus files differ"):
        build(small_config(teacher_dir, corpus, built_cache), progress=False)


def test_corpus_edited_in_place_is_refused(tmp_path, teacher_dir, corpus_dir):
    """Same names and sizes, new bytes: the modification time gives it away (no rehashing)."""
    import os
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    out = tmp_path / "c.zarr"

    class Stop(Exception):
        pass

    def stop(ev, info):
        if ev == "tokenized":
            raise Stop

    with pytest.raises(Stop):
        build(small_config(teacher_dir, corpus, out), progress=False, hook=stop)
    text = (corpus / "alpha.jsonl").read_text()
    (corpus / "alpha.jsonl").write_text(text.replace("market", "garden"))  # same length
    st = os.stat(corpus / "alpha.jsonl")
    os.utime(corpus / "alpha.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StoreError, match=r"corpus file alpha.jsonl \(domain alpha\) changed since this cache's build started"):
        build(small_config(teacher_dir, corpus, out), progress=False)


def test_foreign_output_is_refused(tmp_path, teacher_dir, corpus_dir):
    out = tmp_path / "notacache"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a ddk-cache store; choose another --out"):
        build(small_config(teacher_dir, corpus_dir, out), progress=False)
    assert (out / "precious.txt").read_text() == "keep me"


def test_top_k_larger_than_vocab(tmp_path, teacher_dir, corpus_dir):
    with pytest.raises(ConfigError, match=r"--top-k 100000 is larger than the teacher's vocabulary \(\d+\)"):
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", top_k=100000), progress=False)
    assert not (tmp_path / "c.zarr").exists()


def test_seq_len_longer_than_context(tmp_path, teacher_dir, corpus_dir):
    with pytest.raises(ConfigError, match=r"--seq-len 128 is longer than the teacher's context \(64 tokens\)"):
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", seq_len=128), progress=False)


@pytest.mark.parametrize("field,value,message", [("top_k", -1, "--top-k must be >= 1"), ("seq_len", 1, "--seq-len must be >= 2"),
                                                 ("val_tokens", 0, "--val-tokens must be >= 1"), ("piece_mb", 0, "--piece-mb must be in")])
def test_out_of_range_options(tmp_path, teacher_dir, corpus_dir, field, value, message):
    with pytest.raises(ConfigError, match=message):
        small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", **{field: value})


def test_teacher_that_does_not_load(tmp_path, corpus_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(TeacherError, match=f"cannot load a tokenizer from '{broken}'"):
        build(small_config(broken, corpus_dir, tmp_path / "c.zarr"), progress=False)


def test_teacher_weights_that_do_not_load(tmp_path, teacher_dir, corpus_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TeacherError, match=f"cannot load the teacher model from '{broken}'"):
        build(small_config(broken, corpus_dir, tmp_path / "c.zarr"), progress=False)
    assert not (tmp_path / "c.zarr").exists()


def test_domain_too_small(tmp_path, teacher_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "tiny.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(Exception, match=r"domain 'tiny' has \d+ tokens; it needs at least 64 \(1 validation \+ 1 training sequence of 32 tokens\)"):
        build(small_config(teacher_dir, corpus, tmp_path / "c.zarr"), progress=False)
    assert not (tmp_path / "c.zarr").exists()


def test_newer_format_at_out_is_refused_as_such(tmp_path, built_cache, teacher_dir, corpus_dir):
    out = copy_cache(built_cache, tmp_path / "c.zarr", edit=lambda meta: meta.update(format_version=6))
    with pytest.raises(StoreError, match="has cache format version 6; this ddk-cache .* reads versions 1, 2, 3, 4, 5; upgrade ddk-cache"):
        build(small_config(teacher_dir, corpus_dir, out), progress=False)


def test_capped_build_sizes_validation_from_the_cap(tmp_path, teacher_dir, corpus_dir):
    """Default --val-tokens with a cap below 10% of a domain's validation share: validation
    takes its share of what the cap keeps (it used to be sized from the whole domain and
    leave no training sequence)."""
    config = small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", max_tokens_per_domain=160, val_tokens=1 << 20)
    meta = build(config, progress=False).meta
    for domain, info in meta.domains.items():
        assert info.val.sequences == 1, domain  # 10% of the 5 rows the cap keeps, at least 1
        assert info.train.sequences == 4, domain  # the cap's 160 tokens, less the validation row


def test_cap_too_small_says_raise_the_cap(tmp_path, teacher_dir, corpus_dir):
    with pytest.raises(Exception, match=r"domain 'alpha' keeps 40 tokens; it needs at least 64 .*raise --max-tokens-per-domain"):
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", max_tokens_per_domain=40), progress=False)


def test_resume_with_weights_changed_in_place_is_refused(tmp_path, teacher_dir, corpus_dir):
    """Weights rewritten between a kill and a resume, same file size: the whole-file hash sees
    it (the old fingerprint hashed only the first and last 64 KiB) and names the file."""
    import shutil

    from .helpers import partial_cache

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    out = partial_cache(teacher, corpus_dir, tmp_path / "c.zarr", shards=2)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    size = (teacher / "model.safetensors").stat().st_size
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a tensor in the middle of the file
    model.save_pretrained(teacher)
    assert (teacher / "model.safetensors").stat().st_size == size
    with pytest.raises(StoreError, match=r"the teacher differs \(cache: .*: weights changed \(model.safetensors\)\)"):
        build(small_config(teacher, corpus_dir, out), progress=False)


def test_vllm_only_options_are_refused_for_the_hf_backend(tmp_path, teacher_dir, corpus_dir):
    """They used to be dropped silently: a user asking for 2 GPUs per engine got one."""
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size applies to --backend vllm only; this build runs hf: drop it"):
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", tensor_parallel_size=2), progress=False)
    with pytest.raises(ConfigError, match=r"--gpu-memory-utilization, --engine-arg apply to --backend vllm only"):
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", gpu_memory_utilization=0.5, engine_args={"enforce_eager": True}),
              progress=False)
    assert not (tmp_path / "c.zarr").exists()
