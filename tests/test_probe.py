"""Bad inputs that gave tracebacks (or trained silently), each now one line naming the file,
line or option and what to do, with nothing half-made left looking complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddk_cache.capture.build import build
from ddk_cache.cli.main import main
from ddk_cache.errors import ConfigError, CorpusError

from .helpers import copy_cache, distill_config, make_docs, make_student, small_config


@pytest.fixture(scope="module")
def student_small(tmp_path_factory, teacher_dir):
    return make_student(teacher_dir, tmp_path_factory.mktemp("s") / "small", hidden_size=32, layers=1)


def test_a_domain_named_like_a_store_key_is_refused_before_anything_is_written(tmp_path, teacher_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "zarr.json.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs("alpha", 30)))
    with pytest.raises(CorpusError, match=r"domain name 'zarr.json' is reserved"):
        build(small_config(teacher_dir, corpus, tmp_path / "c.zarr"), progress=False)
    assert not (tmp_path / "c.zarr").exists()


def test_a_lone_surrogate_names_the_file_and_line(tmp_path, teacher_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": t}) for t in make_docs("alpha", 30)]
    lines[7] = '{"text": "an emoji cut in half \\ud83d here"}'
    (corpus / "web.jsonl").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["build", "--teacher", str(teacher_dir), "--data", str(corpus), "--out", str(tmp_path / "c.zarr"),
                                       "--top-k", "8", "--seq-len", "32", "--val-tokens", "64", "--device", "cpu", "--backend", "hf", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{corpus / 'web.jsonl'}:8: the text holds '\\ud83d'" in result.output
    assert not (tmp_path / "c.zarr").exists()  # nothing half-made: the fixed file is a fresh build, not a refused resume


def test_a_tokenizer_larger_than_the_teachers_output_is_refused(tmp_path, teacher_dir, corpus_dir):
    import shutil

    from transformers import AutoTokenizer

    big = tmp_path / "tok"
    shutil.copytree(teacher_dir, big)
    tok = AutoTokenizer.from_pretrained(big)
    tok.add_tokens([f"<extra{i}>" for i in range(200)])
    tok.save_pretrained(big)
    with pytest.raises(ConfigError, match=r"has 600 tokens but the teacher's output has 400 rows"):
        build(small_config(teacher_dir, corpus_dir, tmp_path / "c.zarr", tokenizer=str(big)), progress=False)


def test_an_edited_array_shape_is_named(tmp_path, built_cache, student_small):
    out = copy_cache(built_cache, tmp_path / "c.zarr")
    meta_path = out / "alpha" / "train" / "tokens" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] += 5
    meta_path.write_text(json.dumps(meta))
    result = CliRunner().invoke(main, ["distill", "--cache", str(out), "--student", str(student_small), "--out", str(tmp_path / "run"),
                                       "--max-steps", "2", "--device", "cpu", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "alpha/train/tokens/zarr.json gives the shape" in result.output and "edited after the build?" in result.output


def test_huge_static_weights_are_normalised_not_an_error():
    from ddk_cache.train.mixing import parse_static

    assert parse_static("a=1e308,b=1e308", ["a", "b"]).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_student_with_a_shorter_context_than_the_rows_is_refused(tmp_path, built_cache, teacher_dir, family):
    """GPT-2 indexed past its position table (IndexError); a Llama trained silently."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.train.distill import distill

    tok = load_tokenizer(str(teacher_dir))
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=32, n_layer=1, n_head=1))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=1, max_position_embeddings=16))
    model.save_pretrained(tmp_path / "s")
    tok.save_pretrained(tmp_path / "s")
    with pytest.raises(ConfigError, match=r"the student's context is 16 positions, the cache's rows are 32 tokens"):
        distill(distill_config(built_cache, Path(tmp_path / "s"), tmp_path / "run"), progress=False)


def test_a_read_only_out_is_one_line_for_build_and_distill(tmp_path, teacher_dir, corpus_dir, built_cache, student_small, monkeypatch):
    """Permission errors were tracebacks. Root ignores file modes (CI runs as root), so the
    refusal is simulated where the filesystem would give it: creating a directory under --out."""
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(ro)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    result = CliRunner().invoke(main, ["build", "--teacher", str(teacher_dir), "--data", str(corpus_dir), "--out", str(ro / "c.zarr"),
                                       "--top-k", "8", "--seq-len", "32", "--val-tokens", "64", "--backend", "hf", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "permission" in result.output.lower() and str(ro) in result.output
    result = CliRunner().invoke(main, ["distill", "--cache", str(built_cache), "--student", str(student_small), "--out", str(ro / "run"),
                                       "--max-steps", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "not writable" in result.output or "permission" in result.output.lower()
