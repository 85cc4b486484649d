"""`ddk-cache minillm`: MiniLLM's on-policy training (arXiv 2306.08543) in rounds, with the
teacher never resident next to the student.

Round r (0-based) in OUT/round-r/:
    1. samples/chat.jsonl  the current student's responses to the prompts (`generate`,
                           seed + r: fresh samples each round), with their log-probs; with
                           --mix-alpha a > 0 drawn from a·p + (1 - a)·q (MiniLLM's
                           teacher-mixed sampling: the teacher is loaded while sampling)
    2. cache.zarr          the teacher's top-k at every response position and the log p of
                           each sampled token (`build`, plain encoding: exact values)
    3. run/                `distill --kd-loss minillm` from the round's student for
                           --steps-per-round steps (with --pretrain-cache: plus the paper's
                           LM term on pre-training text); run/final is the next round's student
Every stage resumes itself (a killed run continues: generate keeps its written lines, build
its shards, distill its checkpoints), and a round whose run/final exists is skipped, so the
same command continues a stopped run at the stage it was in. The importance weights of a
round's steps are q_θ/r with r the distribution the samples were drawn from, as `generate`
recorded it (ddk_cache.train.minillm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .capture.build import BuildConfig, build
from .capture.generate import GenerateConfig, generate
from .config import CommandConfig, inherit, option, validate
from .errors import ConfigError
from .train.distill import DistillConfig, distill


@dataclass(frozen=True)
class RoundsConfig(CommandConfig):
    """Everything `ddk-cache minillm` takes. Options it hands to generate, build or distill
    are declared by those commands (`inherit`) and passed on by name (`_GENERATE`, `_BUILD`,
    `_DISTILL`)."""

    student: str = option("", "The starting student (a transformers directory of the teacher's tokenizer family).")
    teacher: str = option("", "The teacher that scores each round's samples (transformers directory).")
    prompts: str = option("", "JSONL of prompts ({'prompt': ...} or {'messages': [...]}), as `generate` reads.")
    out: str = option("", "Work directory: round-0/, round-1/, ...; the last round's run/final is the result.")
    rounds: int = option(3, "Rounds of generate -> build -> distill.")
    steps_per_round: int = option(100, "Optimizer steps per round.")
    max_prompts: int = inherit(GenerateConfig, "max_prompts", help="Prompts sampled per round, at most (0: all).")
    max_new_tokens: int = inherit(GenerateConfig, "max_new_tokens")
    seq_len: int = inherit(BuildConfig, "seq_len", 256, help="Cache sequence length (prompt + response; longer samples are cut).")
    top_k: int = inherit(BuildConfig, "top_k", help="Teacher entries kept per response position.")
    batch_size: int = inherit(DistillConfig, "batch_size", help="Sequences per step.")
    lr: float = inherit(DistillConfig, "lr", 5e-5, help="Learning rate (constant after --warmup-steps in each round's cosine schedule).")
    warmup_steps: int = inherit(DistillConfig, "warmup_steps", 10, help="Warm-up steps per round.")
    clip: float = inherit(DistillConfig, "minillm_clip", flag="--clip")
    no_length_norm: bool = inherit(DistillConfig, "minillm_no_length_norm", flag="--no-length-norm")
    no_single_step: bool = inherit(DistillConfig, "minillm_no_single_step", flag="--no-single-step")
    pretrain_cache: str = inherit(DistillConfig, "pretrain_cache")
    pretrain_weight: float = inherit(DistillConfig, "pretrain_weight")
    pretrain_mixing: str = inherit(DistillConfig, "pretrain_mixing")
    mix_alpha: float = option(0.0, "Teacher-mixed sampling: draw from a*p + (1-a)*q with a = this (MiniLLM: 0.2); 0: the student samples alone.")
    engine: str = option("auto", "Sampling and scoring engine: auto (vLLM when installed), vllm or hf (transformers). Teacher-mixed sampling always uses transformers.",
                         choices=("auto", "vllm", "hf"))
    chat_template: str = inherit(GenerateConfig, "chat_template")
    engine_args: dict = inherit(BuildConfig, "engine_args", help="vLLM: any other engine argument for both engines (sampling and scoring), "
                                                                 "repeatable (e.g. --engine-arg enforce_eager=true).")
    seed: int = option(0, "Seed of round 0's samples (round r: seed + r) and of training.")
    device: str = option("auto", "torch device for sampling and training (the teacher uses it too).")

    def __post_init__(self) -> None:
        validate([
            (self.rounds >= 1 and self.steps_per_round >= 1, "--rounds and --steps-per-round must be >= 1"),
            (self.top_k >= 1, "--top-k must be >= 1 (the single-step term needs teacher targets)"),
            (0 <= self.mix_alpha <= 1, f"--mix-alpha must be in [0, 1], got {self.mix_alpha}"),
        ])


# What each stage takes from the rounds' options: its field <- ours.
_GENERATE = {"max_prompts": "max_prompts", "max_new_tokens": "max_new_tokens", "chat_template": "chat_template", "device": "device"}
_BUILD = {"top_k": "top_k", "seq_len": "seq_len", "chat_template": "chat_template", "device": "device", "seed": "seed", "backend": "engine",
          "engine_args": "engine_args"}
_DISTILL = {"batch_size": "batch_size", "eval_batch_size": "batch_size", "lr": "lr", "warmup_steps": "warmup_steps", "minillm_clip": "clip",
            "minillm_no_length_norm": "no_length_norm", "minillm_no_single_step": "no_single_step", "pretrain_cache": "pretrain_cache",
            "pretrain_weight": "pretrain_weight", "pretrain_mixing": "pretrain_mixing", "seed": "seed", "device": "device"}


def _taken(cfg: RoundsConfig, mapping: dict[str, str]) -> dict[str, object]:
    return {theirs: getattr(cfg, ours) for theirs, ours in mapping.items()}


def run_rounds(cfg: RoundsConfig, *, progress: bool = True, say: Callable[[str], None] = print) -> Path:
    """Run (or continue) the rounds; returns the final student's directory."""
    if not (cfg.student and cfg.teacher and cfg.prompts and cfg.out):
        raise ConfigError("minillm needs --student, --teacher, --prompts and --out")
    out = Path(cfg.out)
    student = cfg.student
    if cfg.mix_alpha:
        say(f"teacher-mixed sampling: on (each token from {cfg.mix_alpha:g}*teacher + {1 - cfg.mix_alpha:g}*student; the teacher is "
            "loaded next to the student while sampling)")
    else:
        say("teacher-mixed sampling: off (the student samples alone; --mix-alpha 0.2 turns it on)")
    for r in range(cfg.rounds):
        here = out / f"round-{r}"
        final = here / "run" / "final"
        if final.exists():
            say(f"round {r}: done ({final})")
            student = str(final)
            continue
        say(f"round {r}: sampling from {student}")
        generate(GenerateConfig(model=student, prompts=cfg.prompts, out=str(here / "samples" / "chat.jsonl"), seed=cfg.seed + r,
                                engine="hf" if cfg.mix_alpha else cfg.engine, **_taken(cfg, _GENERATE),
                                # Teacher-mixed sampling runs on transformers: the engine arguments are the scoring engine's only.
                                **({"mix_teacher": cfg.teacher, "mix_alpha": cfg.mix_alpha} if cfg.mix_alpha else {"engine_args": cfg.engine_args})))
        say(f"round {r}: scoring the samples with {cfg.teacher}")
        build(BuildConfig(teacher=cfg.teacher, data=str(here / "samples"), out=str(here / "cache.zarr"), encoding="plain",
                          val_tokens=8 * cfg.seq_len, **_taken(cfg, _BUILD)), progress=progress)
        say(f"round {r}: {cfg.steps_per_round} MiniLLM steps")
        distill(DistillConfig(cache=str(here / "cache.zarr"), student=student, out=str(here / "run"), kd_loss="minillm",
                              mixing="uniform", max_steps=cfg.steps_per_round, ddk_interval=cfg.steps_per_round,
                              save_every=max(1, cfg.steps_per_round // 2), resume=True, **_taken(cfg, _DISTILL)), progress=progress)
        student = str(final)
    return Path(student)


__all__ = ["RoundsConfig", "run_rounds"]
