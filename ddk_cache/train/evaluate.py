"""Per-domain perplexity of a model on a cache's validation split (what DDK compares with the teacher)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ..store.cache import Cache


@torch.no_grad()
def evaluate_domains(
    model: Any, cache: Cache, *, batch_size: int = 8, device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = nullcontext, rank: int = 0, world_size: int = 1, split: str = "val",
) -> dict[str, float]:
    """exp(mean next-token NLL) per domain, over every position of every `split` sequence.

    Under torch.distributed each rank scores sequences rank, rank+world, ...; the NLL sums
    and token counts are all-reduced, so every rank gets the same numbers (and DDK weights).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(cache.domains), 2, dtype=torch.float64)
    for i, domain in enumerate(cache.domains):
        n = cache.num_sequences(domain, split)
        mine = list(range(rank, n, world_size))
        for start in range(0, len(mine), batch_size):
            rows = mine[start : start + batch_size]
            tokens = cache.read(domain, split, rows[0], rows[-1] + 1).tokens[:: world_size]
            x = torch.from_numpy(tokens).long().to(device)
            with autocast():
                logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            sums[i, 0] += nll.item()
            sums[i, 1] += x[:, 1:].numel()
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    return {d: math.exp(sums[i, 0] / sums[i, 1]) for i, d in enumerate(cache.domains)}
