"""`ddk-cache import`: other tools' teacher captures (and this project's own exports) become a
normal cache (issue #28).

Layouts (`--from`; `sources` reads each as the same checked batches of rows):
* ddk: `ddk-cache export`'s Parquet (DIR/<domain>/<split>/*.parquet, with or without its
  export.json), which any pipeline can also produce: one row per sequence, all of one
  length, the columns of `export.COLUMNS`.
* distillkit: a DistillKit capture directory (compression_config.yaml + data_*.parquet).
* axolotl: axolotl's tokenized KD rows (*.parquet or its prepared dataset's *.arrow files
  under SRC, or SRC itself).

The domain of a row is `--domain`, else its `domain` column, else the folder under SRC that
holds its file (SRC's own name for files at the top). DistillKit and axolotl captures have
no validation split: the last `--val-fraction` of each domain's rows (at least one) become
it. Sequences of different lengths are padded to the longest with token 0 and a loss mask
(0 past each sequence's end), so every domain of such a capture is stored with its mask.

What a capture lacks is recorded in the cache's metadata (`corpus.capture`) and shown by
`inspect` and the fidelity report (`CacheMeta.describe_capture`); `distill` refuses what would be silently wrong on it:
* DistillKit stores vLLM's raw top-k log-probs: the tail is 1 - their mass (exact up to its
  quantisation); the next token's log-prob only where it is in the top-k, so the teacher
  PPL table is a lower bound (elsewhere the bound min(last kept log-prob, log tail) is used).
* axolotl's rows are renormalised over the kept ids: no tail, so only forward KL (the loss
  its own trainer uses on them) is allowed; the PPL table is from renormalised values.

The targets are stored with pack-v3 (every value within its bound of the capture's), or
exactly with `--encoding plain`. Before anything is written, every file is read and checked
(columns, lengths, ids below the vocabulary, finite values), and a bad one is refused with
one line naming the file, row and column. Shards are written and logged as a build writes
them, so an interrupted import resumes with the same command. Memory: a read batch and at
most one shard per domain and split (rows of different domains may interleave in a file).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .capture.corpus import DOMAIN_NAME, RESERVED_NAMES
from .capture.scoring import row_chunks
from .tokenbytes import lengths_or_none, predicted_bytes
from .errors import DDKCacheError
from .export import FORMAT, MANIFEST, tail_logprob64
from .sources import AxolotlDataset, Capture, DdkExport, DistillKitCapture, Rows, bad, batches, pyarrow
from .store.cache import LOSS_MASK, SPLITS, CacheWriter
from .store.encodings import PackV3, PlainV1, RowScores
from .store.log import ShardRecord
from .store.meta import CHAT, STATE_COMPLETE, STATE_INITIALIZING, TEXT, CacheMeta, DomainInfo, SplitInfo
from .store.targets import TargetSpec

LAYOUTS = ("ddk", "distillkit", "axolotl")
ENCODINGS = {"pack": PackV3, "plain": PlainV1}


def _ddk(root: Path) -> DdkExport:
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
    files: list[tuple[str | None, str | None, Path]] = []
    for rel in rels:
        domain, split = Path(rel).parts[:2]
        if split not in SPLITS:
            raise DDKCacheError(f"import: {root / rel}: the split folder must be one of {', '.join(SPLITS)}, not {split!r}")
        files.append((domain, split, root / rel))
    if not files:
        raise DDKCacheError(f"import: no Parquet files under {root} (expected DOMAIN/SPLIT/*.parquet, as `ddk-cache export` writes)")
    return DdkExport("ddk", files, (manifest or {}).get("vocab_size"), {"tail": "stored", "target_logprob": "exact"}, manifest)


def _parquet_files(root: Path) -> list[tuple[str | None, str | None, Path]]:
    """Every Parquet (or Arrow IPC) file under `root` (or `root` itself), with the folder under
    root as its domain."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow"))
    if not paths:
        raise DDKCacheError(f"import: no Parquet (*.parquet) or Arrow (*.arrow) files under {root}")
    return [(None if p.parent == root or p == root else p.relative_to(root).parts[0], None, p) for p in paths]


def _distillkit(root: Path) -> DistillKitCapture:
    config = root / "compression_config.yaml"
    if not config.exists():
        raise DDKCacheError(f"import: {config} not found: a DistillKit capture directory holds the compression_config.yaml "
                            "its sample-logits command wrote (the decoder needs it)")
    try:
        cfg = yaml.safe_load(config.read_text())
        for key in ("d", "k", "exact_k"):
            int(cfg[key])
        binned = sum(int(b["num_elements"]) for b in cfg.get("residual_bins") or [])
        if not 0 <= cfg["exact_k"] <= cfg["k"] or binned > cfg["k"] - cfg["exact_k"]:
            raise ValueError(f"exact_k {cfg['exact_k']} and residual bins of {binned} values do not fit k = {cfg['k']}")
    except Exception as e:  # noqa: BLE001 - any unreadable config is refused the same way
        raise DDKCacheError(f"import: {config}: not a DistillKit DistributionQuantizationConfig ({e})") from None
    capture = DistillKitCapture("distillkit", _parquet_files(root), int(cfg["d"]), {
        "tail": "derived", "target_logprob": "in top-k only",
        "values": (f"DistillKit compression, k = {cfg['k']}, {cfg['exact_k']} exact ({cfg.get('exact_dtype', 'float32')}), "
                   f"the rest as {len(cfg.get('polynomial_terms') or [])} polynomial terms and "
                   f"{len(cfg.get('residual_bins') or [])} residual bin(s)" if cfg["exact_k"] < cfg["k"]
                   else f"DistillKit compression, k = {cfg['k']}, all exact ({cfg.get('exact_dtype', 'float32')})")})
    capture.config = cfg
    return capture


def open_capture(src: str, layout: str) -> Capture:
    """The capture at `src` in `layout` (one of LAYOUTS), its files found, nothing read yet."""
    root = Path(src)
    if not root.exists():
        raise DDKCacheError(f"import: {src} does not exist")
    if layout == "ddk":
        return _ddk(root)
    if layout == "distillkit":
        return _distillkit(root)
    if layout == "axolotl":
        return AxolotlDataset("axolotl", _parquet_files(root), None, {"tail": "none (renormalised top-k)",
                                                                      "target_logprob": "in top-k only, renormalised"})
    raise DDKCacheError(f"import: --from must be one of {', '.join(LAYOUTS)}, not {layout!r}")


def _complete(rows: Rows, capture: Capture, path: Path, base: int, fill: bool = True) -> tuple[int, int]:
    """Fill in what a capture leaves out, in place: the next token's log-prob where it is not
    given (its kept log-prob, else the bound min(last kept, log tail)); a label-only target
    where a position keeps nothing (past a sequence's end, axolotl's prompt padding). Refuses
    a position that carries loss and keeps nothing. Returns (positions carrying loss, those
    whose next token is among the kept ids). `fill`: False checks and counts only."""
    tokens, lengths, ids, lps = rows["tokens"], rows["lengths"], rows["ids"], rows["logprobs"]
    n, P = ids.shape[:2]
    nxt = tokens[:, 1:]
    inside = np.arange(P)[None, :] < (lengths - 1)[:, None]
    carry = inside if rows["mask"] is None else inside & (rows["mask"][:, 1:] == 1)
    empty = ~np.isfinite(lps[..., 0])
    if (empty & carry).any():
        r = int(np.flatnonzero((empty & carry).any(1))[0])
        raise bad(path, base + r, "target_logprobs" if capture.layout == "axolotl" else "logprobs",
                  "a position whose next token is a label has no kept entries")
    if empty.any():
        ids[empty] = 0
        ids[..., 0] = np.where(empty, nxt, ids[..., 0])
        lps[..., 0] = np.where(empty, 0.0, lps[..., 0])
    if rows["target"] is not None:  # given (this project's layout): nothing to find
        return int(carry.sum()), int(carry.sum())
    hit = (ids == nxt[..., None]) & np.isfinite(lps)
    found = hit.any(-1)
    if fill:
        lp64 = lps.astype(np.float64)
        tail = tail_logprob64(lp64)
        last = np.where(np.isfinite(lp64), lp64, np.inf).min(-1)
        bound = np.minimum(last, np.where(np.isfinite(tail), tail, last))
        rows["target"] = np.where(empty, 0.0, np.where(found, np.where(hit, lp64, 0.0).sum(-1), bound))
    return int(carry.sum()), int((found & carry).sum())


def _pad(rows: Rows, L: int, K: int) -> Rows:
    """A batch widened to L tokens and K entries: token 0, mask 0 and label-only targets past
    each sequence's end, (0, -inf) entries beyond its widest position."""
    n, Lb = rows["tokens"].shape
    grow = lambda a, width, fill, axis=1: a if a.shape[axis] == width else np.concatenate(  # noqa: E731
        [a, np.full((*a.shape[:axis], width - a.shape[axis], *a.shape[axis + 1:]), fill, a.dtype)], axis)
    out = dict(rows)
    out["tokens"] = grow(rows["tokens"], L, 0)
    ids, lps = grow(rows["ids"], K, 0, 2), grow(rows["logprobs"], K, -np.inf, 2)
    ids, lps = grow(ids, L - 1, 0), grow(lps, L - 1, -np.inf)
    past = np.arange(L - 1)[None, :] >= (rows["lengths"] - 1)[:, None]
    ids[..., 0] = np.where(past, 0, ids[..., 0])  # the next token past the end is 0, kept with log-prob 0
    lps[..., 0] = np.where(past, 0.0, lps[..., 0])
    out["ids"], out["logprobs"] = ids, lps
    out["target"] = np.where(past, 0.0, grow(rows["target"], L - 1, 0.0))
    out["tail"] = None if rows["tail"] is None else np.where(past, -np.inf, grow(rows["tail"], L - 1, -np.inf))
    if rows["mask"] is not None or (rows["lengths"] < L).any():
        mask = rows["mask"] if rows["mask"] is not None else np.ones((n, Lb), np.uint8)
        mask = grow(mask, L, 0).copy()  # a column read from Arrow is read-only
        mask[np.arange(L)[None, :] >= rows["lengths"][:, None]] = 0
        out["mask"] = mask
    return out


def _row_domains(rows: Rows, domain: str | None, flag: str | None) -> list[str]:
    n = len(rows["tokens"])
    if flag:
        return [flag] * n
    if rows["domain"] is not None:
        return rows["domain"]
    return [domain] * n


def import_capture(src: str, out: str, *, layout: str = "ddk", vocab_size: int | None = None, tokenizer: str | None = None,
                   domain: str | None = None, val_fraction: float = 0.05, encoding: str = "pack", shard_sequences: int = 64,
                   progress: Callable[[int | None, str], Any] | None = None) -> CacheMeta:
    """Write the cache `out` from the capture at `src` in `layout` (see the module docstring);
    returns its metadata. `vocab_size` and `tokenizer` (the teacher's tokenizer directory,
    which `distill` checks students against) are read from src/export.json or DistillKit's
    config where they are there. Resumes an interrupted import into the same `out`.
    `progress(total, label)` returns a bar (update(n)) for each pass: the check of every
    row ("check", total None where a file's row count is not in its footer), then the
    writing ("import", in sequences)."""
    if not 0 < val_fraction < 1:
        raise DDKCacheError(f"import: --val-fraction must be between 0 and 1, got {val_fraction}")
    if encoding not in ENCODINGS:
        raise DDKCacheError(f"import: --encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    capture = open_capture(src, layout)
    root = Path(src)
    manifest = capture.manifest
    if not (vocab_size or capture.vocab_size or (layout == "axolotl" and tokenizer)):
        raise DDKCacheError("import: the vocabulary size is unknown (no export.json beside the files): pass --vocab-size"
                            + (" or --tokenizer" if layout == "axolotl" else ""))
    token_bytes = None  # per token id: the bytes of bits per byte, where the tokenizer is at hand
    if tokenizer:
        from .capture.tokenization import load_tokenizer, tokenizer_info

        tok = load_tokenizer(tokenizer)
        tok_info = tokenizer_info(tok)
        token_bytes = lengths_or_none(tok)
    elif (manifest or {}).get("tokenizer", {}).get("fingerprint"):
        tok_info = manifest["tokenizer"]
    else:
        raise DDKCacheError("import: the teacher's tokenizer is unknown (no export.json beside the files): pass --tokenizer DIR, "
                            "so that `distill` can check that a student shares it")
    capture.vocab_size = vocab_size or capture.vocab_size or (tok_info.get("size") if layout == "axolotl" else None)
    V = capture.vocab_size
    top_name = root.resolve().name if root.is_dir() else root.resolve().stem
    # Check every file, and learn the shape, the domains and what the capture holds, before anything is written.
    counts: dict[tuple[str, str | None], int] = {}
    chat: dict[str, bool] = {}
    lengths: dict[str, tuple[int, int]] = {}
    L = K = carried = found = 0
    masses = [0, 0]  # positions carrying loss; of those, kept mass within 1e-3 of 1
    clamped = positions = 0  # DistillKit: positions with a decoded log-prob above 0 (clamped)
    bos = tok_info.get("bos_token_id")
    all_bos = bos is not None  # whether every row begins with the tokenizer's BOS (the cache's row_start)
    check = progress(_row_count(capture), "check") if progress else None
    for d_path, split, path in capture.files:
        file_L = None
        base = 0
        for rows in batches(path, capture):
            n = len(rows["tokens"])
            if check is not None:
                check.update(n)
            if layout == "ddk":
                Lb = rows["tokens"].shape[1]
                if (file_L or L) and Lb != (file_L or L):
                    raise DDKCacheError(f"import: {path} holds sequences of {Lb} tokens, other rows {file_L or L}: one cache, "
                                        "one length")
                file_L = Lb
            c, f = _complete(rows, capture, path, base, fill=False)
            carried, found = carried + c, found + f
            clamped, positions = clamped + rows.get("clamped", 0), positions + int((rows["lengths"] - 1).sum())
            if layout == "axolotl":
                with np.errstate(under="ignore"):
                    kept = np.exp(rows["logprobs"].astype(np.float64)).sum(-1)
                inside = np.arange(kept.shape[1])[None, :] < (rows["lengths"] - 1)[:, None]
                masses[0] += int(inside.sum())
                masses[1] += int((inside & (np.abs(kept - 1) < 1e-3)).sum())
            L, K = max(L, rows["tokens"].shape[1]), max(K, rows["ids"].shape[-1])
            all_bos = all_bos and bool((rows["tokens"][:, 0] == bos).all())
            for i, d in enumerate(_row_domains(rows, d_path or top_name, domain)):
                if d not in lengths:  # a new domain: its name becomes a group of the store
                    _check_domain(d, path, base + i)
                counts[(d, split)] = counts.get((d, split), 0) + 1
                lo, hi = lengths.get(d, (L, 0))
                lengths[d] = (min(lo, int(rows["lengths"][i])), max(hi, int(rows["lengths"][i])))
                has_mask = rows["mask"] is not None and bool((rows["mask"][i, 1: rows["lengths"][i]] != 1).any())
                chat[d] = chat.get(d, False) or has_mask
            base += n
    domains = sorted({d for d, _ in counts})
    for d in domains:
        chat[d] = chat[d] or lengths[d][0] < L
    if layout == "ddk":
        split_counts = {(d, s): counts.get((d, s), 0) for d in domains for s in SPLITS}
        for d in domains:
            if not split_counts[(d, "val")]:
                raise DDKCacheError(f"import: domain {d!r} has no validation sequences ({d}/val/*.parquet): the teacher's "
                                    "perplexity table and DDK need them")
    else:
        split_counts = {}
        for d in domains:
            total = counts[(d, None)]
            if total < 2:
                raise DDKCacheError(f"import: domain {d!r} has {total} sequence(s): it needs at least 2, one of them for "
                                    "the validation split (the teacher's perplexity table and DDK need one)")
            val = min(total - 1, max(1, round(val_fraction * total)))
            split_counts[(d, "train")], split_counts[(d, "val")] = total - val, val
    limits = dict(capture.limits)
    if layout != "ddk":
        limits["target_in_topk"] = found / max(carried, 1)
    if layout == "distillkit":
        limits["clamped"] = clamped / max(positions, 1)
    if layout == "axolotl":
        renormalised = masses[1] == masses[0]
        limits["tail"] = "none (renormalised top-k)" if renormalised else "derived"
        limits["renormalised"] = renormalised
    digest = hashlib.sha256(json.dumps([layout, domain, val_fraction, encoding,
                                        [[str(p.relative_to(root) if p != root else p.name), p.stat().st_size]
                                         for _, _, p in capture.files]]).encode())
    teacher = dict((manifest or {}).get("teacher") or {"name_or_path": f"imported from {src}"})
    enc = ENCODINGS[encoding]()
    meta = CacheMeta(
        format_version=0, state=STATE_INITIALIZING, encoding=enc, targets=TargetSpec(k=K), seq_len=L,
        shard_sequences=shard_sequences, vocab_size=V, top_k=K, teacher=teacher, tokenizer=tok_info,
        corpus={"imported_from": str(root.resolve()), "format": FORMAT if layout == "ddk" else layout, "capture": limits},
        build_args={"import": True, "from": layout, "shard_sequences": shard_sequences, "val_fraction": val_fraction},
        build_fingerprint="sha256:" + digest.hexdigest(), row_start="bos" if all_bos else "none")
    existing, _ = CacheWriter.initialize(out, meta)
    if existing.build_fingerprint != meta.build_fingerprint:
        raise DDKCacheError(f"import: {out} already holds another cache; choose a new --out")
    if existing.state == STATE_COMPLETE:
        return existing
    writer = CacheWriter(out)
    if tokenizer:
        writer.store_tokenizer(tok)
    if writer.meta.state == STATE_INITIALIZING:
        writer.create_arrays({d: DomainInfo(SplitInfo(split_counts[(d, "train")]), SplitInfo(split_counts[(d, "val")]),
                                            data=CHAT if chat[d] else TEXT) for d in domains})
        writer = CacheWriter(out)  # re-read: the arrays and domains now exist
    pending = writer.pending()
    log = writer.log_writer((0, 1))
    bar = progress(sum(s.stop - s.start for s in pending), "import") if progress else None
    todo = {(d, s): sorted((x for x in pending if (x.domain, x.split) == (d, s)), key=lambda x: x.start)
            for d in domains for s in SPLITS}
    buffers: dict[tuple[str, str], tuple[Rows | None, int]] = {key: (None, 0) for key in todo}  # rows [start, ...) of a split
    seen = {d: 0 for d in domains}  # rows of each domain so far (capture order)
    try:
        for d_path, split, path in capture.files:
            if not any(todo.values()):
                break
            base = 0
            for rows in batches(path, capture):
                _complete(rows, capture, path, base)
                base += len(rows["tokens"])
                rows = _pad(rows, L, K)
                for key, index in _route(rows, _row_domains(rows, d_path or top_name, domain), split, seen, split_counts):
                    if not todo[key]:
                        continue
                    buf, start = buffers[key]
                    part = _take(rows, index)
                    buf = part if buf is None else _concat(buf, part)
                    while todo[key] and todo[key][0].stop <= start + len(buf["tokens"]):
                        shard = todo[key].pop(0)
                        _write_shard(writer, log, shard, buf, shard.start - start, token_bytes)
                        if bar is not None:
                            bar.update(shard.stop - shard.start)
                    # Rows before the next pending shard are done (a resumed import skips written shards).
                    drop = min(todo[key][0].start - start, len(buf["tokens"])) if todo[key] else len(buf["tokens"])
                    buffers[key] = (_slice(buf, drop), start + drop)
    finally:
        log.close()
    return CacheWriter(out).finalize()


def _row_count(capture: Capture) -> int | None:
    """Rows in the capture, from the Parquet footers (no data read); None with Arrow files."""
    if any(p.suffix == ".arrow" for _, _, p in capture.files):
        return None
    _, pq = pyarrow()
    return sum(pq.ParquetFile(p).metadata.num_rows for _, _, p in capture.files)


def _check_domain(name: str, path: Path, row: int) -> None:
    if not DOMAIN_NAME.match(name) or name.lower() in RESERVED_NAMES:
        raise DDKCacheError(f"import: {path}, row {row}: domain name {name!r} must be 1-100 letters, digits, '_', '.' or '-' "
                            f"starting with a letter or digit, and not one of {', '.join(sorted(RESERVED_NAMES))}; pass "
                            "--domain NAME, or rename the column's value or the folder")


def _route(rows: Rows, row_domains: list[str], split: str | None, seen: dict[str, int],
           split_counts: dict[tuple[str, str], int]) -> Iterator[tuple[tuple[str, str], np.ndarray]]:
    """The batch's rows grouped by (domain, split), in order. Without a split from the path,
    a domain's first rows are train and its last split_counts[(d, "val")] are val."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, d in enumerate(row_domains):
        s = split
        if s is None:
            s = "train" if seen[d] < split_counts[(d, "train")] else "val"
        seen[d] += 1
        groups.setdefault((d, s), []).append(i)
    for key, index in groups.items():
        yield key, np.asarray(index)


def _take(rows: Rows, index: np.ndarray) -> Rows:
    return {k: (v[index] if isinstance(v, np.ndarray) else v) for k, v in rows.items() if k != "domain"}


def _slice(rows: dict[str, Any], start: int) -> dict[str, Any]:
    """The rows from `start` on."""
    return {k: (v[start:] if isinstance(v, np.ndarray) else v) for k, v in rows.items()}


def _concat(a: Rows, b: Rows) -> Rows:
    """Rows of `a`, then of `b` (both padded to the cache's L and K by _pad). A batch without
    a mask is all labels; one without a stored tail gets 1 - its kept mass, as pack-v3 would."""
    out = dict(a)
    for name in ("tokens", "lengths", "ids", "logprobs", "target", "tail", "mask"):
        x, y = a[name], b[name]
        if x is None and y is None:
            continue
        if name == "mask":
            x, y = (np.ones_like(o["tokens"], np.uint8) if v is None else v for v, o in ((x, a), (y, b)))
        elif name == "tail":
            x, y = (tail_logprob64(o["logprobs"]) if v is None else v for v, o in ((x, a), (y, b)))
        out[name] = np.concatenate([x, y])
    return out


def _write_shard(writer: CacheWriter, log: Any, shard: Any, rows: dict[str, Any], offset: int, lengths: np.ndarray | None = None) -> None:
    """Encode and write one shard (rows offset .. offset + its size of `rows`) through the
    build's own row writer (scoring.row_chunks), then log it with its sums (with the
    predicted tokens' UTF-8 bytes where `lengths`, per token id, are known)."""
    chat = LOSS_MASK in writer.array_names(shard.domain)
    chunks: dict[str, list[bytes]] = {name: [] for name in writer.array_names(shard.domain)}
    nll, positions, mass, nbytes = [], 0, [], 0
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
        nbytes += predicted_bytes(tokens, mask, lengths) if lengths is not None else 0
    sizes, hashes = writer.put_shard(shard, chunks)
    log.append(ShardRecord(shard.key, shard.stop - shard.start, math.fsum(nll), positions, math.fsum(mass), sizes, [], hashes,
                           nbytes if lengths is not None else None))
