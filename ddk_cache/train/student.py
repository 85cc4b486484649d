"""The student as the trainer sees it: one module whose forward returns the loss's sums, and
how it is spread over ranks (DDP, or FSDP2 with one shard group per decoder layer).

Why a wrapper: the loss is computed inside the module's forward, over chunks of positions
(`chunked_loss`), from the decoder's hidden states and the output head. The [tokens,
vocabulary] logits and their float32 log-softmax are never materialised for a whole batch
(at V = 151,936 that is ~1.8 MB per token with its gradient): each chunk's logits are made,
used and dropped, and recomputed in the backward pass (activation checkpointing). And
FSDP2 unshards the root's parameters (embeddings, final norm, head) in the root module's
forward: computing the loss there is what lets the head run sharded.
"""

from __future__ import annotations

from typing import Any

import torch

from .losses import IGNORE_INDEX, KDConfig, ce_and_dense_kd, ce_and_sparse_kd

DEFAULT_CHUNK = 1024  # positions per loss chunk (~V * 12 bytes each at the peak)


def _head_parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder returning hidden states, output head module, final logit soft-cap or None)
    of a Hugging Face causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__}: chunked loss needs get_decoder() and get_output_embeddings()")
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        raise TypeError(f"{type(model).__name__} scales its logits (logit_scale {scale}); the chunked loss does not apply it")
    return decoder, head, cap


def chunked_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, cfg: KDConfig, *,
                 topk_ids: torch.Tensor | None = None, topk_logprobs: torch.Tensor | None = None,
                 teacher_logits: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK, softcap: float | None = None,
                 checkpoint: bool = True, tail_logprob: torch.Tensor | None = None, per_token: bool = False) -> tuple[torch.Tensor, ...]:
    """CE + KD over positions in chunks: (CE sum, KD sum, per-position CE detached [N]); with
    `per_token`, also the per-position CE and KD with their gradients (CE + KD [N] each).

    hidden [N, H] (the decoder's output at the positions that predict `labels` [N]); the
    targets are sparse (topk_ids/topk_logprobs [N, K]) or dense (teacher_logits [N, V]) or
    none (CE only); `tail_logprob` [N] the teacher's stored tail (pack-v3). Each chunk's logits = head(hidden chunk) in float32; with `checkpoint`
    they are recomputed in the backward pass instead of kept. Equal to the unchunked loss
    and its gradients (tests/test_chunked_loss.py)."""
    N = hidden.shape[0]
    ce_sum = hidden.new_zeros((), dtype=torch.float32)
    kd_sum = hidden.new_zeros((), dtype=torch.float32)
    ce_detached, ce_parts, kd_parts = [], [], []
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        args = [hidden[start:stop], labels[start:stop]]
        if topk_ids is not None:
            args += [topk_ids[start:stop], topk_logprobs[start:stop]]
            if tail_logprob is not None:
                args += [tail_logprob[start:stop]]
        elif teacher_logits is not None:
            args += [teacher_logits[start:stop]]

        def piece(h: torch.Tensor, y: torch.Tensor, *t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = head(h).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            if len(t) == 3:
                return ce_and_sparse_kd(logits, y, t[0], t[1], cfg, tail_logprob=t[2])
            if len(t) == 2:
                return ce_and_sparse_kd(logits, y, t[0], t[1], cfg)
            if len(t) == 1:
                return ce_and_dense_kd(logits, y, t[0], cfg)
            return ce_and_sparse_kd(logits, y, None, None, KDConfig("none"))

        if checkpoint and torch.is_grad_enabled():
            ce, kd = torch.utils.checkpoint.checkpoint(piece, *args, use_reentrant=False)
        else:
            ce, kd = piece(*args)
        ce_sum = ce_sum + ce.sum()
        kd_sum = kd_sum + kd.sum()
        ce_detached.append(ce.detach())
        if per_token:
            ce_parts.append(ce)
            kd_parts.append(kd)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    out = (ce_sum, kd_sum, torch.cat(ce_detached) if ce_detached else empty)
    if per_token:
        out += (torch.cat(ce_parts) if ce_parts else empty, torch.cat(kd_parts) if kd_parts else empty)
    return out


class StudentLoss(torch.nn.Module):
    """A causal LM whose forward returns the training loss's sums (see the module docstring).

    forward(input_ids [B, L], labels [B, L-1] (IGNORE_INDEX: no loss), topk_ids/topk_logprobs
    [B, L-1, K] (and the stored tail_logprob [B, L-1]) or teacher_logits [B, L-1, V] or
    neither) -> (CE sum, KD sum, per-position CE [B*(L-1)] detached)."""

    def __init__(self, model: Any, cfg: KDConfig, chunk: int = DEFAULT_CHUNK, minillm: Any = None) -> None:
        super().__init__()
        self.model, self.cfg, self.chunk, self.minillm = model, cfg, chunk, minillm
        # Plain attributes, not submodules: registered twice, the decoder's and head's
        # parameters would get two names each, and DCP's state dicts under DDP (which strips
        # one name but not the alias) would no longer match on load.
        decoder, head, softcap = _head_parts(model)
        object.__setattr__(self, "_decoder", decoder)
        object.__setattr__(self, "_head", head)
        self._softcap = softcap

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None = None,
                topk_logprobs: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                target_logprob: torch.Tensor | None = None, old_logprob: torch.Tensor | None = None,
                tail_logprob: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        hidden = self._decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        if self.minillm is not None and target_logprob is not None:  # evaluation passes tokens only: CE
            return self._minillm(hidden, labels, topk_ids, topk_logprobs, target_logprob, old_logprob, tail_logprob)
        N = hidden.shape[0] * hidden.shape[1]
        flat = lambda t: None if t is None else t.reshape(N, *t.shape[2:])  # noqa: E731
        return chunked_loss(hidden.reshape(N, -1), self._head, labels.reshape(N), self.cfg,
                            topk_ids=flat(topk_ids), topk_logprobs=flat(topk_logprobs), teacher_logits=flat(teacher_logits),
                            chunk=self.chunk, softcap=self._softcap, tail_logprob=None if tail_logprob is None else tail_logprob.reshape(N))


    def _minillm(self, hidden: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 target_logprob: torch.Tensor, old_logprob: torch.Tensor, tail_logprob: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(CE sum detached: logged, not trained; MiniLLM's objective summed over the response;
        per-position CE detached), in chunks of response positions (minillm.chunked_minillm)."""
        from .minillm import chunked_minillm

        return chunked_minillm(hidden, self._head, labels, topk_ids, topk_logprobs, target_logprob, old_logprob, self.minillm,
                               chunk=self.chunk, softcap=self._softcap, ignore_index=IGNORE_INDEX, tail_logprob=tail_logprob)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face decoder (one FSDP2 shard group each)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks", "block"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise TypeError(f"{type(model).__name__}: cannot find the decoder layers to shard (looked for layers, h, blocks)")


def parallelize(module: StudentLoss, mode: str, device: torch.device, world: int, bf16: bool) -> torch.nn.Module:
    """The module to train: itself (one process), DDP, or FSDP2 (`fully_shard` on every decoder
    layer, then the root; bf16 compute with fp32 master weights and reductions on GPU)."""
    if world == 1 or mode == "none":
        return module
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(module.model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def loss_tokens(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())
