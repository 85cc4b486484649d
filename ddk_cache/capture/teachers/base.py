"""The teacher backend interface: token ids in, top-k log-probabilities (or sampled ids) out.

Every backend returns the same arrays for the same model and sequences, so the store and
the trainer never know which engine produced a cache.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...store.targets import DEFAULT_SAMPLE_POOL, TargetSpec, adaptive_cut, sample_from_topk

DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str) -> Any:
    """'auto' picks CUDA when present, else CPU; anything else is passed to torch.device."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # One GPU per worker when launched by torchrun or srun with several per node.
        local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        return torch.device(f"cuda:{int(local) % torch.cuda.device_count()}")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a torch device: {e}") from None


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


class Teacher(ABC):
    """One loaded teacher model behind one engine."""

    backend: str  # the name users pass to --backend

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
        return {
            "name_or_path": name_or_path,
            "revision": revision,
            "fingerprint": model_fingerprint(name_or_path, revision),
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

    def targets(self, tokens: np.ndarray, spec: TargetSpec, seed: list[int]) -> TeacherScores:
        """The targets `spec` asks for (targets.py): top-k, cut adaptively, or sampled.

        Sampling here draws from the top-`spec.sample_pool` log-probs, renormalised: all a
        backend that returns only top-k (vLLM) can offer. Backends with the full
        distribution override this for `sample_pool=None`. `seed` fixes the draws."""
        if spec.kind == "topk":
            s = self.score(tokens, spec.k)
            return replace(s, topk_logprobs=adaptive_cut(s.topk_logprobs, spec))
        pool = min(spec.sample_pool or DEFAULT_SAMPLE_POOL, self.vocab_size)
        s = self.score(tokens, pool)
        B, P, _ = s.topk_ids.shape
        ids, counts, lps = sample_from_topk(s.topk_ids.reshape(B * P, pool), s.topk_logprobs.reshape(B * P, pool), spec, np.random.default_rng(seed))
        shape = (B, P, spec.entries)
        return TeacherScores(ids.reshape(shape).astype(np.int32), lps.reshape(shape), s.target_logprob, counts.reshape(shape).astype(np.uint8))

    def close(self) -> None:
        """Release the model (and engine processes, for backends that start them)."""


def model_fingerprint(name_or_path: str, revision: str | None) -> str:
    """Identify a model's weights cheaply, to refuse resuming a cache with another teacher.

    A local directory: sha256 over config.json and, per weight file, its name, size and
    first and last 64 KiB (retraining changes those bytes; hashing many GB would not be
    cheap). A hub id: the id and the resolved commit.
    """
    path = Path(name_or_path)
    h = hashlib.sha256()
    if not path.is_dir():
        h.update(f"hub:{name_or_path}@{revision}".encode())
        return "sha256:" + h.hexdigest()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    for w in weights:
        size = w.stat().st_size
        h.update(f"{w.name}:{size}".encode())
        with open(w, "rb") as f:
            h.update(f.read(1 << 16))
            f.seek(max(0, size - (1 << 16)))
            h.update(f.read(1 << 16))
    return "sha256:" + h.hexdigest()
