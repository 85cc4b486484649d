"""Keys and bytes under one root: a local directory, or any fsspec URL (s3://, gs://, memory://).

The cache's large arrays, its build logs and the build's token staging are plain objects;
this module is the only place that reads or writes them (zarr writes only the small
`zarr.json` metadata files). Guarantees, on every store:

  * `put` is atomic: a reader sees the old object, the new one, or none, never a part
    (local: write to a temporary name, fsync, rename; object stores: one PUT);
  * `get`/`get_range` return None for a missing object, so callers decide what absence
    means (in a complete cache it is damage, and they say so);
  * local reads use `os.pread` on file descriptors kept open per object (thread-safe,
    no seek), so reading many rows of one shard costs one open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from ..errors import StoreError


class LockHeld(StoreError):
    """Another live process holds the lock (its description is in the message)."""


def is_url(path: str) -> bool:
    """fsspec URLs (s3://, gs://, memory://...) go through fsspec; anything else is a local path."""
    return "://" in str(path)


class Objects:
    """Base class: see the module docstring. Keys are '/'-separated, relative to the root."""

    root: str
    local: bool = False

    @staticmethod
    def open(root: str) -> "Objects":
        return FsspecObjects(root) if is_url(root) else LocalObjects(root)

    def get(self, key: str) -> bytes | None:
        return self.get_range(key, 0, None)

    def get_range(self, key: str, start: int, end: int | None) -> bytes | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_ranges(self, requests: list[tuple[str, int, int]]) -> list[bytes | None]:
        """Several (key, start, end) ranges; None for each whose object is missing."""
        return [self.get_range(k, s, e) for k, s, e in requests]

    def size(self, key: str) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def put_if_absent(self, key: str, data: bytes) -> bool:  # pragma: no cover - abstract
        """Write `data` unless `key` exists; True if this call wrote it."""
        raise NotImplementedError

    def list(self, prefix: str) -> dict[str, int]:  # pragma: no cover - abstract
        """Every key under `prefix` (recursively) with its size, in one listing."""
        raise NotImplementedError

    def delete(self, prefix: str) -> None:  # pragma: no cover - abstract
        """Remove a key or everything under a prefix; missing is fine."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    @contextlib.contextmanager
    def lock(self, key: str, what: str) -> Iterator[None]:
        """Hold an exclusive lock named `key` while the block runs; LockHeld if another live
        process holds it. Local stores use flock, which the kernel releases when the holder
        dies (kill -9 included), so a crash never leaves it stuck. Object stores have no such
        lock: the block runs unlocked (see README, "What happens when things go wrong")."""
        yield

    def close(self) -> None:
        """Release open file handles."""

    def describe(self, key: str) -> str:
        """A path or URL for messages."""
        return f"{self.root.rstrip('/')}/{key}"


class LocalObjects(Objects):
    local = True
    _MAX_OPEN = 256  # file descriptors kept open for reads (least recently used closed first)

    def __init__(self, root: str) -> None:
        self.root = str(root)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._guard = threading.Lock()

    def path(self, key: str) -> Path:
        return Path(self.root) / key

    def _fd(self, key: str) -> int | None:
        with self._guard:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                return fd
            try:
                fd = os.open(self.path(key), os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
            self._fds[key] = fd
            while len(self._fds) > self._MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def forget(self, key: str) -> None:
        """Drop a cached handle (after the object was replaced)."""
        with self._guard:
            fd = self._fds.pop(key, None)
            if fd is not None:
                os.close(fd)

    def get_range(self, key: str, start: int, end: int | None) -> bytes | None:
        fd = self._fd(key)
        if fd is None:
            return None
        try:
            if start < 0 or end is None:
                size = os.fstat(fd).st_size
                start = max(0, size + start) if start < 0 else start
                end = size if end is None else end
            return os.pread(fd, end - start, start)
        except OSError as e:
            raise StoreError(f"{self.describe(key)}: cannot read ({e})") from None

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(path, e) from None
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        tmp = self._write(path, data)
        os.replace(tmp, path)
        self.forget(key)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self.path(key)
        if path.exists():
            return False
        tmp = self._write(path, data)
        try:
            os.link(tmp, path)  # fails if the name exists: exclusive, and the content is whole
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str) -> dict[str, int]:
        base = self.path(prefix)
        out: dict[str, int] = {}
        if base.is_file():
            return {prefix: base.stat().st_size}
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith(".partial"):
                    continue  # a write in progress (or abandoned by a crash)
                full = os.path.join(dirpath, name)
                try:
                    out[os.path.relpath(full, self.root).replace(os.sep, "/")] = os.stat(full).st_size
                except FileNotFoundError:
                    pass
        return out

    def delete(self, prefix: str) -> None:
        import shutil

        path = self.path(prefix)
        with self._guard:
            for key in [k for k in self._fds if k == prefix or k.startswith(prefix.rstrip("/") + "/")]:
                os.close(self._fds.pop(key))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, key: str, what: str) -> Iterator[None]:
        import fcntl
        import json
        import socket

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise LockHeld(f"{what} is already running ({holder}); wait for it to finish, or stop it") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the flock

    def close(self) -> None:
        with self._guard:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        # The read handles go with the store: a process that opens many caches (a test
        # suite, a service) and never calls close() would otherwise keep up to _MAX_OPEN
        # descriptors per cache until it runs out.
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def describe(self, key: str) -> str:
        return str(self.path(key))


class FsspecObjects(Objects):
    def __init__(self, root: str) -> None:
        import fsspec

        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)

    def _p(self, key: str) -> str:
        return f"{self._base}/{key}" if key else self._base

    def get_range(self, key: str, start: int, end: int | None) -> bytes | None:
        try:
            return self.fs.cat_file(self._p(key), start=start, end=end)
        except FileNotFoundError:
            return None

    def get_ranges(self, requests: list[tuple[str, int, int]]) -> list[bytes | None]:
        if not requests:
            return []
        out = self.fs.cat_ranges([self._p(k) for k, _, _ in requests], [s for _, s, _ in requests], [e for _, _, e in requests],
                                 on_error="return")
        return [None if isinstance(r, FileNotFoundError) else _raise_if_error(r, self, k) for r, (k, _, _) in zip(out, requests)]

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self._p(key)))
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(key), data)
        except OSError as e:
            raise _write_error(self.describe(key), e) from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")  # s3fs: a conditional PUT (If-None-Match)
            return True
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without create mode: check, then write
            if self.exists(key):
                return False
            self.put(key, data)
            return True

    def list(self, prefix: str) -> dict[str, int]:
        try:
            found = self.fs.find(self._p(prefix), detail=True)
        except FileNotFoundError:
            return {}
        start = len(self._base) + 1
        return {path[start:]: int(info.get("size") or 0) for path, info in found.items() if info.get("type", "file") == "file"}

    def delete(self, prefix: str) -> None:
        try:
            self.fs.rm(self._p(prefix), recursive=True)
        except FileNotFoundError:
            pass


def _raise_if_error(result: object, objects: Objects, key: str) -> bytes:
    if isinstance(result, BaseException):
        raise StoreError(f"{objects.describe(key)}: cannot read ({result})") from None
    return result  # type: ignore[return-value]


class DiskFull(StoreError):
    """No space left where the cache (or a run) is written."""


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or what it wraps: DCP's CheckpointException keeps each rank's error in
    `failures`, chained exceptions in __cause__/__context__) is a full disk or quota."""
    seen = 0
    stack = [e]
    while stack and seen < 32:
        x = stack.pop()
        seen += 1
        if not isinstance(x, BaseException):
            continue
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):  # rank -> exception, or (exception, traceback)
            stack.extend(v[0] if isinstance(v, tuple) else v for v in failures.values())
        stack.extend(c for c in (x.__cause__, x.__context__) if c is not None)
    return False


def _write_error(where: object, e: OSError) -> StoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on the device holding {where}; free space (or choose another --out) and run the same command again: it resumes")
    return StoreError(f"cannot write {where}: {e}")
