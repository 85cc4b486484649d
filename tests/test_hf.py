"""The cache from other trainers: the Hugging Face Trainer path equals `ddk-cache distill`, and
the README's "Use it from your own trainer" code runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ddk_cache.train.dataset import CacheDataset, DomainWeightedSampler, collate
from ddk_cache.train.distill import distill

from .helpers import distill_config, make_student

README = Path(__file__).resolve().parents[1] / "README.md"


def test_sampler_draws_the_distill_loaders_batches(built_cache):
    from ddk_cache.store.cache import Cache
    from ddk_cache.train.data import CacheLoader

    ds = CacheDataset(str(built_cache))
    w = [0.5, 0.3, 0.2]
    sampler = DomainWeightedSampler(ds, w, batch_size=3, seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate)
    with CacheLoader(Cache(str(built_cache)), batch_size=3, weights=np.array(w), seed=4) as ref:
        for batch, _ in zip(loader, range(4)):
            expected = ref.next()
            assert torch.equal(batch["input_ids"], expected.tokens)
            assert torch.equal(batch["topk_ids"], expected.topk_ids.long())
            assert torch.equal(batch["topk_logprobs"], expected.topk_logprobs)
            assert batch["domain"].tolist() == expected.domains.tolist()


def distill_and_trainer(tmp_path, cache, student, **dataset_args):
    """The same run twice: `ddk-cache distill`, and DistillationTrainer + DDKCallback on a
    CacheDataset (same student, batches, optimizer, schedule, DDK settings). Returns
    (distill's losses, the Trainer's, distill's DDK weights, the Trainer's, the dataset)."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from ddk_cache.hf import DDKCallback, DistillationTrainer
    from ddk_cache.train.distill import DistillConfig, _optimizer, lr_at

    common = dict(max_steps=4, ddk_interval=2, warmup_steps=2, lr=1e-3, batch_size=4, eval_batch_size=4, kd_weight=0.3, kd_loss="fkl")
    distill(distill_config(cache, student, tmp_path / "distill", **common), progress=False)
    records = [json.loads(line) for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    want = [r["loss"] for r in records if r["type"] == "step"]
    want_weights = [r["weights"] for r in records if r["type"] == "eval"][:-1]  # the last is the final report

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    cfg = DistillConfig(cache=str(cache), out="-", student=str(student), **common)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg, cfg.max_steps) / cfg.lr)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=4, max_grad_norm=1.0,
                             seed=0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", dataloader_num_workers=0)
    losses = []

    class Recording(DistillationTrainer):
        def compute_loss(self, *a, **kw):
            loss = super().compute_loss(*a, **kw)
            losses.append(loss.item())
            return loss

    data = CacheDataset(str(cache), **dataset_args)
    trainer = Recording(model=model, args=args, train_dataset=data, kd_loss="fkl", kd_weight=0.3, optimizers=(opt, sched))
    ddk = DDKCallback(trainer, every=2, eval_batch_size=4)
    trainer.add_callback(ddk)
    trainer.train()
    return want, losses, want_weights, [h["weights"] for h in ddk.controller.history], data


@pytest.mark.parametrize("data", ["text", "chat"])
def test_hf_trainer_steps_equal_ddk_distill(tmp_path, request, teacher_dir, data):
    """Same student, batches, optimizer, schedule and DDK settings: the Trainer's losses are
    distill's, step for step, and so are its DDK weights (text, and chat with prompt masks)."""
    built_cache = request.getfixturevalue("built_cache" if data == "text" else "chat_cache")
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    want, losses, want_weights, got_weights, _ = distill_and_trainer(tmp_path, built_cache, student)
    assert losses == pytest.approx(want, rel=1e-5)
    for a, b in zip(got_weights, want_weights):
        for d in a:
            assert a[d] == pytest.approx(b[d], rel=1e-6)
    assert len(got_weights) == len(want_weights)


def python_blocks(heading: str) -> list[str]:
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_readme_own_trainer_code_runs(tmp_path, built_cache, teacher_dir, monkeypatch):
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks("## Use it from your own trainer")
    assert len(blocks) >= 2
    for code in blocks:
        code = code.replace('"cache.zarr"', repr(str(built_cache))).replace('"student/"', repr(str(student)))
        code = code.replace("max_steps=300", "max_steps=4").replace("step == 300", "step == 4").replace("every=100", "every=2")
        code = code.replace("step % 100", "step % 2").replace('report_to=["tensorboard"]', "report_to=[], use_cpu=True")
        exec(compile(code, str(README), "exec"), {})


def test_distill_writes_tensorboard_events(tmp_path, built_cache, teacher_dir):
    pytest.importorskip("tensorboard")
    student = make_student(teacher_dir, tmp_path / "student", 32, 1)
    distill(distill_config(built_cache, student, tmp_path / "run", max_steps=2, report_to="tensorboard"), progress=False)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # metrics.jsonl stays


def test_a_tied_head_left_on_the_meta_device_is_tied_again(tmp_path, monkeypatch):
    """transformers 5.19 once returned a tied output head untied and on the meta device in a
    long-lived process (the full suite); load_causal_lm ties it again, and names any other
    parameter that has no weights instead of failing later in `.to()`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ddk_cache.errors import ConfigError
    from ddk_cache.runtime import load_causal_lm

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(torch.tensor([[1, 2, 3]])).logits
    real = AutoModelForCausalLM.from_pretrained

    def loses(*names):
        def load(*args, **kwargs):
            model = real(*args, **kwargs)
            for name in names:
                owner, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
                setattr(owner, attr, torch.nn.Parameter(torch.empty_like(getattr(owner, attr), device="meta")))
            return model
        return load

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loses("lm_head.weight"))
    model = load_causal_lm(str(tmp_path / "m"))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    torch.testing.assert_close(model.to("cpu")(torch.tensor([[1, 2, 3]])).logits, expected, rtol=0, atol=0)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loses("lm_head.weight", "model.norm.weight"))
    with pytest.raises(ConfigError, match=r"the checkpoint holds no weights for model\.norm\.weight; is it complete\?"):
        load_causal_lm(str(tmp_path / "m"))


def test_hf_trainer_with_another_tokenizer_equals_distill(tmp_path, built_cache):
    """A CacheDataset in another tokenizer's ids with DistillationTrainer and DDKCallback: the
    losses of `ddk-cache distill` with that student, step for step (the hybrid loss on the
    same converted batches), and the same DDK weights (judged per byte)."""
    from ddk_cache.models import ModelSpec, init_model, train_tokenizer

    from .helpers import WORDS, make_docs

    tok = train_tokenizer([doc for d in WORDS for doc in make_docs(d, 30, seed=7)], 300, add_bos=True)
    student = tmp_path / "student"
    init_model(ModelSpec(vocab_size=len(tok), hidden_size=32, layers=1, heads=1, max_position_embeddings=256, seed=3), tok).save_pretrained(student)
    tok.save_pretrained(student)
    want, losses, want_weights, got_weights, data = distill_and_trainer(tmp_path, built_cache, student, student_tokenizer=str(student),
                                                                        max_len=256)
    assert losses == pytest.approx(want, rel=1e-5)
    assert len(got_weights) == len(want_weights)
    for a, b in zip(got_weights, want_weights):
        assert list(a.values()) == pytest.approx(list(b.values()), rel=1e-6)
    items = data.__getitems__([0, 1])
    batch = collate([items[0], {k: v[:-3] if v.dim() else v for k, v in items[1].items()}])  # rows of two lengths
    assert batch["labels"][1, -3:].eq(-100).all() and batch["topk_logprobs"][1, -3:].isneginf().all()
