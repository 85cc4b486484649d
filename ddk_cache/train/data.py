"""Training batches from a cache: domains drawn by the mixing weights, read ahead in a thread.

Sampling rule (deterministic given the seed and the weights in force at each step):
each step draws `batch_size * world_size` domains with `rng.choice(p=weights)`; each domain
hands out its training sequences in a permutation seeded by (seed, domain, epoch), and
starts a new permutation (the next epoch) when it runs out. Rank r takes items
[r*B, (r+1)*B) of the step's draw, so ranks read different sequences from one shared draw.

The reader thread runs `prefetch` batches ahead. When the weights change (a DDK update),
the queue is dropped and sampling restarts from the state after the last consumed batch,
so which sequences a step gets never depends on how far ahead the reader had got: this
is what makes resumed runs identical to uninterrupted ones.

Reading: the sequences a batch needs are read through `Cache` (only their byte ranges,
adjacent rows in one request, file handles kept open) and their targets decoded for the
whole batch at once (encodings.py). On a GPU machine the batch lands in pinned memory,
so the trainer's copy to the device can be non-blocking.
"""

from __future__ import annotations

import collections
import multiprocessing
import queue
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ..store.cache import Cache
from .losses import IGNORE_INDEX  # labels of positions that carry no loss (one definition)


@dataclass
class Batch:
    """One rank's share of a step.

    tokens int64 [B, L]; loss_mask bool [B, L] (True where tokens[:, t] is a label) or None
    (every token is); topk_ids int32 / topk_logprobs float32 [B, L-1, K] sparse targets
    (log-prob -inf: padding; K = 0 for tokens-only reads); target_logprob float32 [B, L-1]
    (None when not read); sample_logprob float32 [B, L-1]: log-prob of each next token under
    the distribution that sampled it (generated samples only, else None); tail_logprob
    float32 [B, L-1]: the teacher's log mass outside the kept ids, where the cache stores it
    (pack-v3), else None; domains [B] domain index of each row; state: the sampler state
    after this batch (what a checkpoint stores)."""

    tokens: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    domains: np.ndarray
    state: dict
    loss_mask: torch.Tensor | None = None
    target_logprob: torch.Tensor | None = None
    sample_logprob: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None
    crosstok: dict | None = None  # a student of another tokenizer: the conversion's counts (crosstok.CrossTokenizer)

    def labels(self) -> torch.Tensor:
        """Next-token labels [B, L-1]: tokens[:, 1:], IGNORE_INDEX where no loss applies."""
        nxt = self.tokens[:, 1:]
        if self.loss_mask is None:
            return nxt
        return torch.where(self.loss_mask[:, 1:], nxt, torch.full_like(nxt, IGNORE_INDEX))


class DomainSampler:
    """The sampling rule above; its whole state is JSON-serialisable."""

    def __init__(self, sizes: list[int], seed: int) -> None:
        self.sizes, self.seed = list(sizes), seed
        self.rng = np.random.default_rng(seed)
        self.epochs = [0] * len(sizes)
        self.positions = [0] * len(sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, domain: int) -> np.ndarray:
        key = (domain, self.epochs[domain])
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != domain}  # keep one epoch per domain
            self._perms[key] = np.random.default_rng([self.seed, domain, key[1]]).permutation(self.sizes[domain])
        return self._perms[key]

    def draw(self, weights: np.ndarray, count: int) -> list[tuple[int, int]]:
        """`count` (domain, sequence) pairs."""
        out = []
        for d in self.rng.choice(len(self.sizes), size=count, p=weights).tolist():
            out.append((d, int(self._perm(d)[self.positions[d]])))
            self.positions[d] += 1
            if self.positions[d] == self.sizes[d]:  # domain exhausted: cycle, reshuffled
                self.epochs[d] += 1
                self.positions[d] = 0
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "epochs": list(self.epochs), "positions": list(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.epochs, self.positions = list(state["epochs"]), list(state["positions"])


def normalise(weights: np.ndarray) -> np.ndarray:
    """float64 weights summing to 1, as numpy's choice() demands (callers may pass float32)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"mixing weights must be finite, >= 0 and not all 0; got {w.tolist()}")
    return w / w.sum()


class SequenceReader:
    """Reads (domain, sequence) items of one split of a cache into batch arrays.

    Lives in the loader's thread, or once per reader process (which opens the cache again
    from its path). `targets=False` reads tokens (and loss masks) only."""

    def __init__(self, cache: Cache, targets: bool, split: str = "train", pin: bool = False, sample_logprobs: bool = True,
                 crosstok: Any = None) -> None:
        """`crosstok`: a crosstok.CrossTokenizer: batches come out in its student's tokens."""
        self.cache, self.split, self.crosstok = cache, split, crosstok
        self.targets = targets and cache.has_targets
        self.K = cache.top_k if self.targets else 0
        self.tails = self.targets and cache.encoding.stores_tail(cache.layout)
        self.chat = any(cache.is_chat(d) for d in cache.domains)
        self.sampled = sample_logprobs and any(cache.is_sampled(d) for d in cache.domains)
        self.pin = pin

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def read(self, items: list[tuple[int, int]]) -> dict[str, Any]:
        """Tensors for `items` (domain index, sequence): tokens int64 [B, L], loss_mask bool
        [B, L] or None, topk_ids int32 / topk_logprobs float32 [B, L-1, K], target_logprob
        float32 [B, L-1] or None, sample_logprob float32 [B, L-1] or None (0 in rows of domains
        without samples), domains [B]. Each distinct sequence is read once."""
        L, K, B = self.cache.seq_len, self.K, len(items)
        tokens = self._empty((B, L), torch.int64)
        ids = self._empty((B, L - 1, K), torch.int32)
        lps = self._empty((B, L - 1, K), torch.float32)
        target = self._empty((B, L - 1), torch.float32) if self.targets else None
        tail = self._empty((B, L - 1), torch.float32) if self.tails else None
        mask = torch.ones((B, L), dtype=torch.bool) if self.chat else None
        sampled = torch.zeros((B, L - 1), dtype=torch.float32) if self.sampled else None
        doms = np.array([d for d, _ in items], np.int64)
        for d in np.unique(doms):
            rows = np.flatnonzero(doms == d)
            uniq, inverse = np.unique(np.array([items[r][1] for r in rows]), return_inverse=True)
            domain = self.cache.domains[d]
            tokens[rows] = torch.from_numpy(self.cache.tokens(domain, self.split, uniq)[inverse]).long()
            if mask is not None:
                m = self.cache.loss_mask(domain, self.split, uniq)
                if m is not None:
                    mask[rows] = torch.from_numpy(m[inverse].astype(bool))
            if sampled is not None:
                lp = self.cache.sample_logprob(domain, self.split, uniq)
                if lp is not None:
                    sampled[rows] = torch.from_numpy(lp[inverse, 1:])  # position t predicts tokens[t + 1]
            if self.targets:
                t = self.cache.targets_of(domain, self.split, uniq)
                ids[rows] = torch.from_numpy(t.ids[inverse])
                lps[rows] = torch.from_numpy(t.logprobs[inverse])
                target[rows] = torch.from_numpy(t.target_logprob[inverse])
                if tail is not None:
                    tail[rows] = torch.from_numpy(t.tail_logprob[inverse])
        out = {"tokens": tokens, "loss_mask": mask, "topk_ids": ids, "topk_logprobs": lps, "target_logprob": target,
               "sample_logprob": sampled, "tail_logprob": tail, "domains": doms}
        if self.crosstok is not None:
            out = self.crosstok.convert(out)
            if self.pin:
                out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out


_worker_reader: SequenceReader | None = None  # one per reader process


def _worker_init(path: str, targets: bool, sample_logprobs: bool, crosstok: Any = None) -> None:
    global _worker_reader
    torch.set_num_threads(1)  # a reader process decodes; it must not start a thread per core
    _worker_reader = SequenceReader(Cache(path), targets, sample_logprobs=sample_logprobs, crosstok=crosstok)


def _worker_read(items: list[tuple[int, int]]) -> dict[str, Any]:
    assert _worker_reader is not None
    return _worker_reader.read(items)


class CacheLoader:
    """Iterates batches of the cache's training split for one rank, prefetching in a thread.

    With `workers` > 0 the thread hands each batch's reads to that many reader processes
    (decoding is Python/numpy work that one process cannot spread over cores); batches still
    come back in draw order, so what a step gets does not depend on `workers`. Use it as an
    iterator (`for batch in loader`) or call `next()`; `close()` (or `with`) stops the
    thread and the processes."""

    def __init__(
        self, cache: Cache, *, batch_size: int, weights: np.ndarray, seed: int, rank: int = 0, world_size: int = 1,
        prefetch: int = 2, targets: bool = True, workers: int = 0, pin_memory: bool | None = None, sample_logprobs: bool = True,
        crosstok: Any = None,
    ) -> None:
        """`targets=False` reads tokens only (online KD brings its own teacher; tokens-only
        caches have none): the batch's target tensors then have K = 0 columns.
        `sample_logprobs=False` skips generated samples' sampling log-probs (only MiniLLM's
        importance weights use them). `crosstok` (a crosstok.CrossTokenizer): batches in a
        student's tokens, converted where they are read (the reader processes with `workers`)."""
        self.cache, self.domains = cache, cache.domains
        self.batch_size, self.rank, self.world_size, self.prefetch = batch_size, rank, world_size, prefetch
        self.sampler = DomainSampler([cache.num_sequences(d, "train") for d in self.domains], seed)
        self.weights = normalise(weights)
        self.consumed_state = self.sampler.state_dict()
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.reader = SequenceReader(cache, targets, pin=pin, sample_logprobs=sample_logprobs, crosstok=crosstok)
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            # spawn, not fork: the parent has threads (the reader, torch) a fork would copy mid-flight.
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init, initargs=(cache.path, targets, sample_logprobs, crosstok))
        self._depth = prefetch + workers  # reads in flight: enough to keep every process busy
        self._thread: threading.Thread | None = None
        self._closed = False
        self._start()

    def _produce(self, stop: threading.Event, out: queue.Queue) -> None:
        try:
            pending: collections.deque = collections.deque()
            while not stop.is_set():
                draw = self.sampler.draw(self.weights, self.batch_size * self.world_size)
                mine = draw[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                state = self.sampler.state_dict()
                read = self._pool.submit(_worker_read, mine) if self._pool else None
                pending.append((read, mine, state))
                if self._pool and len(pending) < self._depth:
                    continue
                read, mine, state = pending.popleft()
                arrays = read.result() if read else self.reader.read(mine)
                batch = Batch(arrays["tokens"], arrays["topk_ids"], arrays["topk_logprobs"], arrays["domains"], state,
                              arrays["loss_mask"], arrays["target_logprob"], arrays["sample_logprob"], arrays["tail_logprob"],
                              arrays.get("crosstok"))
                while not stop.is_set():
                    try:
                        out.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            for read, _, _ in pending:
                if read:
                    read.cancel()
        except BaseException as e:  # surfaced in the training thread by next()
            out.put(e)

    def _start(self) -> None:
        self.sampler.load_state_dict(self.consumed_state)
        self._stop, self._queue = threading.Event(), queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._stop, self._queue), daemon=True, name="ddk-cache-loader")
        self._thread.start()

    def _halt(self) -> None:
        """Stop the reader thread and drop what it read ahead (the reader processes stay)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop reading: the thread, what it read ahead, and the reader processes. Later
        weight changes or state loads are refused (nothing would read them)."""
        self._closed = True
        self._halt()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "CacheLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def next(self) -> Batch:
        if self._closed:
            raise RuntimeError("the loader is closed")
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.consumed_state = item.state
        return item

    def set_weights(self, weights: np.ndarray) -> None:
        """New mixing weights from the next batch on; read-ahead batches are discarded."""
        if self._closed:
            raise RuntimeError("the loader is closed; set the weights before closing it")
        self._halt()
        self.weights = normalise(weights)
        self._start()

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.consumed_state, "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._halt()
        self.consumed_state = state["sampler"]
        self.weights = normalise(state["weights"])
        self._start()
