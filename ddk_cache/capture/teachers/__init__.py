"""Teacher backends. `load_teacher` is the one entry point the build uses."""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .base import Teacher, TeacherScores

BACKENDS = ("auto", "hf", "vllm")


def resolve_backend(backend: str) -> str:
    """'auto' is vLLM when it is installed (the production engine), else transformers."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        from .vllm import vllm_available

        return "vllm" if vllm_available() else "hf"
    return backend


def load_teacher(backend: str, name_or_path: str, *, top_k: int, seq_len: int, **options: Any) -> Teacher:
    """Load `name_or_path` under `backend` (already resolved: 'hf' or 'vllm').

    `options` are the backend's keyword arguments: dtype, device, batch_size, revision,
    trust_remote_code (both); tensor_parallel_size, gpu_memory_utilization,
    max_num_batched_tokens, logprobs_format, engine_args (vLLM only; hf ignores them).
    """
    if backend == "hf":
        from .hf import HFTeacher

        hf_options = {k: options[k] for k in ("dtype", "device", "batch_size", "revision", "trust_remote_code") if k in options}
        return HFTeacher(name_or_path, **hf_options)
    if backend == "vllm":
        from .vllm import VLLMTeacher

        return VLLMTeacher(name_or_path, top_k=top_k, seq_len=seq_len, **options)
    raise ConfigError(f"--backend must be one of hf, vllm; got {backend!r}")


__all__ = ["BACKENDS", "Teacher", "TeacherScores", "load_teacher", "resolve_backend"]
