"""`ddk-cache distill`: train a student from a cache alone, with DDK domain mixing.

The command's config (`DistillConfig`: every option, validated once), the checks on its
--out, and `distill()`, the public entry: it takes the run's lock and hands over to the
training loop (trainer.Trainer: setup, step, evaluate-and-mix, save), whose objectives
(objectives.py) turn batches into losses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import CommandConfig, changed, option, validate
from ..errors import ConfigError
from ..runtime import Worker, resolve_worker
from ..store.objects import DiskFull, LocalObjects, is_disk_full
from .checkpoint import CKPT_DIR, LOCK_DIR
from .losses import DIVERGENCES, KINDS, TAILS, ULD_SUMMARY, KDConfig
from .minillm import MiniLLMConfig
from .mixing import check_alpha
from .trainer import (  # noqa: F401  (re-exported: the trainer's pieces were importable from here)
    FINAL, METRICS, DistillResult, Trainer, TrainingError, _optimizer, cache_identity, check_resume, load_student, lr_at,
)


@dataclass(frozen=True)
class DistillConfig(CommandConfig):
    """Everything `ddk-cache distill` takes; saved in every checkpoint and in RUN/config.json.
    Fields marked fingerprint=False may change when a run is resumed; the others may not."""

    cache: str = option("", "The cache to learn from (complete; see `ddk-cache inspect`).")
    out: str = option("", "Run directory: checkpoints/, metrics.jsonl, final/ (save_pretrained + tokenizer).", fingerprint=False)
    student: str = option("", "Student causal LM: local directory or hub id (pretrained, as in DDK).")
    student_config: str = option("", "Or a transformers config.json: start the student from random weights.")
    tokenizer: str = option("", "Tokenizer directory (default: --student). When it is not the cache's tokenizer, the student learns across tokenizers (--cross-tokenizer).")
    cross_tokenizer: str = option("auto", "A student whose tokenizer is not the cache's: each row's text is tokenized again with the student's tokenizer, positions are paired by bytes read, and the loss is hybrid (the --kd-loss divergence on teacher tokens whose bytes are one student token, their other mass in the tail bucket, plus ULD, arXiv 2402.12030, between the unmapped teacher entries and the student's unmatched ids) or uld (ULD on every paired position) or prefix (a target at every position: the teacher's candidates that fit the bytes the student has read, each for the student's first token of its remaining bytes, the --kd-loss divergence on them); auto: hybrid when the tokenizers differ, same-tokenizer KD otherwise. hybrid and prefix with the cache's own tokenizer equal plain KD (README, A student with another tokenizer).", choices=("auto", "hybrid", "uld", "prefix"))
    kd_loss: str = option("fkl", ", ".join(f"{d.name} ({d.summary})" for d in DIVERGENCES.values()) + f", uld ({ULD_SUMMARY}), none (CE only), minillm (MiniLLM's sequence-level reverse KL on the student's own samples: a cache built from `ddk-cache generate` output; README, MiniLLM).", choices=(*KINDS, "minillm"))
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
    loss_chunk: int = option(0, "Positions per chunk of the loss (and evaluation): peak loss memory ~ chunk x vocabulary x 16 bytes; 0 = by the vocabulary (1,024 up to 65,536 ids, 512 up to 131,072, 256 up to 262,144).", fingerprint=False)
    loss_impl: str = option("fused", "How the chunked loss gets its gradients: fused (the head's and the hidden states' gradients computed chunk by chunk in the forward pass: 3 head matmuls per chunk) or recompute (each chunk's logits recomputed in the backward pass: 4). Equal results; MiniLLM's second pass is fused too.",
                            choices=("fused", "recompute"), fingerprint=False)
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
            (self.eval_batch_size >= 1 and self.loss_chunk >= 0, "--eval-batch-size must be >= 1 and --loss-chunk >= 0"),
            (self.prefetch >= 1 and self.loader_workers >= 0, "--prefetch must be >= 1 and --loader-workers >= 0"),
            (not (self.online_teacher and self.kd_loss == "none"), "--online-teacher with --kd-loss none would run the teacher for nothing; drop one"),
            (self.bf16 in ("auto", "on", "off"), f"--bf16 must be auto, on or off, got {self.bf16!r}"),
            (self.pretrain_weight > 0, f"--pretrain-weight must be > 0, got {self.pretrain_weight}"),
            (not self.pretrain_cache or self.pretrain_cache != self.cache, "--pretrain-cache is the --cache itself; give a second cache (pre-training text)"),
            (self.cross_tokenizer == "auto" or self.kd_loss not in ("minillm",) and not self.online_teacher and not self.pretrain_cache,
             f"--cross-tokenizer {self.cross_tokenizer} trains from the cache's targets: not with --kd-loss minillm, --online-teacher or --pretrain-cache"),
            (self.cross_tokenizer != "uld" or self.kd_loss in ("fkl", "uld"), f"--cross-tokenizer uld is its own loss; drop --kd-loss {self.kd_loss}"),
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

    def kd(self, unmatched: Any = None) -> KDConfig:
        """The KD term's settings; `unmatched` (the student ids no teacher token maps to) makes it
        the cross-tokenizer hybrid, --cross-tokenizer uld makes it ULD."""
        kind = "rkl" if self.kd_loss == "minillm" else self.kd_loss  # minillm's single-step term is the token-level RKL
        if self.cross_tokenizer == "uld" and kind != "none":
            kind, unmatched = "uld", None
        if self.cross_tokenizer == "prefix":  # every teacher entry has a student id or is in the tail: no unmatched term
            unmatched = None
        return KDConfig(kind, self.temperature, self.tail, self.skew_alpha, self.jsd_beta, self.akl_mu, self.t2_scale,
                        None if kind == "none" else unmatched)

    def minillm(self) -> MiniLLMConfig | None:
        if self.kd_loss != "minillm":
            return None
        return MiniLLMConfig(self.minillm_clip, not self.minillm_no_length_norm, not self.minillm_no_single_step, self.minillm_variant)


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
            return Trainer(cfg, worker, run, progress).run()
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)) or not is_disk_full(e):
                raise
            raise DiskFull(f"no space left on the device holding {run}; the last complete checkpoint is kept: free space (or copy "
                           "the run directory elsewhere), then run the same command with --resume") from None


RUN_ENTRIES = {CKPT_DIR, LOCK_DIR, METRICS, "config.json", FINAL, "tensorboard", "weights.png", "ppl.png", "loss.png", "bits_per_byte.png", "report.md"}


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


