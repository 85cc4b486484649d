"""The store as documented: storage_layout.md's plain-zarr reader works, encodings round-trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ddk_cache.errors import StoreError
from ddk_cache.store.cache import Cache
from ddk_cache.store.encodings import ENCODINGS, PackV2, PlainV1, TokensOnly, encoding_from_dict
from ddk_cache.store.meta import CacheMeta
from ddk_cache.store.targets import TargetSpec

LAYOUT = Path(__file__).resolve().parents[1] / "storage_layout.md"


def test_layout_reader_snippet_runs_on_a_real_cache(built_cache):
    snippet = re.search(r"```python\n(.*?)```", LAYOUT.read_text(), re.S).group(1)
    snippet = snippet.replace('"cache.zarr"', repr(str(built_cache))).replace("news/", "alpha/").replace('["news"]', '["alpha"]')
    exec(compile(snippet, str(LAYOUT), "exec"), {})


def test_layout_bundle_snippet_reads_a_packed_cache(pack_cache):
    """storage_layout.md's plain-zarr reader of a bundle's plane gives the tokens ddk-cache reads."""
    import numpy as np
    import zarr

    snippet = re.findall(r"```python\n(.*?)```", LAYOUT.read_text(), re.S)[1].replace('root["news/val"]', 'root["alpha/val"]')
    scope = {"np": np, "root": zarr.open_group(str(pack_cache), mode="r")}
    exec(compile(snippet, str(LAYOUT), "exec"), scope)
    np.testing.assert_array_equal(scope["tokens"], Cache(str(pack_cache)).tokens("alpha", "val", [0])[0])


def test_layout_documents_every_array_and_encoding():
    from ddk_cache.store.encodings import Layout

    text = LAYOUT.read_text()
    layout = Layout(positions=7, entries=4, vocab_size=100, targets=TargetSpec(k=4))
    for name, cls in ENCODINGS.items():
        assert f"`{name}`" in text
        for array in cls().arrays(layout):
            assert f"`{array}`" in text
    for array in ("tokens", "loss_mask", "rows", "ddk_cache_planes"):
        assert f"`{array}`" in text
    for key in CacheMeta.__dataclass_fields__:
        if key != "extra":
            assert f"`{key}`" in text, key


@pytest.mark.parametrize("enc", [PlainV1(clevel=3), PackV2(kl_budget=3e-4, zstd_level=5, exact_target=True), TokensOnly()])
def test_encoding_round_trip(enc):
    assert encoding_from_dict(enc.to_dict()) == enc


def test_metadata_round_trip(built_cache):
    meta = Cache(str(built_cache)).meta
    again = CacheMeta.from_dict(meta.to_dict())
    assert again == meta and again.to_dict() == meta.to_dict()


def test_unknown_encoding_is_refused():
    with pytest.raises(StoreError, match="encoding 'fancy-v9', which this ddk-cache does not know"):
        encoding_from_dict({"name": "fancy-v9"})


def test_read_unknown_domain(built_cache):
    with pytest.raises(StoreError, match="has no domain 'nope'"):
        Cache(str(built_cache)).read("nope", "train", 0, 1)
