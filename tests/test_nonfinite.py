"""Bad teacher output never enters a cache: NaN from the teacher stops the build with one line
naming where (the cache stays resumable), or, with --on-nonfinite skip, those sequences get
label-only targets and are counted."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ddk_cache.capture.build import build
from ddk_cache.cli.main import main
from ddk_cache.errors import TeacherError
from ddk_cache.store.cache import Cache
from ddk_cache.store.verify import verify_cache

from .helpers import small_config


@pytest.fixture(scope="module")
def broken_teacher(tmp_path_factory, teacher_dir, built_cache):
    """The tests' teacher with one token's embedding set to NaN: every sequence holding that
    token gets NaN logits from its position on (as a bf16 overflow in one row would)."""
    cache = Cache(str(built_cache))
    rows = cache.tokens("alpha", "train", np.arange(cache.num_sequences("alpha", "train")))
    counts = {t: int((rows == t).any(1).sum()) for t in np.unique(rows)}
    token = min((t for t, n in counts.items() if 0 < n < len(rows) // 2), key=lambda t: (-counts[t], t))
    out = tmp_path_factory.mktemp("broken") / "teacher"
    shutil.copytree(teacher_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(out)
    return out, int(token)


def test_nan_stops_the_build_naming_where(tmp_path, broken_teacher, corpus_dir):
    teacher, token = broken_teacher
    out = tmp_path / "c.zarr"
    with pytest.raises(TeacherError, match=r"gave non-finite output \(NaN log-probabilities\) for \w+/(train|val) sequence \d+, "
                                           r"predicted position \d+: the build stopped .* --on-nonfinite skip"):
        build(small_config(teacher, corpus_dir, out), progress=False)
    assert Cache(str(out), require_complete=False).meta.state == "building"  # resumable, not complete
    # The thread that gathers shards ahead of the teacher ends with the build, not blocked on
    # its queue for the rest of the process (a library user retrying builds would pile them up).
    gatherers = [t for t in threading.enumerate() if t.name == "ddk-cache-gather"]
    for t in gatherers:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in gatherers)
    result = CliRunner().invoke(main, ["build", "--teacher", str(teacher), "--data", str(corpus_dir), "--out", str(tmp_path / "d.zarr"),
                                       "--top-k", "8", "--seq-len", "32", "--val-tokens", "64", "--shard-sequences", "4",
                                       "--device", "cpu", "--backend", "hf", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "non-finite output" in result.output


@pytest.mark.parametrize("encoding", ["pack", "plain"])
def test_skip_gives_label_only_targets_and_counts_them(tmp_path, broken_teacher, corpus_dir, built_cache, encoding):
    teacher, token = broken_teacher
    out = tmp_path / "c.zarr"
    # Started with the default (stop) and resumed with skip: the same cache as skip from the start.
    with pytest.raises(TeacherError):
        build(small_config(teacher, corpus_dir, out, encoding=encoding), progress=False)
    meta = build(small_config(teacher, corpus_dir, out, encoding=encoding, on_nonfinite="skip"), progress=False).meta
    cache, good = Cache(str(out)), Cache(str(built_cache))
    skipped = 0
    for d in cache.domains:
        for split in ("train", "val"):
            batch = cache.read(d, split, 0, cache.num_sequences(d, split))
            broken = (batch.tokens[:, :-1] == token).any(1)
            assert meta.domains[d].split(split).nonfinite == int(broken.sum())
            skipped += int(broken.sum())
            # label-only targets: the next token with probability 1
            np.testing.assert_array_equal(batch.topk_ids[broken][..., 0], batch.tokens[broken][:, 1:])
            assert (batch.topk_logprobs[broken][..., 0] == 0).all() and (batch.target_logprob[broken] == 0).all()
            # the others are the good teacher's, and the PPL table counts only them
            ref = good.read(d, split, 0, good.num_sequences(d, split))
            if encoding == "plain":
                np.testing.assert_array_equal(batch.topk_logprobs[~broken], ref.topk_logprobs[~broken])
            assert meta.ppl(d, split).predicted_tokens == int((~broken).sum()) * (cache.seq_len - 1)
    assert skipped > 0
    problems, _ = verify_cache(str(out))
    assert problems == []
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert "sequences with label-only targets (non-finite teacher output, --on-nonfinite skip): alpha/train" in shown.output
