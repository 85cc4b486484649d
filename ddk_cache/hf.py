"""Hugging Face Trainer integration: distill from a cache with `transformers.Trainer`.

    from ddk_cache import CacheDataset
    from ddk_cache.hf import DDKCallback, DistillationTrainer

    train = CacheDataset("cache.zarr")
    trainer = DistillationTrainer(model=student, args=args, train_dataset=train, kd_loss="fkl", kd_weight=0.2)
    trainer.add_callback(DDKCallback(trainer, every=1000))   # DDK mixing, evaluated on the cache's validation split
    trainer.train()

A student of another tokenizer: `CacheDataset("cache.zarr", student_tokenizer=tok)`; the
trainer then uses the cross-tokenizer hybrid loss (kd_loss="uld": ULD).

`DistillationTrainer` draws its batches with a `DomainWeightedSampler` (DDK's sampling rule;
under several processes Accelerate splits its batches) and computes CE + kd_weight * KD on
the cache's teacher targets, normalised by the positions that carry a label over the
whole accumulated batch (`num_items_in_batch`), as `ddk-cache distill` does. Logging
(TensorBoard, W&B, ...) is the Trainer's: `report_to`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .train.data import IGNORE_INDEX
from .train.dataset import CacheDataset, DomainWeightedSampler, collate
from .train.ddk import DDKController
from .train.losses import KDConfig, kd_loss


class DistillationTrainer(Trainer):
    """A Trainer whose loss is CE + kd_weight * D(teacher || student) on a CacheDataset's targets."""

    loss_is_scaled_for_ga = True  # the loss is divided by the accumulated batch's label count

    def __init__(self, *args: Any, kd_loss: str = "fkl", kd_weight: float = 0.2, temperature: float = 1.0, tail: str = "bucket",
                 weights: Any = None, sampler_seed: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        dataset = self.train_dataset
        # A CacheDataset in another tokenizer's ids: the hybrid loss (KD on mapped ids plus ULD on
        # the unmatched ones); with kd_loss="uld", ULD alone.
        crosstok = getattr(dataset, "crosstok", None)
        unmatched = (None if crosstok is None or kd_loss in ("uld", "none") or crosstok.mode == "prefix"
                     else torch.from_numpy(crosstok.unmatched))
        self.kd_config = KDConfig(kd_loss, temperature, tail, unmatched=unmatched)
        self.kd_weight = kd_weight
        self.ddk_sampler = None
        if isinstance(dataset, CacheDataset):
            self.ddk_sampler = DomainWeightedSampler(
                dataset, weights, batch_size=self.args.per_device_train_batch_size,
                seed=self.args.seed if sampler_seed is None else sampler_seed,
                num_samples=self.args.max_steps * self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                if self.args.max_steps > 0 else len(dataset))

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        return self.ddk_sampler if self.ddk_sampler is not None else super()._get_train_sampler(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the teacher targets (and the domain) in the batch: the model does not take them.
        self._signature_columns = ["input_ids", "labels", "topk_ids", "topk_logprobs", "tail_logprob", "domain", "attention_mask"]

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], use_cache=False)
        total = kd_loss(outputs.logits, labels, inputs.get("topk_ids"), inputs.get("topk_logprobs"), config=self.kd_config,
                        kd_weight=self.kd_weight, reduction="sum", tail_logprob=inputs.get("tail_logprob"))
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE_INDEX).sum()
        loss = total / torch.as_tensor(count, device=total.device, dtype=total.dtype).clamp_min(1)
        return (loss, outputs) if return_outputs else loss


class DDKCallback(TrainerCallback):
    """DDK mixing in a Trainer: before training and every `every` optimizer steps, evaluate the
    model per domain on the cache's validation split and give the new weights to the
    trainer's sampler; the weights and perplexities are logged (`ddk/<domain>/...`)."""

    def __init__(self, trainer: DistillationTrainer, every: int = 1000, mixing: str = "ddk", alpha: float = 0.5,
                 eval_batch_size: int = 8) -> None:
        dataset = trainer.train_dataset
        if not isinstance(dataset, CacheDataset) or trainer.ddk_sampler is None:
            raise TypeError("DDKCallback needs a DistillationTrainer whose train_dataset is a CacheDataset")
        self.trainer, self.every = trainer, every
        self.controller = DDKController(dataset.cache, mixing=mixing, alpha=alpha, samplers=[trainer.ddk_sampler],
                                        batch_size=eval_batch_size,
                                        student_tokenizer=None if dataset.crosstok is None else dataset.crosstok.rt.tok)

    def _step(self, model: torch.nn.Module, step: int) -> None:
        args = self.trainer.args
        weights = self.controller.step(model, rank=args.process_index, world_size=args.world_size)
        ppl = self.controller.history[-1]["ppl_student"]
        logs = {f"ddk/{d}/weight": float(w) for d, w in zip(self.controller.domains, weights)}
        logs.update({f"ddk/{d}/ppl": float(p) for d, p in ppl.items()})
        self.trainer.log(logs)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any) -> None:
        if state.global_step == 0:
            self._step(model, 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self._step(model, state.global_step)


__all__ = ["DDKCallback", "DistillationTrainer"]
