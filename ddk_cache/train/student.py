"""The student as the trainer sees it: one module whose forward returns the loss's sums, and
how it is spread over ranks (DDP, or FSDP2 with one shard group per decoder layer).

Why a wrapper: the loss is computed inside the module's forward, over chunks of positions
(`losses.chunked_loss`), from the decoder's hidden states and the output head. The [tokens,
vocabulary] logits and their float32 log-softmax are never materialised for a whole batch
(at V = 151,936 that is ~1.8 MB per token with its gradient): each chunk's logits are made,
used and dropped; the head's and the hidden states' gradients are computed there too
(`fused`), or the logits are recomputed in the backward pass (activation checkpointing). And
FSDP2 unshards the root's parameters (embeddings, final norm, head) in the root module's
forward: computing the loss there is what lets the head run sharded.
"""

from __future__ import annotations

from typing import Any

import torch

from .losses import DEFAULT_CHUNK, IGNORE_INDEX, KDConfig, chunked_loss
from .minillm import chunked_minillm



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


class StudentLoss(torch.nn.Module):
    """A causal LM whose forward returns the training loss's sums (see the module docstring).

    forward(input_ids [B, L], labels [B, L-1] (IGNORE_INDEX: no loss), topk_ids/topk_logprobs
    [B, L-1, K] (and the stored tail_logprob [B, L-1]) or teacher_logits [B, L-1, V] or
    neither) -> (CE sum, KD sum, per-position CE [B*(L-1)] detached)."""

    def __init__(self, model: Any, cfg: KDConfig, chunk: int = DEFAULT_CHUNK, minillm: Any = None, *, fused: bool = False,
                 kd_weight: float = 1.0) -> None:
        super().__init__()
        self.model, self.cfg, self.chunk, self.minillm = model, cfg, chunk, minillm
        # fused: the sums' gradients are those of CE + kd_weight * KD (what the objective minimises).
        self.fused, self.kd_weight = fused, kd_weight
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
                            chunk=self.chunk, softcap=self._softcap, tail_logprob=None if tail_logprob is None else tail_logprob.reshape(N),
                            fused=self.fused, kd_weight=self.kd_weight)


    def _minillm(self, hidden: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 target_logprob: torch.Tensor, old_logprob: torch.Tensor, tail_logprob: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(CE sum detached: logged, not trained; MiniLLM's objective summed over the response;
        per-position CE detached), in chunks of response positions (minillm.chunked_minillm)."""
        return chunked_minillm(hidden, self._head, labels, topk_ids, topk_logprobs, target_logprob, old_logprob, self.minillm,
                               chunk=self.chunk, softcap=self._softcap, ignore_index=IGNORE_INDEX, tail_logprob=tail_logprob,
                               fused=self.fused)


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
