"""The teacher backend interface: token ids in, top-k log-probabilities (or sampled ids) out.

Every backend returns the same arrays for the same model and sequences, so the store and
the trainer never know which engine produced a cache.

The build drives a teacher through `stream`: it hands over jobs (a shard's sequences) and
gets back, per sequence, a *finisher*: a function that turns the engine's raw output into
the row's targets (conversion, adaptive cut, sampling from a pool). The build runs the
finishers in its writer pool, so the engine is fed the next sequences while earlier ones
are converted and encoded; `stats` says how long the engine had nothing to do.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ...errors import ConfigError
from ...store.encodings import RowScores
from ...store.targets import DEFAULT_SAMPLE_POOL, TargetSpec, adaptive_cut, sample_from_topk, split_seed

DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: Any) -> str:
    """'auto' is bfloat16 on a GPU that supports it and float32 elsewhere."""
    import torch

    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's view of a batch of B sequences of L tokens, at temperature 1.

    Position t (0 <= t < L-1) is the distribution after reading tokens[0..t], i.e. over
    the token at t+1. There is no entry for the last token, whose successor is unknown.

    topk_ids:       int32   [B, L-1, k]  token ids, by descending log-probability
    topk_logprobs:  float32 [B, L-1, k]  log-softmax of the logits at those ids
    target_logprob: float32 [B, L-1]     log-probability of the actual next token tokens[t+1]
    """

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprob: np.ndarray
    counts: np.ndarray | None = None  # sampled targets: draws per id [B, L-1, k] (0 = padding)


@dataclass
class Job:
    """Sequences for the teacher: `tokens` int32 [n, L] of one shard; `rows` their global
    indices in their split (they seed sampled targets), `seed` the rest of the seed."""

    key: Any
    tokens: np.ndarray
    rows: np.ndarray
    seed: list[int] = field(default_factory=list)


@dataclass
class EngineStats:
    """How the engine spent the scoring phase: `busy` seconds computing, `wall` in all."""

    busy: float = 0.0
    wall: float = 0.0
    rows: int = 0

    @property
    def idle_share(self) -> float:
        return max(0.0, 1.0 - self.busy / self.wall) if self.wall else 0.0


def finish_topk(ids: np.ndarray, lps: np.ndarray, target: np.ndarray, tokens: np.ndarray, spec: TargetSpec, seed: list[int],
                pool_tail: np.ndarray | None = None) -> RowScores:
    """One sequence's engine output (top-k or a sampling pool, [P, k']) -> its targets.
    `pool_tail` [P], where the engine knows it exactly, is the log of the mass outside the k'
    ids it returned; the targets' tail adds what the adaptive cut drops."""
    if spec.kind == "topk":
        kept = adaptive_cut(lps[:, : spec.k], spec)
        tail = None
        if pool_tail is not None:
            dropped = np.where(np.isfinite(kept), -np.inf, lps[:, : spec.k]).astype(np.float64)
            with np.errstate(under="ignore"):
                tail = np.logaddexp.reduce(np.concatenate([dropped, np.asarray(pool_tail, np.float64)[:, None]], 1), axis=1)
        return RowScores(ids[:, : spec.k], kept, target, tokens[1:], tail_logprob=tail)
    out_ids, counts, out_lps = sample_from_topk(ids, lps, spec, np.random.default_rng(seed))
    return RowScores(out_ids.astype(np.int32), out_lps, target, tokens[1:], counts)


class Teacher(ABC):
    """One loaded teacher model behind one engine."""

    backend: str  # the name users pass to --backend
    stats: EngineStats = EngineStats()  # of the last `stream` (each call starts its own)

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Size of the output distribution (the logits' last dimension)."""

    @property
    @abstractmethod
    def max_context(self) -> int | None:
        """Longest sequence the model accepts, if the config says."""

    _tokenizer: Any

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (transformers), used to tokenize the corpus."""
        return self._tokenizer

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What the cache records about this teacher (JSON-serialisable); built by `_info`."""

    def _info(self, *, name_or_path: str, revision: str | None, architecture: str, num_parameters: int | None,
              dtype: str, backend_version: str, max_context: int | None) -> dict[str, Any]:
        """The root metadata's `teacher` object: its keys are named here only (storage_layout.md)."""
        local = Path(name_or_path)
        return {
            # A local directory by its absolute path: `inspect --fidelity` finds it from anywhere.
            "name_or_path": str(local.resolve()) if local.is_dir() else name_or_path,
            "revision": revision,
            "fingerprint": model_fingerprint(name_or_path, revision),
            "weights": weight_digests(Path(name_or_path)) if Path(name_or_path).is_dir() else {},
            "architecture": architecture,
            "num_parameters": num_parameters,
            "dtype": dtype,
            "backend": self.backend,
            "backend_version": backend_version,
            "max_context": max_context,
        }

    @abstractmethod
    def score(self, tokens: np.ndarray, top_k: int) -> TeacherScores:
        """Score int32 [B, L] token ids; see TeacherScores for what comes back."""

    @abstractmethod
    def stream(self, jobs: Iterable[Job], spec: TargetSpec) -> Iterator[tuple[Job, int, Callable[[], RowScores]]]:
        """For every sequence of every job, (job, row in the job, finisher): see the module docstring."""

    def pool_size(self, spec: TargetSpec) -> int:
        """How many log-probs per position the engine must return for `spec`."""
        if spec.kind == "sampled":
            return min(spec.sample_pool or DEFAULT_SAMPLE_POOL, self.vocab_size)
        return spec.k

    def targets(self, tokens: np.ndarray, spec: TargetSpec, domain: str = "d", split: str = "train", first_row: int = 0) -> list[RowScores]:
        """The targets `spec` asks for, one RowScores per sequence (tests, benchmarks)."""
        job = Job(None, tokens, np.arange(first_row, first_row + len(tokens)), split_seed(spec, domain, split))
        rows: dict[int, RowScores] = {}
        for _, row, finish in self.stream([job], spec):
            rows[row] = finish()
        return [rows[i] for i in range(len(tokens))]

    def close(self) -> None:
        """Release the model (and engine processes, for backends that start them)."""


class Timer:
    """Accumulates seconds spent inside `with timer:` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._t0


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256: one hash per file per process


def weight_digests(path: Path) -> dict[str, str]:
    """sha256 of every weight file of a local model directory, by file name: the whole file,
    streamed (README: the cost per GB), or, for a file that links to a Hugging Face hub blob,
    the blob's own name (the hub names blobs by their sha256: free)."""
    out = {}
    for w in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        target = w.resolve()
        if w.is_symlink() and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
            out[w.name] = target.name
            continue
        st = target.stat()
        key = (str(target), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in _DIGESTS:
            with open(target, "rb") as f:
                _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
        out[w.name] = _DIGESTS[key]
    return out


def model_fingerprint(name_or_path: str, revision: str | None) -> str:
    """Identify a model's weights, to refuse resuming a cache with another teacher.

    A local directory: sha256 over config.json and every weight file's name and sha256 (of
    the whole file: weights changed in place, same size, are a different teacher). A hub
    id: the id and the resolved commit.
    """
    path = Path(name_or_path)
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(f"hub:{name_or_path}@{revision}".encode())
        return "sha256:" + h.hexdigest()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for name, digest in weight_digests(path).items():
        h.update(f"{name}:{digest}".encode())
    return "sha256:" + h.hexdigest()
