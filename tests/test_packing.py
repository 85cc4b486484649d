"""The packing rule at corpus scale: pieces, staged tokens, the plan, the gather.

What must hold whatever the number of workers and the size of the pieces' bytes: the
same documents, the same validation split, the same sequences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddk_cache.capture.corpus import discover_domains, plan_pieces, read_piece, split_parts
from ddk_cache.capture.packing import (
    Candidates, Gatherer, PackingConfig, Plan, doc_hash, make_plan, read_index, tokenize_piece, write_summary,
)
from ddk_cache.capture.tokenization import document_tokenizer, load_tokenizer
from ddk_cache.errors import CorpusError
from ddk_cache.store.objects import Objects


def cfg(**kw) -> PackingConfig:
    args = dict(seq_len=16, seed=3, text_field="text", val_tokens=32, val_max_fraction=0.2, max_tokens=None,
                part_chars=1 << 20, vocab_size=400, pad_id=0)
    args.update(kw)
    return PackingConfig(**args)


def stage(tmp_path, corpus, teacher_dir, workers: int, piece_bytes: int, c: PackingConfig, name: str) -> tuple[Objects, Plan, dict]:
    """Tokenize every piece as `workers` workers would (worker i: pieces i, i+N, ...), each
    writing its summary, then make the plan."""
    objects = Objects.open(str(tmp_path / name))
    tok = load_tokenizer(str(teacher_dir))
    tokenize = document_tokenizer(tok, None, "t")
    domains = discover_domains(corpus)
    pieces = {s.name: plan_pieces(s, piece_bytes) for s in domains}
    everything = [(s, p) for s in domains for p in pieces[s.name]]
    for w in range(workers):
        stats, cands = {}, {s.name: Candidates(limit=c.val_tokens) for s in domains}
        for i, (s, p) in enumerate(everything):
            if i % workers == w:
                tokenize_piece(objects, s, p, tokenize, c)
                index = read_index(objects, s.name, p.index)
                stats.setdefault(s.name, {})[p.index] = index.stats
                cands[s.name].add(p.index, index)
        write_summary(objects, (w, workers), stats, cands)
    return objects, make_plan(objects, domains, pieces, c), pieces


def all_sequences(objects: Objects, plan: Plan) -> dict:
    g = Gatherer(objects, plan)
    out = {}
    for d, p in plan.domains.items():
        out[(d, "train")] = g.sequences(d, "train", 0, p.n_train)[0]
        out[(d, "val")] = g.sequences(d, "val", 0, p.n_val)[0]
    return out


def test_pieces_own_the_same_documents_whatever_their_size(tmp_path):
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " + "x" * (i * 7)}) + "\n" for i in range(60)))
    (tmp_path / "books").mkdir()
    for i in range(4):
        (tmp_path / "books" / f"{i}.txt").write_text(f"line {i}\n" * (i * 200 + 1))
    for source in discover_domains(tmp_path):
        whole = [d.key for p in plan_pieces(source, 1 << 30) for d in read_piece(source, p, "text", 1000)]
        for size in (1, 7, 100, 999, 4000):
            pieces = plan_pieces(source, size)
            assert [d.key for p in pieces for d in read_piece(source, p, "text", 1000)] == whole, (source.name, size)
        assert len(plan_pieces(source, 100)) > 3  # really cut up


def test_long_documents_are_cut_at_line_breaks():
    text = "".join(f"line {i}\n" for i in range(1000))
    parts = split_parts(text, 500)
    assert "".join(parts) == text and all(p.endswith("\n") for p in parts[:-1])
    assert max(len(p) for p in parts) < 600
    blob = "y" * 2000  # no line break: cut at the multiples
    assert [len(p) for p in split_parts(blob, 500)] == [500, 500, 500, 500]


@pytest.mark.parametrize("workers", [2, 3])
def test_plan_and_sequences_do_not_depend_on_the_worker_count(tmp_path, corpus_dir, teacher_dir, workers):
    c = cfg()
    o1, plan1, _ = stage(tmp_path, corpus_dir, teacher_dir, 1, 300, c, "one")
    on, plann, _ = stage(tmp_path, corpus_dir, teacher_dir, workers, 300, c, "many")
    assert plan1.to_bytes() == plann.to_bytes()
    a, b = all_sequences(o1, plan1), all_sequences(on, plann)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_validation_is_the_smallest_keys_and_disjoint_from_training(tmp_path, corpus_dir, teacher_dir):
    c = cfg()
    objects, plan, pieces = stage(tmp_path, corpus_dir, teacher_dir, 1, 300, c, "s")
    for domain, p in plan.domains.items():
        keys = []  # every document's key, with its piece and position there
        for piece in pieces[domain]:
            index = read_index(objects, domain, piece.index)
            keys += [(int(h), piece.index, int(o), int(n)) for h, o, n in zip(index.hashes, index.offsets, index.lengths)]
        keys.sort()
        assert p.val_docs == [[q, o, n] for _, q, o, n in keys[: len(p.val_docs)]]
        assert sum(n for _, _, n in p.val_docs[:-1]) < p.n_val * c.seq_len <= sum(n for _, _, n in p.val_docs)
        # Training takes, in every piece, what follows its validation prefix: no document is in both.
        val_ids = {(q, o) for q, o, _ in p.val_docs}
        for _, q, o, n in keys[len(p.val_docs):]:
            assert (q, o) not in val_ids and o >= p.val_prefix[q]


def test_piece_size_changes_the_order_but_not_the_validation_documents(tmp_path, corpus_dir, teacher_dir):
    c = cfg()
    _, small, _ = stage(tmp_path, corpus_dir, teacher_dir, 1, 200, c, "a")
    _, large, _ = stage(tmp_path, corpus_dir, teacher_dir, 1, 1 << 20, c, "b")
    for d in small.domains:
        assert sum(small.domains[d].tokens) == sum(large.domains[d].tokens)
        assert small.domains[d].n_val == large.domains[d].n_val
        assert sum(n for *_, n in small.domains[d].val_docs) == sum(n for *_, n in large.domains[d].val_docs)


def test_max_tokens_caps_a_domain(tmp_path, corpus_dir, teacher_dir):
    _, plan, _ = stage(tmp_path, corpus_dir, teacher_dir, 1, 300, cfg(max_tokens=200), "cap")
    for p in plan.domains.values():
        assert (p.n_val + p.n_train) * 16 <= 200 and p.n_train == (200 - p.n_val * 16) // 16


def test_shuffle_keys_are_seeded_and_stable():
    assert doc_hash(0, "web", "a.jsonl\x000\x000") == doc_hash(0, "web", "a.jsonl\x000\x000")
    assert doc_hash(0, "web", "a.jsonl\x000\x000") != doc_hash(1, "web", "a.jsonl\x000\x000")
    assert doc_hash(0, "web", "a.jsonl\x000\x000") != doc_hash(0, "news", "a.jsonl\x000\x000")


def test_a_domain_too_small_for_its_splits(tmp_path, teacher_dir):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "tiny.jsonl").write_text('{"text": "a few words only"}\n')
    with pytest.raises(CorpusError, match=r"domain 'tiny' has \d+ tokens; it needs at least 32 \(1 validation \+ 1 training"):
        stage(tmp_path, tmp_path / "corpus", teacher_dir, 1, 300, cfg(), "x")
