"""`build --engine ray`: a Ray cluster's actors score the shards of the same build and give
the same cache as a native build; an actor killed mid-build (SIGKILL: restarted; ray.kill:
gone for good) costs nothing but time; a driver stopped mid-build resumes."""

from __future__ import annotations

import os
import signal

import pytest

from ddk_cache.capture.build import build
from ddk_cache.errors import ConfigError, DDKCacheError

from .helpers import partial_cache, small_config
from .test_kill_resume import assert_same_cache

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(built_cache):
    """One local cluster for the module (127.0.0.1; starting one takes seconds), started after
    the reference cache is built: a process that forks (the native build's tokenizer pool)
    after ray.init leaves Ray's connections in a state where calls hang."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_build_equals_the_native_build(tmp_path, cluster, teacher_dir, corpus_dir, built_cache):
    """Three tokenization tasks (native workers 0-2 of 3) stage the pieces and write the
    summaries, the two scoring actors none; both actors score; the cache equals the native build's."""
    from ddk_cache.capture.packing import SUMMARY_DIR
    from ddk_cache.store.objects import Objects

    out = tmp_path / "c.zarr"
    written = []
    result = build(small_config(teacher_dir, corpus_dir, out, engine="ray", ray_actors=2, ray_tokenize_tasks=3), progress=False,
                   hook=lambda event, info: written.append(info["actor"]) if event == "shard_written" else None)
    assert result.meta.state == "complete" and result.shards_written == len(written) > 0
    assert len({id(a) for a in written}) == 2  # both actors scored
    assert result.pieces_tokenized > 0
    summaries = sorted(key.rsplit("/", 1)[-1] for key in Objects.open(str(out)).list(SUMMARY_DIR))
    assert summaries == [f"w{i:05d}-of-00003.json" for i in range(3)]
    assert_same_cache(out, built_cache)
    again = build(small_config(teacher_dir, corpus_dir, out, engine="ray", ray_actors=2), progress=False)
    assert again.already_complete


@pytest.mark.parametrize("how", ["sigkill", "ray.kill"])
def test_actor_killed_mid_build_gives_the_same_cache(tmp_path, cluster, teacher_dir, corpus_dir, built_cache, how):
    """SIGKILL of an actor's process: Ray restarts it and its shards are scored again;
    ray.kill (no restart): the other actor finishes the build. Either way the cache equals a
    native build's and verify passes."""
    from ddk_cache.store.verify import verify_cache

    out = tmp_path / "c.zarr"
    killed = []

    def hook(event, info):
        if event == "shard_written" and info["count"] == 2 and not killed:
            actor = info["actor"]
            if how == "sigkill":
                os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
            else:
                ray.kill(actor, no_restart=True)
            killed.append(actor)

    result = build(small_config(teacher_dir, corpus_dir, out, engine="ray", ray_actors=2, batch_size=1), progress=False, hook=hook)
    assert killed and result.meta.state == "complete"
    assert_same_cache(out, built_cache)
    assert verify_cache(str(out))[0] == []


def test_driver_stopped_mid_build_resumes(tmp_path, cluster, teacher_dir, corpus_dir, built_cache):
    out = partial_cache(teacher_dir, corpus_dir, tmp_path / "c.zarr", shards=3, engine="ray", ray_actors=2)
    result = build(small_config(teacher_dir, corpus_dir, out, engine="ray", ray_actors=2), progress=False)
    assert 0 < result.shards_written
    assert_same_cache(out, built_cache)


def test_a_bad_corpus_line_stops_the_tokenization_tasks_at_once(tmp_path, cluster, teacher_dir):
    """A tokenization task that meets a bad line fails; the build stops with its one line
    (file and line), without the other tasks waiting for the failed one's pieces."""
    import time

    from .helpers import write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    with open(corpus / "alpha.jsonl", "a") as f:
        f.write("{not json\n")
    started = time.monotonic()
    with pytest.raises(DDKCacheError, match=r"alpha.jsonl:31: not valid JSON"):
        build(small_config(teacher_dir, corpus, tmp_path / "c.zarr", engine="ray", ray_actors=1, ray_tokenize_tasks=2),
              progress=False)
    assert time.monotonic() - started < 120  # not --wait-timeout (2 h)


def test_errors_of_the_work_itself_come_back_as_they_are(tmp_path, cluster, corpus_dir):
    with pytest.raises(ConfigError, match="--engine ray schedules the shards itself"):
        small_config(tmp_path, corpus_dir, tmp_path / "x.zarr", engine="ray", num_shards=2, shard_index=0)
    with pytest.raises(DDKCacheError, match="missing: no such file or directory"):
        build(small_config(tmp_path / "missing", corpus_dir, tmp_path / "c.zarr", engine="ray", ray_actors=1), progress=False)
