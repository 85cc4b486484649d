"""A build killed with SIGKILL (no cleanup at all) and run again equals an uninterrupted build."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ddk_cache.build import build
from ddk_cache.store import SPLITS, Cache, CacheWriter

from .helpers import small_config


def build_argv(config) -> list[str]:
    return [
        sys.executable, "-c", "from ddk_cache.cli.main import main; main()", "build",
        "--teacher", config.teacher, "--data", config.data, "--out", config.out,
        "--top-k", str(config.top_k), "--seq-len", str(config.seq_len), "--val-sequences", str(config.val_sequences),
        "--shard-sequences", str(config.shard_sequences), "--batch-size", str(config.batch_size),
        "--device", "cpu", "--dtype", "float32", "--quiet",
    ]


@pytest.mark.slow
def test_sigkill_mid_build_then_resume(tmp_path, teacher_dir, corpus_dir, built_cache):
    out = tmp_path / "c.zarr"
    # Batch size 1 slows the teacher down enough to kill it between shards.
    config = small_config(teacher_dir, corpus_dir, out, batch_size=1)
    proc = subprocess.Popen(build_argv(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(glob.glob(str(out / "*" / "*" / "shard_done" / "c" / "*"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    pending = CacheWriter(str(out)).pending()
    assert 0 < len(pending) < len(CacheWriter(str(out)).shards())
    result = build(config, progress=False)
    assert result.shards_written == len(pending)
    a, b = Cache(str(out)), Cache(str(built_cache))
    for d in b.domains:
        for s in SPLITS:
            for name in ("tokens", "topk_ids", "topk_logprobs", "target_logprob", "seq_nll", "seq_topk_mass"):
                np.testing.assert_array_equal(a.root[f"{d}/{s}/{name}"][:], b.root[f"{d}/{s}/{name}"][:])
    assert a.meta["teacher_ppl"] == b.meta["teacher_ppl"]
