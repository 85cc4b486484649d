"""Load a tokenizer, fingerprint it, and turn documents into token ids.

The fingerprint is what ties a cache to a tokenizer family: a student whose tokenizer has
another fingerprint cannot learn from the cache's token ids, and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import ConfigError, CorpusError, TeacherError


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer with `AutoTokenizer.from_pretrained`, requiring an EOS token.

    Raises TeacherError (naming the path) when it cannot be loaded or has no EOS token.
    """
    from transformers import AutoTokenizer

    check_model_path(name_or_path, TeacherError)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... depending on what is missing
        hint = "" if os.path.exists(name_or_path) else " (no local directory of that name exists either)"
        raise TeacherError(f"cannot load a tokenizer from {name_or_path!r}: {first_line(e)}{hint}") from None
    if tok.eos_token_id is None:
        raise TeacherError(f"the tokenizer of {name_or_path!r} has no EOS token; documents could not be separated")
    return tok


def check_model_path(name_or_path: str, error: type[Exception]) -> None:
    """Raise `error` for a model or tokenizer path that does not exist and cannot be a hub id
    (absolute, ./ or ../ or ~, a trailing slash, or more than one '/'), so a mistyped run
    directory gets "no such directory", not a hub lookup's error."""
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith("/") or name_or_path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise error(f"{name_or_path}: no such file or directory (a local model directory was expected)")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 over the vocabulary (token -> id), the BPE merges if any, and the special tokens.

    Computed from content, not from a file's bytes, so re-saving a tokenizer (or a newer
    transformers writing its JSON in another order) does not change it.
    """
    merges: list[str] = []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        # tokenizers wrote merges as "a b" strings before 0.20 and as ["a", "b"] pairs since.
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    specials = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
    payload = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "merges": merges,
        "special_tokens": {k: str(v) if v is not None else None for k, v in specials.items()},
        "added_tokens": sorted(str(t) for t in getattr(tok, "all_special_tokens", [])),
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def cache_tokenizer(cache: Any) -> Any:
    """The teacher's tokenizer a cache holds (`Cache.tokenizer_files`), loaded, after checking
    it is the one the cache's token ids come from (its fingerprint)."""
    import tempfile

    from ..errors import StoreError

    with tempfile.TemporaryDirectory(prefix="ddk-tokenizer-") as tmp:
        for name, data in cache.tokenizer_files().items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        tok = load_tokenizer(tmp)
    if tokenizer_fingerprint(tok) != cache.meta.tokenizer.get("fingerprint"):
        raise StoreError(f"{cache.path}/_tokenizer holds a tokenizer whose fingerprint is not the cache's: the cache is damaged")
    return tok


def tokenizer_info(tok: Any) -> dict[str, Any]:
    """The tokenizer facts a cache records: fingerprint, size, special ids, class."""
    return {
        "fingerprint": tokenizer_fingerprint(tok),
        "size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "class": type(tok).__name__,
    }


ROW_STARTS = ("auto", "bos", "none")


def adds_bos(tok: Any) -> bool:
    """Whether the tokenizer puts its BOS token before a document (its own special-token rule,
    as `tok(text)` applies it: Llama 3 and Gemma do, Qwen and SmolLM2 do not)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def resolve_row_start(rule: str, tok: Any) -> str:
    """--row-start: 'auto' becomes 'bos' where the tokenizer adds a BOS to a document, else
    'none'; 'bos' needs a tokenizer with a BOS token. Returns 'bos' or 'none'."""
    if rule not in ROW_STARTS:
        raise ConfigError(f"--row-start must be one of {', '.join(ROW_STARTS)}, got {rule!r}")
    if rule == "auto":
        return "bos" if adds_bos(tok) else "none"
    if rule == "bos" and tok.bos_token_id is None:
        raise ConfigError("--row-start bos: the tokenizer has no BOS token; use --row-start none")
    return rule


def tokenize_documents(tok: Any, documents: Iterable[str], batch_size: int = 256) -> Iterator[np.ndarray]:
    """Yield each document's token ids (int32), EOS appended.

    The tokenizer's own special-token rule applies (a Llama tokenizer prepends BOS, Qwen's
    adds nothing); EOS is appended unless the tokenizer already ended the document with it.
    Batched, so a fast tokenizer encodes in parallel.
    """
    eos = tok.eos_token_id
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for ids in tok(batch, add_special_tokens=True)["input_ids"]:
            if not ids or ids[-1] != eos:
                ids = list(ids) + [eos]
            yield np.asarray(ids, dtype=np.int32)
        batch.clear()

    for doc in documents:
        batch.append(doc)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


def load_chat_template(option: str | None, tok: Any, name: str) -> str:
    """The chat template to format chat records: --chat-template (a file, or the template
    text itself), else the tokenizer's own. CorpusError when there is none."""
    from pathlib import Path

    if option:
        path = Path(option)
        if len(option) < 4096 and path.is_file():
            return path.read_text(encoding="utf-8")
        return option
    template = getattr(tok, "chat_template", None)
    if not template:
        raise CorpusError(
            f"the corpus has chat records but the tokenizer of {name!r} has no chat template; "
            "pass --chat-template FILE (a Jinja template, as in tokenizer_config.json)"
        )
    return template if isinstance(template, str) else template.get("default", next(iter(template.values())))


def chat_tokens(tok: Any, messages: list[dict[str, str]], template: str, origin: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, loss mask uint8) of one conversation formatted by `template`.

    The mask is 1 on the tokens of every assistant turn, from the end of the prompt that
    precedes it (the template's generation prompt) to the end of its rendered message, so
    the end-of-turn marker the model must learn to emit carries loss too. Found by
    rendering the conversation's prefixes and mapping characters to tokens through the
    fast tokenizer's offsets; a template whose prefixes are not prefixes of the whole
    (rare) is refused with the record's place."""
    def render(msgs: list[dict[str, str]], prompt: bool) -> str:
        if not msgs:
            return ""
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt, chat_template=template)

    try:
        text = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise CorpusError(f"{origin}: the chat template does not render this conversation's prefixes as prefixes "
                                  "of the whole; ddk-cache cannot tell which tokens are the assistant's (pass another --chat-template)")
            spans.append((len(before), len(through)))
    except CorpusError:
        raise
    except Exception as e:  # jinja2 errors: the template rejects the conversation
        raise CorpusError(f"{origin}: the chat template fails on this conversation: {first_line(e)}") from None
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64)
    mask = np.zeros(len(ids), np.uint8)
    for a, b in spans:
        mask |= ((starts >= a) & (starts < b)).astype(np.uint8)
    return ids, mask


def sample_tokens(tok: Any, messages: list[dict[str, str]], template: str, sample: tuple[list[int], list[float]],
                  origin: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids int32, loss mask uint8, sampling log-probs float32) of a generated sample:
    the prompt (every message but the last, with the generation prompt) tokenized as
    `ddk-cache generate` did, then the response's token ids exactly as drawn, not the
    re-tokenized text (a sampled id sequence need not be the tokenizer's own segmentation of
    its text; MiniLLM's rewards and importance weights belong to the drawn tokens). The mask
    is 1 on the response; the log-probs are 0 on the prompt."""
    response, logprobs = sample
    if len(tok) and max(response) >= len(tok):
        raise CorpusError(f"{origin}: 'response_ids' holds id {max(response)}, beyond the tokenizer's {len(tok)} tokens: "
                          "the samples come from a model of another tokenizer")
    if tok.decode(response, skip_special_tokens=True) != messages[-1]["content"]:
        raise CorpusError(f"{origin}: the assistant message is not the decoding of 'response_ids' (edited after `ddk-cache generate`, "
                          "or sampled with another tokenizer); remove 'response_ids' and 'logprobs' to train on the text instead")
    try:
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=template)
    except Exception as e:
        raise CorpusError(f"{origin}: the chat template fails on this conversation: {first_line(e)}") from None
    head = np.asarray(tok(prompt, add_special_tokens=False)["input_ids"], np.int32)
    ids = np.concatenate([head, np.asarray(response, np.int32)])
    mask = np.zeros(len(ids), np.uint8)
    mask[len(head):] = 1
    lp = np.zeros(len(ids), np.float32)
    lp[len(head):] = logprobs
    return ids, mask, lp


def document_tokenizer(tok: Any, chat_template: str | None, name: str) -> Any:
    """A function turning a batch of corpus Documents into (token arrays, mask arrays or None,
    sampling log-prob arrays or None): text documents batched through the tokenizer with EOS
    appended, chat records through the chat template with their loss masks, generated
    samples (`ddk-cache generate`) as drawn with their log-probs."""
    template: list[str] = []

    def tokenize(docs: list) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]:
        if docs and docs[0].messages is not None:
            if not template:
                template.append(load_chat_template(chat_template, tok, name))
            if docs[0].sample is not None:
                triples = [sample_tokens(tok, d.messages, template[0], d.sample, d.origin) for d in docs]
                return [t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples]
            pairs = [chat_tokens(tok, d.messages, template[0], d.origin) for d in docs]
            return [p[0] for p in pairs], [p[1] for p in pairs], None
        return list(tokenize_documents(tok, [d.text for d in docs], batch_size=len(docs) or 1)), None, None

    return tokenize
