"""Where a worker runs: its rank from the launcher, its GPU set, the environment its engine gets.

No GPU is needed: the mapping is computed from the environment, and the engine is replaced
by a stand-in that records what it would have seen."""

from __future__ import annotations

import os

import pytest

from ddk_cache.errors import ConfigError
from ddk_cache.runtime import LAUNCHER_VARS, Worker, assign_gpus, engine_env, gpu_set, resolve_worker


@pytest.mark.parametrize("env,expected", [
    ({}, Worker()),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, Worker(5, 8, 1, 4, "torchrun")),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)"}, Worker(9, 16, 1, 8, "srun")),
])
def test_worker_from_the_launcher(env, expected):
    assert resolve_worker(env=env) == expected


def test_flags_win_and_bad_ranks_are_named():
    assert tuple(resolve_worker(4, 2, env={"RANK": "0", "WORLD_SIZE": "2"})) == (2, 4)
    with pytest.raises(ConfigError, match=r"RANK=3 is outside 0..1 \(WORLD_SIZE=2\)"):
        resolve_worker(env={"RANK": "3", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("local_rank,tp,visible,expected", [
    (0, 1, ["0", "1", "2", "3"], ["0"]),
    (3, 1, ["0", "1", "2", "3"], ["3"]),
    (1, 2, ["0", "1", "2", "3"], ["2", "3"]),
    (1, 2, ["4", "5", "6", "7"], ["6", "7"]),  # respects an existing CUDA_VISIBLE_DEVICES
    (0, 4, ["0", "1", "2", "3", "4", "5", "6", "7"], ["0", "1", "2", "3"]),
])
def test_gpu_sets(local_rank, tp, visible, expected):
    assert gpu_set(local_rank, tp, visible) == expected


def test_too_few_gpus_is_named():
    with pytest.raises(ConfigError, match=r"local rank 2 needs GPUs 4..5 \(2 per worker\), but this node shows 4"):
        gpu_set(2, 2, ["0", "1", "2", "3"])


def test_assign_narrows_cuda_visible_devices():
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert assign_gpus(Worker(3, 8, 3, 4, "torchrun"), 2, env) == ["6", "7"]
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert assign_gpus(Worker(), 1, {"CUDA_VISIBLE_DEVICES": ""}) is None  # no GPU: nothing to do


def test_engine_env_drops_the_launcher_variables():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1", "CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/bin"}
    assert engine_env(env) == {"CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/bin"}


def test_the_vllm_engine_starts_with_its_gpu_set_and_without_the_launchers_group(monkeypatch, tmp_path, teacher_dir, corpus_dir):
    """Under torchrun (local rank 1 of 2, tensor parallel 2, 4 GPUs visible) the build narrows
    CUDA_VISIBLE_DEVICES before any engine starts, and vllm.LLM is constructed in an
    environment with that set and without RANK/WORLD_SIZE/MASTER_*: what its engine
    processes inherit."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    import vllm

    from ddk_cache.capture.build import build

    from .helpers import small_config

    seen = {}

    class Stop(Exception):
        pass

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(env=dict(os.environ), kwargs=kwargs)
            raise Stop

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Exception) as info:
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", backend="vllm", tensor_parallel_size=2, dtype="float32"),
              progress=False)
    assert "vLLM could not start" in str(info.value) or isinstance(info.value, Stop)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert not set(LAUNCHER_VARS) & set(seen["env"])
    assert seen["kwargs"]["tensor_parallel_size"] == 2
    assert os.environ["RANK"] == "1"  # the worker's own environment is restored
