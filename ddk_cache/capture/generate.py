"""`ddk-cache generate`: a model's sampled responses to prompts, as chat records `build` reads.

For MiniLLM's on-policy rounds (arXiv 2306.08543; ddk_cache.train.minillm): the student
samples responses, `build` scores them with the teacher into a cache (prompt masks: only the
response carries loss), and the student trains on that cache. Each output line is

    {"messages": [...the prompt's messages..., {"role": "assistant", "content": RESPONSE}],
     "response_ids": [y_1, ..., y_T],              # the generated token ids (EOS included when drawn)
     "logprobs": [log q(y_1), ..., log q(y_T)],   # the sampling distribution's, per generated token
     "sample": {"model": ..., "seed": ..., "temperature": ..., "top_p": ..., "index": i}}

Prompts: JSONL with `prompt` (a user turn) or `messages` (a conversation ending with the
user's turn; a trailing assistant turn is dropped, so a reference dataset works as is).
Sampling is seeded per prompt (seed, index): the same command gives the same samples on the
same machine and library versions, and a run killed midway continues where it stopped (lines
already written are kept). transformers generates here; vLLM is not wired in yet.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import CommandConfig, option, validate
from ..errors import ConfigError, CorpusError
from .tokenization import load_chat_template, load_tokenizer


@dataclass(frozen=True)
class GenerateConfig(CommandConfig):
    """Everything `ddk-cache generate` takes."""

    model: str = option("", "The sampling model (the student): a local transformers directory or a hub id.")
    prompts: str = option("", "JSONL of prompts: {'prompt': ...} or {'messages': [...]} per line.")
    out: str = option("", "Output JSONL of chat records with the sampled responses and their log-probs.")
    max_new_tokens: int = option(128, "Tokens per response, at most.")
    temperature: float = option(1.0, "Sampling temperature (1: the model's own distribution, as MiniLLM samples).")
    top_p: float = option(1.0, "Nucleus sampling mass (1: off).")
    seed: int = option(0, "Seed; sample i of a prompt uses (seed, prompt index, i).")
    samples_per_prompt: int = option(1, "Responses drawn per prompt.")
    max_prompts: int = option(0, "Prompts read, at most (0: all).")
    batch_size: int = option(8, "Samples written between flushes of --out (each prompt is sampled alone: no padding).")
    chat_template: str = option("", "A Jinja chat template (file or text) instead of the tokenizer's.")
    device: str = option("auto", "torch device.")

    def __post_init__(self) -> None:
        validate([
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.samples_per_prompt >= 1 and self.batch_size >= 1, "--samples-per-prompt and --batch-size must be >= 1"),
        ])


def read_prompts(path: str, limit: int = 0) -> Iterator[list[dict[str, str]]]:
    """Each prompt as chat messages ending with a user turn (file:line in every error)."""
    if not os.path.isfile(path):
        raise CorpusError(f"--prompts {path}: no such file")
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                messages = [{"role": "user", "content": record["prompt"]}]
            elif isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
                messages = [dict(role=m["role"], content=m["content"]) for m in record["messages"]]
                if messages[-1]["role"] == "assistant":
                    messages = messages[:-1]
            else:
                raise CorpusError(f"{path}:{lineno}: expected {{'prompt': ...}} or {{'messages': [...]}}")
            if not messages or messages[-1]["role"] != "user":
                raise CorpusError(f"{path}:{lineno}: the conversation must end with a user turn")
            yield messages
            n += 1
            if limit and n >= limit:
                return


def _resume(out: Path) -> int:
    """Complete lines already written (a run killed midway continues after them), dropping a
    partial last line. Streams the file once; leaves a complete file untouched (its
    modification time is what a cache built from it checks)."""
    if not out.exists():
        return 0
    done, end = 0, 0  # complete lines, and the byte offset after the last one
    with open(out, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            done, end = done + 1, end + len(line)
    if end != out.stat().st_size:
        os.truncate(out, end)
    return done


def generate(cfg: GenerateConfig, *, progress: Callable[[int], Any] | None = None) -> int:
    """Write the samples (module docstring); returns how many lines the file holds."""
    from transformers import AutoModelForCausalLM

    from ..runtime import resolve_device

    if not cfg.model or not cfg.prompts or not cfg.out:
        raise ConfigError("generate needs --model, --prompts and --out")
    jobs = [(i, j, m) for i, m in enumerate(read_prompts(cfg.prompts, cfg.max_prompts)) for j in range(cfg.samples_per_prompt)]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(out)
    if done >= len(jobs):
        return done  # complete: no model to load, nothing to write
    tok = load_tokenizer(cfg.model)
    template = load_chat_template(cfg.chat_template or None, tok, cfg.model)
    device = resolve_device(cfg.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device).eval()
    except Exception as e:
        raise ConfigError(f"cannot load --model {cfg.model!r}: {str(e).splitlines()[0]}") from None
    with open(out, "a", encoding="utf-8") as f:
        for start in range(done, len(jobs), cfg.batch_size):
            batch = jobs[start: start + cfg.batch_size]
            for i, j, messages in batch:
                prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=template)
                ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=device)
                # One prompt at a time: no padding, so a sample does not depend on its batch.
                gen = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([cfg.seed, i, j]).generate_state(1)[0]))
                response, logprobs = _sample(model, ids, cfg, gen, tok.eos_token_id)
                text = tok.decode(response, skip_special_tokens=True)
                record = {"messages": [*messages, {"role": "assistant", "content": text}], "response_ids": response, "logprobs": logprobs,
                          "sample": {"model": cfg.model, "seed": cfg.seed, "temperature": cfg.temperature, "top_p": cfg.top_p,
                                     "index": j, "prompt_index": i}}
                f.write(json.dumps(record) + "\n")
            f.flush()
            if progress:
                progress(len(batch))
    return len(jobs)


@torch.no_grad()
def _sample(model: Any, ids: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator, eos: int) -> tuple[list[int], list[float]]:
    """Ancestral sampling at `temperature` / `top_p` with a KV cache; the log-prob of each
    drawn token under the distribution it was drawn from."""
    out, logprobs = [], []
    past = None
    x = ids
    for _ in range(cfg.max_new_tokens):
        res = model(input_ids=x, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[0, -1].float() / cfg.temperature
        logp = torch.log_softmax(logits, -1)
        if cfg.top_p < 1:
            sorted_lp, order = logp.sort(descending=True)
            keep = sorted_lp.exp().cumsum(0) - sorted_lp.exp() < cfg.top_p  # the smallest prefix reaching top_p
            mask = torch.full_like(logp, float("-inf"))
            mask[order[keep]] = 0
            logp = torch.log_softmax(logp + mask, -1)
        y = int(torch.multinomial(logp.exp(), 1, generator=gen))
        out.append(y)
        logprobs.append(float(logp[y]))
        if y == eos:
            break
        x = torch.tensor([[y]], device=ids.device)
    return out, logprobs


__all__ = ["GenerateConfig", "generate", "read_prompts"]
