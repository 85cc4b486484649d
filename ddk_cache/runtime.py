"""Where this process runs: its rank among workers, its GPUs, its torch device. One place
for build and distill.

Launchers, in order of precedence: explicit flags (`--num-shards/--shard-index`, build
only), torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE), else one process.

GPU sets. A worker with local rank r whose engine needs t GPUs (vLLM tensor parallelism)
gets GPUs [r*t, (r+1)*t) of those the node makes visible (CUDA_VISIBLE_DEVICES if set,
else 0..count-1). `assign_gpus` narrows CUDA_VISIBLE_DEVICES to that set; it must run
before anything initialises CUDA (torch or vLLM), which is why `build` calls it first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

# Variables torchrun/srun set for the launcher's own process group. A vLLM engine started
# inside such a worker must not see them: it would try to join that group.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Worker:
    """This process's place: global rank/size and rank/size on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"  # flags, torchrun, srun or single

    def __iter__(self):  # (rank, world_size), as `index, count = worker`
        return iter((self.rank, self.world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not an integer") from None


def resolve_worker(num_shards: int | None = None, shard_index: int | None = None, env: Mapping[str, str] | None = None) -> Worker:
    """This process's Worker: flags, else torchrun's variables, else srun's, else a single process."""
    env = os.environ if env is None else env
    if num_shards is not None:
        index = int(shard_index or 0)
        return Worker(index, num_shards, _int(env, "LOCAL_RANK", _int(env, "SLURM_LOCALID", 0)), 1, "flags")
    launchers = (
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    )
    for name, rank_var, size_var, local_var, local_size_var in launchers:
        if rank_var in env and size_var in env:
            rank, size = _int(env, rank_var, 0), _int(env, size_var, 1)
            if not 0 <= rank < size:
                raise ConfigError(f"{rank_var}={rank} is outside 0..{size - 1} ({size_var}={size})")
            # SLURM_NTASKS_PER_NODE may read "4(x2)": the count before the parenthesis.
            local_size = str(env.get(local_size_var, "1")).split("(")[0]
            return Worker(rank, size, _int(env, local_var, 0), int(local_size or 1), name)
    return Worker()


def gpu_set(local_rank: int, gpus_per_worker: int, visible: list[str]) -> list[str]:
    """The GPUs (as named in `visible`) of the worker with this local rank: [r*t, (r+1)*t)."""
    start = local_rank * gpus_per_worker
    if start + gpus_per_worker > len(visible):
        raise ConfigError(
            f"local rank {local_rank} needs GPUs {start}..{start + gpus_per_worker - 1} "
            f"({gpus_per_worker} per worker), but this node shows {len(visible)} ({','.join(visible) or 'none'}): "
            "start fewer workers per node or lower --tensor-parallel-size"
        )
    return visible[start : start + gpus_per_worker]


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The node's GPUs as this process may name them: CUDA_VISIBLE_DEVICES, else all (counted without initialising CUDA)."""
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES") not in (None, ""):
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    return [str(i) for i in range(_count_gpus())]


def _count_gpus() -> int:
    """GPUs on this node, via NVML (does not create a CUDA context, unlike torch.cuda)."""
    try:
        import pynvml  # shipped with torch's CUDA builds as nvidia-ml-py

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def assign_gpus(worker: Worker, gpus_per_worker: int, env: dict[str, str] | None = None) -> list[str] | None:
    """Narrow CUDA_VISIBLE_DEVICES (in `env`, default os.environ) to this worker's GPU set,
    [local_rank * t, (local_rank + 1) * t) of the visible ones, and return it.

    Does nothing where no GPU is visible (CPU machines). Call it before torch or vLLM touch
    CUDA. Processes started by hand with `--shard-index` on one machine have no local rank
    (LOCAL_RANK / SLURM_LOCALID): give each its own CUDA_VISIBLE_DEVICES instead."""
    env = os.environ if env is None else env
    visible = visible_gpus(env)
    if not visible:
        return None
    chosen = gpu_set(worker.local_rank, gpus_per_worker, visible)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return chosen


def engine_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment an inference engine process should get: the launcher's rendezvous
    variables removed (the engine is a standalone tensor-parallel group of its own)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARS}


def resolve_device(choice: str = "auto", worker: Worker | None = None) -> Any:
    """'auto': this worker's GPU when CUDA is present (cuda:local_rank modulo the visible
    count; after `assign_gpus` that is cuda:0), else CPU. Anything else goes to torch.device."""
    import torch

    if choice == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = (worker or resolve_worker()).local_rank
        return torch.device(f"cuda:{local % torch.cuda.device_count()}")
    try:
        return torch.device(choice)
    except RuntimeError as e:
        raise ConfigError(f"--device {choice!r} is not a torch device: {e}") from None


def init_distributed(worker: Worker, device: Any) -> None:
    """Join torchrun's process group when there are several ranks: NCCL on GPUs, gloo on CPUs."""
    import torch

    if worker.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend, rank=worker.rank, world_size=worker.world_size)


def model_context(model: Any) -> int | None:
    """The most positions a causal LM takes (max_position_embeddings, GPT-2's n_positions, or
    max_sequence_length, of its text config), or None where its config names none."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return next((getattr(text, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                 if isinstance(getattr(text, k, None), int)), None)


def load_causal_lm(path: str, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, never left partly on the meta device.

    In a long-lived process that had run many other models (the full test suite, twice in
    several runs, never alone), transformers 5.19 returned SmolLM2 with its tied output head
    untied and on the meta device (its load report calls `lm_head.weight` missing), and
    `.to(device)` then failed with "cannot copy out of meta tensor". A checkpoint whose
    config ties the head is made whole by tying it again; any other parameter still on meta
    is an error that names it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if any(p.is_meta for p in model.parameters()):
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if (getattr(text, "tie_word_embeddings", False) and head is not None and embed is not None
                and head.weight.is_meta and not embed.weight.is_meta):
            head.weight = embed.weight
        missing = [name for name, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ConfigError(f"{path}: the checkpoint holds no weights for {', '.join(missing[:4])}"
                              f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}; is it complete?")
    return model
