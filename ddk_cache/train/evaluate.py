"""Per-domain perplexity of a model on a cache's validation split (what DDK compares with the teacher)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch

from ..store.cache import Cache


def model_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] of any causal LM: a Hugging Face model (`.logits` of its output, no KV
    cache) or any nn.Module that returns the logits tensor itself."""
    try:
        out = model(input_ids=input_ids, use_cache=False)
    except TypeError:  # a plain module: forward(input_ids)
        out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def evaluate_domains(
    model: Any, cache: Cache, *, batch_size: int = 8, device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = nullcontext, rank: int = 0, world_size: int = 1, split: str = "val",
) -> dict[str, float]:
    """exp(mean next-token NLL) per domain, over the positions that carry loss (all of them
    for text; the assistant's tokens for chat) of every `split` sequence.

    Reads tokens (and loss masks) only. Under torch.distributed each rank scores its own
    slice of each domain (sequences rank, rank + world, ...); the NLL sums and token counts
    are all-reduced on `device`, so every rank gets the same numbers (and DDK weights)."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    sums = torch.zeros(len(cache.domains), 2, dtype=torch.float64, device=device)
    for i, domain in enumerate(cache.domains):
        mine = np.arange(rank, cache.num_sequences(domain, split), world_size)
        for start in range(0, len(mine), batch_size):
            rows = mine[start : start + batch_size]
            x = torch.from_numpy(cache.tokens(domain, split, rows)).long().to(device)
            mask = cache.loss_mask(domain, split, rows)
            with autocast():
                logits = model_logits(model, x)[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none")
            if mask is not None:
                keep = torch.from_numpy(mask[:, 1:].astype(bool)).to(device).reshape(-1)
                nll, count = nll[keep], keep.sum()
            else:
                count = torch.tensor(nll.numel(), device=device)
            sums[i, 0] += nll.sum(dtype=torch.float64)
            sums[i, 1] += count.to(torch.float64)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    totals = sums.cpu().tolist()
    return {d: math.exp(totals[i][0] / totals[i][1]) if totals[i][1] else float("nan") for i, d in enumerate(cache.domains)}
