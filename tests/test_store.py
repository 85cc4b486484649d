"""The store as documented: storage_layout.md's plain-zarr reader works, encodings round-trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ddk_cache.store.encodings import PlainEncoding, encoding_from_dict
from ddk_cache.errors import StoreError
from ddk_cache.store.cache import Cache

LAYOUT = Path(__file__).resolve().parents[1] / "storage_layout.md"


def test_layout_reader_snippet_runs_on_a_real_cache(built_cache):
    snippet = re.search(r"```python\n(.*?)```", LAYOUT.read_text(), re.S).group(1)
    snippet = snippet.replace('"cache.zarr"', repr(str(built_cache))).replace("news/", "alpha/").replace('["news"]', '["alpha"]')
    exec(compile(snippet, str(LAYOUT), "exec"), {})


def test_layout_documents_every_array(built_cache):
    text = LAYOUT.read_text()
    group = Cache(str(built_cache)).root["alpha/train"]
    for name in group.array_keys():
        assert f"`{name}`" in text


def test_encoding_round_trip():
    enc = PlainEncoding(clevel=3)
    assert encoding_from_dict(enc.to_dict()) == enc


def test_unknown_encoding_is_refused():
    with pytest.raises(StoreError, match="encoding 'fancy-v9', which this ddk-cache does not know"):
        encoding_from_dict({"name": "fancy-v9"})


def test_read_unknown_domain(built_cache):
    with pytest.raises(StoreError, match="has no domain 'nope'"):
        Cache(str(built_cache)).read("nope", "train", 0, 1)
