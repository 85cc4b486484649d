"""Build logs: which shards are written, and the sums the teacher perplexity table needs.

Each build worker process appends one JSON line per shard it finished to a log of its own,
`_build/log/<worker>-<run id>.jsonl`, after the shard's objects are written: a record
means the shard is complete. Finding what is left is one listing of `_build/log/` and one
read per log (O(worker runs), never one request per shard), at every start and at
finalize. On local disks a log is appended to and fsynced; object stores cannot append,
so a log there is rewritten whole after each record and a new log segment is started
every SEGMENT records, bounding the bytes rewritten.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from .objects import Objects

LOG_DIR = "_build/log"
SEGMENT = 512  # records per log object on object stores


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard: where, how many rows, and its exact sums (float64, computed from
    the teacher's values before any quantisation)."""

    shard: str  # "<domain>/<split>/<index>"
    rows: int
    nll_sum: float = 0.0  # -sum of target log-probs over the positions that carry loss
    positions: int = 0  # predicted positions that carry loss
    kept_mass_sum: float = 0.0  # sum over those positions of the kept teacher probability
    objects: dict[str, int] = field(default_factory=dict)  # stored object sizes, by array
    # Rows (indices within the shard) whose teacher output was not finite, kept with
    # `--on-nonfinite skip`: they hold label-only targets and are not in the sums.
    nonfinite: list[int] = field(default_factory=list)
    # blake2b-128 (hex) of each object's chunk bytes, as its identity trailer records them
    # (caches built since ddk-cache 0.3; `verify` recomputes them).
    hashes: dict[str, str] = field(default_factory=dict)
    # UTF-8 bytes of the predicted tokens over the positions in the sums (ddk-cache 0.4; None:
    # not recorded, or a tokenizer whose bytes are not known): bits per byte's denominator.
    bytes: int | None = None

    def to_json(self) -> str:
        body = asdict(self)
        for key in ("nonfinite", "hashes", "bytes"):  # absent when empty: records stay as older versions wrote them
            if not body[key]:
                del body[key]
        return json.dumps(body, separators=(",", ":"))


class LogWriter:
    """Appends this worker's shard records (one process, one log; see the module docstring)."""

    def __init__(self, objects: Objects, worker: tuple[int, int]) -> None:
        self.objects = objects
        self.base = f"{LOG_DIR}/w{worker[0]:05d}-of-{worker[1]:05d}-{uuid.uuid4().hex[:10]}"
        self.lines: list[str] = []
        self.segment = 0
        self._file = None

    def append(self, record: ShardRecord) -> None:
        line = record.to_json()
        if self.objects.local:
            if self._file is None:
                path = self.objects.path(f"{self.base}.jsonl")  # type: ignore[attr-defined]
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
            return
        if len(self.lines) == SEGMENT:
            self.segment, self.lines = self.segment + 1, []
        self.lines.append(line)
        self.objects.put(f"{self.base}.{self.segment:05d}.jsonl", ("\n".join(self.lines) + "\n").encode())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(objects: Objects) -> dict[str, ShardRecord]:
    """Every shard record in the cache's logs, by shard key. A line cut short by a crash is
    ignored (its shard is redone); records of one shard by two workers are equal, and
    the first one read is kept."""
    found: dict[str, ShardRecord] = {}
    for key in sorted(objects.list(LOG_DIR)):
        raw = objects.get(key)
        if raw is None:
            continue
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                record = ShardRecord(**json.loads(line))
            except (ValueError, TypeError):
                continue
            found.setdefault(record.shard, record)
    return found


def shard_key(domain: str, split: str, index: int) -> str:
    return f"{domain}/{split}/{index}"


__all__ = ["LOG_DIR", "LogWriter", "ShardRecord", "read_records", "shard_key"]
