"""Shared fixtures: a small synthetic multi-domain corpus and a tiny local Llama teacher.

Nothing here touches a model hub or ../shared: the tests make what they need.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ddk_cache.capture.build import build
from ddk_cache.models import ModelSpec, make_model_dir

from .helpers import WORDS, make_docs, small_config, write_corpus


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    texts = [d for dom in WORDS for d in make_docs(dom, 30)]
    # head_dim 32: vLLM's CPU attention kernels support no smaller head size.
    spec = ModelSpec(vocab_size=400, hidden_size=32, layers=2, heads=1, max_position_embeddings=64, seed=0)
    return make_model_dir(texts, tmp_path_factory.mktemp("teacher") / "model", spec)


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, corpus_dir: Path) -> Path:
    """One complete cache shared by the read-only tests."""
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    build(small_config(teacher_dir, corpus_dir, out), progress=False)
    return out


@pytest.fixture(scope="session")
def pack_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, corpus_dir: Path) -> Path:
    """The same build with the default encoding (pack-v3): a bundled cache (format 5)."""
    out = tmp_path_factory.mktemp("pack") / "c.zarr"
    build(small_config(teacher_dir, corpus_dir, out, encoding="pack"), progress=False)
    return out


@pytest.fixture(scope="session")
def chat_cache(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """A cache of chat records (messages and prompt/response pairs) with the tests' template."""
    from ddk_cache.capture.build import build

    from .helpers import CHAT_TEMPLATE, small_config, write_chat_corpus

    root = tmp_path_factory.mktemp("chat")
    corpus = write_chat_corpus(root / "corpus")
    out = root / "c.zarr"
    build(small_config(teacher_dir, corpus, out, seq_len=64, val_tokens=128, chat_template=CHAT_TEMPLATE), progress=False)
    return out
