"""Named, versioned encodings: how a sequence's teacher targets become stored rows, and back.

An encoding is one small frozen object. It declares the arrays it stores per sequence
(`arrays`: name -> dtype, row shape, compression), turns one scored sequence into one row
per array (`encode`), turns a batch of stored rows back into targets (`decode`), and
becomes a JSON dict in the cache's metadata (`to_dict`, `encoding_from_dict`). The store,
verify, the loader and the trainer only ever call these four things: adding an encoding
means one class here, its codec, and its section in storage_layout.md.

  plain-v1   exact int32 ids + float32 log-probs + float32 target log-probs (3 arrays)
  pack-v3    one packed row per sequence (pack3.py): every kept probability and the tail
             to a bounded relative error (log space), ids and counts exact, top-k or
             sampled targets, the target's log-prob as a reference into the kept
             entries, the tail's log-prob decoded exactly. The default: every divergence's
             gradient matches the exact targets' (BENCHMARKS.md).
  pack-v2    one packed row per sequence (pack2.py): log-probs within a per-position
             forward-KL bound. Smaller, but only forward KL is exact from it: other losses
             are refused on these caches (`forward_kl_only`).
  pack-v1    format 2's packed rows (codec.py) + float32 target log-probs; read only
  none       tokens-only caches (`--top-k 0`): no teacher targets at all
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import StoreError, StoreVersionError
from .shards import ArraySpec
from .targets import TargetSpec


@dataclass(frozen=True)
class Layout:
    """What every row of a cache's targets shares."""

    positions: int  # P = seq_len - 1
    entries: int  # K: the most entries a position holds
    vocab_size: int
    targets: TargetSpec


@dataclass(frozen=True)
class RowScores:
    """One sequence as the teacher scored it (what `encode` takes).

    ids, logprobs [P, K] in rank order (entry 0 = top-1), -inf where an entry is not kept;
    for sampled targets the unique ids, their teacher log-probs and their draw `counts`
    (0 = padding). target_logprob [P]: the teacher's log-prob of next_tokens [P].
    tail_logprob [P] or None: the log of the teacher's mass outside the kept entries where
    the engine knows it exactly (the hf backend: from the full distribution), -inf for none;
    None: encoders take 1 - sum of the kept entries."""

    ids: np.ndarray
    logprobs: np.ndarray
    target_logprob: np.ndarray
    next_tokens: np.ndarray
    counts: np.ndarray | None = None
    tail_logprob: np.ndarray | None = None


@dataclass
class Targets:
    """A decoded batch of B sequences (what `decode` returns).

    ids int32 [B, P, K]; logprobs float32 [B, P, K], -inf for padding (for sampled targets
    the log target weights, which sum to 1: no tail); target_logprob float32 [B, P];
    tail_logprob float32 [B, P] or None: the log of the teacher's mass outside the kept ids
    (-inf: none), for encodings that store it exactly (None: 1 - sum of the kept entries)."""

    ids: np.ndarray
    logprobs: np.ndarray
    target_logprob: np.ndarray
    tail_logprob: np.ndarray | None = None


class Encoding(ABC):
    """See the module docstring."""

    name: ClassVar[str]
    writable: ClassVar[bool] = True  # False: kept to read caches written by older versions
    # True: values are exact only in the forward-KL sense (pack-v1, pack-v2); `distill` refuses
    # other divergences on them (their gradients weight each entry by log p, which these
    # encodings do not bound).
    forward_kl_only: ClassVar[bool] = False
    # True: rows are bytes, so in a format-5 cache they share each shard's object with the
    # tokens (a bundle, shards.py); typed rows (plain-v1) keep their own arrays and shuffle.
    bundled: ClassVar[bool] = False

    @abstractmethod
    def arrays(self, layout: Layout) -> dict[str, ArraySpec]:
        """The per-sequence arrays this encoding stores (beside `tokens`)."""

    @abstractmethod
    def encode(self, row: RowScores, layout: Layout) -> dict[str, np.ndarray | bytes]:
        """One sequence's row for each of `arrays`."""

    @abstractmethod
    def decode(self, rows: dict[str, list], layout: Layout, out: Targets | None = None) -> Targets | None:
        """Stored rows (uncompressed bytes per array, B each) -> their targets."""

    def bytes_per_position(self, spec: TargetSpec) -> float:
        """A rough stored size per predicted position, for shard sizing and the size estimate."""
        return 0.0

    def stores_tail(self, layout: Layout) -> bool:
        """Whether `decode` returns the teacher's tail log-mass (Targets.tail_logprob)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in asdict(self).items() if k != "name"}}  # type: ignore[call-overload]

    def check(self, spec: TargetSpec) -> None:
        """Refuse target kinds this encoding cannot store (ConfigError-style message)."""


def empty_targets(B: int, layout: Layout) -> Targets:
    P, K = layout.positions, layout.entries
    return Targets(np.empty((B, P, K), np.int32), np.empty((B, P, K), np.float32), np.empty((B, P), np.float32))


@dataclass(frozen=True)
class PlainV1(Encoding):
    """Values as the teacher gave them: int32 ids, float32 log-probs (-inf: not kept) in rank order."""

    clevel: int = 5
    name: ClassVar[str] = "plain-v1"

    def __post_init__(self) -> None:
        if not 1 <= self.clevel <= 9:
            raise StoreError(f"plain-v1 encoding: clevel must be in 1..9, got {self.clevel}")

    def check(self, spec: TargetSpec) -> None:
        if spec.kind == "sampled":
            raise StoreError("--targets sampled needs --encoding pack (plain-v1 stores no draw counts)")

    def arrays(self, layout: Layout) -> dict[str, ArraySpec]:
        P, K = layout.positions, layout.entries
        return {
            "topk_ids": ArraySpec("int32", (P, K), "blosc", self.clevel, ("position", "rank")),
            "topk_logprobs": ArraySpec("float32", (P, K), "blosc", self.clevel, ("position", "rank")),
            "target_logprob": ArraySpec("float32", (P,), "blosc", self.clevel, ("position",)),
        }

    def encode(self, row: RowScores, layout: Layout) -> dict[str, np.ndarray | bytes]:
        return {"topk_ids": row.ids.astype(np.int32), "topk_logprobs": row.logprobs.astype(np.float32),
                "target_logprob": row.target_logprob.astype(np.float32)}

    def decode(self, rows: dict[str, list], layout: Layout, out: Targets | None = None) -> Targets:
        P, K = layout.positions, layout.entries
        out = out or empty_targets(len(rows["topk_ids"]), layout)
        for i, (a, b, c) in enumerate(zip(rows["topk_ids"], rows["topk_logprobs"], rows["target_logprob"])):
            out.ids[i] = np.frombuffer(a, "<i4", P * K).reshape(P, K)
            out.logprobs[i] = np.frombuffer(b, "<f4", P * K).reshape(P, K)
            out.target_logprob[i] = np.frombuffer(c, "<f4", P)
        return out

    def bytes_per_position(self, spec: TargetSpec) -> float:
        return 0.75 * 8 * spec.entries + 3.5  # float32 + int32, ~0.75x after blosc-zstd


class _Packed(Encoding):
    """What pack-v3 and pack-v2 share: one `targets` row per sequence from a codec built
    once per layout (`_make_codec`), sampled targets as pack-v2 frames."""

    exact_target: bool
    zstd_level: int
    bundled: ClassVar[bool] = True

    def _make_codec(self, layout: Layout, sampled: bool, sample_logp: bool) -> Any:
        raise NotImplementedError

    def codec(self, layout: Layout) -> Any:
        key = (layout.vocab_size, layout.entries, layout.targets)
        cache = self.__dict__.setdefault("_codecs", {})
        if key not in cache:
            spec = layout.targets
            cache[key] = self._make_codec(layout, spec.kind == "sampled", spec.kind == "sampled" and spec.sample_temperature != 1.0)
        return cache[key]

    def arrays(self, layout: Layout) -> dict[str, ArraySpec]:
        # Rows are padded to the codec's worst case; zstd (level 1) squeezes the padding out.
        return {"targets": ArraySpec("uint8", (self.codec(layout).capacity(layout.positions),), "zstd", 1, ("byte",))}

    def encode(self, row: RowScores, layout: Layout) -> dict[str, np.ndarray | bytes]:
        codec = self.codec(layout)
        if layout.targets.kind == "sampled":
            logp = row.logprobs if layout.targets.sample_temperature != 1.0 else None
            return {"targets": codec.encode_sampled(row.ids, row.counts, logp, row.target_logprob)}
        return {"targets": self._encode_topk(codec, row)}

    def _encode_topk(self, codec: Any, row: RowScores) -> bytes:
        return codec.encode_topk(row.ids, row.logprobs, row.target_logprob, row.next_tokens)

    def _check_level(self) -> None:
        if not 1 <= self.zstd_level <= 19:
            raise StoreError(f"{self.name} encoding: zstd_level must be in 1..19, got {self.zstd_level}")


@dataclass(frozen=True)
class PackV3(_Packed):
    """pack3.Pack3Codec rows: see that module and storage_layout.md, "Encoding pack-v3"."""

    step: float = 2.0**-9  # quantisation step of the companded log-ratios (|log error| <= step near the top)
    knee: float = 4.0  # log-ratio to the top-1 beyond which the error grows with it (relative step)
    zstd_level: int = 7  # of the id stream (the others use 3)
    exact_target: bool = False  # store every target log-prob exactly (not as a reference)
    name: ClassVar[str] = "pack-v3"

    def __post_init__(self) -> None:
        if not 2.0**-16 <= self.step <= 0.5:
            raise StoreError(f"--logprob-step must be in 1.5e-05..0.5, got {self.step}")
        if not 0 < self.knee <= 64:
            raise StoreError(f"pack-v3 encoding: knee must be in (0, 64], got {self.knee}")
        self._check_level()

    def _make_codec(self, layout: Layout, sampled: bool, sample_logp: bool) -> Any:
        from .pack3 import Pack3Codec

        return Pack3Codec(vocab_size=layout.vocab_size, max_entries=layout.entries, step=self.step, knee=self.knee, sampled=sampled,
                          sample_logp=sample_logp, exact_target=self.exact_target, id_level=self.zstd_level)

    def _encode_topk(self, codec: Any, row: RowScores) -> bytes:
        return codec.encode_topk(row.ids, row.logprobs, row.target_logprob, row.next_tokens, row.tail_logprob)

    def decode(self, rows: dict[str, list], layout: Layout, out: Targets | None = None) -> Targets:
        out = out or empty_targets(len(rows["targets"]), layout)
        *_, out.tail_logprob = self.codec(layout).decode(rows["targets"], layout.positions, layout.targets.sample_temperature,
                                                          out=(out.ids, out.logprobs, out.target_logprob), tail=True)
        return out

    def bytes_per_position(self, spec: TargetSpec) -> float:
        if spec.kind == "sampled":
            return 1.5 * min(spec.entries, 0.25 * spec.samples + 1) + 4
        return 2.6 * spec.entries + 4  # measured on SmolLM2-135M (BENCHMARKS.md); peaked teachers need less

    def stores_tail(self, layout: Layout) -> bool:
        return layout.targets.kind == "topk"


@dataclass(frozen=True)
class PackV2(_Packed):
    """pack2.Pack2Codec rows: see that module and storage_layout.md, "Encoding pack-v2"."""

    kl_budget: float = 1e-4
    zstd_level: int = 7  # of the id stream (the others use 3)
    exact_target: bool = False  # store every target log-prob exactly (not as a reference)
    name: ClassVar[str] = "pack-v2"
    forward_kl_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 1e-6 <= self.kl_budget <= 1e-1:
            raise StoreError(f"--kl-budget must be in 1e-06..0.1, got {self.kl_budget}")
        self._check_level()

    def _make_codec(self, layout: Layout, sampled: bool, sample_logp: bool) -> Any:
        from .pack2 import Pack2Codec

        return Pack2Codec(vocab_size=layout.vocab_size, max_entries=layout.entries, kl_budget=self.kl_budget, sampled=sampled,
                          sample_logp=sample_logp, exact_target=self.exact_target, id_level=self.zstd_level)

    def decode(self, rows: dict[str, list], layout: Layout, out: Targets | None = None) -> Targets:
        out = out or empty_targets(len(rows["targets"]), layout)
        self.codec(layout).decode(rows["targets"], layout.positions, layout.targets.sample_temperature,
                                  out=(out.ids, out.logprobs, out.target_logprob))
        return out

    def bytes_per_position(self, spec: TargetSpec) -> float:
        if spec.kind == "sampled":
            return 1.5 * min(spec.entries, 0.25 * spec.samples + 1) + 4
        return 0.85 * spec.entries + 4  # measured on flat teachers; peaked ones need less


@dataclass(frozen=True)
class PackV1(Encoding):
    """Format 2's packed rows (codec.py) and float32 target log-probs. Read only."""

    kl_budget: float = 1e-4
    zstd_level: int = 7
    name: ClassVar[str] = "pack-v1"
    writable: ClassVar[bool] = False
    forward_kl_only: ClassVar[bool] = True

    def codec(self, layout: Layout) -> Any:
        from .codec import PackCodec, step_for_budget

        return PackCodec(vocab_size=layout.vocab_size, max_entries=layout.entries,
                         step=step_for_budget(self.kl_budget, layout.entries), level=self.zstd_level)

    def arrays(self, layout: Layout) -> dict[str, ArraySpec]:
        return {"targets": ArraySpec("uint8", (self.codec(layout).capacity(layout.positions),), "zstd", 1, ("byte",)),
                "target_logprob": ArraySpec("float32", (layout.positions,), "blosc", 5, ("position",))}

    def encode(self, row: RowScores, layout: Layout) -> dict[str, np.ndarray | bytes]:
        raise StoreError("pack-v1 is read only (format 2 caches); new caches use pack-v2")

    def decode(self, rows: dict[str, list], layout: Layout, out: Targets | None = None) -> Targets:
        P = layout.positions
        codec = self.codec(layout)
        out = out or empty_targets(len(rows["targets"]), layout)
        for i, (blob, tgt) in enumerate(zip(rows["targets"], rows["target_logprob"])):
            if layout.targets.kind == "sampled":
                ids, lps = codec.decode_sampled(memoryview(blob), P, layout.targets.sample_temperature)
            else:
                ids, lps = codec.decode_topk(memoryview(blob), P)
            out.ids[i], out.logprobs[i] = ids, lps
            out.target_logprob[i] = np.frombuffer(tgt, "<f4", P)
        return out


@dataclass(frozen=True)
class TokensOnly(Encoding):
    """No teacher targets (`--top-k 0`): the cache holds tokens (and loss masks) only."""

    name: ClassVar[str] = "none"

    def arrays(self, layout: Layout) -> dict[str, ArraySpec]:
        return {}

    def encode(self, row: RowScores, layout: Layout) -> dict[str, np.ndarray | bytes]:
        return {}

    def decode(self, rows: dict[str, list], layout: Layout, out: Targets | None = None) -> None:
        return None


ENCODINGS: dict[str, type[Encoding]] = {c.name: c for c in (PlainV1, PackV3, PackV2, PackV1, TokensOnly)}


def encoding_from_dict(d: dict[str, Any]) -> Encoding:
    """Rebuild an encoding from a cache's metadata; refuse names this version does not know."""
    name = d.get("name")
    if name not in ENCODINGS:
        raise StoreVersionError(
            f"the cache uses encoding {name!r}, which this ddk-cache does not know "
            f"(known: {', '.join(ENCODINGS)}); upgrade ddk-cache"
        )
    return ENCODINGS[name](**{k: v for k, v in d.items() if k != "name"})


__all__ = ["ENCODINGS", "Encoding", "Layout", "PackV1", "PackV2", "PackV3", "PlainV1", "RowScores", "Targets", "TokensOnly",
           "encoding_from_dict"]
