"""`ddk-cache distill`: train a student from a cache alone, with DDK domain mixing.

One file, read top to bottom: the config, setup (cache, student, parallelism, optimizer,
loader, mixer), evaluation, and the loop. Per step, over every rank and micro-batch:

    loss = sum over positions with a label [ CE(student, next token) + kd_weight * D(teacher_T || student_T) ]
           / positions with a label
           (+ pretrain_weight * mean CE on a batch of --pretrain-cache, when given)

with D one of `losses.KINDS` on the cached top-k targets, or, with `--online-teacher`, on the
full distribution of a teacher run next to the student every step (dense online KD: the
reference a cache must match, and what the cache saves). `--kd-loss minillm` replaces the
bracket by MiniLLM's per-position objective on the student's own samples (minillm.py). The loss is computed inside the
student's forward, in chunks of positions (student.py), so no [tokens, vocabulary] tensor
is materialised. Every `ddk_interval` steps the student is evaluated per domain on the
cache's validation split, and the mixer moves the sampling weights toward the domains
where student/teacher perplexity is worst.

Parallelism: one process; DDP (`torchrun`); or FSDP2 (`--fsdp`: parameters, gradients and
optimizer state sharded per decoder layer; bf16 compute with fp32 master weights on GPU).
Checkpoints: torch.distributed.checkpoint, every rank in parallel (checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..capture.tokenization import check_model_path, load_tokenizer, tokenizer_fingerprint
from ..config import CommandConfig, changed, free_fields, option, validate
from ..errors import ConfigError, DDKCacheError, TeacherError
from ..runtime import Worker, init_distributed, resolve_device, resolve_worker
from ..store.cache import Cache
from ..store.objects import DiskFull, LocalObjects, is_disk_full
from . import checkpoint
from .checkpoint import CKPT_DIR, LOCK_DIR, latest_checkpoint
from .data import CacheLoader
from .evaluate import evaluate_domains
from .losses import DEFAULT_CHUNK, DIVERGENCES, IGNORE_INDEX, KINDS, TAILS, KDConfig
from .minillm import MiniLLMConfig
from .ddk import DDKController
from .mixing import check_alpha
from .student import StudentLoss, parallelize

METRICS = "metrics.jsonl"
FINAL = "final"


class TrainingError(DDKCacheError):
    """Training cannot go on (non-finite loss); the message names the last good checkpoint."""


@dataclass(frozen=True)
class DistillConfig(CommandConfig):
    """Everything `ddk-cache distill` takes; saved in every checkpoint and in RUN/config.json.
    Fields marked fingerprint=False may change when a run is resumed; the others may not."""

    cache: str = option("", "The cache to learn from (complete; see `ddk-cache inspect`).")
    out: str = option("", "Run directory: checkpoints/, metrics.jsonl, final/ (save_pretrained + tokenizer).", fingerprint=False)
    student: str = option("", "Student causal LM: local directory or hub id (pretrained, as in DDK).")
    student_config: str = option("", "Or a transformers config.json: start the student from random weights.")
    tokenizer: str = option("", "Tokenizer directory (default: --student). Its fingerprint must equal the cache's.")
    kd_loss: str = option("fkl", ", ".join(f"{d.name} ({d.summary})" for d in DIVERGENCES.values()) + ", none (CE only), minillm (MiniLLM's sequence-level reverse KL on the student's own samples: a cache built from `ddk-cache generate` output; README, MiniLLM).", choices=(*KINDS, "minillm"))
    online_teacher: str = option("", "Dense online KD instead of the cache's targets: this teacher (transformers) runs every step and its full distribution is the target; the cache gives tokens and the teacher PPL table. The baseline the cache replaces.")
    kd_weight: float = option(0.2, "gamma in loss = CE + gamma * KD (DDK: 0.2).")
    temperature: float = option(1.0, "T of both distributions in the KD term.")
    t2_scale: bool = option(False, "Multiply the KD term by T^2 (Hinton et al.), so its gradient keeps its scale as --temperature grows; off by default (torchtune does not scale, DistillKit does).")
    tail: str = option("bucket", "Teacher mass outside the kept ids: 'bucket' (one extra category on both sides) or 'renorm'.", choices=TAILS)
    skew_alpha: float = option(0.1, "alpha of skl/srkl.")
    jsd_beta: float = option(0.5, "beta of jsd.")
    akl_mu: float = option(0.5, "head mass mu of akl.")
    minillm_clip: float = option(0.2, "minillm: epsilon of the clipped importance weight q_theta/r (r: the distribution the samples were drawn from).")
    minillm_no_length_norm: bool = option(False, "minillm ablation: sum the long-horizon rewards instead of averaging them.")
    minillm_no_single_step: bool = option(False, "minillm ablation: no single-step term (the return then includes the current token).")
    minillm_variant: str = option("paper", "minillm: paper (the paper's terms; the default) or lmops (the released code's choices: rewards fixed at sampling, scaled and clipped, discounted and whitened returns from the current token, an unweighted single-step term; README, MiniLLM).", choices=("paper", "lmops"))
    pretrain_cache: str = option("", "A second cache whose next-token CE is added to every step (MiniLLM's pre-training LM term, arXiv 2306.08543: it keeps the student's language modelling while it learns from its own samples): one batch of it per micro-batch; text or tokens-only; the tokenizer must be the cache's.")
    pretrain_weight: float = option(1.0, "Weight of the --pretrain-cache term: loss = main loss + this x its mean CE (MiniLLM: 1).")
    pretrain_mixing: str = option("natural", "Domain mixing of --pretrain-cache: as --mixing (ddk needs its teacher PPL table: the student is evaluated on its validation split every --ddk-interval steps).")
    mixing: str = option("ddk", "ddk, ddk-nosmooth, uniform, natural (by size) or static:DOMAIN=W,...")
    ddk_interval: int = option(1000, "Steps between per-domain evaluations and DDK weight updates (DDK: 1000; scale down for small runs).")
    ddk_alpha: float = option(0.5, "DDK smoothing alpha: r = alpha * psi/sum(psi) + (1 - alpha)/N.")
    batch_size: int = option(8, "Sequences per rank per micro-step.")
    grad_accum: int = option(1, "Micro-steps per optimizer step.")
    lr: float = option(3e-4, "Peak learning rate (AdamW).")
    min_lr_ratio: float = option(0.1, "Cosine decays to lr * this.")
    warmup_steps: int = option(100, "Linear warm-up steps.")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only).")
    grad_clip: float = option(1.0, "Max gradient norm (0 = off).")
    max_steps: int = option(1000, "Optimizer steps.")
    max_tokens: int = option(0, "If > 0: train on this many tokens (all ranks) instead of --max-steps.")
    seed: int = option(0, "Seed of the sampling and of a random-init student.")
    fsdp: bool = option(False, "Shard parameters, gradients and optimizer state over the ranks (FSDP2, one group per decoder layer): for students that do not fit one GPU with DDP.", fingerprint=False)
    device: str = option("auto", "auto = this rank's GPU (cuda:LOCAL_RANK) if available, else cpu.", fingerprint=False)
    bf16: str = option("auto", "bfloat16 compute: auto (GPU only), on, off. With --fsdp: bf16 parameters in compute, fp32 master weights and reductions.", choices=("auto", "on", "off"))
    gradient_checkpointing: bool = option(False, "Trade compute for activation memory.", fingerprint=False)
    loss_chunk: int = option(DEFAULT_CHUNK, "Positions per chunk of the loss (and evaluation): peak loss memory ~ chunk x vocabulary x 12 bytes.", fingerprint=False)
    eval_batch_size: int = option(8, "Sequences per evaluation forward pass (per rank).", fingerprint=False)
    save_every: int = option(500, "Checkpoint every N steps (the final model is always saved).", fingerprint=False)
    keep_checkpoints: int = option(2, "Newest checkpoints kept.", fingerprint=False)
    resume: bool = option(False, "Continue from the newest complete checkpoint in --out, exactly.", fingerprint=False)
    prefetch: int = option(2, "Batches the reader thread reads ahead.", fingerprint=False)
    loader_workers: int = option(0, "Reader processes that decode batches in parallel (0: the reader thread alone).", fingerprint=False)
    report_to: str = option("none", "Also log to: tensorboard (event files in RUN/tensorboard; needs the tensorboard package). metrics.jsonl is always written.",
                            choices=("none", "tensorboard"), fingerprint=False)

    def __post_init__(self) -> None:
        validate([
            (bool(self.cache), "--cache is required"),
            (bool(self.out), "--out is required"),
            (bool(self.student) != bool(self.student_config), "give exactly one of --student and --student-config"),
            (bool(self.student) or bool(self.tokenizer), "--student-config needs --tokenizer (the cache's tokenizer)"),
            (self.kd_weight >= 0, f"--kd-weight must be >= 0, got {self.kd_weight}"),
            (self.ddk_interval >= 1, f"--ddk-interval must be >= 1, got {self.ddk_interval}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.max_steps >= 1 or self.max_tokens > 0, "--max-steps must be >= 1 (or give --max-tokens)"),
            (self.max_tokens >= 0, f"--max-tokens must be >= 0, got {self.max_tokens}"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "--lr must be > 0 and --min-lr-ratio in [0, 1]"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0 and self.grad_clip >= 0, "--weight-decay and --grad-clip must be >= 0"),
            (self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}"),
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.eval_batch_size >= 1 and self.loss_chunk >= 1, "--eval-batch-size and --loss-chunk must be >= 1"),
            (self.prefetch >= 1 and self.loader_workers >= 0, "--prefetch must be >= 1 and --loader-workers >= 0"),
            (not (self.online_teacher and self.kd_loss == "none"), "--online-teacher with --kd-loss none would run the teacher for nothing; drop one"),
            (self.bf16 in ("auto", "on", "off"), f"--bf16 must be auto, on or off, got {self.bf16!r}"),
            (self.pretrain_weight > 0, f"--pretrain-weight must be > 0, got {self.pretrain_weight}"),
            (not self.pretrain_cache or self.pretrain_cache != self.cache, "--pretrain-cache is the --cache itself; give a second cache (pre-training text)"),
        ])
        try:  # the owners' checks: the loss's (temperature, skew, beta, mu) and the mixer's (alpha)
            self.kd()
            self.minillm()
        except ValueError as e:
            raise ConfigError(f"--{str(e).replace('_', '-')}") from None
        try:
            check_alpha(self.ddk_alpha)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def kd(self) -> KDConfig:
        kind = "rkl" if self.kd_loss == "minillm" else self.kd_loss  # minillm's single-step term is the token-level RKL
        return KDConfig(kind, self.temperature, self.tail, self.skew_alpha, self.jsd_beta, self.akl_mu, self.t2_scale)

    def minillm(self) -> MiniLLMConfig | None:
        if self.kd_loss != "minillm":
            return None
        return MiniLLMConfig(self.minillm_clip, not self.minillm_no_length_norm, not self.minillm_no_single_step, self.minillm_variant)


# ----------------------------------------------------------------------------- setup helpers


def load_student(cfg: DistillConfig, cache: Cache) -> tuple[Any, Any]:
    """The student model (float32) and its tokenizer, after checking both fit the cache."""
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
    check_model_path(cfg.student or cfg.student_config, ConfigError)
    try:
        if cfg.student:
            model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
        else:
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.student_config))
    except Exception as e:
        raise ConfigError(f"cannot load the student from {cfg.student or cfg.student_config!r}: {str(e).splitlines()[0]}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tok):
        raise ConfigError(f"the student's vocabulary ({rows} rows) is smaller than the tokenizer ({len(tok)} tokens)")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(getattr(text, k, None), int)), None)
    if context is not None and context < cache.seq_len:
        # GPT-2 would index past its position table; a Llama would train silently on positions
        # its RoPE scaling was never set up for.
        raise ConfigError(f"the student's context is {context} positions, the cache's rows are {cache.seq_len} tokens; "
                          "use a student with max_position_embeddings (n_positions) >= the cache's --seq-len")
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
    if (cache.has_targets and cache.encoding.forward_kl_only and not cfg.online_teacher
            and cfg.kd_loss not in ("fkl", "none")):
        raise ConfigError(
            f"--kd-loss {cfg.kd_loss} on {cfg.cache}: its {cache.encoding.name} targets bound forward KL only (a small probability's "
            "log can be far off, and this loss weights the student by log p); rebuild the cache with --encoding pack (pack-v3), "
            "or use --kd-loss fkl"
        )
    if cfg.kd_loss == "minillm":
        text = [d for d in cache.domains if not cache.is_chat(d)]
        problems = [
            (not cache.has_targets or cache.targets.kind == "sampled", "it needs a top-k cache (the reverse KL's single-step term)"),
            (bool(cfg.online_teacher), "it reads the teacher's scores from the cache; drop --online-teacher"),
            (cfg.temperature != 1.0, "it is defined at temperature 1; drop --temperature"),
            (bool(text), f"it trains on the student's own samples (chat records from `ddk-cache generate`), but {', '.join(text)} "
                         "holds plain text"),
            (0 < sum(map(cache.is_sampled, cache.domains)) < len(cache.domains),
             "some domains hold generated samples with their sampling log-probs and some do not; build them as separate caches"),
        ]
        for bad, why in problems:
            if bad:
                raise ConfigError(f"--kd-loss minillm on {cfg.cache}: {why}")
        return
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


def _check_memory(cfg: DistillConfig, cache: Cache, model: torch.nn.Module, device: torch.device, world: int) -> None:
    """Refuse, before the first step, a batch whose memory certainly exceeds the device's: on
    CPU the OOM killer would end the run without a word. `need` is a lower bound: fp32
    weights, gradients and AdamW moments (FSDP: this rank's share), the activations every
    decoder layer must keep for backward (norm, q/k/v, attention and MLP inputs, the MLP's
    gate/up/act: (7 H + 3 I) floats per token; H per token with gradient checkpointing) and
    one loss chunk's [positions, vocabulary] tensors."""
    c = model.config
    hidden = int(getattr(c, "hidden_size", 0) or 0)
    inter = int(getattr(c, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(c, "num_hidden_layers", 0) or 0)
    tokens = cfg.batch_size * cache.seq_len
    per_token = layers * hidden if cfg.gradient_checkpointing else layers * (7 * hidden + 3 * inter)
    params = sum(p.numel() for p in model.parameters()) / (world if cfg.fsdp else 1)
    need = 4 * (tokens * per_token + 4 * params) + 12 * min(cfg.loss_chunk, tokens) * int(cache.meta.vocab_size)
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device} memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    if need > have:
        raise ConfigError(f"--batch-size {cfg.batch_size} needs at least {need / 2**30:,.1f} GiB ({tokens:,} tokens of a {layers}-layer, "
                          f"{hidden}-wide student), more than the {have / 2**30:,.1f} GiB of {where}; lower --batch-size (raise --grad-accum "
                          "to keep the tokens per step), or use --gradient-checkpointing / --fsdp")


def _frozen_copy(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    import copy

    frozen = copy.deepcopy(model).to(device).eval()
    frozen.requires_grad_(False)
    return frozen


@torch.no_grad()
def _token_logprobs(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, autocast: Any) -> torch.Tensor:
    """log model(labels[t] | x[:t+1]) per predicted position [B, L-1] (0 where ignored)."""
    with autocast():
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
    y = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
    return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


class _Pretrain:
    """MiniLLM's pre-training LM term (arXiv 2306.08543): batches of a second cache, mixed
    over its domains by their own DDKController, whose CE is added to every step."""

    def __init__(self, cfg: DistillConfig, cache: Cache, worker: Worker) -> None:
        self.cache = Cache(cfg.pretrain_cache)
        ours, theirs = self.cache.meta.tokenizer["fingerprint"], cache.meta.tokenizer["fingerprint"]
        if ours != theirs:
            raise ConfigError(f"--pretrain-cache {cfg.pretrain_cache}: its tokenizer ({ours[:19]}) is not --cache's ({theirs[:19]})")
        if any(self.cache.is_sampled(d) for d in self.cache.domains):
            raise ConfigError(f"--pretrain-cache {cfg.pretrain_cache} holds generated samples; give a cache of pre-training text")
        try:
            self.ddk = DDKController(self.cache, mixing=cfg.pretrain_mixing, alpha=cfg.ddk_alpha)
        except ValueError as e:
            raise ConfigError(f"--pretrain-mixing: {e}") from None
        # Its own seed stream: the main cache's draw is the same with or without this term.
        self.loader = CacheLoader(self.cache, batch_size=cfg.batch_size, weights=self.ddk.weights, seed=cfg.seed + 1, rank=worker.rank,
                                  world_size=worker.world_size, prefetch=cfg.prefetch, targets=False)
        self.ddk.samplers.append(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"mixer": self.ddk.mixer.state_dict(), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ddk.mixer.load_state_dict(state["mixer"])
        self.loader.load_state_dict(state["loader"])


def _grad_sync(model: torch.nn.Module, enabled: bool) -> Any:
    """Skip the gradient all-reduce on every micro-batch but the last (DDP and FSDP2)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


# ----------------------------------------------------------------------------- the run


def distill(cfg: DistillConfig, *, progress: bool = True) -> DistillResult:
    """Train per `cfg`; returns where the final model is and the loss history.

    Each rank holds a lock in RUN/.locks for the whole run (flock: released when the process
    dies, kill -9 included), so a second distill into the same --out is refused at once on
    every rank instead of interleaving its checkpoints and metrics with this one's."""
    worker: Worker = resolve_worker()
    run = Path(cfg.out)
    check_out(cfg)
    try:
        lock = LocalObjects(str(run)).lock(f"{LOCK_DIR}/rank-{worker.rank}.lock", f"a distill into {run}")
        lock.__enter__()
    except PermissionError as e:
        raise ConfigError(f"--out {run} is not writable ({e.strerror}); choose a directory you can write to") from None
    with _Release(lock):
        try:
            return _distill(cfg, worker, run, progress)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)) or not is_disk_full(e):
                raise
            raise DiskFull(f"no space left on the device holding {run}; the last complete checkpoint is kept: free space (or copy "
                           "the run directory elsewhere), then run the same command with --resume") from None


RUN_ENTRIES = {CKPT_DIR, LOCK_DIR, METRICS, "config.json", FINAL, "tensorboard", "weights.png", "ppl.png", "loss.png", "report.md"}


class _Release:
    """Leaves an already entered context manager on exit (the run lock, entered early so a
    read-only --out is one line)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> Any:
        return self.ctx.__exit__(*exc)


def check_out(cfg: DistillConfig) -> None:
    """Refuse an --out that holds anything but an unfinished run of this config: a file, a
    directory this run reads (the cache, the student, its tokenizer, a teacher), a finished
    run (unless --resume), another run's settings, or files that are not a run's. One line
    each, saying what to do; nothing is written before this passes."""
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--out {run} is a file; give a directory for the run")
    inputs = {"the cache": cfg.cache, "the student": cfg.student, "the student's config": str(Path(cfg.student_config).parent) if cfg.student_config else "",
              "the tokenizer": cfg.tokenizer, "the online teacher": cfg.online_teacher, "the pre-training cache": cfg.pretrain_cache}
    here = run.resolve()
    for what, path in inputs.items():
        if path and Path(path).exists() and (Path(path).resolve() == here or here in Path(path).resolve().parents):
            raise ConfigError(f"--out {run} is {what} ({path}): the run would write into it; choose a new directory for the run")
    if not run.is_dir():
        return
    entries = {p.name for p in run.iterdir()}
    foreign = sorted(entries - RUN_ENTRIES)
    if foreign:
        raise ConfigError(f"--out {run} holds files that are not a ddk-cache run ({', '.join(foreign[:4])}); choose a new directory for the run")
    if FINAL in entries and not cfg.resume and CKPT_DIR not in entries:  # with checkpoints, _distill says "pass --resume"
        raise ConfigError(f"--out {run} holds a finished run ({FINAL}/); choose another --out, or pass --resume to continue it "
                          "with a larger --max-steps")
    saved = run / "config.json"
    if saved.is_file() and not (run / CKPT_DIR).is_dir():
        try:
            old = json.loads(saved.read_text())
        except ValueError:
            old = None
        diffs = changed(old, cfg) if isinstance(old, dict) else ["its config.json does not parse"]
        if diffs:
            raise ConfigError(f"--out {run} holds the start of a run with other settings ({'; '.join(diffs[:3])}); choose another --out")


def cache_identity(cache: Cache) -> str:
    """What ties a run to its cache's content (not its path): the build fingerprint."""
    return cache.meta.build_fingerprint or f"{cache.meta.teacher.get('fingerprint', '')}@{cache.meta.created_at}"


def check_resume(saved: dict, cfg: DistillConfig, cache: Cache, run: Path, world: int) -> None:
    """Refuse (naming every difference) a resume whose settings or cache differ from the
    checkpoint's; say which flags may change. The per-rank --batch-size and --grad-accum may
    change with the number of ranks as long as the global batch stays the same."""
    old = saved.get("config", {})
    per_step = ("--batch-size:", "--grad-accum:")
    diffs = [d for d in changed(old, cfg) if not d.startswith(per_step)]
    before = old.get("batch_size", cfg.batch_size) * old.get("grad_accum", cfg.grad_accum) * saved.get("world_size", world)
    now = cfg.batch_size * cfg.grad_accum * world
    if before != now:
        diffs.append(f"the global batch (--batch-size x --grad-accum x ranks): {before} sequences before, {now} now")
    theirs = saved.get("cache_identity")
    if theirs and theirs != cache_identity(cache):
        diffs.insert(0, f"the cache: {cfg.cache} holds other content than the cache this run was trained on "
                        f"(build {theirs[:12]} before, {cache_identity(cache)[:12]} now)")
    if diffs:
        raise ConfigError(f"--resume: {run} was trained with other settings: {'; '.join(diffs)}. "
                          f"Only these may change on resume: {', '.join(free_fields(DistillConfig))}; "
                          "for anything else start a new --out")


def _distill(cfg: DistillConfig, worker: Worker, run: Path, progress: bool) -> DistillResult:
    rank, world = worker.rank, worker.world_size
    device = resolve_device(cfg.device, worker)
    init_distributed(worker, device)
    cache = Cache(cfg.cache)  # refuses incomplete caches and unknown versions
    _check_targets(cfg, cache)
    ckpt = latest_checkpoint(run)
    if not cfg.resume and ckpt is not None:  # every rank raises, so none is left waiting
        raise ConfigError(f"{run} already holds a run (checkpoint {ckpt.name}); pass --resume to continue it or choose another --out")
    if cfg.resume and ckpt is None and rank == 0 and (run / CKPT_DIR).is_dir():
        # An interrupted first save leaves only a .tmp folder: nothing to continue, so start.
        tqdm.write(f"--resume: no complete checkpoint in {run / CKPT_DIR}; starting from step 0")
    if ckpt is not None:
        ckpt = checkpoint.latest_whole(run, rank, world, tqdm.write)
        if ckpt is None:
            raise ConfigError(f"--resume: every checkpoint in {run / CKPT_DIR} is damaged (files that do not match their "
                              "recorded sha256, or missing); restore them from a copy, or start a new --out")
        check_resume(checkpoint.read_state(ckpt), cfg, cache, run, world)
    try:
        ddk = DDKController(cache, mixing=cfg.mixing, alpha=cfg.ddk_alpha)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model, tok = load_student(cfg, cache)
    use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    teacher = load_online_teacher(cfg, cache, device, use_bf16) if cfg.online_teacher else None
    student_rows = model.get_output_embeddings().weight.shape[0]
    if teacher is not None and teacher.vocab_size != student_rows:
        raise ConfigError(f"--online-teacher: its output has {teacher.vocab_size} rows, the student's "
                          f"{student_rows}; dense KD needs one vocabulary")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    _check_memory(cfg, cache, model, device, world)
    kd = cfg.kd()
    minillm = cfg.minillm()
    # MiniLLM's importance weights need the log-prob of each sampled token under the policy
    # that drew it: stored in the cache by `ddk-cache generate` (q_old, or the teacher-mixed
    # p~ = a p + (1 - a) q_old). Samples without them: q_old is the student this round starts
    # from (--student), kept as a frozen copy (also on --resume: loaded before the checkpoint),
    # which costs a copy of the weights and a forward pass per step.
    behaviour = None
    if minillm is not None and not any(cache.is_sampled(d) for d in cache.domains):
        behaviour = _frozen_copy(model, device)
    module = StudentLoss(model, kd, chunk=cfg.loss_chunk, minillm=minillm).to(device)
    trained = parallelize(module, "fsdp" if cfg.fsdp else "ddp", device, world, use_bf16)
    opt = _optimizer(trained, cfg)
    # FSDP2 computes in bf16 through its policy; DDP and one process use autocast on GPU.
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 and not cfg.fsdp else nullcontext
    total_steps = math.ceil(cfg.max_tokens / (cfg.batch_size * cache.seq_len * cfg.grad_accum * world)) if cfg.max_tokens else cfg.max_steps
    teacher_ppl = dict(zip(cache.domains, ddk.teacher_ppl or [float("nan")] * len(cache.domains)))

    step, tokens_seen = 0, 0
    board = None
    loader = CacheLoader(cache, batch_size=cfg.batch_size, weights=ddk.weights, seed=cfg.seed, rank=rank, world_size=world,
                         prefetch=cfg.prefetch, targets=teacher is None, workers=cfg.loader_workers, sample_logprobs=behaviour is None and minillm is not None)
    ddk.samplers.append(loader)
    pretrain = None
    try:
        pretrain = _Pretrain(cfg, cache, worker) if cfg.pretrain_cache else None
        if ckpt is not None:
            state = checkpoint.load(ckpt, trained, opt, rank)
            ddk.mixer.load_state_dict(state["mixer"])
            loader.load_state_dict(state["loader"])
            if pretrain is not None:
                pretrain.load_state_dict(state["pretrain"])
            step, tokens_seen = state["step"], state["tokens"]
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
            _trim_metrics(run / METRICS, step)

        board = _tensorboard(run, cfg.report_to) if rank == 0 else None

        def log(record: dict) -> None:
            if rank == 0:
                with open(run / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if board is not None:
                    _board_log(board, record)

        def evaluate_and_mix(update: bool = True) -> dict[str, float]:
            t0 = time.perf_counter()
            ppl = evaluate_domains(trained, cache, batch_size=cfg.eval_batch_size, device=device, autocast=autocast,
                                   rank=rank, world_size=world, loss=True)
            seconds = time.perf_counter() - t0
            weights = ddk.update(ppl) if update else ddk.weights
            record = {"type": "eval", "step": step, "ppl_student": ppl, "ppl_teacher": teacher_ppl,
                      "weights": dict(zip(cache.domains, weights.tolist())), "eval_seconds": seconds,
                      "eval_tokens": sum(cache.num_sequences(d, "val") for d in cache.domains) * cache.seq_len}
            if pretrain is not None:  # what the term guards: the student's LM on pre-training text
                pt = pretrain.cache
                pt_ppl = evaluate_domains(trained, pt, batch_size=cfg.eval_batch_size, device=device, autocast=autocast,
                                          rank=rank, world_size=world, loss=True)
                pt_weights = pretrain.ddk.update(pt_ppl) if update else pretrain.ddk.weights
                record.update(pretrain_ppl_student=pt_ppl, pretrain_weights=dict(zip(pt.domains, pt_weights.tolist())),
                              eval_seconds=time.perf_counter() - t0)
            log(record)
            return ppl

        if step == 0:
            evaluate_and_mix()  # DDK: the first factor comes from the untrained student
        losses: list[float] = []
        bar = tqdm(total=total_steps, initial=step, desc="distill", unit=" step", disable=not progress or rank != 0)
        last_good = ckpt
        t_last = time.perf_counter()
        while step < total_steps:
            lr = lr_at(step, cfg, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            trained.train()
            # Per step: CE sum, KD sum, the --pretrain-cache CE sum, then per domain CE sum and
            # positions (all ranks' after the one all-reduce).
            D = len(cache.domains)
            stats = torch.zeros(3 + 2 * D, dtype=torch.float64, device=device)
            # The step's batches first: the loss is normalised by the positions that carry loss
            # over every micro-batch and rank, known before any backward pass.
            batches = [loader.next() for _ in range(cfg.grad_accum)]
            pt_batches = [pretrain.loader.next() for _ in range(cfg.grad_accum)] if pretrain is not None else []
            count = torch.tensor([float(sum(int((b.labels() != IGNORE_INDEX).sum()) for b in group)) for group in (batches, pt_batches)],
                                 device=device)
            if world > 1:
                torch.distributed.all_reduce(count)
            # DDP and FSDP average gradients over ranks: scale by the world size for the global mean.
            tokens_per_step = max(count[0].item(), 1.0) / world
            pt_tokens_per_step = max(count[1].item(), 1.0) / world
            for micro, batch in enumerate(batches):
                x = batch.tokens.to(device, non_blocking=True)
                labels = batch.labels().to(device, non_blocking=True)
                targets = {}
                if teacher is not None:
                    targets["teacher_logits"] = teacher.logits(x)[:, :-1]
                elif cache.has_targets and kd.kind != "none":
                    targets = {"topk_ids": batch.topk_ids.to(device, non_blocking=True).long(),
                               "topk_logprobs": batch.topk_logprobs.to(device, non_blocking=True)}
                    if batch.tail_logprob is not None:
                        targets["tail_logprob"] = batch.tail_logprob.to(device, non_blocking=True)
                if minillm is not None:
                    targets["target_logprob"] = batch.target_logprob.to(device, non_blocking=True)
                    targets["old_logprob"] = (_token_logprobs(behaviour, x, labels, autocast) if behaviour is not None
                                              else batch.sample_logprob.to(device, non_blocking=True))
                last = micro == cfg.grad_accum - 1
                try:
                    with _grad_sync(trained, last and pretrain is None), autocast():
                        ce, kd_sum, ce_tok = trained(x, labels, **targets)
                    # minillm: its objective alone (the CE it returns is detached, for the log).
                    loss = (kd_sum if minillm is not None else ce + cfg.kd_weight * kd_sum) / tokens_per_step
                    loss.backward()
                    if pretrain is not None:
                        # A second forward/backward into the same gradients (the sum's gradient
                        # is the sum of the two); only the step's last backward synchronises.
                        pb = pt_batches[micro]
                        with _grad_sync(trained, last), autocast():
                            ce_pt, _, _ = trained(pb.tokens.to(device, non_blocking=True), pb.labels().to(device, non_blocking=True))
                        (cfg.pretrain_weight * ce_pt / pt_tokens_per_step).backward()
                        stats[2] += ce_pt.detach().double()
                except torch.OutOfMemoryError:
                    raise ConfigError(f"out of {device.type} memory at step {step + 1} with --batch-size {cfg.batch_size}: lower "
                                      "--batch-size (raise --grad-accum to keep the tokens per step), or use --gradient-checkpointing, "
                                      "--fsdp or a smaller --loss-chunk") from None
                stats[0] += ce.detach().double()
                stats[1] += kd_sum.detach().double()
                doms = torch.as_tensor(batch.domains, device=device)
                stats[3 : 3 + D].index_add_(0, doms, ce_tok.view(x.shape[0], -1).sum(1).double())
                stats[3 + D :].index_add_(0, doms, (labels != IGNORE_INDEX).sum(1).double())
            if world > 1:
                torch.distributed.all_reduce(stats)  # every rank logs and judges the global numbers
            positions = max(count[0].item(), 1.0)
            total = float(stats[1] if minillm is not None else stats[0] + cfg.kd_weight * stats[1]) / positions
            pretrain_ce = float(stats[2]) / max(count[1].item(), 1.0)
            total += cfg.pretrain_weight * pretrain_ce
            if not math.isfinite(total):  # the same global value on every rank: all stop together
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingError(f"loss became non-finite at step {step + 1}; stopped on every rank ({where}). Try a lower --lr or --temperature")
            per_domain = {d: float(stats[3 + i] / stats[3 + D + i]) for i, d in enumerate(cache.domains) if stats[3 + D + i] > 0}
            grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += cfg.batch_size * cache.seq_len * cfg.grad_accum * world
            losses.append(total)
            now = time.perf_counter()
            tps = cfg.batch_size * cache.seq_len * cfg.grad_accum * world / (now - t_last)
            t_last = now
            record = {"type": "step", "step": step, "loss": total, "ce": float(stats[0]) / positions, "kd": float(stats[1]) / positions,
                      "lr": lr, "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                      "tokens": tokens_seen, "tokens_per_s": tps, "ce_by_domain": per_domain}
            if pretrain is not None:
                record["pretrain_ce"] = pretrain_ce
            if device.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tps:,.0f}")
            if step % cfg.ddk_interval == 0 and step < total_steps:
                evaluate_and_mix()
            if step % cfg.save_every == 0 and step < total_steps:
                state = {"step": step, "tokens": tokens_seen, "mixer": ddk.mixer.state_dict(), "loader": loader.state_dict(),
                         "world_size": world, "config": asdict(cfg), "cache_identity": cache_identity(cache)}
                if pretrain is not None:
                    state["pretrain"] = pretrain.state_dict()
                last_good = checkpoint.save(run, step, trained, opt, state, cfg.keep_checkpoints, rank)
        bar.close()
    finally:
        loader.close()
        if pretrain is not None:
            pretrain.loader.close()
    try:
        final_ppl = evaluate_and_mix(update=False)  # logged with the weights in force; nothing reads a new mix now
    finally:
        if board is not None:
            board.close()
    checkpoint.export(trained, tok, run / FINAL, rank)
    return DistillResult(run / FINAL, step, losses, final_ppl)


def _tensorboard(run: Path, report_to: str) -> Any:
    if report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(run / "tensorboard"))


def _board_log(board: Any, record: dict) -> None:
    """A metrics record as TensorBoard scalars: train/loss, eval/ppl/<domain>, eval/weight/<domain>..."""
    step = record["step"]
    if record["type"] == "step":
        for key in ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s"):
            board.add_scalar(f"train/{key}", record[key], step)
        for d, v in record["ce_by_domain"].items():
            board.add_scalar(f"train/ce/{d}", v, step)
        if "pretrain_ce" in record:
            board.add_scalar("train/pretrain_ce", record["pretrain_ce"], step)
    else:
        for d in record["ppl_student"]:
            board.add_scalar(f"eval/ppl/{d}", record["ppl_student"][d], step)
            board.add_scalar(f"eval/weight/{d}", record["weights"][d], step)
    board.flush()


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    if step == 0:  # a fresh run: nothing earlier is kept
        path.write_text("")
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
