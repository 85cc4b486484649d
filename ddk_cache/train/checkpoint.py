"""Checkpoints of a distill run: written by every rank in parallel, complete or ignored.

    RUN/checkpoints/step_00001000/
        dcp/                    torch.distributed.checkpoint: model + optimizer, one file
                                set per rank (its shards under FSDP) + .metadata
        rng-<rank>.pt           each rank's torch (and CUDA) RNG state
        sha256-<rank>.json      the sha256 of the files this rank wrote (merged into state.json)
        state.json              step, tokens, sampler, mixer, config, and `files`: every
                                file's sha256; written LAST

A save goes into `step_N.tmp/`; after every rank has written its part (a barrier), rank 0
writes state.json, fsyncs and renames the folder to `step_N`. A save killed at any point
leaves at most a `.tmp` folder, which nothing reads: the newest folder with a state.json
is the checkpoint. DCP reshards on load, so a run can resume on another number of ranks
(exactly, bit for bit, only on the same one). The final model is a plain
`save_pretrained` directory, gathered on rank 0.

Integrity: every rank hashes the files it wrote (its DCP shard, its RNG state) while
saving, so no rank reads another's; on resume the ranks split the listed files between
them, check each against its hash, and agree (one all-reduce) on the newest checkpoint
that is whole. A damaged one (flipped bytes, a truncated file, a missing .metadata, an
unreadable state.json) is passed over for the one before, with one line saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

CKPT_DIR = "checkpoints"
CKPT_STATE = "state.json"  # written last: the checkpoint is complete
CKPT_DCP = "dcp"
TMP_SUFFIX = ".tmp"
LOCK_DIR = ".locks"  # RUN/.locks/rank-<r>.lock: one live distill per run directory


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(run: str | Path) -> list[Path]:
    """Every complete checkpoint (its state.json exists), oldest first."""
    root = Path(run) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if not p.name.endswith(TMP_SUFFIX) and (p / CKPT_STATE).is_file())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(ckpt: Path, rank: int, world: int) -> str | None:
    """Why this rank's share of a checkpoint's files is not whole (None: it is): files
    i, i + world, ... of state.json's list, in name order. A checkpoint saved before hashes
    were recorded has no list: only its state.json is checked."""
    try:
        state = read_state(ckpt)
    except (OSError, ValueError) as e:
        return f"{CKPT_STATE} does not read ({type(e).__name__})"
    files = state.get("files") or {}
    for name in sorted(files)[rank::world]:
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != files[name]:
            return f"{name} does not match its recorded sha256"
    return None


def latest_whole(run: Path, rank: int, world: int, say: Any) -> Path | None:
    """The newest checkpoint whose files all match their hashes, every rank agreeing; damaged
    newer ones are reported with `say` (rank 0) and passed over."""
    for ckpt in reversed(complete_checkpoints(run)):
        why = damage(ckpt, rank, world)
        bad = torch.tensor([0.0 if why is None else 1.0])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            bad = bad.to(backend_device)
            torch.distributed.all_reduce(bad)
        if float(bad) == 0:
            return ckpt
        if rank == 0:
            say(f"checkpoint {ckpt.name} is damaged ({why or 'a file another rank checked does not match'}); "
                "resuming from the one before it")
    return None


def latest_checkpoint(run: str | Path) -> Path | None:
    done = complete_checkpoints(run)
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(run: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int, rank: int) -> Path:
    """Save a checkpoint (every rank calls this; see the module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = run / CKPT_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / CKPT_DCP))
    with open(tmp / f"rng-{rank}.pt", "wb") as f:
        torch.save(_rng_state(), f)
        f.flush()
        os.fsync(f.fileno())
    # Each rank hashes what it wrote (its DCP files are named __<rank>_*.distcp).
    mine = [f"rng-{rank}.pt"] + sorted(f"{CKPT_DCP}/{p.name}" for p in (tmp / CKPT_DCP).glob(f"__{rank}_*"))
    (tmp / f"sha256-{rank}.json").write_text(json.dumps({name: _sha256(tmp / name) for name in mine}))
    _barrier()
    if rank == 0:
        files: dict[str, str] = {}
        for part in sorted(tmp.glob("sha256-*.json")):
            files.update(json.loads(part.read_text()))
            part.unlink()
        for p in sorted((tmp / CKPT_DCP).iterdir()):  # .metadata, and anything DCP wrote beyond the ranks' shards
            files.setdefault(f"{CKPT_DCP}/{p.name}", _sha256(p))
        with open(tmp / CKPT_STATE, "w") as f:
            f.write(json.dumps({**state, "files": files}, indent=1))
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(final.parent)
        for old in complete_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_state(ckpt: Path) -> dict:
    """A complete checkpoint's state.json (step, config, ...), without loading any tensor."""
    return json.loads((ckpt / CKPT_STATE).read_text())


def load(ckpt: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict:
    """Restore model, optimizer and (on the same rank count) RNG states; return state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(ckpt / CKPT_DCP))
    set_state_dict(module, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = ckpt / f"rng-{rank}.pt"
    if rng.is_file():
        saved = torch.load(rng, weights_only=True)
        torch.set_rng_state(saved["torch"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda"])
    return json.loads((ckpt / CKPT_STATE).read_text())


def export(module: torch.nn.Module, tokenizer: Any, out: Path, rank: int) -> None:
    """The student as a plain Hugging Face directory (`save_pretrained` + the tokenizer),
    its full weights gathered on rank 0 (every rank calls this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        weights = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
        tmp = out.with_name(out.name + TMP_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)
        inner.model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    _barrier()
