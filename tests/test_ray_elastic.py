"""`build --engine ray` on clusters that change or misbehave: a node that joins mid-build gets
a scoring actor (`--ray-actors 0`), which takes shards, and the cache still equals a native
build's; a shard that kills its actor every time stops the build, naming it.

A module of its own: each test starts its own Ray session (a two-node
`ray.cluster_utils.Cluster`, two raylets on 127.0.0.1; a session with a worker setup hook),
and a process holds one Ray connection at a time."""

from __future__ import annotations

import pytest

from ddk_cache.capture import ray_engine
from ddk_cache.capture.build import build
from ddk_cache.errors import DDKCacheError

from .helpers import small_config
from .test_kill_resume import assert_same_cache

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.slow


def test_a_node_joining_mid_build_gets_an_actor_that_scores(tmp_path, teacher_dir, corpus_dir, built_cache, monkeypatch):
    monkeypatch.setattr(ray_engine, "GROW_EVERY", 0.2)
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        events = []

        def hook(event, info):
            events.append((event, info.get("actor")))
            if event == "shard_written" and info["count"] == 1:  # the build is under way on the head's one actor
                cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
                cluster.wait_for_nodes()

        out = tmp_path / "c.zarr"
        result = build(small_config(teacher_dir, corpus_dir, out, engine="ray", ray_actors=0, batch_size=1), progress=False,
                       hook=hook)
        added = [actor for event, actor in events if event == "actor_added"]
        scorers = {id(actor) for event, actor in events if event == "shard_written"}
        assert len(added) == 1, events  # one more actor, for the node that joined (its one CPU)
        assert id(added[0]) in scorers and len(scorers) == 2  # and it scored shards
        assert result.meta.state == "complete"
        assert_same_cache(out, built_cache)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_shard_that_keeps_killing_its_actor_stops_the_build_naming_it(tmp_path, teacher_dir, corpus_dir):
    """Every worker process (a worker setup hook) exits when handed a domain's first train
    shard: Ray restarts the actor each time, the shard goes back to the queue, and the third
    loss stops the build with one line naming the shard; the cache stays resumable."""

    def poison() -> None:  # runs in every Ray worker process, restarted actors included
        import os

        from ddk_cache.capture import scoring

        real = scoring.Scorer.run

        def run(self, shards, teacher):
            if any(s.split == "train" and s.index == 0 for s in shards):
                os._exit(1)
            return real(self, shards, teacher)

        scoring.Scorer.run = run

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"worker_process_setup_hook": poison})
    try:
        with pytest.raises(DDKCacheError, match=r"shard \S+/train/\S+ was lost with its Ray actor 3 times .*resumable"):
            build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", engine="ray", ray_actors=2), progress=False)
    finally:
        ray.shutdown()
