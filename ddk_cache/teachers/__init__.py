"""Teacher backends. `load_teacher` is the one entry point the build uses."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Teacher, TeacherScores

BACKENDS = ("auto", "hf")


def load_teacher(backend: str, name_or_path: str, **options) -> Teacher:
    """Load `name_or_path` under `backend` ('auto' picks the best installed engine).

    Options are the backend's keyword arguments (dtype, device, batch_size, revision,
    trust_remote_code).
    """
    if backend in ("auto", "hf"):
        from .hf import HFTeacher

        return HFTeacher(name_or_path, **options)
    raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


__all__ = ["BACKENDS", "Teacher", "TeacherScores", "load_teacher"]
