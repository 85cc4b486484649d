"""From documents to sequences at corpus scale: staged tokens, the plan, the gather.

The rule (storage_layout.md, "Packing"), in bounded memory and independent of how many
workers share the build:

1. Each domain is cut into pieces (corpus.plan_pieces). Workers tokenize whole pieces
   (build.balance: largest pieces first, each to the least loaded worker, the same split in
   every worker) and stage
   each one under `_build/pieces/<domain>/<piece>`: its documents' tokens, ordered by the
   document's shuffle key h = blake2b-64(seed, domain, file, offset, part), and an index
   of (h, length). A piece's index is written last: it marks the piece done.
2. Validation: the documents with the smallest h over the whole domain, in h order,
   until they hold the validation size (`val_tokens`, at most `val_max_fraction` of what
   the domain keeps under `max_tokens_per_domain`, in whole sequences); the last one is
   cut and its rest discarded, so no document is in both splits. Text: their tokens
   concatenated and cut into sequences.
3. Training: the pieces in the order permutation(seed, crc32(domain)), each contributing
   its remaining documents in h order; text documents are concatenated and cut into
   `seq_len` sequences (crossing document boundaries; a final partial sequence is
   dropped), capped at `max_tokens_per_domain` tokens in all. Chat samples are not packed:
   each is one sequence, truncated to `seq_len`, padded with the pad token (EOS if none),
   loss mask 0 on padding and on everything but the assistant's turns.

Row start (`--row-start`, `bos_id`): with a BOS, text row r is the stream's tokens
[r(L-1), r(L-1) + L) with its first token replaced by the BOS (rows overlap by that token,
so every stream token after the first is a prediction target exactly once), and a chat
sample that does not begin with the BOS gets one in front (loss mask 0). Without, row r
is the stream's tokens [rL, (r+1)L). Document boundaries inside a row stay as the
tokenizer made them: the EOS appended to each document, then the next one's BOS if the
tokenizer adds one.

Memory: a worker holds one piece's tokens at a time; the plan holds a few numbers per
piece and the validation documents; a gather holds the sequences it returns.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import threading
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import CorpusError
from ..store.cache import PIECES_DIR
from ..store.meta import CHAT, TEXT, DomainInfo, SplitInfo
from ..store.objects import Objects
from .corpus import DomainSource, Piece, read_piece

SUMMARY_DIR = "_build/summary"
SAMPLED = "sampled"  # a piece's kind while tokenizing: chat records with their sampling log-probs
KIND_NAMES = {TEXT: "plain-text records", CHAT: "chat records", SAMPLED: "generated samples (with 'response_ids' and 'logprobs')"}
PLAN_KEY = "_build/plan.json"
BATCH_DOCS = 256  # documents per tokenizer call (the fast tokenizer encodes a batch in parallel)
BATCH_CHARS = 4 << 20  # ... and at most about this much text per call: bounded memory for long documents


def _kinds(*kinds: str) -> str:
    return " and ".join(sorted(KIND_NAMES[k] for k in set(kinds)))


def doc_hash(seed: int, domain: str, key: str) -> int:
    """A document's shuffle key: 64 bits of blake2b over (seed, domain, file, offset, part)."""
    digest = hashlib.blake2b(f"{seed}\0{domain}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def domain_rng(seed: int, domain: str) -> np.random.Generator:
    """The generator of a domain's piece order: stable across runs, machines and domain order."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode())])


def piece_key(domain: str, index: int) -> str:
    return f"{PIECES_DIR}/{domain}/{index:07d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """Staged tokens: uint16 while the ids fit (half the bytes), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass
class PieceIndex:
    """A staged piece: its documents in shuffle-key order."""

    hashes: np.ndarray  # uint64 [D], ascending
    lengths: np.ndarray  # int64 [D] tokens
    stats: dict[str, Any]  # tokens, docs, sha256 of the bytes read, data kind (text or chat)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])[:-1]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, hashes=self.hashes, lengths=self.lengths, stats=np.frombuffer(json.dumps(self.stats).encode(), np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "PieceIndex":
        z = np.load(io.BytesIO(raw))
        return cls(z["hashes"], z["lengths"], json.loads(bytes(z["stats"])))


@dataclass
class PackingConfig:
    """The build settings the packing rule depends on (all part of the build fingerprint)."""

    seq_len: int
    seed: int
    text_field: str
    val_tokens: int
    val_max_fraction: float
    max_tokens: int | None
    part_chars: int
    vocab_size: int
    pad_id: int
    bos_id: int | None = None  # --row-start bos: every row begins with this token (None: rows start as the stream falls)

    @property
    def stride(self) -> int:
        return row_stride(self.seq_len, self.bos_id)


def row_stride(seq_len: int, bos_id: int | None) -> int:
    """Stream tokens a text row advances by: L, or L - 1 when every row begins with a BOS
    (row r is then stream[r(L-1) : r(L-1) + L] with its first token replaced by the BOS, so
    consecutive rows overlap by that one token and every stream token after the first is
    predicted exactly once)."""
    return seq_len if bos_id is None else seq_len - 1


def stream_tokens(rows: int, seq_len: int, bos_id: int | None) -> int:
    """Stream tokens that `rows` text rows span (see `row_stride`)."""
    stride = row_stride(seq_len, bos_id)
    return rows * stride + (seq_len - stride) if rows else 0


def rows_in(tokens: int, seq_len: int, bos_id: int | None) -> int:
    """Whole text rows that `tokens` stream tokens make."""
    stride = row_stride(seq_len, bos_id)
    return max(0, tokens - (seq_len - stride)) // stride


# ---------------------------------------------------------------------------- step 1: tokenize


def tokenize_piece(objects: Objects, source: DomainSource, piece: Piece, tokenize: Any, cfg: PackingConfig) -> dict[str, Any]:
    """Read, tokenize and stage one piece; return its stats. `tokenize(docs)` turns a list of
    corpus Documents into (token arrays, mask arrays or None, sampling log-prob arrays or
    None), one per document."""
    digest = hashlib.sha256()
    keys, tokens, masks, logprobs = [], [], [], []
    kind = None
    batch: list = []
    batch_chars = 0
    no_loss = cut = 0

    def flush() -> None:
        nonlocal no_loss, cut, batch_chars
        batch_chars = 0
        ids, ms, lps = tokenize(batch)
        if ms is None:
            keys.extend(doc_hash(cfg.seed, source.name, d.key) for d in batch)
            tokens.extend(ids)
        else:
            for d, i, m, lp in zip(batch, ids, ms, lps or [None] * len(ids)):
                if cfg.bos_id is not None and (not len(i) or i[0] != cfg.bos_id):
                    if lp is not None:
                        raise CorpusError(f"{d.origin}: this generated sample does not start with the BOS token that --row-start "
                                          "bos puts before every row (its sampling log-probs were recorded without one); "
                                          "build it with --row-start none, or generate it again")
                    # Chat: the sample's row begins with the BOS too (it carries no loss).
                    i, m = np.concatenate([[cfg.bos_id], i]).astype(np.int32), np.concatenate([[0], m]).astype(np.uint8)
                # A chat sample whose assistant tokens all lie beyond seq-len would carry no
                # loss (and give its domain's perplexities 0/0): it is left out, and counted.
                if not m[1 : cfg.seq_len].any():
                    no_loss += 1
                    continue
                cut += len(i) > cfg.seq_len  # kept, but its end beyond seq_len is lost
                keys.append(doc_hash(cfg.seed, source.name, d.key))
                tokens.append(i)
                masks.append(m)
                if lp is not None:
                    logprobs.append(lp)
        batch.clear()

    for doc in read_piece(source, piece, cfg.text_field, cfg.part_chars, digest):
        doc_kind = TEXT if doc.messages is None else CHAT if doc.sample is None else SAMPLED
        if kind is None:
            kind = doc_kind
        elif doc_kind != kind:
            raise CorpusError(f"{doc.origin}: domain {source.name!r} mixes {_kinds(kind, doc_kind)}; give each kind its own domain")
        batch.append(doc)
        batch_chars += len(doc.text) if doc.text is not None else sum(len(m["content"]) for m in doc.messages or [])
        # A batch is bounded by documents and by text: 256 documents of 1 Mi characters each
        # held ~5 GB in the tokenizer at once (its offsets and encodings per token).
        if len(batch) >= BATCH_DOCS or batch_chars >= BATCH_CHARS:
            flush()
    if batch:
        flush()
    order = np.argsort(np.array(keys, np.uint64), kind="stable")
    hashes = np.array(keys, np.uint64)[order]
    lengths = np.array([len(tokens[i]) for i in order], np.int64)
    dtype = token_dtype(cfg.vocab_size)
    stream = np.concatenate([tokens[i] for i in order]).astype(dtype) if len(order) else np.zeros(0, dtype)
    key = piece_key(source.name, piece.index)
    objects.put(f"{key}.tok", stream.tobytes())
    if masks:
        objects.put(f"{key}.msk", np.concatenate([masks[i] for i in order]).astype(np.uint8).tobytes())
    if kind == SAMPLED:
        objects.put(f"{key}.slp", np.concatenate([logprobs[i] for i in order]).astype("<f4").tobytes())
    stats = {"docs": int(len(order)), "tokens": int(lengths.sum()), "sha256": digest.hexdigest(), "data": CHAT if kind == SAMPLED else kind or TEXT}
    if kind == SAMPLED:
        stats["sampled"] = True
    if no_loss:
        stats["no_loss"] = no_loss
    if cut:
        stats["cut"] = cut
    index = PieceIndex(hashes, lengths, stats)
    objects.put(f"{key}.idx", index.to_bytes())  # last: the piece is done
    return stats


def done_pieces(objects: Objects) -> set[tuple[str, int]]:
    """(domain, piece) of every staged piece, from one listing."""
    out = set()
    for key in objects.list(PIECES_DIR):
        if key.endswith(".idx"):
            domain, name = key[len(PIECES_DIR) + 1 : -4].rsplit("/", 1)
            out.add((domain, int(name)))
    return out


def read_index(objects: Objects, domain: str, index: int) -> PieceIndex:
    raw = objects.get(f"{piece_key(domain, index)}.idx")
    if raw is None:
        raise CorpusError(f"staged piece {domain}/{index} is missing; rerun the build to tokenize it again")
    return PieceIndex.from_bytes(raw)


@dataclass
class Candidates:
    """A worker's smallest-key documents of one domain: enough for any validation split."""

    limit: int  # tokens (text) or documents (chat) the validation split can need at most
    chat: bool = False
    docs: list[tuple[int, int, int, int]] = field(default_factory=list)  # (hash, piece, offset, length)

    def add(self, piece: int, index: PieceIndex) -> None:
        offsets = index.offsets
        merged = sorted(self.docs + [(int(h), piece, int(o), int(n)) for h, o, n in zip(index.hashes, offsets, index.lengths)])
        kept, total = [], 0
        for doc in merged:
            if total >= self.limit:
                break
            kept.append(doc)
            total += 1 if self.chat else doc[3]
        self.docs = kept


def write_summary(objects: Objects, worker: tuple[int, int], pieces: dict[str, dict[int, dict]], candidates: dict[str, Candidates]) -> None:
    """What this worker staged, and its validation candidates: the plan reads O(workers) of these."""
    body = {"pieces": {d: {str(k): v for k, v in p.items()} for d, p in pieces.items()},
            "val": {d: [[str(h), p, o, n] for h, p, o, n in c.docs] for d, c in candidates.items()}}
    objects.put(f"{SUMMARY_DIR}/w{worker[0]:05d}-of-{worker[1]:05d}.json", json.dumps(body).encode())


# ---------------------------------------------------------------------------- step 2: the plan


@dataclass
class DomainPlan:
    """Where every sequence of a domain comes from (see the module docstring)."""

    data: str
    order: list[int]  # piece ids in training order
    tokens: list[int]  # per piece (by id): staged tokens
    docs: list[int]  # per piece: staged documents
    val_prefix: list[int]  # per piece: tokens (text) or documents (chat) taken by validation
    val_docs: list[list[int]]  # [piece, offset, length] in shuffle-key order
    n_train: int
    n_val: int
    tokens_read: int
    train_documents: int
    sha256: str
    no_loss: int = 0  # chat samples left out: no assistant token within seq_len
    cut: int = 0  # chat samples kept but longer than seq_len (their ends are not in the cache)
    sampled: bool = False  # generated samples: their sampling log-probs are staged too (.slp)

    def info(self) -> DomainInfo:
        return DomainInfo(SplitInfo(self.n_train, self.train_documents), SplitInfo(self.n_val, len(self.val_docs)), self.tokens_read,
                          self.data, self.sampled)


@dataclass
class Plan:
    seq_len: int
    itemsize: int
    pad_id: int
    domains: dict[str, DomainPlan]
    bos_id: int | None = None  # --row-start bos: the token every row begins with

    def to_bytes(self) -> bytes:
        body = {"seq_len": self.seq_len, "itemsize": self.itemsize, "pad_id": self.pad_id,
                "domains": {k: asdict(v) for k, v in self.domains.items()}}
        if self.bos_id is not None:  # absent otherwise: plans of rows without a BOS keep their bytes
            body["bos_id"] = self.bos_id
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Plan":
        d = json.loads(raw)
        return cls(d["seq_len"], d["itemsize"], d["pad_id"], {k: DomainPlan(**v) for k, v in d["domains"].items()}, d.get("bos_id"))

    def corpus_sha256(self) -> str:
        """One hash of every corpus byte read, by domain (each piece's sha256 in piece order)."""
        return hashlib.sha256("".join(f"{d}:{p.sha256}" for d, p in sorted(self.domains.items())).encode()).hexdigest()


def _val_size(total: int, cfg: PackingConfig, chat: bool, name: str, capped: bool) -> int:
    """Validation sequences: val_tokens in whole sequences, at most val_max_fraction of what the
    domain keeps (`total`: after --max-tokens-per-domain), at least 1."""
    L = cfg.seq_len
    units = total if chat else rows_in(total, L, cfg.bos_id)  # what the domain keeps, in sequences
    n = max(1, min(-(-cfg.val_tokens // L), int(cfg.val_max_fraction * units)))
    if units < n + 1:
        what = "keeps" if capped else "has"
        fix = "raise --max-tokens-per-domain" if capped else "add text"
        raise CorpusError(
            f"domain {name!r} {what} {total:,} {'samples' if chat else 'tokens'}; it needs at least "
            f"{(n + 1) if chat else stream_tokens(n + 1, L, cfg.bos_id):,} ({n} validation + 1 training sequence of {L} tokens): "
            f"{fix}, or lower --seq-len or --val-tokens"
        )
    return n


def make_plan(objects: Objects, sources: list[DomainSource], pieces: dict[str, list[Piece]], cfg: PackingConfig) -> Plan:
    """The plan, from the workers' summaries (O(workers) reads), reading the index of any
    piece no summary covers (a build restarted with another worker count)."""
    per_domain: dict[str, dict[int, dict]] = {s.name: {} for s in sources}
    cands: dict[str, list] = {s.name: [] for s in sources}
    for key in sorted(objects.list(SUMMARY_DIR)):
        body = json.loads(objects.get(key) or b"{}")
        for d, found in body.get("pieces", {}).items():
            if d in per_domain:
                for k, v in found.items():
                    per_domain[d].setdefault(int(k), v)
        for d, docs in body.get("val", {}).items():
            if d in cands:
                cands[d] += [(int(h), p, o, n) for h, p, o, n in docs]
    domains = {}
    for source in sources:
        name = source.name
        n_pieces = len(pieces[name])
        missing = [i for i in range(n_pieces) if i not in per_domain[name]]
        chat_guess = any(v.get("data") == CHAT for v in per_domain[name].values())
        extra = Candidates(limit=0, chat=chat_guess)
        for i in missing:  # pieces no summary covers: read their indexes
            index = read_index(objects, name, i)
            per_domain[name][i] = index.stats
            extra.limit = 1 << 62
            extra.add(i, index)
        stats = [per_domain[name][i] for i in range(n_pieces)]
        no_loss = sum(int(s.get("no_loss", 0)) for s in stats)
        cut = sum(int(s.get("cut", 0)) for s in stats)
        kinds = {SAMPLED if s.get("sampled") else s["data"] for s in stats if s["docs"]} or ({CHAT} if no_loss else set())
        if len(kinds) > 1:
            raise CorpusError(f"domain {name!r} mixes {_kinds(*kinds)}; give each kind its own domain")
        sampled = SAMPLED in kinds
        data = CHAT if sampled else kinds.pop() if kinds else TEXT
        chat = data == CHAT
        tokens = [int(s["tokens"]) for s in stats]
        docs = [int(s["docs"]) for s in stats]
        total = sum(docs) if chat else sum(tokens)
        if total == 0 and no_loss:
            raise CorpusError(f"domain {name!r}: none of its {no_loss:,} chat samples has an assistant token within the first "
                              f"{cfg.seq_len} tokens; raise --seq-len or shorten the prompts")
        if total == 0:
            raise CorpusError(f"domain {name!r} has no documents")
        # Validation is sized from what the cap keeps, so a capped build of a large domain
        # takes its share of the cap, not of the whole domain.
        cap = None if cfg.max_tokens is None else (cfg.max_tokens // cfg.seq_len if chat else cfg.max_tokens)
        n_val = _val_size(total if cap is None else min(total, cap), cfg, chat, name, cap is not None and cap < total)
        # Validation: the smallest keys over the whole domain (dedup: a piece may appear in two summaries).
        pool = sorted(set(cands[name] + extra.docs))
        need = n_val if chat else stream_tokens(n_val, cfg.seq_len, cfg.bos_id)
        val_docs, got = [], 0
        for h, p, o, n in pool:
            if got >= need:
                break
            val_docs.append([p, o, n])
            got += 1 if chat else n
        if got < need:
            raise CorpusError(f"domain {name!r}: the staged pieces hold too few documents for {n_val} validation sequences; "
                              "rerun the build (a summary may be stale)")
        val_prefix = [0] * n_pieces
        for p, _, n in val_docs:
            val_prefix[p] += 1 if chat else n
        order = domain_rng(cfg.seed, name).permutation(n_pieces).tolist()
        remaining = sum((docs[p] if chat else tokens[p]) - val_prefix[p] for p in range(n_pieces))
        if chat:
            n_train = remaining
            if cfg.max_tokens is not None:
                n_train = min(n_train, max(0, cfg.max_tokens // cfg.seq_len - n_val))
        else:
            train_tokens = remaining if cfg.max_tokens is None else min(remaining, max(0, cfg.max_tokens - need))
            n_train = rows_in(train_tokens, cfg.seq_len, cfg.bos_id)
        if n_train == 0:
            raise CorpusError(
                f"domain {name!r}: after {n_val} validation sequences fewer than one training sequence of "
                f"{cfg.seq_len} tokens is left: add text, or lower --seq-len or --val-tokens"
            )
        used = n_train if chat else stream_tokens(n_train, cfg.seq_len, cfg.bos_id)
        train_documents, left = 0, used
        for p in order:  # documents in the training stream (pieces used whole, and part of the last)
            avail = (docs[p] if chat else tokens[p]) - val_prefix[p]
            if left <= 0:
                break
            if chat:
                take = min(avail, left)
                train_documents += take
            elif avail <= left:
                train_documents += docs[p] - sum(1 for q, _, _ in val_docs if q == p)
            else:
                index = read_index(objects, name, p)
                ends = np.cumsum(index.lengths) - val_prefix[p]
                train_documents += int(np.searchsorted(ends[ends > 0], left, side="left")) + 1
            left -= avail
        sha = hashlib.sha256("".join(s["sha256"] for s in stats).encode()).hexdigest()
        tokens_read = sum(tokens) if cfg.max_tokens is None else min(sum(tokens), cfg.max_tokens)
        domains[name] = DomainPlan(data, order, tokens, docs, val_prefix, val_docs, n_train, n_val, tokens_read, train_documents, sha, no_loss, cut,
                                   sampled)
    return Plan(cfg.seq_len, token_dtype(cfg.vocab_size).itemsize, cfg.pad_id, domains, cfg.bos_id)


# ---------------------------------------------------------------------------- step 3: gather


class Gatherer:
    """Reads the tokens (and loss masks) of planned sequences from the staged pieces."""

    def __init__(self, objects: Objects, plan: Plan) -> None:
        self.objects, self.plan = objects, plan
        self.dtype = np.dtype("<u2") if plan.itemsize == 2 else np.dtype("<u4")
        self._indexes: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._guard = threading.Lock()
        self._train_cum = {d: np.cumsum([0] + [self._avail(p, i) for i in p.order]).tolist() for d, p in plan.domains.items()}

    @staticmethod
    def _avail(p: DomainPlan, piece: int) -> int:
        return (p.docs[piece] if p.data == CHAT else p.tokens[piece]) - p.val_prefix[piece]

    def _read(self, requests: list[tuple[str, int, int]], suffix: str, itemsize: int, dtype: np.dtype) -> list[np.ndarray]:
        """(domain, piece, token start, token stop) ranges -> arrays."""
        keys = [(f"{piece_key(d, p)}{suffix}", a * itemsize, b * itemsize) for d, p, a, b in requests]  # type: ignore[misc]
        out = []
        for (key, a, b), raw in zip(keys, self.objects.get_ranges(keys)):
            if raw is None or len(raw) != b - a:
                raise CorpusError(f"staged tokens {key} are missing or short; rerun the build (it re-tokenizes missing pieces)")
            out.append(np.frombuffer(raw, dtype))
        return out

    def _offsets(self, domain: str, piece: int) -> np.ndarray:
        """Start offsets (and total) of a piece's documents, from its index (kept a while)."""
        key = (domain, piece)
        with self._guard:
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return self._indexes[key]
        index = read_index(self.objects, domain, piece)
        bounds = np.concatenate([[0], np.cumsum(index.lengths)])
        with self._guard:
            self._indexes[key] = bounds
            while len(self._indexes) > 64:
                self._indexes.popitem(last=False)
        return bounds

    def sequences(self, domain: str, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(int32 tokens [n, L], uint8 loss mask [n, L] or None, float32 sampling log-probs
        [n, L] or None) of sequences [start, stop)."""
        p = self.plan.domains[domain]
        L = self.plan.seq_len
        if p.data == CHAT:
            return self._chat(domain, p, split, start, stop, L)
        stride = row_stride(L, self.plan.bos_id)
        want_a, want_b = start * stride, stop * stride + (L - stride)
        if split == "val":
            segments, at = [], 0
            for piece, offset, length in p.val_docs:
                a, b = max(at, want_a), min(at + length, want_b)
                if a < b:
                    segments.append((domain, piece, offset + a - at, offset + b - at))
                at += length
        else:
            segments = self._train_segments(domain, p, want_a, want_b)
        parts = self._read(segments, ".tok", self.plan.itemsize, self.dtype)
        flat = (np.concatenate(parts) if parts else np.zeros(0, self.dtype)).astype(np.int32)
        if stride == L:
            return flat.reshape(stop - start, L), None, None
        # Rows overlap by one token, which each row's BOS replaces (see `row_stride`).
        rows = np.lib.stride_tricks.sliding_window_view(flat, L)[::stride][: stop - start].copy()
        rows[:, 0] = self.plan.bos_id
        return rows, None, None

    def _train_segments(self, domain: str, p: DomainPlan, a: int, b: int) -> list[tuple[str, int, int, int]]:
        cum = self._train_cum[domain]
        out = []
        k = bisect.bisect_right(cum, a) - 1
        while a < b:
            piece = p.order[k]
            lo, hi = a - cum[k], min(b, cum[k + 1]) - cum[k]
            out.append((domain, piece, p.val_prefix[piece] + lo, p.val_prefix[piece] + hi))
            a = cum[k + 1]
            k += 1
        return out

    def _chat(self, domain: str, p: DomainPlan, split: str, start: int, stop: int, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        docs = []  # (piece, offset, length) of each sample
        if split == "val":
            docs = [tuple(v) for v in p.val_docs[start:stop]]
        else:
            cum = self._train_cum[domain]
            for s in range(start, stop):
                k = bisect.bisect_right(cum, s) - 1
                piece = p.order[k]
                j = p.val_prefix[piece] + s - cum[k]
                bounds = self._offsets(domain, piece)
                docs.append((piece, int(bounds[j]), int(bounds[j + 1] - bounds[j])))
        reqs = [(domain, piece, off, off + min(n, L)) for piece, off, n in docs]
        toks = self._read(reqs, ".tok", self.plan.itemsize, self.dtype)
        masks = self._read(reqs, ".msk", 1, np.dtype(np.uint8))
        tokens = np.full((len(docs), L), self.plan.pad_id, np.int32)
        mask = np.zeros((len(docs), L), np.uint8)
        for i, (t, m) in enumerate(zip(toks, masks)):
            tokens[i, : len(t)] = t
            mask[i, : len(m)] = m
        if not p.sampled:
            return tokens, mask, None
        logprobs = np.zeros((len(docs), L), np.float32)
        for i, v in enumerate(self._read(reqs, ".slp", 4, np.dtype("<f4"))):
            logprobs[i, : len(v)] = v
        return tokens, mask, logprobs
