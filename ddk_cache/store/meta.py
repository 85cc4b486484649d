"""The cache's root metadata as one typed object (storage_layout.md, "Root metadata").

Every reader goes through `CacheMeta`: attribute names, not dict keys spread over the
code. `from_dict` reads format versions 1 to 5 (older ones are mapped onto the same
fields) and refuses anything else with a message naming both versions.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..errors import StoreError, StoreVersionError
from .encodings import Encoding, Layout, PlainV1, encoding_from_dict
from .targets import TargetSpec

# Version 5: a packed cache (pack-v3, pack-v2) keeps each shard's tokens, loss mask, sampling
# log-probs and targets in one object, a bundle (shards.py); older readers would find no
# `tokens` array. Every cache written now is version 5 (plain-v1 and tokens-only caches keep
# one object per array, as in version 3).
FORMAT_VERSION = 5
BUNDLE_FORMAT_VERSION = 5
# Version 4 (ddk-cache 0.3): version 3 plus a domain of generated samples (`sample_logprob`,
# the `sampled` attribute), which a version-3 reader would weight wrongly.
SAMPLED_FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4, 5)
SPLITS = ("train", "val")

# Root states: inputs being tokenized -> teacher shards pending -> done.
STATE_INITIALIZING = "initializing"
STATE_BUILDING = "building"
STATE_COMPLETE = "complete"

TEXT, CHAT = "text", "chat"


@dataclass
class SplitInfo:
    sequences: int
    documents: int = 0  # documents contributing at least one token
    loss_positions: int | None = None  # predicted positions that carry loss (None: all of them)
    nonfinite: int = 0  # sequences whose teacher output was not finite (--on-nonfinite skip): label-only targets

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SplitInfo":
        return cls(int(d["sequences"]), int(d.get("documents", 0)), d.get("loss_positions"), int(d.get("nonfinite", 0)))


@dataclass
class DomainInfo:
    train: SplitInfo
    val: SplitInfo
    tokens_read: int = 0  # the domain's tokens after the cap, before packing dropped its tail
    data: str = TEXT  # text (packed documents) or chat (one sample per sequence, loss mask)
    sampled: bool = False  # chat only: generated samples, stored as drawn with their sampling log-probs

    def split(self, name: str) -> SplitInfo:
        return self.train if name == "train" else self.val

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DomainInfo":
        return cls(SplitInfo.from_dict(d["train"]), SplitInfo.from_dict(d["val"]), int(d.get("tokens_read", 0)), d.get("data", TEXT),
                   bool(d.get("sampled", False)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PPLEntry:
    ppl: float
    nll_sum: float
    predicted_tokens: int
    kept_mass: float | None = None  # mean teacher probability the stored entries cover (None: tokens only)
    bytes: int | None = None  # UTF-8 bytes of the predicted tokens (None: not recorded; see tokenbytes.py)

    @property
    def bits_per_byte(self) -> float | None:
        """The teacher's NLL in bits per UTF-8 byte of the predicted text (comparable across
        tokenizers, unlike PPL); None where the bytes were not recorded."""
        return self.nll_sum / (math.log(2) * self.bytes) if self.bytes else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PPLEntry":
        return cls(float(d["ppl"]), float(d["nll_sum"]), int(d["predicted_tokens"]), d.get("kept_mass"), d.get("bytes"))


@dataclass
class CacheMeta:
    """The root metadata of a cache (attributes of the root group, key `ddk_cache`)."""

    format_version: int
    state: str
    encoding: Encoding
    targets: TargetSpec
    seq_len: int
    shard_sequences: int
    vocab_size: int
    top_k: int  # the most entries a position holds (the K of the target arrays); 0 = tokens only
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    domains: dict[str, DomainInfo] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    build_args: dict[str, Any] = field(default_factory=dict)
    build_fingerprint: str = ""
    teacher_ppl: dict[str, dict[str, PPLEntry]] | None = None
    tool_version: str = __version__
    created_at: str = ""
    completed_at: str | None = None
    # What every row begins with: "bos" (the tokenizer's BOS, mid-document rows included) or
    # "none"; None for caches built before the rule was recorded (their rows start as the
    # stream falls, as "none").
    row_start: str | None = None
    # Shard objects carry an identity trailer (build id, place, content hash; storage_layout.md,
    # "Row arrays and shard objects"), checked by every reader: caches built since ddk-cache 0.3.
    shard_identity: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    @property
    def complete(self) -> bool:
        return self.state == STATE_COMPLETE

    def shard_rows(self, n: int) -> int:
        """Rows per shard object of a split of `n` sequences: `shard_sequences`, or the split's
        size when smaller (caches since ddk-cache 0.3: a shard's index has a slot per row)."""
        return max(1, min(self.shard_sequences, n)) if self.shard_identity else self.shard_sequences

    @property
    def bundled(self) -> bool:
        """Whether each shard is one object holding every per-sequence array (format 5, packed
        encodings; storage_layout.md, "Bundles")."""
        return self.format_version >= BUNDLE_FORMAT_VERSION and self.encoding.bundled

    @property
    def build_id(self) -> bytes | None:
        """The 16 bytes of the build fingerprint every shard object's trailer names (None:
        a cache written before objects carried one)."""
        if not self.shard_identity or not self.build_fingerprint.startswith("sha256:"):
            return None
        return bytes.fromhex(self.build_fingerprint[7:39])

    def describe_row_start(self) -> str:
        """One line for `inspect`: what each row begins with."""
        if self.row_start == "bos":
            return f"every row begins with BOS (id {self.tokenizer.get('bos_token_id')}), mid-document rows included"
        if self.row_start == "none":
            return "rows start as the token stream falls (no BOS added)"
        return "not recorded (built before ddk-cache 0.3): rows start as the token stream falls (no BOS added)"

    def describe_capture(self) -> list[str]:
        """What an imported capture lacks (`corpus.capture`, written by `ddk-cache import`), one
        line each; empty for builds and imports of this project's exports. `inspect` and the
        fidelity report print it."""
        capture = self.corpus.get("capture") or {}
        lines = []
        if capture.get("values"):
            lines.append(f"values: {capture['values']} (the capture's own rounding, before this cache's)")
        if capture.get("clamped"):
            lines.append(f"values above 0 (its polynomial overshooting) clamped to 0 at {capture['clamped']:.2%} of positions")
        if capture.get("tail") == "derived":
            lines.append("tail: not stored by the capture; 1 - the kept mass (its values are the teacher's, not renormalised)")
        elif capture.get("tail", "").startswith("none"):
            lines.append("tail: none; the kept log-probs are renormalised over the kept ids, so `distill` takes only "
                         "--kd-loss fkl from this cache")
        if capture.get("target_logprob", "exact") != "exact":
            share = capture.get("target_in_topk")
            lines.append("next-token log-prob: only where it is among the kept ids"
                         + (f" ({share:.1%} of positions)" if share is not None else "")
                         + "; elsewhere a bound, so the teacher PPL is a lower bound and `distill` refuses --mixing ddk")
        return lines

    def layout(self) -> Layout:
        return Layout(positions=self.seq_len - 1, entries=self.top_k, vocab_size=self.vocab_size, targets=self.targets)

    def ppl(self, domain: str, split: str = "val") -> PPLEntry:
        if not self.teacher_ppl:
            raise StoreError("this cache has no teacher perplexity table (a tokens-only cache, or not complete)")
        return self.teacher_ppl[domain][split]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {
            "format_version": self.format_version, "tool_version": self.tool_version, "state": self.state,
            "created_at": self.created_at, "encoding": self.encoding.to_dict(), "targets": self.targets.to_dict(),
            "top_k": self.top_k, "seq_len": self.seq_len, "shard_sequences": self.shard_sequences,
            "vocab_size": self.vocab_size, "teacher": self.teacher, "tokenizer": self.tokenizer,
            "domains": {k: v.to_dict() for k, v in self.domains.items()}, "corpus": self.corpus,
            "build_args": self.build_args, "build_fingerprint": self.build_fingerprint,
            **self.extra,
        }
        if self.completed_at is not None:
            d["completed_at"] = self.completed_at
        if self.row_start is not None:
            d["row_start"] = self.row_start
        if self.shard_identity:
            d["shard_identity"] = 1
        if self.teacher_ppl is not None:
            d["teacher_ppl"] = {dom: {s: dataclasses.asdict(e) for s, e in by.items()} for dom, by in self.teacher_ppl.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "the cache") -> "CacheMeta":
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreVersionError(
                f"{where} has cache format version {version}; this ddk-cache {__version__} reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
                + ("; upgrade ddk-cache" if isinstance(version, int) and version > max(READABLE_VERSIONS) else "; rebuild the cache")
            )
        encoding = encoding_from_dict(d["encoding"])
        if version == 1:  # plain top-k, no `targets` attribute
            targets = TargetSpec(k=int(d["top_k"]))
        else:
            targets = TargetSpec.from_dict(d["targets"])
        known = {f.name for f in dataclasses.fields(cls)}
        table = d.get("teacher_ppl")
        return cls(
            format_version=int(version), state=d.get("state", ""), encoding=encoding, targets=targets,
            seq_len=int(d["seq_len"]), shard_sequences=int(d["shard_sequences"]), vocab_size=int(d["vocab_size"]),
            top_k=int(d.get("top_k", targets.entries)), teacher=d.get("teacher", {}), tokenizer=d.get("tokenizer", {}),
            domains={k: DomainInfo.from_dict(v) for k, v in (d.get("domains") or {}).items()},
            corpus=d.get("corpus", {}), build_args=d.get("build_args", {}), build_fingerprint=d.get("build_fingerprint", ""),
            teacher_ppl={dom: {s: PPLEntry.from_dict(e) for s, e in by.items()} for dom, by in table.items()} if table else None,
            tool_version=d.get("tool_version", ""), created_at=d.get("created_at", ""), completed_at=d.get("completed_at"),
            row_start=d.get("row_start"), shard_identity=bool(d.get("shard_identity", 0)),
            extra={k: v for k, v in d.items() if k not in known},
        )


__all__ = ["BUNDLE_FORMAT_VERSION", "CHAT", "CacheMeta", "DomainInfo", "FORMAT_VERSION", "SAMPLED_FORMAT_VERSION", "PPLEntry", "PlainV1", "READABLE_VERSIONS", "SPLITS",
           "STATE_BUILDING", "STATE_COMPLETE", "STATE_INITIALIZING", "SplitInfo", "TEXT"]
