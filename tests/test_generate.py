"""`ddk-cache generate`: seeded samples with the log-prob of every sampled token, a file that
`build` reads as chat records, and a run killed midway that continues to the same file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from ddk_cache.capture.build import build
from ddk_cache.capture.teachers.vllm import vllm_available
from ddk_cache.cli.main import main
from ddk_cache.store.cache import Cache

from .helpers import CHAT_TEMPLATE, small_config


def prompts_file(path):
    lines = [{"prompt": "the market rose"}, {"messages": [{"role": "user", "content": "the knight rode"},
                                                          {"role": "assistant", "content": "dropped"}]}, {"prompt": "def return self"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def run(tmp_path, teacher_dir, out, *extra):
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    return CliRunner().invoke(main, ["generate", "--model", str(teacher_dir), "--prompts", str(prompts_file(tmp_path / "p.jsonl")),
                                     "--out", str(out), "--max-new-tokens", "12", "--seed", "3", "--samples-per-prompt", "2",
                                     "--chat-template", str(tmpl), "--device", "cpu", "--quiet", "--engine", "hf", *extra])


def check_rescoring(out, teacher_dir, engine):
    """Each recorded log-prob is the drawn token's under the distribution it was drawn from:
    softmax(logits / 0.8) cut to the 0.95 nucleus, from a full forward pass over the sample."""
    from transformers import AutoModelForCausalLM

    from ddk_cache.capture.generate import _processed
    from ddk_cache.capture.tokenization import load_tokenizer

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and records[2]["messages"][-1]["role"] == "assistant" and records[2]["messages"][-1]["content"] != "dropped"
    tok = load_tokenizer(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    for r in records:
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + r["response_ids"]])
        with torch.no_grad():
            logp = torch.stack([_processed(v, 0.8, 0.95) for v in model(input_ids=x).logits[0, len(ids) - 1: -1].float()])
        assert r["sample"]["engine"] == engine
        want = logp.gather(-1, torch.tensor(r["response_ids"]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r["logprobs"]), want, rtol=1e-4, atol=1e-4)
    assert records[0]["response_ids"] != records[1]["response_ids"]  # two samples of one prompt differ


def test_samples_and_their_logprobs_equal_a_rescoring(tmp_path, teacher_dir):
    out = tmp_path / "s" / "chat.jsonl"
    result = run(tmp_path, teacher_dir, out, "--temperature", "0.8", "--top-p", "0.95")
    assert result.exit_code == 0, result.output
    check_rescoring(out, teacher_dir, "hf")


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
@pytest.mark.slow
def test_vllm_samples_equal_a_rescoring_and_do_not_depend_on_the_batch(tmp_path, teacher_dir):
    """vLLM (one engine, as `generate` starts it): log-probs after temperature and top-p, and
    per-request seeds: 1 and 4 samples per call give the same file."""
    from ddk_cache.capture.generate import GenerateConfig, _VLLMSampler, generate

    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    cfg = GenerateConfig(model=str(teacher_dir), prompts=str(prompts_file(tmp_path / "p.jsonl")), out=str(tmp_path / "a.jsonl"),
                         max_new_tokens=12, seed=3, samples_per_prompt=2, temperature=0.8, top_p=0.95, chat_template=str(tmpl),
                         engine="vllm", dtype="float32", batch_size=1, engine_args={"enforce_eager": True})  # no graph compilation
    sampler = _VLLMSampler(cfg, 400)
    try:
        assert generate(cfg, llm=sampler.llm) == 6
        generate(dataclasses.replace(cfg, out=str(tmp_path / "b.jsonl"), batch_size=4), llm=sampler.llm)
    finally:
        sampler.close()
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    check_rescoring(tmp_path / "a.jsonl", teacher_dir, "vllm")


def test_the_same_command_gives_the_same_file_and_resumes(tmp_path, teacher_dir):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run(tmp_path, teacher_dir, a).exit_code == 0
    full = a.read_text()
    lines = full.splitlines(keepends=True)
    b.write_text("".join(lines[:2]) + lines[2][:15])  # killed while writing the third line
    assert run(tmp_path, teacher_dir, b).exit_code == 0
    assert b.read_text() == full
    # Complete: a re-run leaves the file alone (a cache built from it checks its mtime).
    before = b.stat().st_mtime_ns
    assert run(tmp_path, teacher_dir, b).exit_code == 0
    assert b.stat().st_mtime_ns == before
    # Other sampling settings would put two distributions in one file: refused, file untouched.
    other = run(tmp_path, teacher_dir, b, "--temperature", "0.5")
    assert other.exit_code == 1 and "holds samples drawn with other settings (temperature 1.0 there, 0.5 now)" in other.output
    assert b.stat().st_mtime_ns == before


def test_build_stores_the_samples_as_drawn_with_their_logprobs(tmp_path, teacher_dir):
    """The cache's tokens are the prompt's tokens then `response_ids` exactly (not the text
    re-tokenized), the loss mask covers the response, and `sample_logprob` holds `logprobs`."""
    from ddk_cache.capture.tokenization import load_tokenizer

    corpus = tmp_path / "corpus"
    assert run(tmp_path, teacher_dir, corpus / "samples.jsonl").exit_code == 0  # prompt + 12 tokens < --seq-len 64: none is cut
    out = tmp_path / "c.zarr"
    build(small_config(teacher_dir, corpus, out, seq_len=64, val_tokens=64, chat_template=CHAT_TEMPLATE), progress=False)
    cache = Cache(str(out))
    assert cache.is_chat("samples") and cache.is_sampled("samples")
    # A cache with generated samples is format 4 or later: a format-3 reader would weight them
    # wrongly, so it must refuse (an older ddk-cache reads versions 1-3 only). Every cache
    # written now is format 5 (meta.FORMAT_VERSION).
    assert cache.meta.format_version == 5
    import ddk_cache.store.meta as meta_module
    from ddk_cache.errors import StoreVersionError

    old_reader = pytest.MonkeyPatch()
    old_reader.setattr(meta_module, "READABLE_VERSIONS", (1, 2, 3))
    with pytest.raises(StoreVersionError, match="has cache format version 5; .* reads versions 1, 2, 3; upgrade ddk-cache"):
        Cache(str(out))
    old_reader.undo()
    tok = load_tokenizer(str(teacher_dir))
    records = {json.dumps(r["response_ids"]): r for r in map(json.loads, (corpus / "samples.jsonl").read_text().splitlines())}
    seen = 0
    for split in ("train", "val"):
        batch = cache.read("samples", split, 0, cache.num_sequences("samples", split))
        for tokens, mask, lp in zip(batch.tokens, batch.loss_mask, batch.sample_logprob):
            response = tokens[mask.astype(bool)].tolist()
            r = records[json.dumps(response)]
            prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
            head = tok(prompt, add_special_tokens=False)["input_ids"]
            assert tokens[: len(head)].tolist() == head and tokens[len(head): len(head) + len(response)].tolist() == r["response_ids"]
            assert lp[mask.astype(bool)].tolist() == [float(v) for v in torch.tensor(r["logprobs"], dtype=torch.float32)]
            assert not lp[~mask.astype(bool)].any()
            seen += 1
    assert seen == len(records)
    from ddk_cache.store.verify import verify_cache

    problems, checked = verify_cache(str(out))
    assert problems == [] and checked > 0  # sample_logprob included
    # The loader hands them over only where asked (MiniLLM's weights are their only use).
    import numpy as np

    from ddk_cache.train.data import CacheLoader

    for wanted in (True, False):
        with CacheLoader(cache, batch_size=2, weights=np.ones(1), seed=0, sample_logprobs=wanted) as loader:
            b = loader.next()
        assert (b.sample_logprob is not None) == wanted
        if wanted:  # row by row: the cache's values of the next tokens (position t predicts t + 1)
            every = cache.read("samples", "train", 0, cache.num_sequences("samples", "train"))
            for tokens, lp in zip(b.tokens.numpy(), b.sample_logprob.numpy()):
                row = int(np.flatnonzero((every.tokens == tokens).all(1))[0])
                assert lp.tolist() == every.sample_logprob[row, 1:].tolist()


def test_padded_output_rows_are_never_sampled(tmp_path, teacher_dir):
    """A student with more output rows than tokens (padded, as many real models are), whose
    padding rows take a good share of the mass: generate samples real tokens only, with the
    log-probs of the distribution over them, and build accepts the file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    model.resize_token_embeddings(432)
    with torch.no_grad():
        model.get_output_embeddings().weight[400:] = 50 * model.get_output_embeddings().weight[:400].mean(0)
    padded = tmp_path / "padded"
    model.save_pretrained(padded)
    for f in teacher_dir.glob("*token*"):
        (padded / f.name).write_bytes(f.read_bytes())
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    out = tmp_path / "corpus" / "samples.jsonl"
    res = CliRunner().invoke(main, ["generate", "--model", str(padded), "--prompts", str(prompts_file(tmp_path / "p.jsonl")), "--out", str(out),
                                    "--max-new-tokens", "12", "--samples-per-prompt", "2", "--chat-template", str(tmpl), "--device", "cpu",
                                    "--quiet", "--engine", "hf"])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(max(r["response_ids"]) < 400 for r in records)
    # Unrestricted, the 72 draws would almost surely have hit a padding row:
    x = torch.tensor([r["response_ids"] for r in records if len(r["response_ids"]) == 12])
    with torch.no_grad():
        pad_mass = torch.softmax(model(input_ids=x).logits, -1)[..., 400:].sum(-1).mean()
    assert pad_mass > 0.05
    build(small_config(teacher_dir, out.parent, tmp_path / "c.zarr", seq_len=64, val_tokens=64, chat_template=CHAT_TEMPLATE), progress=False)


def test_an_edited_sample_is_refused_with_its_place(tmp_path, teacher_dir):
    from ddk_cache.errors import CorpusError

    corpus = tmp_path / "corpus"
    assert run(tmp_path, teacher_dir, corpus / "samples.jsonl").exit_code == 0
    lines = (corpus / "samples.jsonl").read_text().splitlines()
    r = json.loads(lines[1])
    r["messages"][-1]["content"] += " edited"
    lines[1] = json.dumps(r)
    (corpus / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"samples.jsonl@\d+: the assistant message is not the decoding of 'response_ids'"):
        build(small_config(teacher_dir, corpus, tmp_path / "c.zarr", seq_len=64, val_tokens=64, chat_template=CHAT_TEMPLATE), progress=False)
    # A domain of generated samples and plain chat records is refused too.
    del r["response_ids"], r["logprobs"]
    lines[1] = json.dumps(r)
    (corpus / "samples.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match="mixes .* give each kind its own domain"):
        build(small_config(teacher_dir, corpus, tmp_path / "d.zarr", seq_len=64, val_tokens=64, chat_template=CHAT_TEMPLATE), progress=False)


def test_teacher_mixed_sampling_records_the_mixture_logprob(tmp_path, teacher_dir):
    """--mix-teacher: each token's recorded log-prob is log(a p + (1 - a) q) from full forward
    passes of both models over the sampled sequence (a = 0.2, MiniLLM's value); at a = 1 the
    samples are the teacher's own."""
    from transformers import AutoModelForCausalLM

    from ddk_cache.capture.tokenization import load_tokenizer

    from .helpers import make_student

    student = make_student(teacher_dir, tmp_path / "s", 32, 1)
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    tok = load_tokenizer(str(teacher_dir))
    models = {m: AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32) for m in (str(student), str(teacher_dir))}
    for alpha in (0.2, 1.0):
        out = tmp_path / f"mix-{alpha}.jsonl"
        res = CliRunner().invoke(main, ["generate", "--model", str(student), "--prompts", str(prompts_file(tmp_path / "p.jsonl")), "--out", str(out),
                                        "--max-new-tokens", "10", "--mix-teacher", str(teacher_dir), "--mix-alpha", str(alpha),
                                        "--chat-template", str(tmpl), "--device", "cpu", "--quiet"])
        assert res.exit_code == 0, res.output
        for r in map(json.loads, out.read_text().splitlines()):
            assert r["sample"]["engine"] == "hf" and r["sample"]["mix_alpha"] == alpha
            prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids + r["response_ids"]])
            y = torch.tensor(r["response_ids"]).unsqueeze(-1)
            with torch.no_grad():
                q, p = (torch.log_softmax(models[m](input_ids=x).logits[0, len(ids) - 1: -1].float(), -1).gather(-1, y).squeeze(-1)
                        for m in (str(student), str(teacher_dir)))
            want = p if alpha == 1 else torch.log(alpha * p.exp() + (1 - alpha) * q.exp())
            torch.testing.assert_close(torch.tensor(r["logprobs"]), want, rtol=1e-4, atol=1e-4)


def test_bad_prompts_name_file_and_line(tmp_path, teacher_dir):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    result = CliRunner().invoke(main, ["generate", "--model", str(teacher_dir), "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"),
                                       "--chat-template", CHAT_TEMPLATE, "--quiet"])
    assert result.exit_code == 1 and f"{p}:2: expected {{'prompt': ...}} or {{'messages': [...]}}" in result.output


def test_vllm_engine_arguments_are_refused_where_transformers_samples(tmp_path, teacher_dir):
    result = run(tmp_path, teacher_dir, tmp_path / "a.jsonl", "--engine-arg", "enforce_eager=true")
    assert result.exit_code != 0 and "--engine-arg applies to vLLM only; this run samples with transformers: drop it" in result.output
    assert not (tmp_path / "a.jsonl").exists()
