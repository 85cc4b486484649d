"""`ddk-cache export`: a cache's sequences and decoded teacher targets as plain Parquet, for
training stacks that read Parquet or Hugging Face `datasets` and not Zarr (issue #28).

Layout of the output directory DIR:

    DIR/<domain>/<split>/part-00000.parquet ...   `rows_per_file` sequences each
    DIR/README.md                                  (--format hf) a dataset card: `datasets.load_dataset(DIR)`
                                                   finds each split's files through its `configs`
    DIR/export.json                                what the export holds; `state` is "complete"
                                                   only once every part is written

One row per cached sequence of L tokens, P = L - 1 predicted positions (COLUMNS says what
each column holds). Position t is the teacher's distribution after reading input_ids[0..t]:
it predicts input_ids[t + 1]. The values are the cache's decoded targets exactly (float32),
no other rounding.

`--format axolotl` writes, in the same files, the pre-tokenized columns axolotl's KD plugin
reads instead (AXOLOTL_COLUMNS: fixed-k rows, masks, labels), so that it trains from a
ddk-cache cache without re-running the teacher.

Every part is written to a temporary name and renamed once complete, and export.json is
rewritten last, so an interrupted export leaves no part that looks complete and is not: a
rerun of the same command keeps the parts that exist (their row counts checked) and writes
the rest. Memory is one read batch of decoded targets (`batch` sequences), whatever the
cache's size. Nested columns are built from offsets and flat values (pyarrow's ListArray),
never a Python loop per token.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DDKCacheError
from .store.cache import SPLITS, Cache
from .store.pack3 import log1mexp
from .store.targets import TargetSpec

FORMAT = "ddk-cache-parquet"
VERSION = 1
MANIFEST = "export.json"

COLUMNS = {
    "domain": "string: the cache's domain",
    "split": "string: train or val",
    "sequence": "int64: the sequence's row in its domain's split of the cache",
    "input_ids": "list<int32> [L]: the sequence's token ids (the teacher's tokenizer)",
    "loss_mask": "list<uint8> [L]: 1 where input_ids[t] is a label the student learns to predict "
                 "(the assistant's turns of chat domains; every token of text domains)",
    "topk_ids": "list<list<int32>> [P][n_t]: the kept ids at position t in rank order (n_t = k, or fewer "
                "with adaptive k); for sampled targets the sampled ids",
    "topk_logprobs": "list<list<float32>> [P][n_t]: their teacher log-probabilities; for sampled targets the log "
                     "target weights (count / N, summing to 1 per position)",
    "tail_logprob": "list<float32> [P]: log of the teacher's mass outside the kept ids (-inf: none); null for "
                    "sampled targets",
    "target_logprob": "list<float32> [P]: the teacher's log-probability of input_ids[t + 1]",
    "sample_logprob": "list<float32> [L]: domains of generated samples only (null elsewhere): the log-prob of "
                      "input_ids[t] under the distribution that sampled it",
}


# `--format axolotl`: the pre-tokenized columns axolotl's KD plugin trains from
# (integrations/kd: its chat_template strategy's output, read by its KD trainer).
AXOLOTL_COLUMNS = {
    "input_ids": "list<int32> [L]",
    "attention_mask": "list<int8> [L]: all 1 (sequences are packed full)",
    "labels": "list<int32> [L]: input_ids where the token is a label, -100 elsewhere",
    "target_token_ids": "list<list<int32>> [L][k]: at position t the kept ids predicting input_ids[t + 1], rank "
                        "order, padded to k with id 0; position L - 1 (nothing to predict) all padding",
    "target_logprobs": "list<list<float32>> [L][k]: their log-probabilities renormalised over the kept ids (axolotl's "
                       "format has no tail; its own capture renormalises the same way), -inf for padding",
    "target_mask": "list<list<int8>> [L][k]: 1 for a kept entry at a position whose next token is a label",
}


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DDKCacheError("ddk-cache export writes Parquet with pyarrow: pip install 'ddk-cache[parquet]'") from None
    return pa, pq


def _lists(pa: Any, values: np.ndarray, lengths: np.ndarray) -> Any:
    """A list array of len(lengths) lists from flat `values` (lists of lengths[i] values)."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def tail_logprob64(logprobs: np.ndarray) -> np.ndarray:
    """float64 [..., P]: log(1 - sum of the kept probabilities) per position (-inf where they
    hold all the mass), from log-probs [..., P, K] (-inf: not kept); pack-v3's own tail rule.
    The kept mass is summed shifted by each position's largest entry (a fraction of
    np.logaddexp.reduce's time: the import runs this on every position)."""
    lp = np.asarray(logprobs, np.float64)
    with np.errstate(divide="ignore", under="ignore", invalid="ignore"):
        top = lp.max(-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)  # a position keeping nothing: its mass is 0
        kept = np.log(np.exp(lp - top).sum(-1)) + top[..., 0]
    return log1mexp(np.minimum(kept, 0.0))


def tail_logprob(logprobs: np.ndarray) -> np.ndarray:
    """tail_logprob64 as float32, for encodings that do not store the tail."""
    return tail_logprob64(logprobs).astype(np.float32)


def batch_table(pa: Any, cache: Cache, domain: str, split: str, start: int, stop: int, sample_column: bool = False) -> Any:
    """Sequences [start, stop) of one split as a pyarrow Table with the COLUMNS
    (`sample_logprob` where the domain has it, or as nulls with `sample_column`, so that
    every part of an export that includes sampled domains has one schema)."""
    b = cache.read(domain, split, start, stop)
    n, L = b.tokens.shape
    P = L - 1
    cols: dict[str, Any] = {
        "domain": pa.array([domain] * n, pa.string()),
        "split": pa.array([split] * n, pa.string()),
        "sequence": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "input_ids": _lists(pa, b.tokens.reshape(-1), np.full(n, L)),
        "loss_mask": _lists(pa, (b.loss_mask if b.loss_mask is not None else np.ones((n, L), np.uint8)).reshape(-1),
                            np.full(n, L)),
    }
    if b.topk_ids is not None:
        kept = np.isfinite(b.topk_logprobs)  # padding of adaptive rows is -inf; kept entries come first
        per_position = kept.sum(-1).reshape(-1)
        inner = _lists(pa, b.topk_ids[kept].astype(np.int32), per_position)
        outer = lambda arr: pa.LargeListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int64) * P), arr)  # noqa: E731
        cols["topk_ids"] = outer(inner)
        cols["topk_logprobs"] = outer(_lists(pa, b.topk_logprobs[kept].astype(np.float32), per_position))
        if cache.targets.kind == "sampled":
            cols["tail_logprob"] = pa.nulls(n, pa.large_list(pa.float32()))
        else:
            tail = b.tail_logprob if b.tail_logprob is not None else tail_logprob(b.topk_logprobs)
            cols["tail_logprob"] = _lists(pa, tail.reshape(-1), np.full(n, P))
        cols["target_logprob"] = _lists(pa, b.target_logprob.reshape(-1).astype(np.float32), np.full(n, P))
    if b.sample_logprob is not None:
        cols["sample_logprob"] = _lists(pa, b.sample_logprob.reshape(-1).astype(np.float32), np.full(n, L))
    elif sample_column:
        cols["sample_logprob"] = pa.nulls(n, pa.large_list(pa.float32()))
    return pa.table(cols)


def axolotl_table(pa: Any, cache: Cache, domain: str, split: str, start: int, stop: int) -> Any:
    """Sequences [start, stop) as a pyarrow Table with the AXOLOTL_COLUMNS (top-k targets)."""
    b = cache.read(domain, split, start, stop)
    n, L = b.tokens.shape
    K = b.topk_ids.shape[-1]
    mask = b.loss_mask if b.loss_mask is not None else np.ones((n, L), np.uint8)
    kept = np.zeros((n, L, K), bool)
    kept[:, :-1] = np.isfinite(b.topk_logprobs)
    ids = np.zeros((n, L, K), np.int32)
    ids[:, :-1] = np.where(kept[:, :-1], b.topk_ids, 0)
    with np.errstate(invalid="ignore"):
        lp = b.topk_logprobs.astype(np.float64)
        lp = lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True)  # over the kept entries (-inf adds nothing)
    logprobs = np.full((n, L, K), -np.inf, np.float32)
    logprobs[:, :-1] = np.where(kept[:, :-1], lp, -np.inf)
    target_mask = kept.copy()
    target_mask[:, :-1] &= mask[:, 1:, None] == 1  # position t carries loss iff input_ids[t + 1] is a label
    per_sequence = lambda a: _lists(pa, a.reshape(-1), np.full(n, L))  # noqa: E731
    nested = lambda a: pa.LargeListArray.from_arrays(  # noqa: E731
        pa.array(np.arange(n + 1, dtype=np.int64) * L), _lists(pa, a.reshape(-1), np.full(n * L, K)))
    return pa.table({
        "input_ids": per_sequence(b.tokens),
        "attention_mask": per_sequence(np.ones((n, L), np.int8)),
        "labels": per_sequence(np.where(mask == 1, b.tokens, -100).astype(np.int32)),
        "target_token_ids": nested(ids),
        "target_logprobs": nested(logprobs),
        "target_mask": nested(target_mask.astype(np.int8)),
    })


def _card(parts: dict[str, list[str]], manifest: dict[str, Any]) -> str:
    """README.md with the `configs` metadata that `datasets.load_dataset(DIR)` reads: one
    config per domain and one `all`, each with its train and validation files."""
    lines = ["---", "configs:"]
    domains = sorted({key.split("/")[0] for key in parts})
    for name, keep in [("all", domains)] + [(d, [d]) for d in domains]:
        lines += [f"- config_name: {name}"] + (["  default: true"] if name == "all" else []) + ["  data_files:"]
        for split, hf_split in (("train", "train"), ("val", "validation")):
            globs = [f"{d}/{split}/*.parquet" for d in keep if parts.get(f"{d}/{split}")]
            if globs:
                lines += [f"  - split: {hf_split}", "    path:"] + [f"    - {g}" for g in globs]
    lines += ["---", "", f"# Teacher targets exported from {manifest['source']}", "",
              f"Exported by ddk-cache {manifest['ddk_cache_version']} (`{FORMAT}` v{VERSION}). Teacher: "
              f"{manifest['teacher'].get('name_or_path', '?')}; targets: {manifest['targets']}.", "",
              "Position t is the teacher's distribution after input_ids[0..t]; it predicts input_ids[t + 1].", "",
              "| column | contents |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in manifest["columns"].items()]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_parquet(cache_path: str, out: str, *, domains: Iterable[str] | None = None, splits: Iterable[str] = SPLITS,
                   rows_per_file: int = 4096, batch: int = 64, compression: str = "zstd", card: bool = False,
                   layout: str = "ddk", progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Write the cache at `cache_path` (complete) as Parquet parts under `out`; returns the
    manifest (also written to out/export.json). `layout` "ddk" writes the COLUMNS;
    "axolotl" the AXOLOTL_COLUMNS (top-k targets only: the tail dropped, the kept entries
    renormalised). With `card`, also README.md, whose
    `configs` make `out` a Hugging Face dataset. Resumes an interrupted export of the same
    cache and settings; refuses a directory that holds another export. `progress(total)`
    returns an object with `update(n)` (a tqdm bar), called per written batch."""
    from ddk_cache import __version__

    pa, pq = _pyarrow()
    if rows_per_file < 1 or batch < 1:
        raise DDKCacheError(f"export: --rows-per-file and the read batch must be >= 1 (got {rows_per_file}, {batch})")
    cache = Cache(cache_path)
    meta = cache.meta
    domains = list(domains) if domains else cache.domains
    unknown = [d for d in domains if d not in cache.domains]
    if unknown:
        raise DDKCacheError(f"export: {cache_path} has no domain {', '.join(map(repr, unknown))} (it has {', '.join(cache.domains)})")
    splits = list(splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DDKCacheError(f"export: unknown split {', '.join(map(repr, bad))} (splits: {', '.join(SPLITS)})")
    root = Path(out)
    if layout not in ("ddk", "axolotl"):
        raise DDKCacheError(f"export: unknown layout {layout!r} (ddk or axolotl)")
    if layout == "axolotl" and (not cache.has_targets or meta.targets.kind != "topk"):
        raise DDKCacheError(f"export: the axolotl layout holds top-k targets; {cache_path} holds "
                            f"{meta.targets.describe() if cache.has_targets else 'tokens only'}: export it with --format parquet")
    settings = {"source_fingerprint": meta.build_fingerprint, "rows_per_file": rows_per_file, "domains": domains,
                "splits": splits, "compression": compression, "layout": layout}
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("format") != FORMAT or any(old.get(k) != v for k, v in settings.items()):
            raise DDKCacheError(f"export: {root} already holds another export ({manifest_path}: a different cache or "
                                "settings); choose an empty --out, or delete it to start over")
        if old.get("state") == "complete":
            return old
    elif root.exists() and any(root.iterdir()):
        raise DDKCacheError(f"export: {root} is not empty and holds no {MANIFEST}; choose an empty --out")
    root.mkdir(parents=True, exist_ok=True)
    spec: TargetSpec = meta.targets
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "state": "exporting", **settings, "source": str(cache_path),
        "ddk_cache_version": __version__, "teacher": meta.teacher,
        "tokenizer": meta.tokenizer, "vocab_size": meta.vocab_size, "seq_len": meta.seq_len,
        "targets": spec.describe() if cache.has_targets else "none (tokens only)",
        "targets_kind": spec.kind if cache.has_targets else None, "encoding": meta.encoding.name,
        "position_convention": "position t predicts input_ids[t + 1]",
        "values": ("log-probabilities renormalised over the kept ids (no tail)" if layout == "axolotl"
                   else "the teacher's log-probabilities as the cache decodes them"),
        "teacher_ppl": {d: {s: meta.ppl(d, s).ppl for s in splits} for d in domains} if meta.teacher_ppl else {},
        "columns": AXOLOTL_COLUMNS if layout == "axolotl" else COLUMNS, "files": {},
    }
    _write_atomic(manifest_path, json.dumps(manifest, indent=2))
    jobs = [(d, s, i * rows_per_file, min((i + 1) * rows_per_file, cache.num_sequences(d, s)))
            for d in domains for s in splits for i in range(math.ceil(cache.num_sequences(d, s) / rows_per_file))]
    sample_column = any(cache.is_sampled(d) for d in domains)
    bar = progress(sum(stop - start for _, _, start, stop in jobs)) if progress else None
    parts: dict[str, list[str]] = {}
    for domain, split, start, stop in jobs:
        rel = f"{domain}/{split}/part-{start // rows_per_file:05d}.parquet"
        path = root / rel
        parts.setdefault(f"{domain}/{split}", []).append(rel)
        manifest["files"][rel] = stop - start
        if path.exists() and pq.ParquetFile(path).metadata.num_rows == stop - start:
            if bar is not None:
                bar.update(stop - start)
            continue  # written by an earlier run
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        writer = None
        try:
            for a in range(start, stop, batch):
                table = (axolotl_table(pa, cache, domain, split, a, min(a + batch, stop)) if layout == "axolotl"
                         else batch_table(pa, cache, domain, split, a, min(a + batch, stop), sample_column))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema, compression=compression)
                writer.write_table(table)
                if bar is not None:
                    bar.update(table.num_rows)
        finally:
            if writer is not None:
                writer.close()
        os.replace(tmp, path)
    manifest["state"] = "complete"
    if card:
        _write_atomic(root / "README.md", _card(parts, manifest))
    _write_atomic(manifest_path, json.dumps(manifest, indent=2))
    return manifest
