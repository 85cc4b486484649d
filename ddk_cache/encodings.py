"""Named, versioned encodings: how each cache array is turned into bytes.

An encoding is a small frozen value object that becomes a JSON dict (stored in the cache's
root metadata) and back. Its name changes whenever the bytes it writes would change, so a
reader can always tell whether it understands a cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import StoreError, StoreVersionError


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

    def compressors(self, array: str) -> list[Any]:
        """Bytes-to-bytes codecs for the (inner) chunks of `array`."""
        return [BloscCodec(cname="zstd", clevel=self.clevel, shuffle="shuffle"), Crc32cCodec()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ENCODINGS = {"plain-v1": PlainEncoding}


def encoding_from_dict(d: dict[str, Any]) -> PlainEncoding:
    """Rebuild an encoding from a cache's metadata; refuse names this version does not know."""
    name = d.get("name")
    if name not in ENCODINGS:
        raise StoreVersionError(
            f"the cache uses encoding {name!r}, which this ddk-cache does not know "
            f"(known: {', '.join(ENCODINGS)}); upgrade ddk-cache"
        )
    return ENCODINGS[name](**d)
