"""The build's scoring stage: planned sequences -> teacher targets -> written shards.

The teacher streams rows (`Teacher.stream`); a pool of writer threads turns each row's
scores into encoded chunks (the cache's encoding), and the last row of a shard writes the
shard object and its log record (store/cache.py, store/log.py). Rows finish in any order;
a shard's sums are kept per row and added exactly (fsum), so the log is the same whatever
the order. What waits in memory is bounded: at most a few rows per writer thread.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import NonFiniteTeacher, TeacherError
from ..store.cache import (
    LOSS_MASK,
    SAMPLE_LOGPROB,
    TOKENS,
    CacheWriter,
    Shard,
    format_bytes,
)
from ..store.encodings import RowScores
from ..store.log import ShardRecord
from ..store.meta import FORMAT_VERSION, CacheMeta
from ..store.targets import TargetSpec, split_seed
from ..tokenbytes import predicted_bytes
from .packing import Gatherer, Plan
from .teachers.base import Job

Hook = Callable[[str, dict[str, Any]], None]


@dataclass
class ScoreStats:
    """What one worker's scoring stage did (summed into its BuildResult)."""

    shards_written: int = 0
    tokens_scored: int = 0
    bytes_written: int = 0  # of the shard objects written
    positions_written: int = 0
    write_seconds: float = 0.0  # summed over writer threads (convert + encode + write)
    stall_seconds: float = 0.0  # time the scoring loop waited for writers


class SizeProjection:
    """The finished cache's size, projected from the shards written so far: each domain's
    bytes per position (targets, tokens and the rest) times its positions. A size guessed
    before any teacher output is unreliable (a peaked teacher's rows take a third of a flat
    one's), so the build says nothing until every domain it works on has a written shard,
    then prints this once."""

    def __init__(self, meta: CacheMeta, shards: list[Shard]) -> None:
        P = meta.seq_len - 1
        self.total = {d: P * sum(info.split(s).sequences for s in ("train", "val")) for d, info in meta.domains.items()}
        self.waiting = {s.domain for s in shards}
        self.bytes: dict[str, int] = {}
        self.positions: dict[str, int] = {}
        self.P = P
        self.done = False

    def add(self, shard: Shard, sizes: dict[str, int]) -> str | None:
        """Record a written shard; the line to print once every domain has one."""
        self.bytes[shard.domain] = self.bytes.get(shard.domain, 0) + sum(sizes.values())
        self.positions[shard.domain] = self.positions.get(shard.domain, 0) + (shard.stop - shard.start) * self.P
        self.waiting.discard(shard.domain)
        if self.done or self.waiting:
            return None
        self.done = True
        per = {d: self.bytes[d] / self.positions[d] for d in self.bytes}
        mean = sum(self.bytes.values()) / sum(self.positions.values())
        total = sum(self.total[d] * per.get(d, mean) for d in self.total)
        return (f"cache size, projected from the shards written so far: about {format_bytes(total)} "
                f"({total / sum(self.total.values()):.1f} B/position, {sum(self.total.values()):,} positions)")


def label_only(tokens: np.ndarray, spec: TargetSpec) -> RowScores:
    """Targets that say nothing beyond the label (the next token with probability 1): what a
    sequence whose teacher output was not finite gets with --on-nonfinite skip."""
    P, K = len(tokens) - 1, spec.entries
    ids = np.zeros((P, K), np.int32)
    ids[:, 0] = tokens[1:]
    lps = np.full((P, K), -np.inf, np.float32)
    lps[:, 0] = 0.0
    counts = None
    if spec.kind == "sampled":
        counts = np.zeros((P, K), np.int64)
        counts[:, 0] = spec.samples
    return RowScores(ids, lps, np.zeros(P, np.float32), tokens[1:], counts, tail_logprob=np.full(P, -np.inf))


def row_chunks(writer: CacheWriter, shard: Shard, tokens: np.ndarray, scores: RowScores | None,
               mask: np.ndarray | None = None, sampled: np.ndarray | None = None) -> tuple[dict[str, bytes], float, int, float]:
    """One sequence as its shard stores it, and its terms of the shard record's sums: a chunk
    per array (tokens; the loss mask and sampling log-probs where the domain has them; the
    encoding's targets unless `scores` is None), then -sum of the target log-probs, the
    number of positions that carry loss (all of them, or where the next token is a label)
    and their kept teacher mass. The build's writer threads and `ddk-cache import` both
    write rows through here."""
    array = lambda name: writer.array(shard.domain, shard.split, name)  # noqa: E731
    chunks = {TOKENS: array(TOKENS).encode_row(tokens)}
    carry = np.ones(writer.seq_len - 1, bool) if mask is None else mask[1:].astype(bool)
    if mask is not None:
        chunks[LOSS_MASK] = array(LOSS_MASK).encode_row(mask)
    if sampled is not None:
        chunks[SAMPLE_LOGPROB] = array(SAMPLE_LOGPROB).encode_row(sampled)
    nll = mass = 0.0
    if scores is not None:
        for name, value in writer.encoding.encode(scores, writer.layout).items():
            chunks[name] = array(name).encode_row(value)
        nll = -math.fsum(scores.target_logprob.astype(np.float64)[carry].tolist())
        with np.errstate(under="ignore"):
            kept = np.exp(scores.logprobs.astype(np.float64)).sum(1)
        mass = float(np.sum(kept[carry]))
    return chunks, nll, int(carry.sum()), mass


@dataclass
class _ShardState:
    """A shard being finished: its rows' chunks and sums, filled in any order by the writers."""

    shard: Shard
    chunks: dict[str, list[bytes | None]]
    left: int
    nll: list[float] = field(default_factory=list)  # per row; summed exactly (fsum): the same
    positions: list[int] = field(default_factory=list)  # record whatever order rows finish in
    mass: list[float] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)  # rows given label-only targets (--on-nonfinite skip)
    mask: np.ndarray | None = None  # chat: the loss mask of every row
    nbytes: list[int] = field(default_factory=list)  # per row: UTF-8 bytes of the predicted tokens in the sums
    sampled: np.ndarray | None = None  # generated samples: their sampling log-probs


class Scorer:
    """Scores a worker's shards with its teacher and writes them (see the module docstring).

    `worker` is (rank, world size), for the progress label and the log file's name;
    `on_nonfinite` is "stop" (raise, naming the sequence) or "skip" (label-only targets)."""

    def __init__(self, writer: CacheWriter, plan: Plan, spec: TargetSpec, *, threads: int, worker: tuple[int, int],
                 on_nonfinite: str = "stop", progress: bool = True, hook: Hook | None = None,
                 byte_lengths: np.ndarray | None = None) -> None:
        self.writer, self.plan, self.spec = writer, plan, spec
        # Per token id (tokenbytes.py): records carry bits per byte's bytes. Not in a format-3/4
        # cache finished by this version: a ddk-cache 0.3 reading its logs would not know the key.
        self.byte_lengths = byte_lengths if writer.meta.format_version >= FORMAT_VERSION else None
        self.threads, self.worker, self.on_nonfinite = threads, worker, on_nonfinite
        self.progress, self.hook = progress, hook or (lambda event, info: None)
        self.stats = ScoreStats()
        self._states: dict[str, _ShardState] = {}
        self._guard = threading.Lock()  # the shard states
        self._log_guard = threading.Lock()  # the log file, the stats, the projection
        self._written: queue.Queue = queue.Queue()  # shards complete, for the hook (called in the scoring thread)
        self._log = None  # this worker's build log, opened by the first run

    def run(self, shards: list[Shard], teacher: Any) -> ScoreStats:
        """Score and write `shards`; returns this run's statistics."""
        if not shards:
            return self.stats
        seq_len = self.writer.seq_len
        rank, world = self.worker
        bar = tqdm(total=sum(s.stop - s.start for s in shards) * seq_len, desc="teacher" if world == 1 else f"teacher (worker {rank}/{world})",
                   unit=" tok", unit_scale=True, disable=not self.progress)
        # One log per Scorer, appended to by every run (an engine that hands a worker one shard
        # at a time writes one log per worker, not one per shard).
        self._log = self._log or self.writer.log_writer(self.worker)
        self._projection = SizeProjection(self.writer.meta, shards)
        in_flight: list[Future] = []
        limit = 4 * self.threads + 16  # rows finishing at once: bounds what waits in memory
        jobs = self._jobs(shards)
        try:
            with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ddk-cache-writer") as pool:
                try:
                    for job, row, finish in teacher.stream(jobs, self.spec):
                        in_flight.append(pool.submit(self._finish_row, job, row, finish))
                        self.stats.tokens_scored += seq_len
                        bar.update(seq_len)
                        self._drain(in_flight, keep=limit)
                    self._drain(in_flight, keep=0)
                except BaseException:
                    for f in in_flight:
                        f.cancel()
                    raise
        finally:
            jobs.close()  # its gathering thread ends now, not when the generator is collected
            self._log.close()
            bar.close()
        return self.stats

    def _jobs(self, shards: list[Shard]) -> Iterator[Job]:
        """The teacher's work, one job per shard. Gathering a shard's tokens is I/O: a thread
        stays one shard ahead of the engine."""
        gather = Gatherer(self.writer.objects, self.plan)
        ahead: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()  # the scoring side is gone (done, or stopped by an error): stop gathering

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for shard in shards:
                    if not put((shard, *gather.sequences(shard.domain, shard.split, shard.start, shard.stop))):
                        return
                put(None)
            except BaseException as e:  # surfaced in the scoring thread
                put(e)

        producer = threading.Thread(target=produce, daemon=True, name="ddk-cache-gather")
        producer.start()
        try:
            while True:
                item = ahead.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                shard, tokens, mask, sampled = item
                arrays = self.writer.array_names(shard.domain)
                n = len(tokens)
                with self._guard:
                    self._states[shard.key] = _ShardState(shard, {a: [None] * n for a in arrays}, n, [0.0] * n, [0] * n, [0.0] * n,
                                                          mask=mask, sampled=sampled, nbytes=[0] * n)
                yield Job(shard, tokens, np.arange(shard.start, shard.stop), split_seed(self.spec, shard.domain, shard.split))
        finally:
            stop.set()
            producer.join(timeout=30)  # at most the shard it is reading

    def _scores(self, job: Job, row: int, finish: Callable[[], RowScores | None]) -> tuple[RowScores | None, bool]:
        """The row's scores from the teacher, and whether they were replaced (non-finite output, skip)."""
        try:
            return finish(), False
        except NonFiniteTeacher as e:
            if self.on_nonfinite != "skip":
                shard: Shard = job.key
                raise TeacherError(
                    f"the teacher ({self.writer.meta.teacher.get('name_or_path')}) gave non-finite output ({e.detail}) for "
                    f"{shard.domain}/{shard.split} sequence {int(job.rows[row])}, predicted position {e.position}: the build "
                    "stopped and the shards written so far are kept (the same command resumes); pass --on-nonfinite skip to "
                    "give such sequences label-only targets instead") from None
            return label_only(job.tokens[row], self.spec), True

    def _finish_row(self, job: Job, row: int, finish: Callable[[], RowScores | None]) -> float:
        """In a writer thread: one row's chunks and sums; the shard's last row writes it.
        Returns the seconds spent."""
        t0 = time.perf_counter()
        writer, shard = self.writer, job.key
        tokens = job.tokens[row]
        scores, skipped = self._scores(job, row, finish)
        with self._guard:
            state = self._states[shard.key]
        mask = None if state.mask is None else state.mask[row]
        chunks, nll, positions, mass = row_chunks(writer, shard, tokens, scores, mask, None if state.sampled is None else state.sampled[row])
        nbytes = predicted_bytes(tokens, mask, self.byte_lengths) if self.byte_lengths is not None else 0
        if skipped:  # no teacher values: not in the perplexity table
            nll, positions, mass, nbytes = 0.0, 0, 0.0, 0
        with self._guard:
            for name, chunk in chunks.items():
                state.chunks[name][row] = chunk
            state.nll[row], state.positions[row], state.mass[row], state.nbytes[row] = nll, positions, mass, nbytes
            if skipped:
                state.nonfinite.append(row)
            state.left -= 1
            complete = state.left == 0
        if complete:
            self._write_shard(state)
        return time.perf_counter() - t0

    def _write_shard(self, state: _ShardState) -> None:
        shard = state.shard
        sizes, hashes = self.writer.put_shard(shard, state.chunks)  # type: ignore[arg-type]
        record = ShardRecord(shard.key, shard.stop - shard.start, math.fsum(state.nll), sum(state.positions), math.fsum(state.mass), sizes,
                             sorted(state.nonfinite), hashes, sum(state.nbytes) if self.byte_lengths is not None else None)
        with self._log_guard:
            self.stats.bytes_written += sum(sizes.values())
            self.stats.positions_written += (shard.stop - shard.start) * (self.writer.seq_len - 1)
            line = self._projection.add(shard, sizes)
            self._log.append(record)
        if line and self.progress:
            tqdm.write(line)
        with self._guard:
            del self._states[shard.key]
        self._written.put(shard)

    def _drain(self, in_flight: list[Future], keep: int) -> None:
        """Wait until at most `keep` rows are in flight (raising a writer's error here), then
        report the shards written since the last call."""
        while len(in_flight) > keep:
            future = in_flight.pop(0)
            t0 = time.perf_counter()
            self.stats.write_seconds += future.result()
            self.stats.stall_seconds += time.perf_counter() - t0
        while not self._written.empty():
            shard = self._written.get()
            self.stats.shards_written += 1
            self.hook("shard_written", {"shard": shard, "count": self.stats.shards_written})
