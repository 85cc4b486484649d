"""A build killed with SIGKILL (no cleanup at all) and run again equals an uninterrupted build."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from ddk_cache.capture.build import build
from ddk_cache.store.cache import Cache, CacheWriter

from .helpers import build_argv, small_config
from .test_build import all_arrays


def shards_logged(out) -> int:
    """Shards recorded as written in the build logs so far (a partial last line does not count)."""
    return sum(line.endswith("}") for f in glob.glob(str(out / "_build" / "log" / "*.jsonl")) for line in open(f).read().splitlines())


def pieces_staged(out) -> int:
    return len(glob.glob(str(out / "_build" / "pieces" / "*" / "*.idx")))


@pytest.mark.slow
def test_sigkill_mid_build_then_resume(tmp_path, teacher_dir, corpus_dir, pack_cache):
    """With the default encoding: each shard is one object (a bundle of tokens and targets)."""
    out = tmp_path / "c.zarr"
    # Batch size 1 slows the teacher down enough to kill it between shards.
    config = small_config(teacher_dir, corpus_dir, out, batch_size=1, encoding="pack")
    proc = subprocess.Popen(build_argv(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shards_logged(out) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    pending = CacheWriter(str(out)).pending()
    assert 0 < len(pending) < len(CacheWriter(str(out)).shards())
    result = build(config, progress=False)
    assert result.shards_written == len(pending)
    assert Cache(str(out)).meta.bundled
    assert_same_cache(out, pack_cache)


@pytest.mark.slow
def test_sigkill_during_tokenization_then_resume(tmp_path, teacher_dir, corpus_dir, built_cache):
    """Killed while staging tokenized pieces: the rerun stages only the missing pieces and
    the cache equals an uninterrupted build."""
    out = tmp_path / "c.zarr"
    config = small_config(teacher_dir, corpus_dir, out, piece_mb=0.0002)  # ~200-byte pieces: many of them
    proc = subprocess.Popen(build_argv(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and pieces_staged(out) < 5:
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished tokenizing before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    staged = pieces_staged(out)
    assert Cache(str(out), require_complete=False).meta.state == "initializing" and staged >= 5
    tokenized = []
    build(config, progress=False, hook=lambda ev, info: tokenized.append(info) if ev == "piece_tokenized" else None)
    assert 0 < len(tokenized) and staged + len(tokenized) >= pieces_staged(out)
    reference = tmp_path / "reference.zarr"
    build(small_config(teacher_dir, corpus_dir, reference, piece_mb=0.0002), progress=False)
    assert_same_cache(out, reference)


def assert_same_cache(path, reference, table_bytes: bool = True) -> None:
    """Same arrays, same PPL table (without its `bytes` with table_bytes=False: a format-3
    cache does not record them), same fingerprint and shard sums."""
    import dataclasses

    a, b = Cache(str(path)), Cache(str(reference))
    expected, got = all_arrays(reference), all_arrays(path)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))
    strip = (lambda t: t) if table_bytes else (lambda t: {d: {s: dataclasses.replace(e, bytes=None) for s, e in by.items()} for d, by in t.items()})
    assert strip(a.meta.teacher_ppl) == strip(b.meta.teacher_ppl)
    assert a.meta.build_fingerprint == b.meta.build_fingerprint
    assert a.records() == b.records() or {k: (r.nll_sum, r.positions) for k, r in a.records().items()} == \
        {k: (r.nll_sum, r.positions) for k, r in b.records().items()}


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 3])
def test_concurrent_workers_equal_single_process(tmp_path, teacher_dir, corpus_dir, built_cache, workers):
    config = small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr")
    procs = [
        subprocess.Popen(build_argv(config) + ["--num-shards", str(workers), "--shard-index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(workers)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("complete. next:" in o for o in outputs) >= 1
    assert_same_cache(tmp_path / "c.zarr", built_cache)


@pytest.mark.slow
def test_worker_killed_and_restarted(tmp_path, teacher_dir, corpus_dir, built_cache):
    out = tmp_path / "c.zarr"
    config = small_config(teacher_dir, corpus_dir, out, batch_size=1)
    argv = build_argv(config)
    w0 = subprocess.Popen(argv + ["--num-shards", "2", "--shard-index", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    w1 = subprocess.Popen(argv + ["--num-shards", "2", "--shard-index", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and w1.poll() is None:
        if shards_logged(out) >= 4:
            break
        time.sleep(0.02)
    os.killpg(w1.pid, signal.SIGKILL)
    w1.wait()
    text = w0.communicate(timeout=300)[0]
    assert w0.returncode == 0, text
    # Worker 0 finished its own shards but cannot finalize while worker 1's are missing.
    assert "still pending on other workers" in text
    restart = subprocess.run(argv + ["--num-shards", "2", "--shard-index", "1"], capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert "complete. next:" in restart.stdout
    assert_same_cache(out, built_cache)


def test_finalize_refuses_missing_shards(tmp_path, teacher_dir, corpus_dir):
    import threading

    from click.testing import CliRunner

    from ddk_cache.cli.main import main

    out = tmp_path / "c.zarr"

    class Stop(Exception):
        pass

    def stop_before_scoring(ev, info):
        if ev == "store_created":
            raise Stop

    # Both workers tokenize (each waits for the other's pieces); worker 1 then stops
    # before scoring, as if killed, and worker 0 scores only its own shards.
    errors = []

    def worker1():
        try:
            build(small_config(teacher_dir, corpus_dir, out, num_shards=2, shard_index=1), progress=False, hook=stop_before_scoring)
        except Stop:
            pass
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=worker1)
    thread.start()
    result = build(small_config(teacher_dir, corpus_dir, out, num_shards=2, shard_index=0), progress=False)
    thread.join()
    assert not errors, errors
    assert result.pending_elsewhere > 0 and result.meta.state == "building"
    refused = CliRunner().invoke(main, ["build", "--out", str(out), "--finalize"])
    assert refused.exit_code == 1 and "cannot be finalized" in refused.output and "shard(s) not written" in refused.output
    inspect = CliRunner().invoke(main, ["inspect", str(out)])
    assert "INCOMPLETE" in inspect.output
    build(small_config(teacher_dir, corpus_dir, out, num_shards=2, shard_index=1), progress=False)
    assert Cache(str(out)).meta.state == "complete"
    again = CliRunner().invoke(main, ["build", "--out", str(out), "--finalize"])
    assert again.exit_code == 0 and "is complete" in again.output


def test_workers_from_torchrun_environment(monkeypatch):
    from ddk_cache.runtime import resolve_worker

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert tuple(resolve_worker(None, None)) == (2, 4)
    assert tuple(resolve_worker(3, 1)) == (1, 3)  # flags win
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert tuple(resolve_worker(None, None)) == (0, 2)
