"""`ddk-cache build --engine ray`: the same build, scheduled on a Ray cluster.

Why: a native build is N copies of the CLI with fixed slices of the shards (torchrun, srun,
--num-shards). That suits one Slurm allocation; teams on Kubernetes or cloud clusters run
batch inference on Ray. Here Ray schedules the work of the same build, and the result is the
same cache (the same plan, the same shard objects and records, the same finalize):

  1. Scoring actors start, one per GPU group (`--tensor-parallel-size` GPUs) or
     `--ray-actors`; each loads the teacher once (build stages 1-2).
  2. The first actor creates the store (stage 3: its metadata records the teacher). Then
     `--ray-tokenize-tasks` CPU tasks (default: one per CPU of the cluster) run stages 4-5
     as native workers i of M (`build.prepare` with a stand-in for the teacher: only its
     vocabulary and context are read): each tokenizes its share of the pieces, and
     whichever gets there first makes the plan and the arrays. Nothing new here: the tasks
     coordinate through the store as native workers do, so a retried task resumes its
     share, and the plan does not depend on M. The actors, engines loaded, wait.
  3. The driver hands out the shards not yet recorded, one at a time, at most two queued per
     actor so no engine waits between shards. An actor scores a shard with the build's own
     `Scorer` and writes it as a native worker does: every object whole, then its log record.
  4. Once every shard is recorded, the driver finalizes (the PPL table, state complete).

Faults: an actor or node lost mid-shard (SIGKILL, `ray.kill`, a node gone) surfaces as an
actor error on its calls; its shards go back to the queue and are scored by whichever actor
asks next, while Ray restarts the actor (`max_restarts`). A shard written twice is written
with the same bytes, and a shard whose objects were written but not recorded is simply
written again: nothing complete is ever changed. A shard lost with its actor
MAX_SHARD_ATTEMPTS times stops the build with one line naming it (a shard that kills its
engine would otherwise kill every actor in turn); an error raised by the scoring itself
(non-finite teacher output, a full disk) stops it at once, as in a native build. Killing
the driver leaves a resumable cache: the same command continues from what is recorded.

Elastic: an actor that died is probed before it gets work again (a restart, wherever Ray
finds room, answers the probe; an actor gone for good, e.g. `ray.kill`, is dropped and the
build goes on with the rest), and with `--ray-actors 0` the driver adds an actor whenever
the cluster shows room for one more engine (an autoscaler adding nodes): free GPUs for one
on a GPU cluster; on a CPU cluster, free CPUs on a node that joined after the build began.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError, StoreError
from ..store.cache import CacheWriter
from ..store.objects import Objects
from ..runtime import Worker
from ..store.meta import STATE_COMPLETE, STATE_INITIALIZING
from ..tokenbytes import lengths_or_none
from .build import BuildConfig, BuildResult, _need, _open_teacher, _resolve, auto_writer_threads, prepare
from .corpus import plan_pieces
from .packing import PLAN_KEY, Plan, done_pieces
from .scoring import Hook, Scorer

MAX_SHARD_ATTEMPTS = 3  # a shard whose actor died this many times stops the build
QUEUED_PER_ACTOR = 2  # shards handed to an actor ahead: the next one is there when one ends
GROW_EVERY = 10.0  # seconds between looks for room for another actor (--ray-actors 0)
PROBE_WAIT = 0.5  # seconds before probing again an actor that is restarting


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'ddk-cache[ray]' (or pip install ray)") from None
    return ray


class ScoringActor:
    """One teacher engine on a Ray worker: the first creates the store (stage 3); every one
    scores the shards it is handed (stage 6; see the module docstring)."""

    def __init__(self, config: dict[str, Any], index: int, count: int) -> None:
        # Worker `index` of `count` of the native protocol: the label of its build log. An
        # actor added during the build has index >= count (its config keeps a valid index;
        # the log's name is unique anyway).
        self.config = replace(BuildConfig(**config), num_shards=count, shard_index=min(index, count - 1))
        self.index, self.count = index, count
        self.stack = ExitStack()
        self.scorer: Scorer | None = None
        self.shards: dict[str, Any] = {}  # the plan's shards by key (fixed once the plan exists)
        # An error here (a teacher that does not load) is kept and raised by every call: Ray
        # reports a failed constructor only as a dead actor, without the error itself.
        self.failed: Exception | None = None
        try:
            self.inputs = _resolve(self.config, cheap_checks=True)
            self.teacher, _ = _open_teacher(self.inputs, None, self.stack, progress=False)
        except Exception as e:
            self.failed = e

    def pid(self) -> int:
        return os.getpid()

    def create_store(self) -> tuple[BuildResult, dict[str, Any]]:
        """Stage 3 (the store's metadata, which records this teacher), and what the
        tokenization tasks need to run stages 4-5 without a teacher: its vocabulary size,
        context and this actor's resolved stage 1."""
        if self.failed is not None:
            raise self.failed
        result = prepare(self.config, teacher=self.teacher, inputs=self.inputs, store_only=True)
        return result, {"vocab_size": self.teacher.vocab_size, "max_context": self.teacher.max_context, "inputs": self.inputs}

    def score(self, key: str) -> dict[str, Any]:
        """Score and write the shard `key` (again if it was written before: a shard handed
        out again after its actor died is rewritten with the same bytes); returns this
        actor's statistics so far."""
        if self.failed is not None:
            raise self.failed
        if self.scorer is None:
            writer = CacheWriter(self.config.out)
            plan = Plan.from_bytes(_need(writer.objects.get(PLAN_KEY), f"{self.config.out}: the build plan is missing"))
            self.scorer = Scorer(writer, plan, self.inputs.spec, threads=self.config.writer_threads or auto_writer_threads(),
                                 worker=(self.index, self.count), on_nonfinite=self.config.on_nonfinite, progress=False,
                                 byte_lengths=lengths_or_none(self.inputs.tok))
            self.shards = {s.key: s for s in writer.shards()}
        shard = self.shards.get(key)
        if shard is None:
            raise StoreError(f"{self.config.out}: no shard {key} in this cache's plan")
        self.scorer.run([shard], self.teacher)
        stats = dataclasses.asdict(self.scorer.stats)
        stats["teacher_seconds"], stats["engine_idle_share"] = self.teacher.stats.busy, self.teacher.stats.idle_share
        return stats


class _DescribedTeacher:
    """What stages 4-5 read of a teacher (its vocabulary and context), without its weights: a
    tokenization task's stand-in for the engine the actors hold."""

    def __init__(self, vocab_size: int, max_context: int | None) -> None:
        self.vocab_size, self.max_context = vocab_size, max_context

    def close(self) -> None:
        pass


def tokenize_share(index: int, count: int, described: dict[str, Any]) -> BuildResult:
    """A Ray CPU task: stages 4-5 as native worker `index` of `count` (its share of the
    pieces; the plan and arrays by whichever task gets there first), on the store an actor
    created, from that actor's resolved stage 1. Runs the native protocol, so a retried task
    resumes its share."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one task per CPU: the tokenizer's own threads would oversubscribe
    inputs = described["inputs"]
    config = replace(inputs.config, num_shards=count, shard_index=index)
    inputs = replace(inputs, config=config, worker=Worker(index, count))
    return prepare(config, teacher=_DescribedTeacher(described["vocab_size"], described["max_context"]), inputs=inputs)


def _actor_count(ray: Any, config: BuildConfig) -> int:
    if config.ray_actors:
        return config.ray_actors
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return max(1, gpus // max(1, config.tensor_parallel_size))


def build_on_ray(config: BuildConfig, *, progress: bool = True, hook: Hook | None = None) -> BuildResult:
    """`build` with `--engine ray` (see the module docstring). `hook(event, info)` is called at
    "shard_written" (in the driver, as each shard comes back; info has the shard's key, the
    count so far and the actor that wrote it), "actor_added" (an actor started during the
    build: `--ray-actors 0` and room for one more) and "before_finalize"."""
    ray = _import_ray()
    hook = hook or (lambda event, info: None)
    started = time.perf_counter()
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=config.ray_address or None, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
    try:
        return _run(ray, config, progress, hook, started)
    finally:
        if owns:
            ray.shutdown()


def _run(ray: Any, config: BuildConfig, progress: bool, hook: Hook, started: float) -> BuildResult:
    native = replace(config, engine="native")
    options = {f.name: getattr(native, f.name) for f in dataclasses.fields(native)}
    gpus = config.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) else 0
    # Restarts without limit: an actor lost with its node comes back wherever there is room
    # (a shard that keeps killing its actor is stopped by MAX_SHARD_ATTEMPTS instead).
    Actor = ray.remote(ScoringActor).options(num_cpus=config.ray_actor_cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=0)
    count = _actor_count(ray, config)
    actors = [Actor.remote(options, i, count) for i in range(count)]
    everyone = list(actors)  # killed at the end: a handle kept elsewhere must not keep an engine's GPU
    try:
        return _schedule(ray, config, progress, hook, started, Actor, options, actors, everyone)
    finally:
        for actor in everyone:
            ray.kill(actor)


def _schedule(ray: Any, config: BuildConfig, progress: bool, hook: Hook, started: float, Actor: Any, options: dict,
              actors: list, everyone: list) -> BuildResult:
    count = len(actors)
    # Stage 3 on the first actor (the store records its teacher); stages 4-5 (tokenization,
    # plan, arrays) as CPU tasks, each a native worker's share, while the actors wait with
    # their engines loaded; then the actors only score.
    [(result, described)] = _call_all(ray, actors[:1], "create_store")
    if result.already_complete or result.meta.state == STATE_COMPLETE:
        result.already_complete, result.seconds = True, time.perf_counter() - started
        return result
    if result.meta.state == STATE_INITIALIZING:
        tasks = config.ray_tokenize_tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # No CPUs reserved: the actors hold theirs idle until the plan exists, and the tasks
        # are spread over the nodes rather than packed onto the driver's.
        task = ray.remote(tokenize_share).options(num_cpus=0, scheduling_strategy="SPREAD", max_retries=MAX_SHARD_ATTEMPTS)
        share_calls = [task.remote(i, tasks, described) for i in range(tasks)]
        try:
            shares = _await_tokenization(ray, config, described["inputs"].domains, share_calls, tasks, progress)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        except ray.exceptions.WorkerCrashedError:
            raise StoreError(f"a Ray tokenization task died {MAX_SHARD_ATTEMPTS + 1} times; see `ray logs`; the cache is "
                             "resumable") from None
        result = replace(shares[0], pieces_tokenized=sum(r.pieces_tokenized for r in shares))
    result.worker = (0, 1)  # the driver reports for the whole build, as a single worker would
    writer = CacheWriter(config.out)
    records = writer.records()
    todo = deque(s.key for s in writer.shards() if s.key not in records)
    sizes = {s.key: (s.stop - s.start) * writer.seq_len for s in writer.shards()}
    bar = tqdm(total=sum(sizes[k] for k in todo), desc=f"teacher ({count} Ray actors)", unit=" tok", unit_scale=True, disable=not progress)
    stats: dict[int, dict[str, Any]] = {}  # per actor: its Scorer's statistics so far
    lost: dict[str, int] = {}  # per shard: times its actor died under it
    calls: dict[Any, tuple[Any, str | None]] = {}  # call -> (actor, shard key; None for a liveness probe)
    ready = {id(a): a for a in actors}  # actors that take shards (not dead, not being probed)
    load = {id(a): 0 for a in actors}
    restarting: dict[int, float] = {}  # per actor: when a liveness probe first found it restarting
    # Ray >= 2.22 tells an actor that is restarting from one that is gone; before, any failed
    # probe drops the actor.
    unavailable = getattr(ray.exceptions, "ActorUnavailableError", ())
    last_grow, written, nodes_at_start = time.perf_counter(), 0, _nodes(ray)
    try:
        while todo or any(key is not None for _, key in calls.values()):
            for actor in list(ready.values()):
                while todo and load[id(actor)] < QUEUED_PER_ACTOR:
                    key = todo.popleft()
                    calls[actor.score.remote(key)] = (actor, key)
                    load[id(actor)] += 1
            if not calls:
                raise StoreError("every Ray scoring actor is gone (see `ray status` and `ray logs`); run the same command again: it resumes")
            done, _ = ray.wait(list(calls), num_returns=1, timeout=GROW_EVERY)
            for call in done:
                actor, key = calls.pop(call)
                if key is None:  # a probe: back in rotation once it answers, dropped if it is dead for good
                    try:
                        ray.get(call)
                        ready[id(actor)] = actor
                    except unavailable:
                        # Restarting (a new process, the teacher loading again): probe again
                        # until it answers, or until --wait-timeout has passed.
                        since = restarting.setdefault(id(actor), time.monotonic())
                        if time.monotonic() - since < config.wait_timeout:
                            time.sleep(PROBE_WAIT)
                            calls[actor.pid.remote()] = (actor, None)
                    except ray.exceptions.RayActorError:
                        pass  # gone for good (ray.kill, or its restarts used up): the others go on
                    else:
                        restarting.pop(id(actor), None)
                    continue
                load[id(actor)] -= 1
                try:
                    stats[id(actor)] = ray.get(call)
                except ray.exceptions.RayActorError as e:
                    lost[key] = lost.get(key, 0) + 1
                    if lost[key] >= MAX_SHARD_ATTEMPTS:
                        raise StoreError(f"shard {key} was lost with its Ray actor {lost[key]} times (last: {type(e).__name__}); "
                                         "see `ray logs`; the cache is resumable") from None
                    todo.appendleft(key)  # scored next, by whichever actor takes work
                    if ready.pop(id(actor), None) is not None:
                        calls[actor.pid.remote()] = (actor, None)  # waits out a restart; fails if the actor is gone for good
                    continue
                except ray.exceptions.RayTaskError as e:  # the scoring itself failed: stop, as a native build does
                    raise _cause(e) from None
                written += 1
                bar.update(sizes[key])
                hook("shard_written", {"shard": key, "count": written, "actor": actor})
            if config.ray_actors == 0 and todo and time.perf_counter() - last_grow > GROW_EVERY:
                last_grow = time.perf_counter()
                if _room_for_one(ray, config, nodes_at_start):  # an autoscaler added a node: one more engine
                    actor = Actor.remote(options, len(load), count)  # a scorer only: the tokenization is done
                    ready[id(actor)], load[id(actor)] = actor, 0
                    everyone.append(actor)
                    hook("actor_added", {"actor": actor, "actors": len(load)})
    finally:
        bar.close()
    for name in ("shards_written", "tokens_scored", "bytes_written", "positions_written", "write_seconds", "stall_seconds", "teacher_seconds"):
        setattr(result, name, sum(s[name] for s in stats.values()))
    result.engine_idle_share = max((s["engine_idle_share"] for s in stats.values()), default=0.0)
    result.seconds = time.perf_counter() - started
    writer = CacheWriter(config.out)
    records = writer.records()
    pending = writer.pending(records)
    if pending:
        raise StoreError(f"{config.out}: {len(pending)} shards are still unrecorded after the Ray build; run the same command again")
    hook("before_finalize", {})
    result.meta = writer.finalize(records)
    result.seconds = time.perf_counter() - started
    return result


def _await_tokenization(ray: Any, config: BuildConfig, domains: list, calls: list, tasks: int, progress: bool) -> list:
    """The tokenization tasks' results, with a bar of the pieces staged so far (read from the
    store every few seconds: the tasks' own bars are in their processes)."""
    total = sum(len(plan_pieces(source, max(1, int(config.piece_mb * (1 << 20))))) for source in domains)
    objects = Objects.open(config.out)
    with tqdm(total=total, desc=f"tokenize ({tasks} Ray tasks)", unit=" piece", disable=not progress) as bar:
        pending = list(calls)
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
            try:
                ray.get(ready)  # a task that failed (a bad corpus line) stops the build now
            except Exception:
                for call in pending:  # the others would wait for its pieces until --wait-timeout
                    ray.cancel(call, force=True)
                raise
            if progress:
                bar.update(len(done_pieces(objects)) - bar.n)
    return ray.get(calls)


def _call_all(ray: Any, actors: list, method: str) -> list:
    """`method` on every actor, retried on an actor that died and restarted (the native
    protocol resumes a worker's share); an error of the work itself is raised as is."""
    results: list = [None] * len(actors)
    for attempt in range(MAX_SHARD_ATTEMPTS):
        calls = {getattr(a, method).remote(): i for i, a in enumerate(actors) if results[i] is None}
        for call, i in calls.items():
            try:
                results[i] = ray.get(call)
            except ray.exceptions.RayActorError:
                if attempt == MAX_SHARD_ATTEMPTS - 1:
                    raise StoreError(f"Ray scoring actor {i} died {MAX_SHARD_ATTEMPTS} times while preparing the build; see `ray logs`") from None
            except ray.exceptions.RayTaskError as e:
                raise _cause(e) from None
        if all(r is not None for r in results):
            break
    return results


def _cause(error: Any) -> BaseException:
    """The exception an actor's call raised (so the CLI prints its one line), else Ray's."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error.as_instanceof_cause()


def _nodes(ray: Any) -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _room_for_one(ray: Any, config: BuildConfig, nodes_at_start: int) -> bool:
    """Whether the cluster has room for one more scoring actor: on GPUs, free GPUs for one
    more engine; on CPUs, only once a node has joined since the build started (an autoscaler
    adding one), since the cores already there are what the first actors' engines use."""
    free = ray.available_resources()
    if ray.cluster_resources().get("GPU", 0):
        return free.get("CPU", 0) >= config.ray_actor_cpus and free.get("GPU", 0) >= config.tensor_parallel_size
    return _nodes(ray) > nodes_at_start and free.get("CPU", 0) >= config.ray_actor_cpus


__all__ = ["MAX_SHARD_ATTEMPTS", "ScoringActor", "build_on_ray"]
