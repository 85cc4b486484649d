"""`ddk-cache import --from ddk`: Parquet targets in `ddk-cache export`'s layout become a
normal cache again (issue #28, in part).

The source is a directory as `ddk-cache export` writes it (DIR/<domain>/<split>/*.parquet,
with or without its export.json), which any pipeline can also produce: one row per
sequence, all of one length L, with the columns of `export.COLUMNS` (`input_ids`,
`topk_ids`, `topk_logprobs`, `target_logprob` required; `loss_mask` and `tail_logprob`
used where present). The targets are stored with pack-v3, so every kept value is within
its bound of the source; the teacher perplexity table is computed from `target_logprob`.

Before anything is written, every file is checked (columns, lengths, ids below the
vocabulary, finite values), and a bad one is refused with one line naming the file, row
and column. Shards are written and logged as a build writes them, so an interrupted import
resumes with the same command; memory is a batch of rows and a shard's, whatever a file
holds (files are read by row groups).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DDKCacheError
from .export import FORMAT, MANIFEST, _pyarrow
from .capture.scoring import row_chunks
from .store.cache import LOSS_MASK, SPLITS, CacheWriter
from .store.encodings import PackV3, RowScores
from .store.log import ShardRecord
from .store.meta import CHAT, STATE_COMPLETE, STATE_INITIALIZING, TEXT, CacheMeta, DomainInfo, SplitInfo
from .store.targets import TargetSpec

REQUIRED = ("input_ids", "topk_ids", "topk_logprobs", "target_logprob")


def _bad(path: Path, row: int, column: str, what: str) -> DDKCacheError:
    return DDKCacheError(f"import: {path}, row {row}, column {column}: {what}; fix or drop that row and run the import again")


def _sources(root: Path) -> tuple[dict[str, Any] | None, list[tuple[str, str, Path]]]:
    """The export manifest (or None) and every (domain, split, file) in row order."""
    manifest = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).exists() else None
    if manifest is not None:
        if manifest.get("format") != FORMAT or manifest.get("layout", "ddk") != "ddk":
            raise DDKCacheError(f"import: {root / MANIFEST} is not a ddk-cache export in its own layout (--format parquet or hf)")
        if manifest.get("targets_kind") != "topk":
            raise DDKCacheError(f"import: {root} holds {manifest.get('targets')}: import takes top-k targets (sampled ones "
                                "would be read as log-probabilities)")
        if manifest.get("state") != "complete":
            raise DDKCacheError(f"import: the export in {root} is not complete; finish it (run the same `ddk-cache export` again)")
        rels = list(manifest["files"])
    else:
        rels = sorted(str(p.relative_to(root)) for p in root.glob("*/*/*.parquet"))
    files = []
    for rel in rels:
        domain, split = Path(rel).parts[:2]
        if split not in SPLITS:
            raise DDKCacheError(f"import: {root / rel}: the split folder must be one of {', '.join(SPLITS)}, not {split!r}")
        files.append((domain, split, root / rel))
    if not files:
        raise DDKCacheError(f"import: no Parquet files under {root} (expected DOMAIN/SPLIT/*.parquet, as `ddk-cache export` writes)")
    return manifest, files


BATCH = 64  # sequences read at a time: memory is this many sequences (and a shard's rest), whatever a file holds


def _batches(pq: Any, pa: Any, path: Path, vocab_size: int) -> Iterator[dict[str, Any]]:
    """A file's rows, BATCH sequences at a time, checked (see _rows)."""
    base, length = 0, None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH):
        rows = _rows(pa.Table.from_batches([batch]), path, vocab_size, base, length)
        base, length = base + batch.num_rows, length or rows["L"]
        yield rows


def _lists(table: Any, name: str, path: Path, base: int) -> tuple[np.ndarray, Any]:
    """A list column as (offsets [n + 1] from 0, child array): Arrow's own buffers, no Python
    object per value. A null list is refused (naming its row)."""
    arr = table.column(name).combine_chunks()
    if arr.null_count:
        raise _bad(path, base + int(np.flatnonzero(np.asarray(arr.is_null()))[0]), name, "null")
    offsets = np.asarray(arr.offsets, np.int64)
    return offsets - offsets[0], arr.flatten()


def _rows(table: Any, path: Path, vocab_size: int, base: int, length: int | None = None) -> dict[str, Any]:
    """Rows base.. of file `path` as numpy arrays, checked: tokens [n, L], ids/logprobs
    [n, P, K] padded (0 / -inf), target [n, P], tail [n, P] or None, mask [n, L] or None.
    L is `length` (the file's earlier rows) or this table's first row's."""
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DDKCacheError(f"import: {path}: missing column(s) {', '.join(missing)} (the columns of `ddk-cache export --help`)")
    n = table.num_rows

    def per_sequence(name: str, width: int | None, dtype: type) -> np.ndarray:
        offsets, values = _lists(table, name, path, base)
        lengths = np.diff(offsets)
        want = lengths[0] if width is None and n else width
        bad = np.flatnonzero(lengths != want)
        if len(bad):
            raise _bad(path, base + int(bad[0]), name, f"{lengths[bad[0]]} values where the rows before it have {want}: "
                       "every sequence of a cache has one length, one value per token or position")
        return values.to_numpy(zero_copy_only=False).astype(dtype).reshape(n, want)

    tokens = per_sequence("input_ids", length, np.int64)
    L = tokens.shape[1] if n else 0
    P = L - 1
    if n and (tokens.min() < 0 or tokens.max() >= vocab_size):
        row = int(np.flatnonzero((tokens < 0).any(1) | (tokens >= vocab_size).any(1))[0])
        raise _bad(path, row, "input_ids", f"a token id outside the vocabulary [0, {vocab_size})")
    target = per_sequence("target_logprob", P, np.float64)
    if not np.isfinite(target).all():
        raise _bad(path, base + int(np.flatnonzero(~np.isfinite(target).all(1))[0]), "target_logprob", "a value that is not finite")
    entries = {}
    for name in ("topk_ids", "topk_logprobs"):
        outer, positions = _lists(table, name, path, base)
        bad = np.flatnonzero(np.diff(outer) != P)
        if len(bad):
            raise _bad(path, base + int(bad[0]), name, f"not one entry per predicted position ({P})")
        inner = np.asarray(positions.offsets, np.int64)
        entries[name] = (inner - inner[0], positions.flatten().to_numpy(zero_copy_only=False))
    (widths_at, ids), (lp_at, lps) = entries["topk_ids"], entries["topk_logprobs"]
    widths = np.diff(widths_at)
    row_of = lambda i: base + int(i) // max(P, 1)  # noqa: E731  (position index -> row)
    if not np.array_equal(widths_at, lp_at) or (widths < 1).any():
        bad = np.flatnonzero((np.diff(lp_at) != widths) | (widths < 1))[0]
        raise _bad(path, row_of(bad), "topk_logprobs", "each position needs as many log-probs as ids, and at least one")
    where = lambda bad: row_of(np.searchsorted(widths_at, np.flatnonzero(bad)[0], "right") - 1)  # noqa: E731  (value index -> row)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise _bad(path, where((ids < 0) | (ids >= vocab_size)), "topk_ids", f"an id outside the vocabulary [0, {vocab_size})")
    lps = lps.astype(np.float64)
    if not (np.isfinite(lps) & (lps <= 1e-6)).all():
        raise _bad(path, where(~(np.isfinite(lps) & (lps <= 1e-6))), "topk_logprobs", "a log-probability that is not finite or is above 0")
    K = int(widths.max(initial=1))
    keep = np.arange(K)[None, :] < widths[:, None]
    out_ids, out_lp = np.zeros((n * P, K), np.int32), np.full((n * P, K), -np.inf, np.float32)
    out_ids[keep], out_lp[keep] = ids, lps
    tail = None
    if "tail_logprob" in table.column_names and table.column("tail_logprob").null_count < n:
        tail = per_sequence("tail_logprob", P, np.float64)
        if np.isnan(tail).any():
            raise _bad(path, base + int(np.flatnonzero(np.isnan(tail).any(1))[0]), "tail_logprob", "NaN")
    mask = per_sequence("loss_mask", L, np.uint8) if "loss_mask" in table.column_names else None
    return {"tokens": tokens, "ids": out_ids.reshape(n, P, K), "logprobs": out_lp.reshape(n, P, K), "target": target,
            "tail": tail, "mask": mask, "K": K, "L": L}


def import_parquet(src: str, out: str, *, vocab_size: int | None = None, tokenizer: str | None = None,
                   shard_sequences: int = 64, progress: Callable[[int], Any] | None = None) -> CacheMeta:
    """Write the cache `out` from the Parquet targets under `src` (see the module docstring);
    returns its metadata. `vocab_size` and `tokenizer` (the teacher's tokenizer directory,
    which `distill` checks students against) are read from src/export.json when it is
    there. Resumes an interrupted import into the same `out`."""
    pa, pq = _pyarrow()
    root = Path(src)
    manifest, files = _sources(root)
    V = vocab_size or (manifest or {}).get("vocab_size")
    if not V:
        raise DDKCacheError("import: the vocabulary size is unknown (no export.json beside the files): pass --vocab-size")
    if tokenizer:
        from .capture.tokenization import load_tokenizer, tokenizer_info

        tok_info = tokenizer_info(load_tokenizer(tokenizer))
    elif (manifest or {}).get("tokenizer", {}).get("fingerprint"):
        tok_info = manifest["tokenizer"]
    else:
        raise DDKCacheError("import: the teacher's tokenizer is unknown (no export.json beside the files): pass --tokenizer DIR, "
                            "so that `distill` can check that a student shares it")
    # Check every file, and learn the shape and the domains, before anything is written.
    counts: dict[tuple[str, str], int] = {}
    chat: dict[str, bool] = {}
    L = K = 0
    for domain, split, path in files:
        for rows in _batches(pq, pa, path, V):
            if L and rows["L"] != L:
                raise DDKCacheError(f"import: {path} holds sequences of {rows['L']} tokens, other files {L}: one cache, one length")
            L, K = rows["L"] or L, max(K, rows["K"])
            counts[(domain, split)] = counts.get((domain, split), 0) + len(rows["tokens"])
            chat[domain] = chat.get(domain, False) or (rows["mask"] is not None and bool((rows["mask"] != 1).any()))
    domains = sorted({d for d, _, _ in files})
    for d in domains:
        if not counts.get((d, "val")):
            raise DDKCacheError(f"import: domain {d!r} has no validation sequences ({d}/val/*.parquet): the teacher's "
                                "perplexity table and DDK need them")
    digest = hashlib.sha256(json.dumps([[str(p.relative_to(root)), p.stat().st_size] for _, _, p in files]).encode())
    teacher = dict((manifest or {}).get("teacher") or {"name_or_path": f"imported from {src}"})
    meta = CacheMeta(
        format_version=0, state=STATE_INITIALIZING, encoding=PackV3(), targets=TargetSpec(k=K), seq_len=L,
        shard_sequences=shard_sequences, vocab_size=V, top_k=K, teacher=teacher, tokenizer=tok_info,
        corpus={"imported_from": str(root.resolve()), "format": FORMAT}, build_args={"import": True, "shard_sequences": shard_sequences},
        build_fingerprint="sha256:" + digest.hexdigest())
    existing, _ = CacheWriter.initialize(out, meta)
    if existing.build_fingerprint != meta.build_fingerprint:
        raise DDKCacheError(f"import: {out} already holds another cache; choose a new --out")
    if existing.state == STATE_COMPLETE:
        return existing
    writer = CacheWriter(out)
    if writer.meta.state == STATE_INITIALIZING:
        writer.create_arrays({d: DomainInfo(SplitInfo(counts.get((d, "train"), 0)), SplitInfo(counts[(d, "val")]),
                                            data=CHAT if chat[d] else TEXT) for d in domains})
        writer = CacheWriter(out)  # re-read: the arrays and domains now exist
    pending = writer.pending()
    log = writer.log_writer((0, 1))
    bar = progress(sum(s.stop - s.start for s in pending)) if progress else None
    try:
        for domain in domains:
            for split in SPLITS:
                todo = sorted((s for s in pending if (s.domain, s.split) == (domain, split)), key=lambda s: s.start)
                buf, buf_start = None, 0  # rows [buf_start, ...) of this split: one file and a shard's rest
                for rows in (r for d, sp, path in files if (d, sp) == (domain, split) for r in _batches(pq, pa, path, V)):
                    if not todo:
                        break
                    buf = rows if buf is None else _concat(buf, rows)
                    while todo and todo[0].stop <= buf_start + len(buf["tokens"]):
                        _write_shard(writer, log, todo[0], buf, todo[0].start - buf_start)
                        if bar is not None:
                            bar.update(todo[0].stop - todo[0].start)
                        todo.pop(0)
                    # Rows before the next pending shard are done (a resumed import skips written shards).
                    drop = min(todo[0].start - buf_start, len(buf["tokens"])) if todo else len(buf["tokens"])
                    buf, buf_start = _slice(buf, drop), buf_start + drop
    finally:
        log.close()
    return CacheWriter(out).finalize()


def _slice(rows: dict[str, Any], start: int) -> dict[str, Any]:
    """The rows from `start` on."""
    return {k: (v[start:] if isinstance(v, np.ndarray) else v) for k, v in rows.items()}


def _concat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Rows of `a`, then of `b` (ids and log-probs padded to the wider k)."""
    K = max(a["K"], b["K"])
    out = {"K": K, "L": a["L"]}
    for name in ("tokens", "ids", "logprobs", "target", "tail", "mask"):
        x, y = a[name], b[name]
        if x is None or y is None:  # one file without the column: use none of it
            out[name] = None
            continue
        if name in ("ids", "logprobs"):
            fill = -np.inf if name == "logprobs" else 0
            x, y = (np.concatenate([v, np.full((*v.shape[:-1], K - v.shape[-1]), fill, v.dtype)], -1) for v in (x, y))
        out[name] = np.concatenate([x, y])
    return out


def _write_shard(writer: CacheWriter, log: Any, shard: Any, rows: dict[str, Any], offset: int) -> None:
    """Encode and write one shard (rows offset .. offset + its size of `rows`) through the
    build's own row writer (scoring.row_chunks), then log it with its sums."""
    chat = LOSS_MASK in writer.array_names(shard.domain)
    chunks: dict[str, list[bytes]] = {name: [] for name in writer.array_names(shard.domain)}
    nll, positions, mass = [], 0, []
    K = writer.layout.entries
    for r in range(offset, offset + shard.stop - shard.start):
        tokens = rows["tokens"][r].astype(np.int32)
        ids, lps = rows["ids"][r], rows["logprobs"][r]
        if ids.shape[-1] < K:  # this file's widest row is narrower than the cache's k
            ids = np.pad(ids, ((0, 0), (0, K - ids.shape[-1])))
            lps = np.pad(lps, ((0, 0), (0, K - lps.shape[-1])), constant_values=-np.inf)
        tail = None if rows["tail"] is None else rows["tail"][r]
        mask = (rows["mask"][r] if rows["mask"] is not None else np.ones(len(tokens), np.uint8)) if chat else None
        row, row_nll, row_positions, row_mass = row_chunks(writer, shard, tokens, RowScores(ids, lps, rows["target"][r], tokens[1:],
                                                                                            tail_logprob=tail), mask)
        for name, chunk in row.items():
            chunks[name].append(chunk)
        nll.append(row_nll)
        mass.append(row_mass)
        positions += row_positions
    sizes, hashes = writer.put_shard(shard, chunks)
    log.append(ShardRecord(shard.key, shard.stop - shard.start, math.fsum(nll), positions, math.fsum(mass), sizes, [], hashes))
