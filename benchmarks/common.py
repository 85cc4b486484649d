"""Helpers the benchmark scripts share: describe the machine, make or reuse a local teacher."""

from __future__ import annotations

import itertools
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ddk_cache.capture.corpus import discover_domains, iter_documents
from ddk_cache.models import ModelSpec, make_model_dir


def machine() -> str:
    """CPU count and model, GPU if any, torch version: what every table records."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} x {cpu}{gpu}; torch {torch.__version__}"


def teacher(corpus: str, work: Path, *, vocab_size: int, hidden_size: int, layers: int, heads: int, context: int) -> Path:
    """A randomly initialised Llama with a BPE tokenizer trained on `corpus`, made once per shape."""
    path = work / f"teacher-v{vocab_size}-h{hidden_size}-l{layers}"
    if not path.exists():
        t0 = time.perf_counter()
        texts = itertools.chain.from_iterable(iter_documents(d) for d in discover_domains(corpus))
        spec = ModelSpec(vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads, max_position_embeddings=context)
        make_model_dir(texts, path, spec)
        print(f"made teacher {path} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return path


def real_teacher(name: str) -> str:
    """A teacher argument: 'smollm2' (SmolLM2-135M-Instruct, made from the PyPI wheel once and
    kept in ~/.cache/ddk-cache) or a model directory as it is."""
    if name == "smollm2":
        from ddk_cache.models import smollm2

        return str(smollm2())
    return name


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    """A markdown table, ready to paste into BENCHMARKS.md."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
