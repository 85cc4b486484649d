"""Two ranks (gloo, CPU) train exactly what one process trains: DDP and FSDP2, losses and
final weights; checkpoints resume onto another number of ranks.

The loader splits one shared draw over the ranks, and the loss is normalised by the
global count of positions that carry loss, so 2 ranks x batch 2 is the same step as
1 process x batch 4: the only difference allowed is float summation order."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddk_cache.train.distill import distill

from .helpers import distill_config

pytestmark = pytest.mark.slow

COMMON = dict(max_steps=4, ddk_interval=2, warmup_steps=2, lr=1e-3, eval_batch_size=3, save_every=2)


def records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def torchrun(tmp_path, built_cache, student, out, *extra, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "ddk_cache", "distill",
           "--cache", str(built_cache), "--student", str(student), "--out", str(out), "--batch-size", "2", "--device", "cpu", "--quiet",
           *[x for k, v in COMMON.items() for x in (f"--{k.replace('_', '-')}", str(v))], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher_dir):
    from .helpers import make_student

    return make_student(teacher_dir, tmp_path_factory.mktemp("s") / "student", hidden_size=32, layers=2)


@pytest.fixture(scope="module")
def single(tmp_path_factory, built_cache, student):
    # The reference recomputes each loss chunk's logits in the backward pass; the ranks use the
    # default fused head loss: equality also shows the fused gradients right under DDP and FSDP2.
    out = tmp_path_factory.mktemp("single") / "run"
    distill(distill_config(built_cache, student, out, batch_size=4, loss_impl="recompute", **COMMON), progress=False)
    return out


@pytest.mark.parametrize("mode,port", [("ddp", 29541), ("fsdp", 29542)])
def test_two_ranks_equal_one_process(tmp_path, built_cache, student, single, mode, port):
    out = tmp_path / mode
    torchrun(tmp_path, built_cache, student, out, *(["--fsdp"] if mode == "fsdp" else []), port=port)
    a, b = records(single, "step"), records(out, "step")
    assert [s["step"] for s in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["tokens"] == x["tokens"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    for x, y in zip(records(single, "eval"), records(out, "eval")):
        for d in x["weights"]:
            assert y["weights"][d] == pytest.approx(x["weights"][d], rel=1e-6)
            assert y["ppl_student"][d] == pytest.approx(x["ppl_student"][d], rel=1e-5)
    ref, got = load_file(single / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


def test_fsdp_checkpoint_resumes_on_one_process(tmp_path, built_cache, student, single):
    """A checkpoint saved by 2 FSDP ranks (one file set per rank) resumes on 1 process: the
    global draw and the loss are the same, so steps 3-4 continue the 2-rank run."""
    out = tmp_path / "fsdp"
    torchrun(tmp_path, built_cache, student, out, "--fsdp", port=29543)
    ckpt = out / "checkpoints" / "step_00000002"
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one file set per rank
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    result = distill(distill_config(built_cache, student, resumed, batch_size=4, resume=True, **COMMON), progress=False)
    assert result.steps == 4 and len(result.losses) == 2
    for x, y in zip(records(out, "step")[2:], records(resumed, "step")[2:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def untied(tmp_path_factory, teacher_dir):
    """A student whose output head is its own matrix (most large models tie it; many do not)."""
    from transformers import AutoModelForCausalLM

    from .helpers import make_student

    path = make_student(teacher_dir, tmp_path_factory.mktemp("s") / "tied", hidden_size=32, layers=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    out = tmp_path_factory.mktemp("s") / "untied"
    model.save_pretrained(out)
    for f in path.glob("*token*"):
        shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("mode,port,tie", [("ddp", 29544, "tied"), ("fsdp", 29545, "tied"), ("ddp", 29546, "untied")])
def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path, request, built_cache, mode, port, tie):
    """A checkpoint of a 1-process run resumes under 2 ranks (DDP or FSDP): steps 3-4 continue
    the 1-process run (DCP reshards; the loader's global draw is the same)."""
    student = request.getfixturevalue("student" if tie == "tied" else "untied")
    one = tmp_path / "one"
    distill(distill_config(built_cache, student, one, batch_size=4, **COMMON), progress=False)
    resumed = tmp_path / "resumed"
    ckpt = one / "checkpoints" / "step_00000002"
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    shutil.copy(one / "metrics.jsonl", resumed / "metrics.jsonl")
    torchrun(tmp_path, built_cache, student, resumed, "--resume", *(["--fsdp"] if mode == "fsdp" else []), port=port)
    for x, y in zip(records(one, "step")[2:], records(resumed, "step")[2:]):
        assert y["step"] == x["step"] and y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert len(records(resumed, "step")) == 4


@pytest.fixture(scope="module")
def pretrain_cache(tmp_path_factory, teacher_dir, corpus_dir):
    """A tokens-only cache of the corpus: the pre-training text of --pretrain-cache."""
    from ddk_cache.capture.build import build

    from .helpers import small_config

    out = tmp_path_factory.mktemp("pt") / "pt.zarr"
    build(small_config(teacher_dir, corpus_dir, out, top_k=0, seed=7), progress=False)
    return out


@pytest.mark.parametrize("mode,port", [("ddp", 29547), ("fsdp", 29548)])
def test_pretraining_term_on_two_ranks_equals_one_process_and_resumes(tmp_path, built_cache, student, pretrain_cache, mode, port):
    """With --pretrain-cache each micro-batch runs two forward/backward passes and only the
    last synchronises: 2 ranks still train what 1 process trains, and the 1-process run
    resumed from its step-2 checkpoint (the second loader's state included) continues it."""
    extra = {"pretrain_cache": str(pretrain_cache), "pretrain_weight": 0.5}
    one = tmp_path / "one"
    distill(distill_config(built_cache, student, one, batch_size=4, **COMMON, **extra), progress=False)
    two = tmp_path / mode
    torchrun(tmp_path, built_cache, student, two, "--pretrain-cache", str(pretrain_cache), "--pretrain-weight", "0.5",
             *(["--fsdp"] if mode == "fsdp" else []), port=port)
    for x, y in zip(records(one, "step"), records(two, "step")):
        assert y["pretrain_ce"] == pytest.approx(x["pretrain_ce"], rel=1e-5) and y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert len(records(two, "step")) == 4
    if mode == "ddp":
        resumed = tmp_path / "resumed"
        ckpt = one / "checkpoints" / "step_00000002"
        shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
        shutil.copy(one / "metrics.jsonl", resumed / "metrics.jsonl")
        distill(distill_config(built_cache, student, resumed, batch_size=4, resume=True, **COMMON, **extra), progress=False)
        for x, y in zip(records(one, "step")[2:], records(resumed, "step")[2:]):
            assert y["pretrain_ce"] == pytest.approx(x["pretrain_ce"], rel=1e-6) and y["loss"] == pytest.approx(x["loss"], rel=1e-6)


def test_two_ranks_equal_one_process_across_tokenizers(tmp_path, built_cache):
    """A student of another tokenizer under FSDP2 on 2 ranks: each rank converts its share of
    the draw (rows padded to its own longest, padding carries nothing) and scores its slice of
    the validation text; losses, DDK weights (per byte) and weights equal one process's."""
    from ddk_cache.models import ModelSpec, init_model, train_tokenizer

    from .helpers import WORDS, make_docs

    tok = train_tokenizer([doc for d in WORDS for doc in make_docs(d, 30, seed=7)], 300, add_bos=True)
    other = tmp_path / "other"
    init_model(ModelSpec(vocab_size=len(tok), hidden_size=32, layers=2, heads=1, max_position_embeddings=256, seed=3), tok).save_pretrained(other)
    tok.save_pretrained(other)
    single = tmp_path / "single"
    distill(distill_config(built_cache, other, single, batch_size=4, **COMMON), progress=False)
    out = tmp_path / "fsdp"
    torchrun(tmp_path, built_cache, other, out, "--fsdp", port=29549)
    a, b = records(single, "step"), records(out, "step")
    assert len(b) == 4 and all(s["crosstok"]["paired"] < 1 for s in a)
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["kd"] == pytest.approx(x["kd"], rel=1e-5)
    for x, y in zip(records(single, "eval"), records(out, "eval")):
        assert y["ddk_unit"] == "byte"
        for d in x["weights"]:
            assert y["weights"][d] == pytest.approx(x["weights"][d], rel=1e-6)
            assert y["bpb_student"][d] == pytest.approx(x["bpb_student"][d], rel=1e-5)
    ref, got = load_file(single / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
