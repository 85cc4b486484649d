"""Teacher backends, by name: `load_teacher` is the one entry point the build uses.

A backend is one entry of `REGISTRY`: how to load it and the options it takes. Options
only one engine understands (vLLM's tensor parallelism, memory share, engine arguments...)
live with that backend: given to another, they are refused with the flag's name, never
dropped. Adding a backend is one class and one `Backend` entry, plus its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ...errors import ConfigError
from .base import Teacher, TeacherScores

# Options every backend takes; a backend may ignore one it has no use for (vLLM places
# and batches itself: device and batch size are scheduling, not results).
COMMON_OPTIONS = ("dtype", "device", "batch_size", "revision", "trust_remote_code")
# vLLM's own options, by their BuildConfig field names.
VLLM_OPTIONS = ("tensor_parallel_size", "gpu_memory_utilization", "max_num_batched_tokens", "logprobs_format", "engine_args")


def _load_hf(name_or_path: str, *, top_k: int, seq_len: int, **options: Any) -> Teacher:
    from .hf import HFTeacher

    return HFTeacher(name_or_path, **options)


def _load_vllm(name_or_path: str, *, top_k: int, seq_len: int, **options: Any) -> Teacher:
    from .vllm import VLLMTeacher

    return VLLMTeacher(name_or_path, top_k=top_k, seq_len=seq_len, **options)


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[..., Teacher]
    options: tuple[str, ...]  # the options it takes (beyond top_k and seq_len)


REGISTRY: dict[str, Backend] = {
    "hf": Backend("hf", _load_hf, COMMON_OPTIONS),
    "vllm": Backend("vllm", _load_vllm, COMMON_OPTIONS + VLLM_OPTIONS),
}
BACKENDS = ("auto", *REGISTRY)


def resolve_backend(backend: str) -> str:
    """'auto' is vLLM when it is installed (the production engine), else transformers."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        from .vllm import vllm_available

        return "vllm" if vllm_available() else "hf"
    return backend


def check_options(backend: str, options: dict[str, Any]) -> None:
    """Refuse, naming the flag, an option `backend` does not take (it would be dropped silently)."""
    if backend not in REGISTRY:
        raise ConfigError(f"--backend must be one of {', '.join(REGISTRY)}; got {backend!r}")
    extra = [k for k in options if k not in REGISTRY[backend].options]
    if extra:
        flags = ", ".join("--" + k.replace("_", "-").replace("engine-args", "engine-arg") for k in extra)
        takers = [b.name for b in REGISTRY.values() if all(k in b.options for k in extra)]
        raise ConfigError(f"{flags} {'applies' if len(extra) == 1 else 'apply'} to --backend {' or '.join(takers) or 'none'} only; "
                          f"this build runs {backend}: drop {'it' if len(extra) == 1 else 'them'}")


def load_teacher(backend: str, name_or_path: str, *, top_k: int, seq_len: int, **options: Any) -> Teacher:
    """Load `name_or_path` under `backend` (already resolved: a name in REGISTRY) with the
    options it takes (`check_options` refuses the others)."""
    check_options(backend, options)
    return REGISTRY[backend].load(name_or_path, top_k=top_k, seq_len=seq_len, **options)


__all__ = ["BACKENDS", "Backend", "REGISTRY", "Teacher", "TeacherScores", "check_options", "load_teacher", "resolve_backend"]
