"""Named, versioned encodings: how each cache array is turned into bytes.

An encoding is a small frozen value object that becomes a JSON dict (stored in the cache's
root metadata) and back. Its name changes whenever the bytes it writes would change, so a
reader can always tell whether it understands a cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .codec import MAX_ENTRIES, PackCodec, step_for_budget
from ..errors import StoreError, StoreVersionError


@dataclass(frozen=True)
class PlainEncoding:
    """`plain-v1`: values as they are (int32 ids, float32 log-probs), Blosc-zstd, CRC32C.

    Every chunk goes through Blosc (zstd at `clevel`, byte shuffle so the slowly varying
    high bytes of ids and floats compress together) and ends with a CRC32C checksum, so a
    corrupted chunk fails to decode instead of returning wrong values.
    """

    clevel: int = 5
    name: str = "plain-v1"

    def __post_init__(self) -> None:
        if not 1 <= self.clevel <= 9:
            raise StoreError(f"plain-v1 encoding: clevel must be in 1..9, got {self.clevel}")

    def compressors(self, packed: bool = False) -> list[Any]:
        """Bytes-to-bytes codecs for the (inner) chunks of an array (`packed`: pack-v1's rows)."""
        return [BloscCodec(cname="zstd", clevel=self.clevel, shuffle="shuffle"), Crc32cCodec()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PackEncoding:
    """`pack-v1`: each sequence's targets packed by `codec.PackCodec` into one uint8 row.

    Lossy in the log-probs only, within a KL budget: quantisation adds about `kl_budget`
    nats of KL per position (storage_layout.md gives the exact rule); ids and counts are
    exact, the kept mass (tail bucket) within 0.2% and the top-1 log-prob within 2^-8 nats. The row is
    padded with zeros to a fixed width; the chunk codec (zstd level 1) removes the padding.
    """

    kl_budget: float = 1e-4
    zstd_level: int = 7
    name: str = "pack-v1"

    def __post_init__(self) -> None:
        if not 1e-5 <= self.kl_budget <= 1e-2:
            raise StoreError(f"pack-v1 encoding: kl_budget must be in 1e-5..1e-2, got {self.kl_budget}")
        if not 1 <= self.zstd_level <= 19:
            raise StoreError(f"pack-v1 encoding: zstd_level must be in 1..19, got {self.zstd_level}")

    def codec(self, *, vocab_size: int, max_entries: int) -> PackCodec:
        """The codec for a cache with this vocabulary and at most `max_entries` per position."""
        if max_entries > MAX_ENTRIES:
            raise StoreError(f"pack-v1 keeps at most {MAX_ENTRIES} entries per position, got {max_entries}; use --encoding plain")
        return PackCodec(vocab_size=vocab_size, max_entries=max_entries, step=step_for_budget(self.kl_budget, max_entries), level=self.zstd_level)

    def compressors(self, packed: bool = False) -> list[Any]:
        """Packed rows are already compressed: zstd level 1 only squeezes out the zero padding."""
        return [ZstdCodec(level=1), Crc32cCodec()] if packed else PlainEncoding().compressors()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Encoding = PlainEncoding | PackEncoding
ENCODINGS: dict[str, type] = {"plain-v1": PlainEncoding, "pack-v1": PackEncoding}


def encoding_from_dict(d: dict[str, Any]) -> Encoding:
    """Rebuild an encoding from a cache's metadata; refuse names this version does not know."""
    name = d.get("name")
    if name not in ENCODINGS:
        raise StoreVersionError(
            f"the cache uses encoding {name!r}, which this ddk-cache does not know "
            f"(known: {', '.join(ENCODINGS)}); upgrade ddk-cache"
        )
    return ENCODINGS[name](**d)
