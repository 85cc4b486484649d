"""`ddk-cache generate`: seeded samples with the log-prob of every sampled token, a file that
`build` reads as chat records, and a run killed midway that continues to the same file."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from ddk_cache.capture.build import build
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
                                     "--chat-template", str(tmpl), "--device", "cpu", "--quiet", *extra])


def test_samples_and_their_logprobs_equal_a_rescoring(tmp_path, teacher_dir):
    from transformers import AutoModelForCausalLM

    from ddk_cache.capture.tokenization import load_tokenizer

    out = tmp_path / "s" / "chat.jsonl"
    result = run(tmp_path, teacher_dir, out)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and records[2]["messages"][-1]["role"] == "assistant" and records[2]["messages"][-1]["content"] != "dropped"
    tok = load_tokenizer(str(teacher_dir))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    for r in records:
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + r["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0, len(ids) - 1: -1].float(), -1)
        want = logp.gather(-1, torch.tensor(r["response_ids"]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(r["logprobs"]), want, rtol=1e-4, atol=1e-4)
    assert records[0]["response_ids"] != records[1]["response_ids"]  # two samples of one prompt differ


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


def test_build_reads_the_samples_as_chat_records(tmp_path, teacher_dir):
    corpus = tmp_path / "corpus"
    assert run(tmp_path, teacher_dir, corpus / "samples.jsonl", "--max-new-tokens", "20").exit_code == 0
    out = tmp_path / "c.zarr"
    build(small_config(teacher_dir, corpus, out, seq_len=64, val_tokens=64, chat_template=CHAT_TEMPLATE), progress=False)
    cache = Cache(str(out))
    assert cache.is_chat("samples")
    batch = cache.read("samples", "train", 0, cache.num_sequences("samples", "train"))
    assert batch.loss_mask[:, 1:].any(axis=1).all()


def test_bad_prompts_name_file_and_line(tmp_path, teacher_dir):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    result = CliRunner().invoke(main, ["generate", "--model", str(teacher_dir), "--prompts", str(p), "--out", str(tmp_path / "o.jsonl"),
                                       "--chat-template", CHAT_TEMPLATE, "--quiet"])
    assert result.exit_code == 1 and f"{p}:2: expected {{'prompt': ...}} or {{'messages': [...]}}" in result.output
