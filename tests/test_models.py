"""Models made locally: students cut from a teacher's layers (`init-student`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from ddk_cache.capture.tokenization import load_tokenizer, tokenizer_fingerprint
from ddk_cache.cli.main import main
from ddk_cache.errors import ConfigError
from ddk_cache.models import ModelSpec, init_student, keep_layers, make_model_dir

from .helpers import WORDS, make_docs


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [d for dom in WORDS for d in make_docs(dom, 30)]
    spec = ModelSpec(vocab_size=400, hidden_size=32, layers=5, heads=1, max_position_embeddings=64, seed=3)
    return make_model_dir(texts, tmp_path_factory.mktemp("deep") / "model", spec)


def _logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(x).logits


def test_keep_takes_the_ends_of_the_stack():
    assert keep_layers(30, 4) == [0, 1, 28, 29]
    assert keep_layers(5, 3) == [0, 1, 4]
    assert keep_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="--keep must be in 1..5"):
        keep_layers(5, 6)


def test_all_layers_kept_is_the_teacher(tmp_path, deep_teacher):
    x = torch.randint(0, 300, (2, 20))
    path, kept = init_student(deep_teacher, tmp_path / "s", keep=5)
    assert kept == [0, 1, 2, 3, 4]
    torch.testing.assert_close(_logits(path, x), _logits(deep_teacher, x), rtol=0, atol=0)


def test_student_holds_the_chosen_layers_and_loads(tmp_path, deep_teacher):
    result = CliRunner().invoke(main, ["init-student", "--from", str(deep_teacher), "--layers", "0,3,4", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "teacher layers 0,3,4" in result.output
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher, dtype=torch.float32)
    assert student.config.num_hidden_layers == 3
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 3, 4]):
        for key, value in s.items():
            if key.startswith(f"model.layers.{new}."):
                torch.testing.assert_close(value, t[key.replace(f"layers.{new}.", f"layers.{old}.")], rtol=0, atol=0)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(s[key], t[key], rtol=0, atol=0)
    # It runs with a KV cache (attention layers renumbered) and shares the teacher's tokenizer.
    out = student.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path / "s"))) == tokenizer_fingerprint(load_tokenizer(str(deep_teacher)))


@pytest.mark.parametrize("args, message", [
    (["--layers", "3,1"], "distinct teacher layers in increasing order"),
    (["--layers", "0,9"], r"each in 0..4"),
    (["--keep", "9"], r"--keep must be in 1..5"),
    ([], "give exactly one of --layers and --keep"),
])
def test_bad_layer_choices_are_refused(tmp_path, deep_teacher, args, message):
    result = CliRunner().invoke(main, ["init-student", "--from", str(deep_teacher), "--out", str(tmp_path / "s"), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "s").exists()


def test_out_that_holds_something_is_refused(tmp_path, deep_teacher):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        init_student(deep_teacher, tmp_path / "s", keep=2)
