"""Split a domain's documents into validation and training streams and pack them into sequences.

The rule (also in storage_layout.md, "Packing"):

1. Shuffle the domain's documents with `np.random.default_rng([seed, crc32(domain)])`.
2. With `max_tokens`, keep documents in that order until the cap; the document crossing
   the cap is cut there.
3. Validation takes whole documents from the front of the order until it holds
   `val_sequences * seq_len` tokens; the last one is cut and its rest discarded, so no
   document contributes to both splits.
4. The remaining documents are concatenated and cut into `seq_len` sequences; the tail
   shorter than one sequence is dropped. Sequences cross document boundaries (each
   document ends with EOS), as in standard LM pre-training packing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import CorpusError


@dataclass(frozen=True)
class PackedSplit:
    """Sequences of one split: `tokens` is int32 [sequences, seq_len]."""

    tokens: np.ndarray
    documents: int  # documents that contributed at least one token


@dataclass(frozen=True)
class PackedDomain:
    name: str
    train: PackedSplit
    val: PackedSplit
    tokens_read: int  # tokens after the cap, before dropping the packing tail


def domain_rng(seed: int, domain: str) -> np.random.Generator:
    """The generator a domain's shuffle uses: stable across runs, machines and domain order."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode())])


def pack_domain(
    name: str,
    documents: list[np.ndarray],
    *,
    seq_len: int,
    val_sequences: int,
    max_tokens: int | None = None,
    seed: int = 0,
) -> PackedDomain:
    """Apply the packing rule above to one domain's tokenized documents.

    Raises CorpusError when the domain has no documents or too few tokens for
    `val_sequences` validation sequences plus one training sequence.
    """
    if not documents:
        raise CorpusError(f"domain {name!r} has no documents")
    order = domain_rng(seed, name).permutation(len(documents))
    docs = [documents[i] for i in order]
    if max_tokens is not None:
        docs = _cap(docs, max_tokens)
    total = sum(len(d) for d in docs)
    need_val = val_sequences * seq_len
    if total < need_val + seq_len:
        raise CorpusError(
            f"domain {name!r} has {total:,} tokens{' (after --max-tokens-per-domain)' if max_tokens else ''}; "
            f"it needs at least {need_val + seq_len:,} ({val_sequences} validation + 1 training sequence of "
            f"{seq_len} tokens): add text, or lower --seq-len or --val-sequences"
        )

    val_parts, used, n_val_docs = [], 0, 0
    while used < need_val:
        doc = docs[n_val_docs][: need_val - used]
        val_parts.append(doc)
        used += len(doc)
        n_val_docs += 1
    train_docs = docs[n_val_docs:]
    train_stream = np.concatenate(train_docs) if train_docs else np.zeros(0, np.int32)
    n_train = len(train_stream) // seq_len
    if n_train == 0:
        raise CorpusError(
            f"domain {name!r}: after {val_sequences} validation sequences only {len(train_stream):,} tokens are left, "
            f"fewer than one training sequence of {seq_len}: add text, or lower --seq-len or --val-sequences"
        )
    train = train_stream[: n_train * seq_len].reshape(n_train, seq_len)
    # A document counts for train if any of its tokens made it into a kept sequence.
    lengths = np.cumsum([len(d) for d in train_docs])
    n_train_docs = int(np.searchsorted(lengths, n_train * seq_len, side="left")) + 1
    val = (np.concatenate(val_parts) if val_parts else np.zeros(0, np.int32)).reshape(val_sequences, seq_len)
    return PackedDomain(
        name=name,
        train=PackedSplit(train.astype(np.int32, copy=False), min(n_train_docs, len(train_docs))),
        val=PackedSplit(val.astype(np.int32, copy=False), n_val_docs),
        tokens_read=total,
    )


def _cap(docs: list[np.ndarray], max_tokens: int) -> list[np.ndarray]:
    kept, used = [], 0
    for doc in docs:
        if used >= max_tokens:
            break
        doc = doc[: max_tokens - used]
        kept.append(doc)
        used += len(doc)
    return kept
