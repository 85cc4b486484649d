"""`ddk-cache distill`: train a student from a cache alone, with DDK domain mixing.

One file, read top to bottom: the config, setup (cache, student, optimizer, loader, mixer),
evaluation, checkpoints, and the loop. Per step:

    loss = sum_tokens [ CE(student, next token) + kd_weight * D(teacher_T || student_T) ] / tokens

with D one of `losses.KINDS` on the cached top-k targets, or, with `--online-teacher`, on the
full distribution of a teacher run next to the student every step (dense online KD: the
reference a cache must match, and what the cache saves). Every `ddk_interval` steps the
student is evaluated per domain on the cache's validation split, and the mixer moves the
sampling weights toward the domains where student/teacher perplexity is worst.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .data import CacheLoader
from ..errors import ConfigError, DDKCacheError, TeacherError
from .evaluate import evaluate_domains
from .losses import IGNORE_INDEX, KDLoss, ce_and_dense_kd, ce_and_sparse_kd
from .mixing import Mixer
from ..store.cache import Cache
from ..capture.tokenization import load_tokenizer, tokenizer_fingerprint

# Checkpoint layout (one folder per step under RUN/checkpoints/): keys are constants.
CKPT_DIR = "checkpoints"
CKPT_TRAINER = "trainer_state.pt"  # optimizer state + RNG states; loaded with weights_only=True
CKPT_STATE = "state.json"  # step, tokens, sampler, mixer, config; written last = checkpoint complete
METRICS = "metrics.jsonl"
FINAL = "final"


class TrainingError(DDKCacheError):
    """Training cannot go on (non-finite loss); the message names the last good checkpoint."""


@dataclass(frozen=True)
class DistillConfig:
    """Everything `ddk-cache distill` takes; saved in every checkpoint and in RUN/config.json."""

    cache: str = ""  # the cache to learn from
    out: str = ""  # run directory
    student: str = ""  # causal LM directory or hub id (pretrained, as in DDK)
    student_config: str = ""  # or: a transformers config.json to start from random weights
    tokenizer: str = ""  # tokenizer directory; default: --student (needed with --student-config)
    kd_loss: str = "fkl"  # fkl, rkl, skl, srkl, jsd, akl, none (CE only: continued pre-training)
    online_teacher: str = ""  # teacher model run every step; its full distribution replaces the cached targets
    kd_weight: float = 0.2  # gamma: loss = CE + gamma * KD (DDK's 0.2)
    temperature: float = 1.0  # T of teacher and student distributions in the KD term
    tail: str = "bucket"  # mass outside the top-k: one extra category (bucket) or renormalise
    skew_alpha: float = 0.1  # skl / srkl
    jsd_beta: float = 0.5  # jsd
    akl_mu: float = 0.5  # akl head mass
    mixing: str = "ddk"  # ddk, ddk-nosmooth, uniform, natural, static:dom=w,...
    ddk_interval: int = 1000  # steps between evaluations / DDK updates
    ddk_alpha: float = 0.5  # DDK smoothing
    batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.1  # AdamW, on matrices only
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    max_steps: int = 1000  # optimizer steps
    max_tokens: int = 0  # if > 0, overrides max_steps: tokens over all ranks
    seed: int = 0  # model init (student_config), sampling
    device: str = "auto"  # cuda:LOCAL_RANK when available, else cpu
    bf16: str = "auto"  # autocast to bfloat16: auto = on GPU only (fp32 on CPU)
    gradient_checkpointing: bool = False
    eval_batch_size: int = 8
    save_every: int = 500  # checkpoint interval (steps); the final model is always saved
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in --out
    prefetch: int = 2  # batches the reader thread runs ahead
    loader_workers: int = 0  # reader processes decoding batches (0: the reader thread does it)

    def __post_init__(self) -> None:
        checks = [
            (bool(self.cache), "--cache is required"),
            (bool(self.out), "--out is required"),
            (bool(self.student) != bool(self.student_config), "give exactly one of --student and --student-config"),
            (bool(self.student) or bool(self.tokenizer), "--student-config needs --tokenizer (the cache's tokenizer)"),
            (self.kd_weight >= 0, f"--kd-weight must be >= 0, got {self.kd_weight}"),
            (0 < self.temperature <= 100, f"--temperature must be in (0, 100], got {self.temperature}"),
            (0 <= self.ddk_alpha <= 1, f"--ddk-alpha must be in [0, 1], got {self.ddk_alpha}"),
            (self.ddk_interval >= 1, f"--ddk-interval must be >= 1, got {self.ddk_interval}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.max_steps >= 1 or self.max_tokens > 0, "--max-steps must be >= 1 (or give --max-tokens)"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "--lr must be > 0 and --min-lr-ratio in [0, 1]"),
            (self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}"),
            (self.prefetch >= 1 and self.loader_workers >= 0, "--prefetch must be >= 1 and --loader-workers >= 0"),
            (not (self.online_teacher and self.kd_loss == "none"), "--online-teacher with --kd-loss none would run the teacher for nothing; drop one"),
            (self.bf16 in ("auto", "on", "off"), f"--bf16 must be auto, on or off, got {self.bf16!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        try:
            self.kd()
        except ValueError as e:
            raise ConfigError(f"--{str(e).replace('_', '-')}") from None

    def kd(self) -> KDLoss:
        return KDLoss(self.kd_loss, self.temperature, self.tail, self.skew_alpha, self.jsd_beta, self.akl_mu)

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> "DistillConfig":
        """Defaults < YAML config file < command-line flags. Unknown config keys are errors."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        if config_file:
            try:
                raw = yaml.safe_load(Path(config_file).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"{config_file}: cannot read the config: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{config_file}: expected a mapping of option: value")
            for key, value in raw.items():
                name = str(key).replace("-", "_")
                if name not in known:
                    raise ConfigError(f"{config_file}: unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
                values[name] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        types = {f.name: f.type for f in fields(cls)}
        for name, value in values.items():
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[str(types[name])]
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"option {name!r} must be {types[name]}, got {value!r}")
        return cls(**values)


# ----------------------------------------------------------------------------- setup helpers


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank), initialising torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def load_student(cfg: DistillConfig, cache: Cache, weights: str | Path | None = None) -> tuple[Any, Any]:
    """The student model and its tokenizer, after checking both fit the cache.

    `weights`, if given, is a checkpoint directory to load instead of --student/--student-config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_path = cfg.tokenizer or cfg.student
    tok = load_tokenizer(tok_path)
    theirs = cache.meta.tokenizer["fingerprint"]
    ours = tokenizer_fingerprint(tok)
    if ours != theirs:
        raise ConfigError(
            f"tokenizer mismatch: the student's tokenizer ({tok_path}, {ours[:19]}) is not the cache's "
            f"({cache.meta.teacher['name_or_path']}, {theirs[:19]}); a student must share the teacher's tokenizer"
        )
    try:
        if weights is not None or cfg.student:
            model = AutoModelForCausalLM.from_pretrained(weights or cfg.student, dtype=torch.float32)
        else:
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.student_config))
    except Exception as e:
        raise ConfigError(f"cannot load the student from {cfg.student or cfg.student_config!r}: {str(e).splitlines()[0]}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tok):
        raise ConfigError(f"the student's vocabulary ({rows} rows) is smaller than the tokenizer ({len(tok)} tokens)")
    return model, tok


def lr_at(step: int, cfg: DistillConfig, total: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=False)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint (its state.json exists) in a run directory."""
    root = Path(out) / CKPT_DIR
    done = sorted(p for p in root.glob("step_*") if (p / CKPT_STATE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _save_checkpoint(run: Path, step: int, model: Any, tok: Any, opt: torch.optim.Optimizer, state: dict, keep: int) -> Path:
    """Write into a temporary folder and rename it: a crash never leaves a half checkpoint."""
    final = run / CKPT_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": opt.state_dict(), "rng": rng}, tmp / CKPT_TRAINER)
    (tmp / CKPT_STATE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted((run / CKPT_DIR).glob("step_????????"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- the run


@dataclass
class DistillResult:
    """Where the final model is, how many steps were done, this run's losses and final per-domain PPL."""

    out: Path
    steps: int
    losses: list[float]  # total loss per optimizer step (this run's steps only)
    final_ppl: dict[str, float]


def _check_targets(cfg: DistillConfig, cache: Cache) -> None:
    """Refuse settings the cache cannot serve: KD or DDK from a tokens-only cache; on sampled
    targets anything that is biased there (they estimate the teacher without bias only where
    the loss is linear in the target, forward KL, at the temperature they were drawn for, 1,
    and renormalising over randomly drawn ids biases the gradient)."""
    if not cache.has_targets:
        if cfg.kd_loss != "none" and not cfg.online_teacher:
            raise ConfigError(f"{cfg.cache} is a tokens-only cache (built with --top-k 0): it has no teacher targets; "
                              "use --kd-loss none (plain language modelling) or build a cache with --top-k")
        if cfg.mixing.startswith("ddk"):
            raise ConfigError(f"--mixing {cfg.mixing} needs the teacher perplexity table, which a tokens-only cache lacks; "
                              "use --mixing natural, uniform or static:...")
    if cache.targets.kind != "sampled" or cfg.online_teacher:
        return
    if cfg.kd_loss not in ("fkl", "none"):
        raise ConfigError(
            f"--kd-loss {cfg.kd_loss} on a cache of sampled targets: only forward KL (fkl) is unbiased on "
            "sampled ids (the others are not linear in the target); use --kd-loss fkl or a top-k cache"
        )
    if cfg.temperature != 1.0:
        raise ConfigError(f"--temperature {cfg.temperature} on a cache of sampled targets: they estimate the teacher at T = 1; use --temperature 1")
    if cfg.tail == "renorm":
        raise ConfigError(
            "--tail renorm on a cache of sampled targets: renormalising the student over randomly drawn ids biases the "
            "gradient (its expectation is not the dense KD gradient); sampled targets have no tail: use --tail bucket"
        )


def load_online_teacher(cfg: DistillConfig, cache: Cache, device: torch.device, bf16: bool) -> Any:
    """The resident teacher of online KD (transformers), after checking it shares the cache's
    tokenizer. The DDK factor still uses the cache's teacher PPL table: give the cache's teacher."""
    from ..capture.teachers.hf import HFTeacher

    try:
        teacher = HFTeacher(cfg.online_teacher, device=str(device), dtype="bfloat16" if bf16 else "float32", batch_size=cfg.batch_size)
    except TeacherError as e:
        raise ConfigError(f"--online-teacher: {e}") from None
    ours, theirs = tokenizer_fingerprint(teacher.tokenizer), cache.meta.tokenizer["fingerprint"]
    if ours != theirs:
        raise ConfigError(f"--online-teacher {cfg.online_teacher}: its tokenizer ({ours[:19]}) is not the cache's ({theirs[:19]})")
    return teacher


def distill(cfg: DistillConfig, *, progress: bool = True) -> DistillResult:
    """Train per `cfg`; returns where the final model is and the loss history."""
    rank, world, local_rank = _distributed()
    device = _device(cfg.device, local_rank)
    cache = Cache(cfg.cache)  # refuses incomplete caches and unknown versions
    _check_targets(cfg, cache)
    run = Path(cfg.out)
    ckpt = latest_checkpoint(run) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise ConfigError(f"--resume: no checkpoint in {run / CKPT_DIR}")
    if not cfg.resume and (run / CKPT_DIR).exists():  # every rank raises, so none is left waiting
        raise ConfigError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    try:
        mixer = Mixer(cfg.mixing, cache.domains, [cache.num_sequences(d, "train") for d in cache.domains], alpha=cfg.ddk_alpha)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model, tok = load_student(cfg, cache, weights=ckpt)  # on resume, the checkpoint's weights
    model.to(device)
    use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    teacher = load_online_teacher(cfg, cache, device, use_bf16) if cfg.online_teacher else None
    student_rows = model.get_output_embeddings().weight.shape[0]
    if teacher is not None and teacher.vocab_size != student_rows:
        raise ConfigError(f"--online-teacher: its output has {teacher.vocab_size} rows, the student's "
                          f"{student_rows}; dense KD needs one vocabulary")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    opt = _optimizer(model, cfg)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    total_steps = math.ceil(cfg.max_tokens / (cfg.batch_size * cache.seq_len * cfg.grad_accum * world)) if cfg.max_tokens else cfg.max_steps
    kd = cfg.kd()
    teacher_ppl = [cache.teacher_ppl(d, "val") for d in cache.domains] if cache.meta.teacher_ppl else [float("nan")] * len(cache.domains)

    step, tokens_seen = 0, 0
    loader = CacheLoader(cache, batch_size=cfg.batch_size, weights=mixer.weights, seed=cfg.seed, rank=rank, world_size=world,
                         prefetch=cfg.prefetch, targets=teacher is None, workers=cfg.loader_workers)
    if ckpt is not None:
        state = json.loads((ckpt / CKPT_STATE).read_text())
        trainer = torch.load(ckpt / CKPT_TRAINER, weights_only=True)
        opt.load_state_dict(trainer["optimizer"])
        torch.set_rng_state(trainer["rng"]["torch"])
        if "cuda" in trainer["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
        mixer.load_state_dict(state["mixer"])
        loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens"]
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        _trim_metrics(run / METRICS, step)

    def log(record: dict) -> None:
        if rank == 0:
            with open(run / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate_and_mix(update: bool = True) -> dict[str, float]:
        ppl = evaluate_domains(model, cache, batch_size=cfg.eval_batch_size, device=device, autocast=autocast, rank=rank, world_size=world)
        weights = mixer.weights
        if update:
            before = mixer.weights.copy()
            weights = mixer.update([ppl[d] for d in cache.domains], teacher_ppl)
            if not np.array_equal(before, weights):
                loader.set_weights(weights)
        log({"type": "eval", "step": step, "ppl_student": ppl, "ppl_teacher": dict(zip(cache.domains, teacher_ppl)),
             "weights": dict(zip(cache.domains, weights.tolist()))})
        return ppl

    if step == 0:
        evaluate_and_mix()  # DDK: the first factor comes from the untrained student
    losses: list[float] = []
    bar = tqdm(total=total_steps, initial=step, desc="distill", unit=" step", disable=not progress or rank != 0)
    last_good = ckpt
    t_last = time.perf_counter()
    try:
        while step < total_steps:
            lr = lr_at(step, cfg, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            ddp_model.train()
            sums = {"ce": 0.0, "kd": 0.0}
            per_domain: dict[str, list[float]] = {}
            # The step's batches first: the loss is normalised by the tokens that carry loss
            # over every micro-batch and rank, known before any backward pass.
            batches = [loader.next() for _ in range(cfg.grad_accum)]
            count = torch.tensor(float(sum(int((b.labels() != IGNORE_INDEX).sum()) for b in batches)))
            if world > 1:
                torch.distributed.all_reduce(count)
            # DDP averages gradients over ranks: scale by the world size to get the global mean.
            tokens_per_step = max(count.item(), 1.0) / world
            for micro, batch in enumerate(batches):
                x = batch.tokens.to(device, non_blocking=True)
                sync = nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else ddp_model.no_sync()
                with sync:
                    with autocast():
                        logits = ddp_model(input_ids=x, use_cache=False).logits[:, :-1]
                    flat = logits.reshape(-1, logits.shape[-1])
                    labels = batch.labels().to(device, non_blocking=True).reshape(-1)
                    if teacher is None:
                        ce, kd_tok = ce_and_sparse_kd(
                            flat, labels, batch.topk_ids.to(device, non_blocking=True).long().reshape(flat.shape[0], -1),
                            batch.topk_logprobs.to(device, non_blocking=True).reshape(flat.shape[0], -1), kd,
                        )
                    else:
                        t_logits = teacher.logits(x)[:, :-1].reshape(flat.shape)
                        ce, kd_tok = ce_and_dense_kd(flat, labels, t_logits, kd)
                    loss = (ce.sum() + cfg.kd_weight * kd_tok.sum()) / tokens_per_step
                    loss.backward()
                sums["ce"] += ce.sum().item()
                sums["kd"] += kd_tok.sum().item()
                row_tokens = (labels != IGNORE_INDEX).view(x.shape[0], -1).sum(1).clamp_min(1)
                for d, row_ce in zip(batch.domains, (ce.view(x.shape[0], -1).sum(1) / row_tokens).tolist()):
                    per_domain.setdefault(cache.domains[d], []).append(row_ce)
            total = (sums["ce"] + cfg.kd_weight * sums["kd"]) / tokens_per_step
            if not math.isfinite(total):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingError(f"loss became {total} at step {step + 1}; stopped ({where}). Try a lower --lr or --temperature")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += cfg.batch_size * cache.seq_len * cfg.grad_accum * world
            losses.append(total)
            now = time.perf_counter()
            tps = cfg.batch_size * cache.seq_len * cfg.grad_accum * world / (now - t_last)
            t_last = now
            record = {"type": "step", "step": step, "loss": total, "ce": sums["ce"] / tokens_per_step, "kd": sums["kd"] / tokens_per_step,
                      "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_seen, "tokens_per_s": tps,
                      "ce_by_domain": {d: float(np.mean(v)) for d, v in per_domain.items()}}
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tps:,.0f}")
            if step % cfg.ddk_interval == 0 and step < total_steps:
                evaluate_and_mix()
            if step % cfg.save_every == 0 and step < total_steps:
                if rank == 0:
                    state = {"step": step, "tokens": tokens_seen, "mixer": mixer.state_dict(), "loader": loader.state_dict(), "config": asdict(cfg)}
                    last_good = _save_checkpoint(run, step, model, tok, opt, state, cfg.keep_checkpoints)
                if world > 1:
                    torch.distributed.barrier()
    finally:
        bar.close()
        loader.close()
    final_ppl = evaluate_and_mix(update=False)  # logged with the weights in force; nothing reads a new mix now
    if rank == 0:
        model.save_pretrained(run / FINAL)
        tok.save_pretrained(run / FINAL)
    if world > 1:
        torch.distributed.barrier()
    return DistillResult(run / FINAL, step, losses, final_ppl)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    if step == 0:  # a fresh run: nothing earlier is kept
        path.write_text("")
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
