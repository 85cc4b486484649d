"""Distill a student from a cache with the Hugging Face Trainer (README: "Use it from your own trainer").

    python examples/hf_trainer.py --cache cache.zarr --student student/ --out runs/hf --max-steps 300

Any Trainer argument works the same way (gradient accumulation, bf16, DeepSpeed/FSDP,
`report_to`); under `torchrun` or `accelerate launch` each process trains its share of
every batch and DDK's evaluation is all-reduced over them.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from ddk_cache import CacheDataset
from ddk_cache.hf import DDKCallback, DistillationTrainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="a finished ddk-cache store")
    p.add_argument("--student", required=True, help="a transformers model directory of the teacher's tokenizer family")
    p.add_argument("--out", default="runs/hf")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kd-loss", default="fkl")
    p.add_argument("--kd-weight", type=float, default=0.2)
    p.add_argument("--ddk-every", type=int, default=100, help="optimizer steps between DDK updates")
    p.add_argument("--report-to", default="none", help="tensorboard, wandb, ... (the Trainer's report_to)")
    a = p.parse_args()
    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=a.batch_size, max_steps=a.max_steps, learning_rate=a.lr,
                             logging_steps=10, report_to=[] if a.report_to == "none" else [a.report_to])
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(a.student), args=args,
                                  train_dataset=CacheDataset(a.cache), kd_loss=a.kd_loss, kd_weight=a.kd_weight,
                                  processing_class=AutoTokenizer.from_pretrained(a.student))  # saved with the model
    trainer.add_callback(DDKCallback(trainer, every=a.ddk_every))
    trainer.train()
    trainer.save_model(a.out)


if __name__ == "__main__":
    main()
