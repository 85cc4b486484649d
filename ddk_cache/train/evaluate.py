"""Per-domain perplexity of a model on a cache's validation split (what DDK compares with the teacher)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..store.cache import Cache
from .losses import IGNORE_INDEX, cross_entropy


def model_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] of any causal LM: a Hugging Face model (`.logits` of its output, no KV
    cache) or any nn.Module that returns the logits tensor itself."""
    try:
        out = model(input_ids=input_ids, use_cache=False)
    except TypeError:  # a plain module: forward(input_ids)
        out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def _per_token_ce(model: Any, x: torch.Tensor, labels: torch.Tensor, loss: bool, chunk: int) -> torch.Tensor:
    """CE of every position [B*(L-1)] (0 where labels are IGNORE_INDEX)."""
    if loss:  # a StudentLoss (possibly under DDP/FSDP): the chunked loss in its forward
        return model(x, labels)[2]
    logits = model_logits(model, x)[:, :-1]
    flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    parts = [cross_entropy(flat[s : s + chunk], torch.where(y[s : s + chunk] == IGNORE_INDEX, 0, y[s : s + chunk]))
             for s in range(0, flat.shape[0], chunk)]  # float32 per chunk, never for the whole batch
    return torch.where(y == IGNORE_INDEX, 0.0, torch.cat(parts))


@torch.no_grad()
def evaluate_domains(
    model: Any, cache: Cache, *, batch_size: int = 8, device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = nullcontext, rank: int = 0, world_size: int = 1, split: str = "val",
    loss: bool = False, chunk: int = 1024,
) -> dict[str, float]:
    """exp(mean next-token NLL) per domain, over the positions that carry loss (all of them
    for text; the assistant's tokens for chat) of every `split` sequence (see `evaluate_scores`)."""
    scores = evaluate_scores(model, cache, batch_size=batch_size, device=device, autocast=autocast, rank=rank,
                             world_size=world_size, split=split, loss=loss, chunk=chunk)
    return {d: s["ppl"] for d, s in scores.items()}


@torch.no_grad()
def evaluate_scores(
    model: Any, cache: Cache, *, batch_size: int = 8, device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = nullcontext, rank: int = 0, world_size: int = 1, split: str = "val",
    loss: bool = False, chunk: int = 1024, byte_lengths: np.ndarray | None = None,
) -> dict[str, dict[str, float | None]]:
    """Per domain {"ppl", "bits_per_byte", "nll_sum", "positions", "bytes"} over the positions
    that carry loss (all of them for text; the assistant's tokens for chat) of every `split`
    sequence. bits per byte = NLL in bits per UTF-8 byte of the predicted tokens, with each
    token id's bytes from `byte_lengths` (tokenbytes.py; None: not reported).

    `model`: any causal LM returning logits (a Hugging Face model, or a module whose forward
    returns the logits), or with `loss=True` the trainer's StudentLoss. Reads tokens (and
    loss masks) only. Under torch.distributed each rank scores its own slice of each domain
    (sequences rank, rank + world, ...) and every rank runs the same number of forward
    passes (short slices are padded with positions that count for nothing), as FSDP
    requires; the NLL sums and token counts are all-reduced on `device`."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    sums = torch.zeros(len(cache.domains), 3, dtype=torch.float64, device=device)  # NLL, positions, bytes
    table = None if byte_lengths is None else torch.from_numpy(byte_lengths).to(device)  # once, not per batch
    for i, domain in enumerate(cache.domains):
        for rows, size in rank_batches(cache.num_sequences(domain, split), rank, world_size, batch_size):
            real = len(rows)
            if real < size:  # pad to the batch every rank runs
                rows = np.concatenate([rows, np.zeros(size - real, np.int64)])
            x = torch.from_numpy(cache.tokens(domain, split, rows)).long().to(device)
            mask = cache.loss_mask(domain, split, rows)
            keep = torch.ones_like(x[:, 1:], dtype=torch.bool) if mask is None else torch.from_numpy(mask[:, 1:].astype(bool)).to(device)
            keep[real:] = False
            labels = torch.where(keep, x[:, 1:], IGNORE_INDEX)
            with autocast():
                ce = _per_token_ce(model, x, labels, loss, chunk)
            sums[i, 0] += ce.sum(dtype=torch.float64)
            sums[i, 1] += keep.sum().to(torch.float64)
            if table is not None:
                sums[i, 2] += torch.where(keep, table[x[:, 1:]], 0).sum().to(torch.float64)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    totals = sums.cpu().tolist()
    return {d: {"ppl": ppl(t[0], t[1]), "bits_per_byte": t[0] / (math.log(2) * t[2]) if byte_lengths is not None and t[2] else None,
                "nll_sum": t[0], "positions": int(t[1]), "bytes": int(t[2]) if byte_lengths is not None else None}
            for d, t in zip(cache.domains, totals)}


@torch.no_grad()
def evaluate_text(
    model: Any, student_tok: Any, cache: Cache, *, batch_size: int = 8, device: torch.device | str = "cpu", split: str = "val",
    max_unusable: float = 0.01, context: int | None = None, autocast: Callable[[], Any] = nullcontext, rank: int = 0,
    world_size: int = 1, loss: bool = False, chunk: int = 1024, row_text: Any = None,
) -> dict[str, dict[str, float | int | None]]:
    """Bits per byte of a model whose tokenizer is not the cache's, on the cache's `split`:
    each row becomes text (the cache's own tokenizer, `capture.tokenization.cache_tokenizer`), the model's
    tokenizer tokenizes it (crosstok.RowText), and the model's NLL of every token it
    predicts is divided by those tokens' UTF-8 bytes. Per domain {"bits_per_byte", "ppl"
    (per model token), "nll_sum", "bytes", "tokens", "rows", "unusable", "truncated"}.

    Rows whose text does not tokenize back to its bytes are left out and counted; above
    `max_unusable` of a domain's rows the evaluation stops (DDKCacheError) rather than report
    a number over another text. Rows longer than `context` model tokens (default: the
    model's positions) are cut there and counted. In chat domains only the tokens whose
    last byte is in a teacher token that carries loss count (RowText.carry_mask): the
    responses' bytes. `model`: a causal LM, or with `loss=True` the trainer's
    StudentLoss. Under torch.distributed each rank scores rows rank, rank + world, ... with
    the same number of forward passes (FSDP needs that) and the sums are all-reduced.
    `row_text`: a crosstok.RowText of the cache's and this tokenizer, where the caller has
    one (built here otherwise: it loads the cache's tokenizer and reads both vocabularies)."""
    from ..capture.tokenization import cache_tokenizer
    from ..errors import DDKCacheError
    from ..runtime import model_context
    from .crosstok import RowText

    was_training = model.training
    model.eval()
    device = torch.device(device)
    rt = row_text if row_text is not None else RowText(cache_tokenizer(cache), student_tok)
    if context is None:
        context = model_context(getattr(model, "model", model) if loss else model)
    pad = rt.s_eos if rt.s_eos is not None else 0
    sums = torch.zeros(len(cache.domains), 6, dtype=torch.float64, device=device)  # NLL, bytes, tokens, rows, unusable, truncated
    for i, domain in enumerate(cache.domains):
        for slots, size in rank_batches(cache.num_sequences(domain, split), rank, world_size, batch_size):
            t_rows = cache.tokens(domain, split, slots) if len(slots) else np.zeros((0, 0), np.int64)
            masks = cache.loss_mask(domain, split, slots) if len(slots) else None
            got = rt.student_rows(t_rows) if len(slots) else []
            labelled = [None if r is None or masks is None else rt.carry_mask(t_rows[k], r, masks[k]) for k, r in enumerate(got)]
            got += [None] * (size - len(got))  # every rank runs the same passes
            labelled += [None] * (len(got) - len(labelled))
            sums[i, 4] += sum(r is None for r in got[: len(slots)])
            for k, r in enumerate(got):
                if r is not None and context is not None and len(r.ids) > context:
                    r.ids, r.lengths = r.ids[:context], r.lengths[:context]
                    sums[i, 5] += 1
                if labelled[k] is not None:
                    labelled[k] = labelled[k][: len(r.ids)]
            width = max(2, max(len(r.ids) for r in got if r is not None) if any(r is not None for r in got) else 2)
            x = torch.full((len(got), width), pad, dtype=torch.long)
            keep = torch.zeros((len(got), width - 1), dtype=torch.bool)
            for b, r in enumerate(got):
                if r is not None:
                    x[b, : len(r.ids)] = torch.from_numpy(r.ids)
                    on = np.ones(len(r.ids), bool) if labelled[b] is None else labelled[b]
                    keep[b, : len(r.ids) - 1] = torch.from_numpy(on[1:])
                    sums[i, 1] += int(r.lengths[1:][on[1:]].sum())
                    sums[i, 3] += 1
            x, keep = x.to(device), keep.to(device)
            labels = torch.where(keep, x[:, 1:], IGNORE_INDEX)
            with autocast():
                sums[i, 0] += _per_token_ce(model, x, labels, loss, chunk).sum(dtype=torch.float64)
            sums[i, 2] += keep.sum().to(torch.float64)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    out = {}
    for domain, (nll, nbytes, tokens, rows, unusable, truncated) in zip(cache.domains, sums.cpu().tolist()):
        n = cache.num_sequences(domain, split)
        if unusable > max_unusable * n:
            raise DDKCacheError(f"{cache.path}: {int(unusable)} of {n} {domain}/{split} rows do not tokenize back to their own text with "
                                f"this tokenizer (a normaliser, added spaces or unknown bytes); bits per byte over the rest "
                                f"would describe other text (allowed: {max_unusable:.0%})")
        out[domain] = {"bits_per_byte": nll / (math.log(2) * nbytes) if nbytes else None, "ppl": ppl(nll, tokens), "nll_sum": nll,
                       "bytes": int(nbytes), "tokens": int(tokens), "rows": int(rows), "unusable": int(unusable), "truncated": int(truncated)}
    return out


def rank_batches(n: int, rank: int, world_size: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """This rank's share of n sequences (rank, rank + world, ...) in batches: (its indices,
    the batch size every rank runs at this step). A rank with fewer indices pads to that
    size, so all ranks make the same number of forward passes of the same size (FSDP needs
    that)."""
    per_rank = -(-n // world_size)
    mine = np.arange(rank, n, world_size)
    for start in range(0, per_rank, batch_size):
        yield mine[start: start + batch_size], min(batch_size, per_rank - start)


def ppl(nll_sum: float, tokens: float) -> float:
    """exp(mean NLL): inf past float64's range (a freshly pruned or diverged model), nan for no tokens."""
    if not tokens:
        return float("nan")
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 709.0 else float("inf")
