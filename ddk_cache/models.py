"""Make small models locally: a BPE tokenizer trained on a corpus and a randomly initialised causal LM.

No model hub is needed, so the quickstart, the tests and small experiments run anywhere.
The result is an ordinary transformers directory (`from_pretrained` loads it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a small Llama-style model; defaults give ~1M parameters."""

    vocab_size: int = 4096  # BPE vocabulary target (the trainer may stop short on tiny corpora)
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 0  # 0 = 4 * hidden_size, rounded to a multiple of 64 (Llama convention)
    max_position_embeddings: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} must be a multiple of --heads {self.heads}")
        if self.vocab_size < 300:
            raise ConfigError(f"--vocab-size must be >= 300 (256 byte tokens plus merges and specials), got {self.vocab_size}")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) and wrap it for transformers.

    EOS doubles as BOS (nothing is prepended); PAD is a separate token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def init_model(spec: ModelSpec, tokenizer: Any) -> Any:
    """A randomly initialised LlamaForCausalLM sized by `spec`, its vocabulary the tokenizer's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = spec.intermediate_size or ((4 * spec.hidden_size + 63) // 64) * 64
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def make_model_dir(texts: Iterable[str], out: str | Path, spec: ModelSpec) -> Path:
    """Train a tokenizer on `texts`, initialise a model, and save both to `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose a new directory for the model")
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    model = init_model(spec, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "ddk_model_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out
