"""Test helpers: a synthetic multi-domain corpus and a small build configuration."""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

from ddk_cache.capture.build import BuildConfig

WORDS = {
    "alpha": ["the", "market", "rose", "as", "investors", "weighed", "rates", "and", "the", "central", "bank", "held", "steady", "on", "inflation"],
    "beta": ["def", "return", "self", "import", "class", "for", "in", "range", "if", "else", "none", "true", "false", "print", "value", "key"],
    "gamma": ["the", "knight", "rode", "through", "the", "dark", "forest", "toward", "the", "castle", "where", "the", "dragon", "slept"],
}


def make_docs(domain: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    words = WORDS[domain]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 90))) + "." for _ in range(n)]


def write_corpus(root: Path) -> Path:
    """Three domains, one per supported layout: .jsonl, .jsonl.gz, a folder of .txt files."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "alpha.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc, "id": 1}) + "\n" for doc in make_docs("alpha", 30))
    with gzip.open(root / "beta.jsonl.gz", "wt") as f:
        for doc in make_docs("beta", 30):
            f.write(json.dumps({"text": doc}) + "\n")
    (root / "gamma").mkdir(exist_ok=True)
    for i, doc in enumerate(make_docs("gamma", 30)):
        (root / "gamma" / f"{i:03d}.txt").write_text(doc)
    return root


def small_config(teacher_dir: Path, corpus_dir: Path, out: Path, **overrides) -> BuildConfig:
    """A build that takes a couple of seconds: 32-token sequences, k=8, shards of 4 sequences,
    2 validation sequences per domain, the exact plain-v1 encoding (tests compare it with
    direct forward passes bit for bit), and small tokenization pieces (several per domain)."""
    args = dict(
        teacher=str(teacher_dir), data=str(corpus_dir), out=str(out), top_k=8, seq_len=32,
        val_tokens=64, shard_sequences=4, batch_size=3, device="cpu", dtype="float32", backend="hf",
        encoding="plain", piece_mb=0.002,
    )
    args.update(overrides)
    return BuildConfig(**args)


def build_argv(config) -> list[str]:
    return [
        sys.executable, "-c", "from ddk_cache.cli.main import main; main()", "build",
        "--teacher", config.teacher, "--data", config.data, "--out", config.out,
        "--top-k", str(config.top_k), "--seq-len", str(config.seq_len), "--val-tokens", str(config.val_tokens),
        "--shard-sequences", str(config.shard_sequences), "--batch-size", str(config.batch_size), "--piece-mb", str(config.piece_mb),
        "--device", "cpu", "--dtype", "float32", "--backend", "hf", "--encoding", config.encoding, "--quiet",
    ]


def make_student(teacher_dir: Path, out: Path, hidden_size: int, layers: int, seed: int = 1) -> Path:
    """A random-init Llama student sharing the teacher's tokenizer (head_dim 32 like the teacher)."""
    from ddk_cache.capture.tokenization import load_tokenizer
    from ddk_cache.models import ModelSpec, init_model

    tok = load_tokenizer(str(teacher_dir))
    spec = ModelSpec(vocab_size=400, hidden_size=hidden_size, layers=layers, heads=hidden_size // 32, max_position_embeddings=64, seed=seed)
    model = init_model(spec, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def distill_config(cache: Path, student: Path, out: Path, **overrides):
    from ddk_cache.train.distill import DistillConfig

    args = dict(cache=str(cache), student=str(student), out=str(out), batch_size=4, max_steps=4, ddk_interval=2,
                warmup_steps=2, lr=1e-3, eval_batch_size=4, save_every=100, device="cpu")
    args.update(overrides)
    return DistillConfig(**args)


def copy_cache(src: Path, dst: Path, edit=None) -> Path:
    """Copy a cache; `edit(meta)`, if given, changes a copy of its root metadata in place."""
    import shutil

    import zarr

    shutil.copytree(src, dst)
    if edit is not None:
        root = zarr.open_group(str(dst), mode="r+")
        meta = dict(root.attrs["ddk_cache"])
        edit(meta)
        root.update_attributes({"ddk_cache": meta})
    return dst


def partial_cache(teacher_dir: Path, corpus_dir: Path, out: Path | str, shards: int = 3, **overrides) -> Path | str:
    """A cache whose build stopped (as if killed) after `shards` shards: state building."""
    from ddk_cache.capture.build import build

    class Stop(Exception):
        pass

    def stop(event, info):
        if event == "shard_written" and info["count"] == shards:
            raise Stop

    try:
        build(small_config(teacher_dir, corpus_dir, out, **overrides), progress=False, hook=stop)
    except Stop:
        pass
    return out


# A ChatML-like template for the test tokenizer (which has none of its own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Chat samples of the test vocabulary: some multi-turn, some prompt/response pairs."""
    rng = random.Random(f"chat-{seed}")
    words = WORDS["alpha"] + WORDS["gamma"]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"prompt": say(rng.randint(3, 8)), "response": say(rng.randint(4, 12))})
        else:
            turns = [{"role": "system", "content": "be brief"}] if i % 2 else []
            for _ in range(rng.randint(1, 2)):
                turns += [{"role": "user", "content": say(rng.randint(3, 8))}, {"role": "assistant", "content": say(rng.randint(3, 10))}]
            out.append({"messages": turns})
    return out


def write_chat_corpus(root: Path, n: int = 80) -> Path:
    """A corpus with one chat domain (JSONL of chat records) beside two text domains."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "chat.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in chat_records(n))
    with open(root / "alpha.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in make_docs("alpha", 30))
    return root


def import_interrupted_then_resumed(monkeypatch, run, after: int, between=None) -> int:
    """`run()` (an import) stopped by Ctrl-C once `after` shards are written, `between()`
    called on the stopped cache, then `run()` again; returns the shards the second run wrote."""
    import pytest

    from ddk_cache import importer

    real, calls = importer._write_shard, []

    def stop(*a, **k):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(importer, "_write_shard", stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert len(calls) == after
    if between is not None:
        between()
    monkeypatch.setattr(importer, "_write_shard", lambda *a, **k: (calls.append(2), real(*a, **k)))
    run()
    return calls.count(2)


def zarr_view(root, cache, domain: str, split: str, name: str):
    """Array `name` of a split as a plain Zarr v3 reader sees it: its own array, or in a
    bundled cache (format 5) its plane of `rows`, cut to the plane's row and dtype as the
    `ddk_cache_planes` attribute says (storage_layout.md, "Bundles")."""
    import numpy as np

    if name in root[f"{domain}/{split}"].array_keys():
        return root[f"{domain}/{split}/{name}"][:]
    rows = root[f"{domain}/{split}/rows"]
    planes = rows.attrs["ddk_cache_planes"]
    i = [p["name"] for p in planes].index(name)
    dtype, shape = np.dtype(planes[i]["data_type"]).newbyteorder("<"), tuple(planes[i]["shape"])
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return np.ascontiguousarray(rows[:, i, :nbytes]).view(dtype).reshape(rows.shape[0], *shape)
