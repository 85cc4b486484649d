"""Chat data: the chat template formats it, only the assistant's tokens carry loss, and the
build, the teacher PPL table, evaluation, the dataset and the trainer all respect that."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddk_cache.capture.build import build
from ddk_cache.capture.tokenization import chat_tokens, load_tokenizer
from ddk_cache.errors import CorpusError
from ddk_cache.store.cache import Cache
from ddk_cache.train.data import IGNORE_INDEX
from ddk_cache.train.dataset import CacheDataset, collate
from ddk_cache.train.evaluate import evaluate_domains

from .helpers import (
    CHAT_TEMPLATE,
    chat_records,
    distill_config,
    make_student,
    small_config,
    write_chat_corpus,
)


def expected_assistant_text(record: dict) -> str:
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    return "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")


def test_mask_is_the_assistant_tokens_token_by_token(chat_cache, teacher_dir):
    cache = Cache(str(chat_cache))
    tok = load_tokenizer(str(teacher_dir))
    assert cache.is_chat("chat") and not cache.is_chat("alpha")
    assert "loss_mask" in cache.array_names("chat") and "loss_mask" not in cache.array_names("alpha")
    by_tokens, with_loss = {}, 0
    for record in chat_records(80):
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        ids, mask = chat_tokens(tok, messages, CHAT_TEMPLATE)
        by_tokens[tuple(ids[:64])] = (record, ids, mask)
        with_loss += bool(mask[1:64].any())  # the others are left out (no loss within seq-len)
        # The template's own rendering, independently: the masked tokens spell the assistant's turns.
        assert tok.decode(ids[mask == 1]) == expected_assistant_text(record)
        assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False, chat_template=CHAT_TEMPLATE)
    seen = 0
    for split in ("train", "val"):
        batch = cache.read("chat", split, 0, cache.num_sequences("chat", split))
        for row, mask in zip(batch.tokens, batch.loss_mask):
            n = int(np.argmax(row == tok.pad_token_id)) if (row == tok.pad_token_id).any() else len(row)
            record, ids, want = by_tokens[tuple(row[:n].tolist())]  # each sequence is one whole sample (or its first 64 tokens)
            np.testing.assert_array_equal(mask[:n], want[:n])
            assert (mask[n:] == 0).all() and (row[n:] == tok.pad_token_id).all()  # padding carries no loss
            seen += 1
    assert seen == with_loss > 40  # one sequence per sample that carries loss, none packed together


def test_the_teacher_table_counts_only_masked_positions(chat_cache):
    cache = Cache(str(chat_cache))
    for split in ("train", "val"):
        batch = cache.read("chat", split, 0, cache.num_sequences("chat", split))
        carry = batch.loss_mask[:, 1:].astype(bool)
        entry = cache.meta.ppl("chat", split)
        assert entry.predicted_tokens == carry.sum() == cache.meta.domains["chat"].split(split).loss_positions
        assert entry.ppl == pytest.approx(float(np.exp(-batch.target_logprob[carry].astype(np.float64).mean())), rel=1e-9)
        text = cache.read("alpha", split, 0, cache.num_sequences("alpha", split))
        assert cache.meta.ppl("alpha", split).predicted_tokens == text.target_logprob.size


def test_evaluation_counts_only_masked_positions(chat_cache, teacher_dir):
    from transformers import AutoModelForCausalLM

    cache = Cache(str(chat_cache))
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    ppl = evaluate_domains(model, cache, batch_size=3)
    batch = cache.read("chat", "val", 0, cache.num_sequences("chat", "val"))
    x = torch.from_numpy(batch.tokens).long()
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[..., 0]
    carry = torch.from_numpy(batch.loss_mask[:, 1:].astype(bool))
    assert ppl["chat"] == pytest.approx(float(torch.exp(-lp[carry].double().mean())), rel=1e-5)
    # The teacher scored the same positions: its PPL on them is the table's.
    assert ppl["chat"] == pytest.approx(cache.teacher_ppl("chat", "val"), rel=1e-4)


def test_dataset_labels_and_loaders(chat_cache):
    ds = CacheDataset(str(chat_cache))
    item = ds[ds.index_of(ds.domains.index("chat"), 0)]
    cache = Cache(str(chat_cache))
    mask = cache.loss_mask("chat", "train", [0])[0].astype(bool)
    labels = item["labels"].numpy()
    assert labels[0] == IGNORE_INDEX
    np.testing.assert_array_equal(labels[1:][mask[1:]], item["input_ids"].numpy()[1:][mask[1:]])
    assert (labels[1:][~mask[1:]] == IGNORE_INDEX).all()
    assert item["topk_ids"].shape == (63, 8) and item["domain"].item() == ds.domains.index("chat")
    # Two DataLoader workers give the same batches as none.
    plain = list(torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate))
    workers = list(torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate, num_workers=2))
    for a, b in zip(plain, workers):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # A DistributedSampler of 2 ranks splits the same samples (the dataset does not shard itself).
    per_rank = []
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(0)
        rows = [tuple(r.tolist()) for batch in torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate)
                for r in batch["input_ids"]]
        per_rank.append(rows)
    single = [tuple(r.tolist()) for b in plain for r in b["input_ids"]]
    indices = [list(torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=3)) for r in range(2)]
    assert per_rank[0] + per_rank[1] == [single[i] for i in indices[0] + indices[1]]  # exactly the sampler's split
    assert set(per_rank[0]) | set(per_rank[1]) == set(single)


def test_distill_trains_on_the_assistant_tokens_only(chat_cache, tmp_path, teacher_dir):
    from transformers import AutoModelForCausalLM

    from ddk_cache.train.data import CacheLoader
    from ddk_cache.train.distill import distill
    from ddk_cache.train.losses import KDConfig, kd_loss

    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    distill(distill_config(chat_cache, student, tmp_path / "run", max_steps=2, kd_weight=0.3), progress=False)
    first = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    weights = np.array([first[0]["weights"][d] for d in Cache(str(chat_cache)).domains])
    with CacheLoader(Cache(str(chat_cache)), batch_size=4, weights=weights, seed=0) as loader:
        batch = loader.next()
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    logits = model(input_ids=batch.tokens).logits
    labels = torch.cat([torch.full_like(batch.tokens[:, :1], IGNORE_INDEX), batch.labels()], 1)
    expected = kd_loss(logits, labels, batch.topk_ids, batch.topk_logprobs, config=KDConfig("fkl"), kd_weight=0.3)
    assert first[1]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_chat_records_need_a_template(tmp_path, teacher_dir):
    corpus = write_chat_corpus(tmp_path / "corpus", n=20)
    with pytest.raises(CorpusError, match="the tokenizer of .* has no chat template; pass --chat-template FILE"):
        build(small_config(teacher_dir, corpus, tmp_path / "c.zarr", seq_len=64), progress=False)


def test_text_and_chat_records_in_one_domain_are_refused(tmp_path, teacher_dir):
    (tmp_path / "corpus").mkdir()
    lines = [json.dumps({"text": "a plain document " * 5})] + [json.dumps(r) for r in chat_records(5)]
    (tmp_path / "corpus" / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match="mixes chat records and plain-text records"):
        build(small_config(teacher_dir, tmp_path / "corpus", tmp_path / "c.zarr", seq_len=64, chat_template=CHAT_TEMPLATE), progress=False)


def test_samples_without_loss_within_seq_len_are_left_out(tmp_path, teacher_dir):
    """A sample whose prompt fills the whole sequence would carry no loss (and make its
    domain's perplexities 0/0): it is left out and counted; a domain of only such samples
    is an error that says what to do."""
    records = chat_records(60)
    long_prompt = " ".join(["the market rose"] * 40)  # far beyond 64 tokens
    for i in range(0, 60, 6):
        records[i] = {"prompt": long_prompt, "response": "the bank held"}
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = load_tokenizer(str(teacher_dir))
    as_messages = lambda r: r.get("messages") or [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
    no_loss = sum(not chat_tokens(tok, as_messages(r), CHAT_TEMPLATE)[1][1:64].any() for r in records)
    assert no_loss >= 10  # the long prompts, and multi-turn samples whose answer starts late
    result = build(small_config(teacher_dir, tmp_path / "corpus", tmp_path / "c.zarr", seq_len=64, val_tokens=128,
                                chat_template=CHAT_TEMPLATE), progress=False)
    assert result.chat_no_loss == {"chat": no_loss}
    cut = sum(len(ids) > 64 and mask[1:64].any() for ids, mask in (chat_tokens(tok, as_messages(r), CHAT_TEMPLATE) for r in records))
    assert cut > 0 and result.chat_cut == {"chat": cut}  # kept, their ends lost: counted too
    cache = Cache(str(tmp_path / "c.zarr"))
    assert cache.num_sequences("chat", "train") + cache.num_sequences("chat", "val") == 60 - no_loss
    for split in ("train", "val"):
        mask = cache.read("chat", split, 0, cache.num_sequences("chat", split)).loss_mask
        assert mask[:, 1:].any(axis=1).all()  # every sequence carries loss
    assert np.isfinite(cache.teacher_ppl("chat", "val"))

    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "chat.jsonl").write_text(json.dumps({"prompt": long_prompt, "response": "x"}) + "\n")
    with pytest.raises(CorpusError, match="none of its 1 chat samples has an assistant token within the first 64 tokens; raise --seq-len"):
        build(small_config(teacher_dir, tmp_path / "only", tmp_path / "d.zarr", seq_len=64, chat_template=CHAT_TEMPLATE), progress=False)
