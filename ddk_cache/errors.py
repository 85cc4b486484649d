"""Typed exceptions. The library raises these; the CLI turns them into one-line messages."""


class DDKCacheError(Exception):
    """Base class for every error a user can fix (bad input, wrong store, bad option)."""


class CorpusError(DDKCacheError):
    """The corpus cannot be read: missing files, malformed lines, bad encoding, too little text."""


class ConfigError(DDKCacheError):
    """An option is out of range or inconsistent with the teacher or the cache."""


class TeacherError(DDKCacheError):
    """The teacher model or its tokenizer cannot be loaded or used."""


class NonFiniteTeacher(TeacherError):
    """The teacher's output for one sequence holds NaN or infinity (a broken head, bf16 overflow).

    `row` is the sequence's index in its job (shard), `position` the first bad predicted position."""

    def __init__(self, row: int, position: int, detail: str = "") -> None:
        super().__init__(f"non-finite teacher output at position {position}{': ' + detail if detail else ''}")
        self.row, self.position, self.detail = row, position, detail


class StoreError(DDKCacheError):
    """The output or input path is not a usable cache (wrong version, other build, incomplete)."""


class StoreVersionError(StoreError):
    """A cache written by another format version or with an unknown encoding: never "not a cache"."""
