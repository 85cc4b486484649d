"""The training loop of `ddk-cache distill`, readable top to bottom: setup, one step,
evaluate-and-mix, save, in one small class (`Trainer`), and the setup helpers it uses.

Per step, over every rank and micro-batch:

    loss = objective.loss(CE sum, KD sum) / positions with a label
           (+ pretrain_weight * mean CE on a batch of --pretrain-cache, when given)

where the objective (objectives.py) says what a batch contributes: CE + kd_weight * D on the
cached targets, on a resident teacher's full distribution (`--online-teacher`), CE only, or
MiniLLM's objective on the student's own samples. The loss is computed inside the student's
forward, in chunks of positions (student.py, losses.chunked_loss), so no [tokens,
vocabulary] tensor is materialised. Every `ddk_interval` steps the student is evaluated per
domain on the cache's validation split, and the mixer moves the sampling weights toward the
domains where student/teacher perplexity is worst (DDK, arXiv 2407.16154).

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
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..capture.tokenization import check_model_path, load_tokenizer, tokenizer_fingerprint
from ..config import changed, free_fields
from ..errors import ConfigError, DDKCacheError, TeacherError
from ..runtime import Worker, init_distributed, load_causal_lm, model_context, resolve_device
from ..store.cache import Cache
from . import checkpoint
from .checkpoint import CKPT_DIR, latest_checkpoint
from .data import CacheLoader
from .ddk import DDKController
from .evaluate import evaluate_domains, evaluate_scores, evaluate_text
from ..tokenbytes import lengths_or_none
from .losses import IGNORE_INDEX, auto_chunk
from .objectives import Objective, StepStats, make_objective
from .student import StudentLoss, parallelize

if TYPE_CHECKING:
    from .distill import DistillConfig

METRICS = "metrics.jsonl"
FINAL = "final"


class TrainingError(DDKCacheError):
    """Training cannot go on (non-finite loss); the message names the last good checkpoint."""


@dataclass
class DistillResult:
    """Where the final model is, how many steps were done, this run's losses and final per-domain PPL."""

    out: Path
    steps: int
    losses: list[float]  # total loss per optimizer step (this run's steps only)
    final_ppl: dict[str, float]


# ----------------------------------------------------------------------------- setup helpers


def load_student(cfg: DistillConfig, cache: Cache) -> tuple[Any, Any]:
    """The student model (float32) and its tokenizer, after checking both fit the cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = load_tokenizer(cfg.tokenizer or cfg.student)
    other = cross_tokenizer(cfg, cache, tok)
    check_model_path(cfg.student or cfg.student_config, ConfigError)
    try:
        if cfg.student:
            model = load_causal_lm(cfg.student, dtype=torch.float32)
        else:
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.student_config))
    except Exception as e:
        raise ConfigError(f"cannot load the student from {cfg.student or cfg.student_config!r}: {str(e).splitlines()[0]}") from None
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tok):
        raise ConfigError(f"the student's vocabulary ({rows} rows) is smaller than the tokenizer ({len(tok)} tokens)")
    context = model_context(model)
    if context is not None and context < cache.seq_len and not other:  # another tokenizer's rows are cut at the context
        # GPT-2 would index past its position table; a Llama would train silently on positions
        # its RoPE scaling was never set up for.
        raise ConfigError(f"the student's context is {context} positions, the cache's rows are {cache.seq_len} tokens; "
                          "use a student with max_position_embeddings (n_positions) >= the cache's --seq-len")
    return model, tok


def cross_tokenizer(cfg: DistillConfig, cache: Cache, tok: Any) -> bool:
    """Whether this run trains across tokenizers (crosstok.py): the student's tokenizer is not
    the cache's, or --cross-tokenizer is given. Refuses what cannot work that way."""
    theirs = cache.meta.tokenizer["fingerprint"]
    ours = tokenizer_fingerprint(tok)
    if ours == theirs and cfg.cross_tokenizer == "auto":
        return False
    where = f"the student's tokenizer ({cfg.tokenizer or cfg.student}, {ours[:19]}) is not the cache's ({theirs[:19]})"
    if cfg.kd_loss == "minillm" or cfg.online_teacher or cfg.pretrain_cache:
        raise ConfigError(f"{where}: --kd-loss minillm, --online-teacher and --pretrain-cache need a student of the cache's tokenizer")
    if cache.has_targets and cache.targets.kind == "sampled" and cfg.kd_loss != "none":
        raise ConfigError(f"{where}: a cache of sampled targets cannot be carried to another tokenizer (its ids are draws, not the "
                          "teacher's top-k); build a top-k cache, or use --kd-loss none")
    if lengths_or_none(tok) is None:
        raise ConfigError(f"{where}, and tokens of this tokenizer cannot be read as bytes (tokenbytes.py: byte-level BPE and "
                          "SentencePiece are); use a student of the cache's tokenizer")
    return True


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
    capture = cache.meta.corpus.get("capture") or {}  # an imported capture: what it lacks (importer.py)
    if capture.get("renormalised") and not cfg.online_teacher and cfg.kd_loss not in ("fkl", "none"):
        raise ConfigError(
            f"--kd-loss {cfg.kd_loss} on {cfg.cache}: it was imported from {cache.meta.corpus.get('format')} rows renormalised "
            "over the kept ids, so the teacher's mass outside them is unknown and this loss would read it as 0; use "
            "--kd-loss fkl (forward KL over the kept ids, what that tool trains with) or rebuild with `ddk-cache build`")
    if capture.get("target_logprob", "exact") != "exact" and cfg.mixing.startswith("ddk"):
        share = capture.get("target_in_topk")
        raise ConfigError(
            f"--mixing {cfg.mixing} on {cfg.cache}: it was imported from a {cache.meta.corpus.get('format')} capture that has "
            "the next token's log-prob only where it is among the kept ids"
            + (f" ({share:.0%} of positions)" if share is not None else "")
            + ", so its teacher PPL table is a lower bound and DDK's domain weights would follow that bias; use --mixing "
            "natural, uniform or static:..., or build the cache with `ddk-cache build`")
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


def _loss_chunk(cfg: DistillConfig, cache: Cache) -> int:
    """Positions per loss chunk: --loss-chunk, or by the cache's vocabulary (losses.auto_chunk)."""
    return cfg.loss_chunk or auto_chunk(int(cache.meta.vocab_size))


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
    need = 4 * (tokens * per_token + 4 * params) + 16 * min(_loss_chunk(cfg, cache), tokens) * int(cache.meta.vocab_size)
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


class _Pretrain:
    """MiniLLM's pre-training LM term (arXiv 2306.08543): batches of a second cache, mixed
    over its domains by their own DDKController, whose CE is added to every step."""

    def __init__(self, cfg: DistillConfig, cache: Cache, rank: int, world: int) -> None:
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
        self.loader = CacheLoader(self.cache, batch_size=cfg.batch_size, weights=self.ddk.weights, seed=cfg.seed + 1, rank=rank,
                                  world_size=world, prefetch=cfg.prefetch, targets=False)
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
                          f"Only these may change on resume: {', '.join(free_fields(type(cfg)))}; "
                          "for anything else start a new --out")




# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One distill run on this rank: `Trainer(cfg, worker, run).run()`. Setup in __init__
    (cache, checks, student, objective, parallelism, optimizer, loader, mixer; a resume's
    checkpoint), then `run` calls `step` until done, `evaluate_and_mix` every `ddk_interval`
    steps and `save` every `save_every`, and exports the final model."""

    def __init__(self, cfg: DistillConfig, worker: Worker, run: Path, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.progress = cfg, run, progress
        self.rank, self.world = worker.rank, worker.world_size
        self.device = device = resolve_device(cfg.device, worker)
        init_distributed(worker, device)
        self.cache = cache = Cache(cfg.cache)  # refuses incomplete caches and unknown versions
        _check_targets(cfg, cache)
        self.ckpt = self._resume_point()
        try:
            self.ddk = DDKController(cache, mixing=cfg.mixing, alpha=cfg.ddk_alpha)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model, self.tok = load_student(cfg, cache)
        self.byte_lengths = lengths_or_none(self.tok)  # per token id, for bits per byte (None: a tokenizer tokenbytes cannot read)
        # A student of another tokenizer (crosstok.py): batches in its tokens, evaluation and DDK in bits per byte.
        self.crosstok = None
        if cross_tokenizer(cfg, cache, self.tok):
            from ..capture.tokenization import cache_tokenizer
            from .crosstok import CrossTokenizer

            self.crosstok = CrossTokenizer(cache_tokenizer(cache), self.tok, model.get_output_embeddings().weight.shape[0],
                                           max_len=model_context(model), mode="prefix" if cfg.cross_tokenizer == "prefix" else "paired")
            try:
                self.ddk.per_byte()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.xtok_counts = {"rows": 0, "unusable": 0, "cut": 0, "positions": 0, "paired": 0, "mapped_mass": 0.0}
        use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
        teacher = load_online_teacher(cfg, cache, device, use_bf16) if cfg.online_teacher else None
        student_rows = model.get_output_embeddings().weight.shape[0]
        if teacher is not None and teacher.vocab_size != student_rows:
            raise ConfigError(f"--online-teacher: its output has {teacher.vocab_size} rows, the student's "
                              f"{student_rows}; dense KD needs one vocabulary")
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        _check_memory(cfg, cache, model, device, self.world)
        minillm = cfg.minillm()
        # MiniLLM's importance weights need the log-prob of each sampled token under the policy
        # that drew it: stored in the cache by `ddk-cache generate` (q_old, or the teacher-mixed
        # p~ = a p + (1 - a) q_old). Samples without them: q_old is the student this round starts
        # from (--student), kept as a frozen copy (also on --resume: loaded before the checkpoint),
        # which costs a copy of the weights and a forward pass per step.
        behaviour = None
        if minillm is not None and not any(cache.is_sampled(d) for d in cache.domains):
            behaviour = _frozen_copy(model, device)
        kd = cfg.kd(None if self.crosstok is None else torch.from_numpy(self.crosstok.unmatched).to(device))  # on the device once
        module = StudentLoss(model, kd, chunk=_loss_chunk(cfg, cache), minillm=minillm, fused=cfg.loss_impl == "fused",
                             kd_weight=cfg.kd_weight).to(device)
        self.trained = parallelize(module, "fsdp" if cfg.fsdp else "ddp", device, self.world, use_bf16)
        self.opt = _optimizer(self.trained, cfg)
        # FSDP2 computes in bf16 through its policy; DDP and one process use autocast on GPU.
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 and not cfg.fsdp else nullcontext
        self.objective: Objective = make_objective(cfg.kd_loss, cfg.kd_weight, has_targets=cache.has_targets, teacher=teacher,
                                                   behaviour=behaviour, autocast=self.autocast)
        self.tokens_per_batch = cfg.batch_size * cache.seq_len * cfg.grad_accum * self.world
        self.total_steps = math.ceil(cfg.max_tokens / self.tokens_per_batch) if cfg.max_tokens else cfg.max_steps
        self.teacher_ppl = {d: cache.teacher_ppl(d) if cache.meta.teacher_ppl else float("nan") for d in cache.domains}
        self.step_no, self.tokens_seen = 0, 0
        self.board = None
        self.loader = CacheLoader(cache, batch_size=cfg.batch_size, weights=self.ddk.weights, seed=cfg.seed, rank=self.rank,
                                  world_size=self.world, prefetch=cfg.prefetch, targets=teacher is None, workers=cfg.loader_workers,
                                  sample_logprobs=self.objective.sample_logprobs and minillm is not None, crosstok=self.crosstok)
        self.ddk.samplers.append(self.loader)
        self.pretrain: _Pretrain | None = None

    def _resume_point(self) -> Path | None:
        """The checkpoint to continue from (None: a fresh run), after the checks a resume needs."""
        cfg, run, rank, world = self.cfg, self.run_dir, self.rank, self.world
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
            check_resume(checkpoint.read_state(ckpt), cfg, self.cache, run, world)
        return ckpt

    # ------------------------------------------------------------------ the run
    def run(self) -> DistillResult:
        cfg = self.cfg
        losses: list[float] = []
        try:
            self.pretrain = _Pretrain(cfg, self.cache, self.rank, self.world) if cfg.pretrain_cache else None
            if self.ckpt is not None:
                self._load(self.ckpt)
            if self.rank == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
                _trim_metrics(self.run_dir / METRICS, self.step_no)
            self.board = _tensorboard(self.run_dir, cfg.report_to) if self.rank == 0 else None
            if self.step_no == 0:
                self.evaluate_and_mix()  # DDK: the first factor comes from the untrained student
            bar = tqdm(total=self.total_steps, initial=self.step_no, desc="distill", unit=" step", disable=not self.progress or self.rank != 0)
            self.last_good = self.ckpt
            self.t_last = time.perf_counter()
            while self.step_no < self.total_steps:
                total, tps = self.step()
                losses.append(total)
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tps:,.0f}")
                if self.step_no % cfg.ddk_interval == 0 and self.step_no < self.total_steps:
                    self.evaluate_and_mix()
                if self.step_no % cfg.save_every == 0 and self.step_no < self.total_steps:
                    self.last_good = self.save()
            bar.close()
        finally:
            self.loader.close()
            if self.pretrain is not None:
                self.pretrain.loader.close()
        try:
            final_ppl = self.evaluate_and_mix(update=False)  # logged with the weights in force; nothing reads a new mix now
        finally:
            if self.board is not None:
                self.board.close()
        checkpoint.export(self.trained, self.tok, self.run_dir / FINAL, self.rank)
        return DistillResult(self.run_dir / FINAL, self.step_no, losses, final_ppl)

    def step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches on every rank: (the global loss, tokens/s)."""
        cfg, device, world, pretrain, objective = self.cfg, self.device, self.world, self.pretrain, self.objective
        lr = lr_at(self.step_no, cfg, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.trained.train()
        stats = StepStats(len(self.cache.domains), device)
        # The step's batches first: the loss is normalised by the positions that carry loss
        # over every micro-batch and rank, known before any backward pass.
        batches = [self.loader.next() for _ in range(cfg.grad_accum)]
        pt_batches = [pretrain.loader.next() for _ in range(cfg.grad_accum)] if pretrain is not None else []
        # Positions with a label (main, pre-training), and rows read and unusable (another
        # tokenizer): one all-reduce, so every rank judges the same global numbers.
        rows = [float(sum(b.crosstok[k] for b in batches)) if self.crosstok is not None else 0.0 for k in ("rows", "unusable")]
        count = torch.tensor([float(sum(int((b.labels() != IGNORE_INDEX).sum()) for b in group)) for group in (batches, pt_batches)] + rows,
                             device=device)
        if world > 1:
            torch.distributed.all_reduce(count)
        if self.crosstok is not None:
            self._count_crosstok(batches, int(count[2]), int(count[3]))
        # DDP and FSDP average gradients over ranks: scale by the world size for the global mean.
        tokens_per_step = max(count[0].item(), 1.0) / world
        pt_tokens_per_step = max(count[1].item(), 1.0) / world
        for micro, batch in enumerate(batches):
            x = batch.tokens.to(device, non_blocking=True)
            labels = batch.labels().to(device, non_blocking=True)
            targets = objective.targets(batch, x, labels)
            last = micro == cfg.grad_accum - 1
            try:
                with _grad_sync(self.trained, last and pretrain is None), self.autocast():
                    ce, kd_sum, ce_tok = self.trained(x, labels, **targets)
                (objective.loss(ce, kd_sum) / tokens_per_step).backward()
                if pretrain is not None:
                    # A second forward/backward into the same gradients (the sum's gradient
                    # is the sum of the two); only the step's last backward synchronises.
                    pb = pt_batches[micro]
                    with _grad_sync(self.trained, last), self.autocast():
                        ce_pt, _, _ = self.trained(pb.tokens.to(device, non_blocking=True), pb.labels().to(device, non_blocking=True))
                    (cfg.pretrain_weight * ce_pt / pt_tokens_per_step).backward()
                    stats.add_pretrain(ce_pt)
            except torch.OutOfMemoryError:
                raise ConfigError(f"out of {device.type} memory at step {self.step_no + 1} with --batch-size {cfg.batch_size}: lower "
                                  "--batch-size (raise --grad-accum to keep the tokens per step), or use --gradient-checkpointing, "
                                  "--fsdp or a smaller --loss-chunk") from None
            stats.add(ce, kd_sum, torch.as_tensor(batch.domains, device=device), ce_tok, labels, x.shape[0])
        stats.all_reduce(world)
        positions = max(count[0].item(), 1.0)
        total = float(objective.loss(stats.ce, stats.kd)) / positions
        pretrain_ce = float(stats.pretrain_ce) / max(count[1].item(), 1.0)
        total += cfg.pretrain_weight * pretrain_ce
        if not math.isfinite(total):  # the same global value on every rank: all stop together
            where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
            raise TrainingError(f"loss became non-finite at step {self.step_no + 1}; stopped on every rank ({where}). Try a lower --lr or --temperature")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        self.tokens_seen += self.tokens_per_batch
        now = time.perf_counter()
        tps = self.tokens_per_batch / (now - self.t_last)
        self.t_last = now
        record = {"type": "step", "step": self.step_no, "loss": total, "ce": float(stats.ce) / positions, "kd": float(stats.kd) / positions,
                  "lr": lr, "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                  "tokens": self.tokens_seen, "tokens_per_s": tps, "ce_by_domain": stats.ce_by_domain(self.cache.domains)}
        if pretrain is not None:
            record["pretrain_ce"] = pretrain_ce
        if self.crosstok is not None:  # this rank's counts so far
            c = self.xtok_counts
            record["crosstok"] = {"paired": c["paired"] / max(1, c["positions"]), "mapped_mass": c["mapped_mass"] / max(1, c["paired"]),
                                  "unusable_rows": c["unusable"], "cut_rows": c["cut"], "rows": c["rows"]}
            if "targeted" in c:  # prefix: positions with a teacher target, paired or not
                record["crosstok"]["targeted"] = c["targeted"] / max(1, c["positions"])
        if device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.log(record)
        return total, tps

    MAX_UNUSABLE = 0.01  # share of rows whose text another tokenizer does not give back, above which a run stops

    def _count_crosstok(self, batches: list[Any], rows: int, unusable: int) -> None:
        """Add this rank's conversion counts (logged) and the step's global rows and unusable
        rows (all ranks); stop, on every rank alike, when too many rows do not tokenize back."""
        c = self.xtok_counts
        for b in batches:
            for k, v in b.crosstok.items():
                c[k] = c.get(k, 0) + v
        c["all_rows"], c["all_unusable"] = c.get("all_rows", 0) + rows, c.get("all_unusable", 0) + unusable
        if c["all_rows"] >= 100 and c["all_unusable"] > self.MAX_UNUSABLE * c["all_rows"]:
            raise DDKCacheError(f"{c['all_unusable']} of the {c['all_rows']} rows read so far do not tokenize back to their own text with the "
                                f"student's tokenizer ({self.cfg.tokenizer or self.cfg.student}: a normaliser, added spaces or unknown "
                                f"bytes); they train on nothing, and above {self.MAX_UNUSABLE:.0%} the run stops. Use a student tokenizer "
                                "without normalisers (byte-level BPE), or one of the cache's")

    def evaluate_and_mix(self, update: bool = True) -> dict[str, float]:
        """Per-domain validation perplexity (all ranks), the mixer's new weights (`update`), logged.
        A student of another tokenizer is scored on the same text in its own tokens, and DDK
        compares it with the teacher per byte (2 ** bits per byte on both sides)."""
        cfg, cache = self.cfg, self.cache
        t0 = time.perf_counter()
        if self.crosstok is None:
            scores = evaluate_scores(self.trained, cache, batch_size=cfg.eval_batch_size, device=self.device, autocast=self.autocast,
                                     rank=self.rank, world_size=self.world, loss=True, byte_lengths=self.byte_lengths)
        else:
            scores = evaluate_text(self.trained, self.tok, cache, batch_size=cfg.eval_batch_size, device=self.device,
                                   autocast=self.autocast, rank=self.rank, world_size=self.world, loss=True,
                                   context=self.crosstok.max_len, max_unusable=self.MAX_UNUSABLE, row_text=self.crosstok.rt)
        ppl = {d: s["ppl"] for d, s in scores.items()}
        seconds = time.perf_counter() - t0
        judged = ppl if self.crosstok is None else {d: 2.0 ** s["bits_per_byte"] for d, s in scores.items()}
        weights = self.ddk.update(judged) if update else self.ddk.weights
        record = {"type": "eval", "step": self.step_no, "ppl_student": ppl, "ppl_teacher": self.teacher_ppl,
                  # Bits per UTF-8 byte (tokenbytes.py): comparable across tokenizers, unlike PPL.
                  "bpb_student": {d: s["bits_per_byte"] for d, s in scores.items()},
                  "bpb_teacher": {d: cache.meta.ppl(d).bits_per_byte if cache.meta.teacher_ppl else None for d in cache.domains},
                  "weights": dict(zip(cache.domains, weights.tolist())), "eval_seconds": seconds,
                  # ppl_student is per the student's own token; DDK judged it per byte when the tokenizers differ
                  "ddk_unit": "token" if self.crosstok is None else "byte",
                  "eval_tokens": sum(cache.num_sequences(d, "val") for d in cache.domains) * cache.seq_len}
        if self.pretrain is not None:  # what the term guards: the student's LM on pre-training text
            pt = self.pretrain.cache
            pt_ppl = evaluate_domains(self.trained, pt, batch_size=cfg.eval_batch_size, device=self.device, autocast=self.autocast,
                                      rank=self.rank, world_size=self.world, loss=True)
            pt_weights = self.pretrain.ddk.update(pt_ppl) if update else self.pretrain.ddk.weights
            record.update(pretrain_ppl_student=pt_ppl, pretrain_weights=dict(zip(pt.domains, pt_weights.tolist())),
                          eval_seconds=time.perf_counter() - t0)
        self.log(record)
        return ppl

    def save(self) -> Path:
        """A checkpoint of this step: weights, optimizer, sampler and mixer states, config."""
        state = {"step": self.step_no, "tokens": self.tokens_seen, "mixer": self.ddk.mixer.state_dict(), "loader": self.loader.state_dict(),
                 "world_size": self.world, "config": asdict(self.cfg), "cache_identity": cache_identity(self.cache)}
        if self.pretrain is not None:
            state["pretrain"] = self.pretrain.state_dict()
        return checkpoint.save(self.run_dir, self.step_no, self.trained, self.opt, state, self.cfg.keep_checkpoints, self.rank)

    def _load(self, ckpt: Path) -> None:
        state = checkpoint.load(ckpt, self.trained, self.opt, self.rank)
        self.ddk.mixer.load_state_dict(state["mixer"])
        self.loader.load_state_dict(state["loader"])
        if self.pretrain is not None:
            self.pretrain.load_state_dict(state["pretrain"])
        self.step_no, self.tokens_seen = state["step"], state["tokens"]

    def log(self, record: dict) -> None:
        """One metrics line (rank 0), and to TensorBoard when asked."""
        if self.rank == 0:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.board is not None:
                _board_log(self.board, record)


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
