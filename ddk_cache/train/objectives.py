"""Training objectives: how a batch becomes the loss of one micro-step.

Each way of training the student is one object with one small interface: `targets(batch,
x, labels)` says what it needs from a batch (the keyword arguments of the student's
forward, student.StudentLoss), and `loss(ce, kd)` combines the two sums that forward
returns into what is minimised (before normalising by the step's positions). The loop
(trainer.py) calls these and never asks which objective it runs. A new objective (next:
cross-tokenizer KD) is one class here and one line in `make_objective`.

  CrossEntropy   CE only (`--kd-loss none`): continued pre-training, the CPT baseline
  CacheKD        CE + gamma * D(teacher || student) on the cache's top-k or sampled targets
  OnlineKD       the same with a resident teacher's full distribution (`--online-teacher`)
  MiniLLM        MiniLLM's objective on the student's own samples (`--kd-loss minillm`)

The per-step statistics are one named structure (`StepStats`), all-reduced once.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

from .losses import IGNORE_INDEX


class Objective:
    """See the module docstring."""

    name: str = ""
    cache_targets = False  # the loader reads the cache's teacher targets
    sample_logprobs = False  # ... and the recorded sampling log-probs (MiniLLM)

    def __init__(self, kd_weight: float = 0.0) -> None:
        self.kd_weight = kd_weight

    def targets(self, batch: Any, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student forward's keyword arguments for this batch (on x's device)."""
        return {}

    def loss(self, ce: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
        """What is minimised, from the CE and KD sums the student's forward returns."""
        return ce + self.kd_weight * kd


class CrossEntropy(Objective):
    name = "ce"

    def loss(self, ce: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
        return ce + self.kd_weight * kd  # kd is 0: the student's loss ran with KDConfig("none")


class CacheKD(Objective):
    name = "cache-kd"
    cache_targets = True

    def targets(self, batch: Any, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        device = x.device
        out = {"topk_ids": batch.topk_ids.to(device, non_blocking=True).long(),
               "topk_logprobs": batch.topk_logprobs.to(device, non_blocking=True)}
        if batch.tail_logprob is not None:
            out["tail_logprob"] = batch.tail_logprob.to(device, non_blocking=True)
        return out


class OnlineKD(Objective):
    name = "online-kd"

    def __init__(self, kd_weight: float, teacher: Any) -> None:
        super().__init__(kd_weight)
        self.teacher = teacher

    def targets(self, batch: Any, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"teacher_logits": self.teacher.logits(x)[:, :-1]}


class MiniLLM(CacheKD):
    """The student forward computes MiniLLM's objective (student.StudentLoss with a
    MiniLLMConfig); it needs the teacher's log-prob of each sampled token and the log-prob
    the sampling distribution gave it: recorded in the cache, or, for samples without
    them, from a frozen copy of the starting student (`behaviour`)."""

    name = "minillm"

    def __init__(self, behaviour: torch.nn.Module | None = None, autocast: Callable[[], Any] = nullcontext) -> None:
        super().__init__(0.0)
        self.behaviour, self.autocast = behaviour, autocast
        self.sample_logprobs = behaviour is None

    def targets(self, batch: Any, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().targets(batch, x, labels)
        out["target_logprob"] = batch.target_logprob.to(x.device, non_blocking=True)
        out["old_logprob"] = (token_logprobs(self.behaviour, x, labels, self.autocast) if self.behaviour is not None
                              else batch.sample_logprob.to(x.device, non_blocking=True))
        return out

    def loss(self, ce: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
        return kd  # its objective alone: the CE the forward returns is detached, for the log


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, autocast: Any) -> torch.Tensor:
    """log model(labels[t] | x[:t+1]) per predicted position [B, L-1] (0 where ignored)."""
    with autocast():
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
    y = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
    return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def make_objective(kd_loss: str, kd_weight: float, *, has_targets: bool, teacher: Any = None, behaviour: Any = None,
                   autocast: Callable[[], Any] = nullcontext) -> Objective:
    """The objective `distill` runs for these settings."""
    if kd_loss == "minillm":
        return MiniLLM(behaviour, autocast)
    if teacher is not None:
        return OnlineKD(kd_weight, teacher)
    if has_targets and kd_loss != "none":
        return CacheKD(kd_weight)
    return CrossEntropy(kd_weight)


class StepStats:
    """One step's sums over micro-batches: CE, KD, the pre-training term's CE, and per domain
    the CE and the positions that carry loss. Kept in one float64 vector so ranks agree on
    them with a single all-reduce."""

    def __init__(self, domains: int, device: torch.device) -> None:
        self.D = domains
        self.values = torch.zeros(3 + 2 * domains, dtype=torch.float64, device=device)

    def add(self, ce: torch.Tensor, kd: torch.Tensor, domains: torch.Tensor, ce_tok: torch.Tensor, labels: torch.Tensor, rows: int) -> None:
        """One micro-batch of the main objective: its sums and per-row CE and positions by domain."""
        self.values[0] += ce.detach().double()
        self.values[1] += kd.detach().double()
        self.values[3 : 3 + self.D].index_add_(0, domains, ce_tok.view(rows, -1).sum(1).double())
        self.values[3 + self.D :].index_add_(0, domains, (labels != IGNORE_INDEX).sum(1).double())

    def add_pretrain(self, ce: torch.Tensor) -> None:
        self.values[2] += ce.detach().double()

    def all_reduce(self, world: int) -> None:
        if world > 1:
            torch.distributed.all_reduce(self.values)  # every rank logs and judges the global numbers

    @property
    def ce(self) -> torch.Tensor:
        return self.values[0]

    @property
    def kd(self) -> torch.Tensor:
        return self.values[1]

    @property
    def pretrain_ce(self) -> torch.Tensor:
        return self.values[2]

    def ce_by_domain(self, names: list[str]) -> dict[str, float]:
        """Mean CE per domain, over the domains this step drew."""
        v, D = self.values, self.D
        return {d: float(v[3 + i] / v[3 + D + i]) for i, d in enumerate(names) if v[3 + D + i] > 0}


__all__ = ["CacheKD", "CrossEntropy", "MiniLLM", "Objective", "OnlineKD", "StepStats", "make_objective", "token_logprobs"]
