"""Typed exceptions. The library raises these; the CLI turns them into one-line messages."""


class DDKCacheError(Exception):
    """Base class for every error a user can fix (bad input, wrong store, bad option)."""


class CorpusError(DDKCacheError):
    """The corpus cannot be read: missing files, malformed lines, bad encoding, too little text."""


class ConfigError(DDKCacheError):
    """An option is out of range or inconsistent with the teacher or the cache."""


class TeacherError(DDKCacheError):
    """The teacher model or its tokenizer cannot be loaded or used."""


class StoreError(DDKCacheError):
    """The output or input path is not a usable cache (wrong version, other build, incomplete)."""


class StoreVersionError(StoreError):
    """A cache written by another format version or with an unknown encoding: never "not a cache"."""
