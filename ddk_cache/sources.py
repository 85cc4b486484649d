"""Teacher captures as `ddk-cache import` reads them: this project's export layout, DistillKit's
Parquet captures and axolotl's KD datasets, each turned into the same checked batches of rows
(issue #28). `importer` writes the cache from those batches; this module only reads.

A batch (`Rows`) holds n sequences of one file, padded to the batch's longest:
  tokens   int64 [n, Lb]        token ids (0 past a sequence's end)
  lengths  int64 [n]            each sequence's own length
  ids      int32 [n, Lb-1, K]   kept ids per predicted position, rank order where the capture
                                gives it (pack-v3 sorts anyway); 0 where not kept
  logprobs float32 [n, Lb-1, K] their log-probabilities, -inf where not kept
  target   float64 [n, Lb-1] or None  the log-prob of the next token, where the capture has it
  tail     float64 [n, Lb-1] or None  log of the mass outside the kept ids, where stored
  mask     uint8 [n, Lb] or None      1 where the token is a label (None: every token)
  domain   list[str] or None          per row, from a `domain` column

Position t is the teacher's distribution after tokens[0..t], predicting tokens[t + 1], in
every layout (DistillKit's first prompt position, which predicts nothing, is not stored;
axolotl's row t already predicts t + 1, its trainer shifts only the student's logits).

Formats, read from the tools' own code (their schemas; nothing of theirs is imported):
* DistillKit (arcee-ai/DistillKit, `distillkit/sample_logits_vllm.py`): a directory with
  `compression_config.yaml` (its DistributionQuantizationConfig) and `data_*.parquet` with
  `input_ids` list<uint64> and, per predicted position, `compressed_logprobs` and
  `bytepacked_indices` list<list<uint8>> (or uncompressed `token_ids` / `top_values`).
  The ids are packed MSB-first at ceil(log2 d) bits; the log-probs, sorted descending, are
  (optionally) delta-coded, then the first `exact_k` stored as floats, the rest as a
  least-squares polynomial over rank plus quantised residual bins (`decode_distillkit`).
  vLLM's raw top-k log-probs, not renormalised: the tail is 1 - their mass. No target
  log-prob outside the top-k.
* axolotl (axolotl-ai-cloud/axolotl, `integrations/kd/chat_template.py`, what its KD trainer
  reads): `input_ids`, `labels` (-100: no loss), `target_token_ids` and `target_logprobs`
  list<list> [L][k] (renormalised over the kept ids by its own preprocessing), `target_mask`;
  in Parquet, or in the *.arrow files of its prepared dataset (`axolotl preprocess`, which
  `datasets` saves). Its raw KD datasets (chat messages with vLLM log-probs per completion
  token) need its chat-template tokenization first: `axolotl preprocess` does it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DDKCacheError

Rows = dict[str, Any]
BATCH = 64  # sequences read at a time: memory is this many sequences, whatever a file holds
DDK_REQUIRED = ("input_ids", "topk_ids", "topk_logprobs", "target_logprob")
AXOLOTL_REQUIRED = ("input_ids", "target_token_ids", "target_logprobs")


def bad(path: Path, row: int, column: str, what: str) -> DDKCacheError:
    """The one-line refusal of a bad input row."""
    return DDKCacheError(f"import: {path}, row {row}, column {column}: {what}; fix or drop that row and run the import again")


def pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DDKCacheError("ddk-cache import reads Parquet with pyarrow: pip install 'ddk-cache[parquet]'") from None
    return pa, pq


def _record_batches(path: Path) -> Iterator[Any]:
    """A Parquet file's record batches, or an Arrow IPC file's (`datasets`' save_to_disk writes
    *.arrow streams: axolotl's prepared datasets), BATCH rows at a time."""
    pa, pq = pyarrow()
    if path.suffix != ".arrow":
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH)
        return
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file = pa.ipc.open_file(source)
            reader = (file.get_batch(i) for i in range(file.num_record_batches))
        for batch in reader:
            for start in range(0, batch.num_rows, BATCH):
                yield batch.slice(start, BATCH)


def batches(path: Path, reader: Any) -> Iterator[Rows]:
    """A file's rows as checked batches (`reader.rows(table, path, base)`), BATCH sequences at a time."""
    pa, _ = pyarrow()
    base = 0
    for batch in _record_batches(path):
        yield reader.rows(pa.Table.from_batches([batch]), path, base)
        base += batch.num_rows


def _lists(table: Any, name: str, path: Path, base: int) -> tuple[np.ndarray, Any]:
    """A list column as (offsets [n + 1] from 0, child array): Arrow's own buffers, no Python
    object per value. A null list is refused (naming its row)."""
    arr = table.column(name).combine_chunks()
    if arr.null_count:
        raise bad(path, base + int(np.flatnonzero(np.asarray(arr.is_null()))[0]), name, "null")
    offsets = np.asarray(arr.offsets, np.int64)
    return offsets - offsets[0], arr.flatten()


def _flat(values: Any, dtype: Any) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _nested(table: Any, name: str, path: Path, base: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """A list<list> column with `positions[i]` inner lists in row i: (row offsets into the
    positions, position offsets into the values, the values). Refuses other counts."""
    outer, inner_arr = _lists(table, name, path, base)
    wrong = np.flatnonzero(np.diff(outer) != positions)
    if len(wrong):
        i = int(wrong[0])
        raise bad(path, base + i, name, f"{np.diff(outer)[i]} entries where input_ids gives {positions[i]} predicted positions")
    if inner_arr.null_count:
        raise bad(path, base + int(np.searchsorted(outer, np.flatnonzero(np.asarray(inner_arr.is_null()))[0], "right") - 1),
                  name, "a null position")
    inner = np.asarray(inner_arr.offsets, np.int64)
    return outer, inner - inner[0], inner_arr.flatten()


def _check_tokens(tokens: np.ndarray, offsets: np.ndarray, path: Path, base: int, vocab_size: int) -> None:
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        at = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        raise bad(path, base + int(np.searchsorted(offsets, at, "right") - 1), "input_ids",
                  f"a token id outside the vocabulary [0, {vocab_size})")


def _ragged_tokens(table: Any, path: Path, base: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`input_ids` of sequences of any lengths: (offsets, flat ids, lengths), checked (at least
    2 tokens each, ids within the vocabulary)."""
    t_at, t_flat = _lists(table, "input_ids", path, base)
    flat = _flat(t_flat, np.int64)
    lengths = np.diff(t_at)
    if (lengths < 2).any():
        raise bad(path, base + int(np.flatnonzero(lengths < 2)[0]), "input_ids", "fewer than 2 tokens: nothing to predict")
    _check_tokens(flat, t_at, path, base, vocab_size)
    return t_at, flat, lengths


def _place(per_position: np.ndarray, pos_offsets: np.ndarray, lengths: np.ndarray, fill: Any) -> np.ndarray:
    """Flat per-position values [sum(lengths - 1), ...] into [n, max(lengths) - 1, ...] (fill past each row's end)."""
    n, P = len(lengths), max(int(lengths.max(initial=1)) - 1, 0)
    out = np.full((n, P, *per_position.shape[1:]), fill, per_position.dtype)
    row = np.repeat(np.arange(n), lengths - 1)
    col = np.arange(len(row)) - np.repeat(pos_offsets[:-1], lengths - 1)
    out[row, col] = per_position
    return out


def _padded_tokens(flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(offsets)
    n, L = len(lengths), int(lengths.max(initial=0))
    tokens = np.zeros((n, L), np.int64)
    row = np.repeat(np.arange(n), lengths)
    tokens[row, np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)] = flat
    return tokens, lengths


def _entries(ids: np.ndarray, lps: np.ndarray, widths_at: np.ndarray, path: Path, row_of: Any, vocab_size: int,
             column: str, check_finite: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Ragged kept entries (ids, log-probs, offsets per position) as [positions, K] padded
    with (0, -inf), checked: ids within the vocabulary, log-probs finite and <= 0."""
    widths = np.diff(widths_at)
    where = lambda m: row_of(np.searchsorted(widths_at, np.flatnonzero(m)[0], "right") - 1)  # noqa: E731 (value -> row)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise bad(path, where((ids < 0) | (ids >= vocab_size)), column, f"an id outside the vocabulary [0, {vocab_size})")
    if check_finite and not (np.isfinite(lps) & (lps <= 1e-6)).all():
        raise bad(path, where(~(np.isfinite(lps) & (lps <= 1e-6))), column.replace("ids", "logprobs"),
                  "a log-probability that is not finite or is above 0")
    K = int(widths.max(initial=1))
    keep = np.arange(K)[None, :] < widths[:, None]
    out_ids, out_lp = np.zeros((len(widths), K), np.int32), np.full((len(widths), K), -np.inf, np.float32)
    out_ids[keep], out_lp[keep] = ids, lps
    return out_ids, out_lp, K


@dataclass
class Capture:
    """What a source layout knows before its rows are read: its files (with the domain and
    split their path gives, or None), and what the capture holds and lacks (`limits`, kept in
    the cache's metadata: `inspect`, the fidelity report and `distill` read them)."""

    layout: str
    files: list[tuple[str | None, str | None, Path]]
    vocab_size: int | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None

    def rows(self, table: Any, path: Path, base: int) -> Rows:  # pragma: no cover - per layout
        raise NotImplementedError


# -- this project's export layout --------------------------------------------------------------

class DdkExport(Capture):
    """`ddk-cache export`'s Parquet (see export.COLUMNS): one row per sequence, one length."""

    def rows(self, table: Any, path: Path, base: int) -> Rows:
        missing = [c for c in DDK_REQUIRED if c not in table.column_names]
        if missing:
            raise DDKCacheError(f"import: {path}: missing column(s) {', '.join(missing)} (the columns of `ddk-cache export --help`)")
        n = table.num_rows

        def per_sequence(name: str, width: int | None, dtype: Any) -> np.ndarray:
            offsets, values = _lists(table, name, path, base)
            lengths = np.diff(offsets)
            want = lengths[0] if width is None and n else width
            wrong = np.flatnonzero(lengths != want)
            if len(wrong):
                raise bad(path, base + int(wrong[0]), name, f"{lengths[wrong[0]]} values where the rows before it have {want}: "
                          "every sequence of a cache has one length, one value per token or position")
            return _flat(values, dtype).reshape(n, want)

        tokens = per_sequence("input_ids", None, np.int64)
        L = tokens.shape[1] if n else 0
        P = L - 1
        _check_tokens(tokens.reshape(-1), np.arange(n + 1) * L, path, base, self.vocab_size)
        target = per_sequence("target_logprob", P, np.float64)
        if not np.isfinite(target).all():
            raise bad(path, base + int(np.flatnonzero(~np.isfinite(target).all(1))[0]), "target_logprob", "a value that is not finite")
        (_, at, ids), (_, lp_at, lps) = (_nested(table, c, path, base, np.full(n, P)) for c in ("topk_ids", "topk_logprobs"))
        row_of = lambda i: base + int(i) // max(P, 1)  # noqa: E731  (position index -> row)
        widths = np.diff(at)
        if not np.array_equal(at, lp_at) or (widths < 1).any():
            wrong = np.flatnonzero((np.diff(lp_at) != widths) | (widths < 1))[0]
            raise bad(path, row_of(wrong), "topk_logprobs", "each position needs as many log-probs as ids, and at least one")
        out_ids, out_lp, K = _entries(_flat(ids, np.int64), _flat(lps, np.float64), at, path, row_of, self.vocab_size, "topk_ids")
        tail = None
        if "tail_logprob" in table.column_names and table.column("tail_logprob").null_count < n:
            tail = per_sequence("tail_logprob", P, np.float64)
            if np.isnan(tail).any():
                raise bad(path, base + int(np.flatnonzero(np.isnan(tail).any(1))[0]), "tail_logprob", "NaN")
        mask = per_sequence("loss_mask", L, np.uint8) if "loss_mask" in table.column_names else None
        return {"tokens": tokens, "lengths": np.full(n, L), "ids": out_ids.reshape(n, P, K), "logprobs": out_lp.reshape(n, P, K),
                "target": target, "tail": tail, "mask": mask, "domain": None}


# -- DistillKit ----------------------------------------------------------------------------------

_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "bfloat16": "bfloat16"}


def _floats(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Little-endian bytes [..., m * width] as float32/64 [..., m] (bfloat16 widened exactly)."""
    if dtype == "bfloat16":
        return (np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(raw).view(np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(
        np.float64 if dtype == "float64" else np.float32)


def _width(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]


def unpack_bits(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """DistillKit's bit packing undone: [..., bytes] uint8 holding `count` integers of `bits`
    bits each, most significant bit first, as int64 [..., count]."""
    if bits == 16:
        return np.ascontiguousarray(raw[..., : 2 * count]).view(">u2").astype(np.int64)
    if bits == 8:
        return raw[..., :count].astype(np.int64)
    stream = np.unpackbits(np.ascontiguousarray(raw), axis=-1)[..., : bits * count]
    stream = stream.reshape(*raw.shape[:-1], count, bits).astype(np.int64)
    return stream @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))


def _term_matrix(terms: list[Any], t: int, dtype: Any, normalize_t: bool) -> np.ndarray:
    """DistillKit's polynomial design matrix [t, terms]: rank (or rank / (t - 1)) to each integer
    power, or sqrt / exp of it, in the term dtype."""
    pts = np.linspace(0, 1, t, dtype=dtype) if normalize_t else np.arange(t, dtype=dtype)
    cols = []
    for term in terms:
        if isinstance(term, int):
            cols.append(pts ** dtype(term) if term else np.ones_like(pts))
        elif term == "sqrt":
            cols.append(np.sqrt(pts))
        elif term == "exp":
            cols.append(np.exp(pts))
        else:
            raise DDKCacheError(f"import: DistillKit polynomial term {term!r} is not one this reader knows (int, sqrt, exp)")
    return np.stack(cols, -1).astype(dtype)


def distillkit_sizes(cfg: dict[str, Any]) -> tuple[int, int]:
    """(bytes of a position's compressed log-probs, bits per id) of a DistillKit config."""
    bits = 0
    bits += cfg["exact_k"] * 8 * _width(cfg.get("exact_dtype", "float32"))
    bits += len(cfg.get("polynomial_terms") or []) * 8 * _width(cfg.get("term_dtype", "float32"))
    for b in cfg.get("residual_bins") or []:
        bits += math.ceil((8 * _width(b["scale_dtype"]) + b["element_bits"] * b["num_elements"]) / 8) * 8
    return math.ceil(bits / 8), math.ceil(math.log2(cfg["d"]))


def decode_distillkit(cfg: dict[str, Any], logprob_bytes: np.ndarray, index_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One DistillKit-compressed position per row: (ids int64 [N, k], log-probs float32 [N, k]),
    computed as its decompressor does (float32 arithmetic; bfloat16 output rounding where its
    exact values are bfloat16 and deltas are summed)."""
    k, exact_k = cfg["k"], cfg["exact_k"]
    exact_dtype, term_dtype = cfg.get("exact_dtype", "float32"), cfg.get("term_dtype", "float32")
    N, at = len(logprob_bytes), 0
    exact = _floats(logprob_bytes[:, : exact_k * _width(exact_dtype)], exact_dtype).reshape(N, exact_k)
    at += exact_k * _width(exact_dtype)
    terms = cfg.get("polynomial_terms") or []
    # float16/bfloat16 terms are widened to float32 here; DistillKit multiplies in their own
    # dtype, so such configs agree to that dtype's rounding, not float32's.
    work = np.float64 if term_dtype == "float64" else np.float32
    coeffs = None
    if terms:
        coeffs = _floats(logprob_bytes[:, at: at + len(terms) * _width(term_dtype)], term_dtype).reshape(N, len(terms))
        at += len(terms) * _width(term_dtype)
    residuals = []
    for b in cfg.get("residual_bins") or []:
        sw = _width(b["scale_dtype"])
        scale = _floats(logprob_bytes[:, at: at + sw], b["scale_dtype"]).reshape(N, 1).astype(np.float32)
        at += sw
        nbytes = (b["num_elements"] * b["element_bits"] + 7) // 8
        q = unpack_bits(logprob_bytes[:, at: at + nbytes], b["element_bits"], b["num_elements"])
        at += nbytes
        if b["element_bits"] == 1:
            residuals.append((q.astype(np.float32) * 2 - 1) * scale)
        else:
            residuals.append((q - 2 ** (b["element_bits"] - 1)).astype(np.float32) * scale)
    approx_n = k - exact_k
    residual = np.zeros((N, approx_n), np.float32)
    if residuals:
        r = np.concatenate(residuals, -1)
        residual[:, : r.shape[1]] = r
    approx = residual
    if coeffs is not None and approx_n:
        X = _term_matrix(terms, approx_n, work, bool(cfg.get("normalize_t")))
        approx = (X[None, :, :] * coeffs.astype(work)[:, None, :]).sum(-1).astype(np.float32) + residual
    values = np.concatenate([exact.astype(np.float32), approx.astype(np.float32)], -1)
    if cfg.get("delta_encoding", True):
        values = np.cumsum(values, -1, dtype=np.float32)
        if exact_dtype in ("bfloat16", "float16"):  # its result is cast to the exact dtype
            values = _round_to(values, exact_dtype)
    ids = unpack_bits(index_bytes, math.ceil(math.log2(cfg["d"])), k)
    return ids, values


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rounded to bfloat16 / float16 (nearest even), widened back to float32."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return np.where(np.isnan(x), x, u.astype(np.uint32).view(np.float32))


class DistillKitCapture(Capture):
    """DistillKit's `sample_logits_vllm` output (see the module docstring)."""

    config: dict[str, Any]

    def rows(self, table: Any, path: Path, base: int) -> Rows:
        names = table.column_names
        if "packed_indices" in names and "exact_values" in names:
            raise DDKCacheError(f"import: {path} holds DistillKit's legacy polynomial logit compression (packed_indices, "
                                "exact_values, coeffs), which its own README has replaced; re-capture with its current "
                                "compressor (compressed_logprobs, bytepacked_indices) or write uncompressed token_ids/top_values")
        compressed = "compressed_logprobs" in names and "bytepacked_indices" in names
        if "input_ids" not in names or not (compressed or ("token_ids" in names and "top_values" in names)):
            raise DDKCacheError(f"import: {path}: not a DistillKit capture (it needs input_ids and compressed_logprobs + "
                                f"bytepacked_indices, or token_ids + top_values; it has {', '.join(names)})")
        n = table.num_rows
        t_at, flat, lengths = _ragged_tokens(table, path, base, self.vocab_size)
        positions = lengths - 1
        pos_at = np.zeros(n + 1, np.int64)
        np.cumsum(positions, out=pos_at[1:])
        row_of = lambda i: base + int(np.searchsorted(pos_at, i, "right") - 1)  # noqa: E731  (position -> row)
        if compressed:
            lp_bytes, id_bits = distillkit_sizes(self.config)
            k = self.config["k"]
            arrays = []
            for name, width in (("compressed_logprobs", lp_bytes), ("bytepacked_indices", (k * id_bits + 7) // 8)):
                _, inner, values = _nested(table, name, path, base, positions)
                wrong = np.flatnonzero(np.diff(inner) != width)
                if len(wrong):
                    raise bad(path, row_of(wrong[0]), name, f"{np.diff(inner)[wrong[0]]} bytes at a position where "
                              f"compression_config.yaml gives {width}: the capture and its config do not match")
                arrays.append(_flat(values, np.uint8).reshape(-1, width))
            ids, lps = decode_distillkit(self.config, *arrays)
            # Fewer than k entries at a position (vLLM returned fewer) decode as -inf, then NaN
            # through the delta sums: a finite prefix, then nothing kept.
            finite = np.isfinite(lps)
            broken = (finite[:, 1:] & ~finite[:, :-1]).any(1) | ~finite[:, 0]
            if broken.any():
                raise bad(path, row_of(np.flatnonzero(broken)[0]), "compressed_logprobs",
                          "log-probabilities that do not decode to a finite, descending prefix")
            # Its polynomial can overshoot above 0 where the rows fall steeply (peaked positions):
            # such values are clamped to 0 and counted (`inspect` reports the share).
            clamped = int((lps > 0).any(1).sum())
            lps = np.minimum(lps, 0)
            ids = np.where(finite, ids, 0)  # ids of entries not kept are whatever DistillKit's buffer held
            if len(ids) and ids.max() >= self.vocab_size:
                raise bad(path, row_of(np.flatnonzero((ids >= self.vocab_size).any(1))[0]), "bytepacked_indices",
                          f"an id outside the vocabulary [0, {self.vocab_size})")
            lps = np.where(finite, lps, -np.inf).astype(np.float32)
            ids = ids.astype(np.int32)
        else:
            (_, at, ids_v), (_, lp_at, lp_v) = (_nested(table, c, path, base, positions) for c in ("token_ids", "top_values"))
            if not np.array_equal(at, lp_at) or (np.diff(at) < 1).any():
                raise bad(path, row_of(np.flatnonzero((np.diff(lp_at) != np.diff(at)) | (np.diff(at) < 1))[0]), "top_values",
                          "each position needs as many log-probs as ids, and at least one")
            ids, lps, _ = _entries(_flat(ids_v, np.int64), _flat(lp_v, np.float64), at, path, row_of, self.vocab_size, "token_ids")
            clamped = 0
        tokens, lengths = _padded_tokens(flat, t_at)
        return {"tokens": tokens, "lengths": lengths, "ids": _place(ids, pos_at, lengths, 0),
                "logprobs": _place(lps.astype(np.float32), pos_at, lengths, -np.inf), "target": None, "tail": None,
                "mask": None, "domain": _domains(table, n), "clamped": clamped}


def _domains(table: Any, n: int) -> list[str] | None:
    if "domain" not in table.column_names:
        return None
    return [str(d) for d in table.column("domain").to_pylist()]


# -- axolotl -------------------------------------------------------------------------------------

class AxolotlDataset(Capture):
    """axolotl's tokenized KD rows (see the module docstring)."""

    def rows(self, table: Any, path: Path, base: int) -> Rows:
        missing = [c for c in AXOLOTL_REQUIRED if c not in table.column_names]
        if missing:
            raise DDKCacheError(f"import: {path}: missing column(s) {', '.join(missing)} (axolotl's KD rows: input_ids, labels, "
                                "target_token_ids, target_logprobs, target_mask)")
        n = table.num_rows
        t_at, flat, lengths = _ragged_tokens(table, path, base, self.vocab_size)
        # One target row per token (the last predicts past the sequence and is dropped).
        (row_at, at, ids_v), (_, lp_at, lp_v) = (_nested(table, c, path, base, lengths) for c in ("target_token_ids", "target_logprobs"))
        row_of = lambda i: base + int(np.searchsorted(row_at, i, "right") - 1)  # noqa: E731  (position -> row)
        if not np.array_equal(at, lp_at):
            raise bad(path, row_of(np.flatnonzero(np.diff(lp_at) != np.diff(at))[0]), "target_logprobs",
                      "each position needs as many log-probs as ids")
        lp_flat = _flat(lp_v, np.float64)
        if np.isnan(lp_flat).any() or (lp_flat > 1e-6).any():
            at_v = int(np.flatnonzero(np.isnan(lp_flat) | (lp_flat > 1e-6))[0])
            raise bad(path, row_of(np.searchsorted(at, at_v, "right") - 1), "target_logprobs", "NaN or a log-probability above 0")
        ids, lps, _ = _entries(_flat(ids_v, np.int64), lp_flat, at, path, row_of, self.vocab_size, "target_token_ids",
                               check_finite=False)
        ids = np.where(np.isfinite(lps), ids, 0).astype(np.int32)  # -inf entries are axolotl's padding
        keep_pos = np.ones(len(ids), bool)
        keep_pos[row_at[1:] - 1] = False  # each row's last position
        pos_at = np.zeros(n + 1, np.int64)
        np.cumsum(lengths - 1, out=pos_at[1:])
        tokens, lengths = _padded_tokens(flat, t_at)
        mask = None
        if "labels" in table.column_names:
            l_at, l_flat = _lists(table, "labels", path, base)
            if not np.array_equal(np.diff(l_at), lengths):
                raise bad(path, base + int(np.flatnonzero(np.diff(l_at) != lengths)[0]), "labels", "not one label per input id")
            labels, _ = _padded_tokens(_flat(l_flat, np.int64), l_at)
            mask = (labels != -100).astype(np.uint8)
        elif "target_mask" in table.column_names:
            _, m_at, m_v = _nested(table, "target_mask", path, base, lengths)
            per_pos = np.add.reduceat(_flat(m_v, np.int64), m_at[:-1]) > 0 if len(m_v) else np.zeros(len(m_at) - 1, bool)
            m = np.zeros_like(tokens, np.uint8)
            m[:, 1:] = _place(per_pos[keep_pos].astype(np.uint8), pos_at, lengths, 0)  # position t carries token t + 1's loss
            mask = m
        if mask is not None:
            mask[:, 0] = 0
            mask[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
        lps = lps[keep_pos]
        # A position whose entries are all padding (axolotl's prompt padding) keeps nothing:
        # it becomes a label-only target in the importer, and carries no loss.
        return {"tokens": tokens, "lengths": lengths, "ids": _place(ids[keep_pos], pos_at, lengths, 0),
                "logprobs": _place(lps.astype(np.float32), pos_at, lengths, -np.inf), "target": None, "tail": None,
                "mask": mask, "domain": _domains(table, n)}
