"""`build --engine ray --ray-actors 0` grows with its cluster: a node that joins mid-build gets
a scoring actor, which takes shards, and the cache still equals a native build's.

A module of its own: it runs a two-node cluster (`ray.cluster_utils.Cluster`, two raylets on
127.0.0.1), and a process holds one Ray connection at a time."""

from __future__ import annotations

import pytest

from ddk_cache.capture import ray_engine
from ddk_cache.capture.build import build

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
