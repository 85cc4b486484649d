"""Corpus discovery and reading: layouts, specs, and an error that names the file and line."""

from __future__ import annotations

import gzip

import pytest

from ddk_cache.capture.corpus import discover_domains, iter_documents
from ddk_cache.errors import CorpusError


def test_directory_layout(corpus_dir):
    domains = discover_domains(corpus_dir)
    assert [d.name for d in domains] == ["alpha", "beta", "gamma"]
    assert len(domains[2].files) == 30 and all(f.suffix == ".txt" for f in domains[2].files)
    docs = {d.name: list(iter_documents(d)) for d in domains}
    assert all(len(v) == 30 for v in docs.values())
    assert docs["gamma"][0] == (corpus_dir / "gamma" / "000.txt").read_text()


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_spec_maps_domains_to_globs(tmp_path, corpus_dir, fmt):
    spec = tmp_path / f"spec.{fmt}"
    if fmt == "yaml":
        spec.write_text(f"domains:\n  web: ['{corpus_dir}/alpha.jsonl', '{corpus_dir}/beta.jsonl.gz']\n  stories: '{corpus_dir}/gamma/*.txt'\n")
    else:
        spec.write_text(f'[domains]\nweb = ["{corpus_dir}/alpha.jsonl", "{corpus_dir}/beta.jsonl.gz"]\nstories = "{corpus_dir}/gamma/*.txt"\n')
    domains = discover_domains(spec)
    assert [d.name for d in domains] == ["stories", "web"]
    assert len(list(iter_documents(domains[1]))) == 60


def test_spec_globs_are_relative_to_the_spec(tmp_path, corpus_dir):
    import shutil

    shutil.copytree(corpus_dir, tmp_path / "data")
    (tmp_path / "spec.yaml").write_text("web: data/*.jsonl\n")
    (domain,) = discover_domains(tmp_path / "spec.yaml")
    assert domain.name == "web" and [f.name for f in domain.files] == ["alpha.jsonl"]


def test_text_field_option(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"content": "hello there"}\n\n{"content": "bye"}\n')
    (domain,) = discover_domains(tmp_path)
    assert list(iter_documents(domain, "content")) == ["hello there", "bye"]


def errors_for(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(content)
    else:
        path.write_bytes(content)
    (domain,) = discover_domains(tmp_path)
    with pytest.raises(CorpusError) as e:
        list(iter_documents(domain))
    return str(e.value)


def test_malformed_json_names_file_and_line(tmp_path):
    msg = errors_for(tmp_path, "d.jsonl", b'{"text": "ok"}\n{"text": "broken\n')
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}:2: not valid JSON")


def test_malformed_json_in_gzip(tmp_path):
    msg = errors_for(tmp_path, "d.jsonl.gz", b'{"text": "ok"}\n\n[1, 2\n')
    assert f"{tmp_path / 'd.jsonl.gz'}:3: not valid JSON" in msg


def test_missing_text_field(tmp_path):
    msg = errors_for(tmp_path, "d.jsonl", b'{"body": "x", "id": 3}\n')
    assert msg == (f"{tmp_path / 'd.jsonl'}:1: no 'text' field (found: body, id); pass --text-field to name the text field, "
                   "or give chat records with 'messages' (or 'prompt' and 'response')")


def test_json_array_file_is_named_as_such(tmp_path):
    """A .jsonl holding one JSON array: --text-field cannot help, so the message says what can."""
    msg = errors_for(tmp_path, "d.jsonl", b'[{"text": "a"}, {"text": "b"}]\n')
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}:1: a JSON list, not an object: ddk-cache reads JSON Lines")
    assert "--text-field" not in msg


def test_errors_in_a_piece_that_starts_mid_file_name_the_line(tmp_path):
    from ddk_cache.capture.corpus import discover_domains, plan_pieces, read_piece
    from ddk_cache.errors import CorpusError

    lines = [b'{"text": "fine %d"}\n' % i for i in range(40)] + [b'{"text": broken}\n']
    (tmp_path / "d.jsonl").write_bytes(b"".join(lines))
    (source,) = discover_domains(tmp_path)
    pieces = plan_pieces(source, 100)
    with pytest.raises(CorpusError, match=f"{tmp_path / 'd.jsonl'}:41: not valid JSON"):
        for piece in pieces:
            list(read_piece(source, piece, "text", None))


def test_non_string_text(tmp_path):
    assert "field 'text' is int, expected a string" in errors_for(tmp_path, "d.jsonl", b'{"text": 5}\n')


def test_non_utf8_bytes(tmp_path):
    msg = errors_for(tmp_path, "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert msg == f"{tmp_path / 'd.jsonl'}:2: not valid UTF-8 (byte 0xe9 at column 14); re-encode the file as UTF-8"


def test_non_utf8_txt(tmp_path):
    (tmp_path / "dom").mkdir()
    (tmp_path / "dom" / "a.txt").write_bytes(b"\xff\xfe")
    (domain,) = discover_domains(tmp_path)
    with pytest.raises(CorpusError, match=r"a.txt \(the part at byte 0\): not valid UTF-8"):
        list(iter_documents(domain))


def test_missing_corpus(tmp_path):
    with pytest.raises(CorpusError, match=f"corpus path {tmp_path / 'nope'} does not exist"):
        discover_domains(tmp_path / "nope")


def test_empty_corpus(tmp_path):
    (tmp_path / "notes.md").write_text("not a corpus file")
    with pytest.raises(CorpusError, match="holds no corpus files"):
        discover_domains(tmp_path)


def test_bad_domain_name(tmp_path):
    (tmp_path / "my domain.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(CorpusError, match="domain name 'my domain' must be"):
        discover_domains(tmp_path)


def test_duplicate_domain(tmp_path):
    (tmp_path / "web.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.txt").write_text("x")
    with pytest.raises(CorpusError, match="domain 'web' is defined twice"):
        discover_domains(tmp_path)


def test_spec_glob_without_match(tmp_path):
    (tmp_path / "spec.yaml").write_text("web: ['nothing/*.jsonl']\n")
    with pytest.raises(CorpusError, match="glob 'nothing/\\*.jsonl' of domain 'web' matches no file"):
        discover_domains(tmp_path / "spec.yaml")


def test_data_is_an_unsupported_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="not a .csv file"):
        discover_domains(tmp_path / "x.csv")


def test_parquet_domain(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "", "second doc"], "n": [1, 2, 3]}), tmp_path / "web.parquet")
    (domain,) = discover_domains(tmp_path)
    assert domain.name == "web" and list(iter_documents(domain)) == ["first doc", "second doc"]
    with pytest.raises(CorpusError, match="no 'body' column \\(found: text, n\\); pass --text-field"):
        list(iter_documents(domain, "body"))


def test_domain_without_documents_fails_the_build(tmp_path, teacher_dir):
    from ddk_cache.capture.build import build

    from .helpers import small_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "empty.jsonl").write_text('\n{"text": "   "}\n')
    with pytest.raises(CorpusError, match="domain 'empty' has no documents"):
        build(small_config(teacher_dir, corpus, tmp_path / "c.zarr"), progress=False)
    assert not (tmp_path / "c.zarr").exists()


def _docs(domain) -> list[str]:
    return list(iter_documents(domain))


def test_zstd_jsonl_is_read_like_plain_jsonl(tmp_path):
    """A folder of .jsonl.zst used to vanish as a domain without a word."""
    import json

    import zstandard

    lines = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(50)).encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_bytes(lines)
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    domains = {d.name: d for d in discover_domains(tmp_path)}
    assert set(domains) == {"plain", "zst"}
    assert _docs(domains["zst"]) == _docs(domains["plain"])


def test_files_not_read_are_reported_and_hidden_entries_skipped_at_every_depth(tmp_path, teacher_dir):
    from ddk_cache.capture.build import build

    from .helpers import make_docs, small_config

    import json

    web = tmp_path / "web"
    (web / ".ipynb_checkpoints").mkdir(parents=True)
    web_docs = [json.dumps({"text": t}) + "\n" for t in make_docs("alpha", 40)]
    (web / "a.jsonl").write_text("".join(web_docs))
    (web / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text('{"text": "a stale copy, must not be read"}\n')
    (web / "notes.md").write_text("not a corpus file")
    (tmp_path / "extra.json").write_text("{}")
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs("beta", 40)))
    domains = {d.name: d for d in discover_domains(tmp_path)}
    assert [p.name for p in domains["web"].files] == ["a.jsonl"]  # the hidden checkpoint copy is not a document
    result = build(small_config(teacher_dir, tmp_path, tmp_path / "out" / "c.zarr"), progress=False)
    assert sorted(result.unread) == sorted([str(tmp_path / "extra.json"), str(web / "notes.md")])
    assert result.meta.corpus["unread_count"] == 2


def test_a_file_claimed_by_two_domains_is_refused(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "spec.yaml").write_text("domains:\n  one: raw/*.jsonl\n  two: raw/a.*\n")
    with pytest.raises(CorpusError, match=r"a.jsonl is matched by the globs of two domains \('one' and 'two'\)"):
        discover_domains(tmp_path / "spec.yaml")


def test_corrupt_gzip_body_is_one_line(tmp_path):
    good = gzip.compress(b'{"text": "hello"}\n' * 2000)
    (tmp_path / "d.jsonl.gz").write_bytes(good[:40] + bytes(200) + good[240:])
    with pytest.raises(CorpusError, match=r"d.jsonl.gz: cannot read: .*damaged or truncated"):
        _docs(discover_domains(tmp_path)[0])
