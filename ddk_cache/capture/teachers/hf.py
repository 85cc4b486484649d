"""The transformers teacher: `AutoModelForCausalLM`, batched forward passes, exact log-softmax.

It is the reference every other backend is tested against.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ...errors import NonFiniteTeacher, TeacherError
from ...store.encodings import RowScores
from ...store.targets import TargetSpec, sample_from_logprobs
from ..tokenization import first_line, load_tokenizer
from ...runtime import load_causal_lm, resolve_device
from .base import EngineStats, Job, Teacher, TeacherScores, Timer, finish_topk, resolve_dtype

class HFTeacher(Teacher):
    """A causal LM loaded with transformers, scored `batch_size` sequences at a time."""

    backend = "hf"

    def __init__(
        self,
        name_or_path: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.name_or_path = name_or_path
        self.revision = revision
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        try:
            model = load_causal_lm(name_or_path, revision=revision, dtype=getattr(torch, self.dtype), trust_remote_code=trust_remote_code)
        except Exception as e:  # OSError, ValueError, safetensors errors... all mean "does not load"
            raise TeacherError(f"cannot load the teacher model from {name_or_path!r}: {first_line(e)}") from None
        self.model = model.to(self.device).eval()
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_context(self) -> int | None:
        value = getattr(self.config, "max_position_embeddings", None)
        return int(value) if value else None

    def info(self) -> dict[str, Any]:
        import transformers

        return self._info(
            name_or_path=self.name_or_path,
            revision=getattr(self.model.config, "_commit_hash", None) or self.revision,
            architecture=(getattr(self.model.config, "architectures", None) or [type(self.model).__name__])[0],
            num_parameters=int(sum(p.numel() for p in self.model.parameters())),
            dtype=self.dtype,
            backend_version=f"transformers {transformers.__version__}, torch {torch.__version__}",
            max_context=self.max_context,
        )

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw logits [B, L, V] of token ids already on the model's device (online KD's
        target). no_grad rather than inference_mode: the result enters the student's loss."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    @torch.inference_mode()
    def rows(self, tokens: np.ndarray) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(row, float32 log-softmax [L-1, V], next tokens [L-1]) for each sequence of int32
        [B, L] `tokens`, `batch_size` sequences per forward pass, on the model's device."""
        for start in range(0, len(tokens), self.batch_size):
            stop = min(len(tokens), start + self.batch_size)
            input_ids = torch.from_numpy(np.ascontiguousarray(tokens[start:stop])).to(self.device, torch.long)
            logits = self.model(input_ids=input_ids, use_cache=False).logits
            # One row at a time: the float32 log-softmax of a whole batch would be B*L*V*4 bytes.
            for row in range(stop - start):
                yield start + row, torch.log_softmax(logits[row, :-1].float(), dim=-1), input_ids[row, 1:]

    @torch.inference_mode()
    def score(self, tokens: np.ndarray, top_k: int) -> TeacherScores:
        n, length = tokens.shape
        ids = np.empty((n, length - 1, top_k), np.int32)
        lps = np.empty((n, length - 1, top_k), np.float32)
        target = np.empty((n, length - 1), np.float32)
        for row, logprobs, nxt in self.rows(tokens):
            values, indices = torch.topk(logprobs, top_k, dim=-1)
            ids[row] = indices.to(torch.int32).cpu().numpy()
            lps[row] = values.cpu().numpy()
            target[row] = logprobs.gather(-1, nxt[:, None]).squeeze(-1).cpu().numpy()
        return TeacherScores(ids, lps, target)

    def stream(self, jobs: Iterable[Job], spec: TargetSpec) -> Iterator[tuple[Job, int, Callable[[], RowScores]]]:
        """Forward passes of `batch_size` sequences back to back; per sequence the top-k (or,
        for sampled targets, the draws from the full distribution) leave the device at once,
        and the finisher does the rest in the caller's pool. `stats.busy` is the time spent
        in forward passes and on-device selection."""
        self.stats = EngineStats()
        started = time.perf_counter()
        busy = Timer()
        full_sampling = spec.kind == "sampled" and spec.sample_pool is None
        k = self.pool_size(spec)
        for job in jobs:
            for start in range(0, len(job.tokens), self.batch_size):
                with busy, torch.inference_mode():
                    chunk = job.tokens[start : start + self.batch_size]
                    results = []
                    for row, logprobs, nxt in self.rows(chunk):
                        # NaN or +inf logits (a broken head, bf16 overflow) give NaN log-probs:
                        # one reduction on the device, and the row's finisher reports where.
                        nan = torch.isnan(logprobs).any(-1)
                        if bool(nan.any()):
                            position = int(nan.nonzero()[0, 0])
                            results.append((row, (lambda r=start + row, p=position: _raise(NonFiniteTeacher(r, p, "NaN log-probabilities")))))
                            continue
                        target = logprobs.gather(-1, nxt[:, None]).squeeze(-1).cpu().numpy()
                        seed = [*job.seed, int(job.rows[start + row])]
                        if full_sampling:
                            # One generator per sequence, on the logits' device: the same draws on every resume.
                            gen = torch.Generator(self.device).manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
                            ids, counts, lps = sample_from_logprobs(logprobs, spec, gen)
                            scores = RowScores(ids.astype(np.int32), lps, target, chunk[row, 1:], counts)
                            results.append((row, (lambda s=scores: s)))
                        else:
                            values, indices = torch.topk(logprobs, k, dim=-1)
                            ids, lps = indices.to(torch.int32).cpu().numpy(), values.cpu().numpy()
                            # The mass outside the top-k, exactly (1 - their sum would round away
                            # a peaked teacher's tail): a log-sum-exp over the other ids.
                            tail = (torch.logsumexp(logprobs.scatter(-1, indices, float("-inf")), -1).cpu().numpy()
                                    if k < logprobs.shape[-1] else np.full(len(lps), -np.inf, np.float32))
                            results.append((row, (lambda i=ids, v=lps, g=target, x=chunk[row], s=seed, t=tail:
                                                  finish_topk(i, v, g, x, spec, s, t))))
                for row, finish in results:
                    self.stats.busy, self.stats.wall = busy.seconds, time.perf_counter() - started
                    self.stats.rows += 1
                    yield job, start + row, finish
        self.stats.busy, self.stats.wall = busy.seconds, time.perf_counter() - started

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _raise(error: Exception) -> RowScores:
    raise error
