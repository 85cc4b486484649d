"""Stage 2, `ddk-cache distill`: batches from a cache, KD losses, DDK mixing, the training loop."""
