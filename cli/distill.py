"""`ddk-cache distill`, `ddk-cache eval`, `ddk-cache report`: train from a cache, measure, plot."""

from __future__ import annotations

import json

import click

from ddk_cache.config import click_options
from ddk_cache.train.distill import DistillConfig, distill as run_distill

@click.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (keys as the flags, - or _); flags override it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click_options(DistillConfig)
def distill(config_file: str | None, quiet: bool, **overrides: object) -> None:
    """Train a student from a cache alone: CE + gamma * KD on the cached top-k teacher
    log-probabilities, with DDK domain mixing (arXiv 2407.16154) by default.

    \b
    ddk-cache distill --cache cache.zarr --student student/ --out runs/s1 --max-steps 2000 --ddk-interval 100
    torchrun --nproc-per-node 4 -m ddk_cache distill --config distill.yaml     # DDP
    torchrun --nproc-per-node 8 -m ddk_cache distill --config distill.yaml --fsdp   # FSDP2
    ddk-cache distill --config distill.yaml --resume                           # continue exactly
    """
    cfg = DistillConfig.from_sources(config_file, overrides)
    if quiet:
        from .common import quiet_libraries

        quiet_libraries()
    result = run_distill(cfg, progress=not quiet)
    click.echo(f"trained {result.steps} steps; final model: {result.out}")
    click.echo("final validation PPL: " + ", ".join(f"{d} {p:.3f}" for d, p in result.final_ppl.items()))
    click.echo(f"next: ddk-cache report {cfg.out}")


@click.command("eval")
@click.option("--cache", required=True, help="Cache whose validation split (and teacher PPL table) to use.")
@click.option("--model", "model_path", required=True, help="Model directory (e.g. RUN/final) with its tokenizer.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_cmd(cache: str, model_path: str, batch_size: int, device: str, as_json: bool) -> None:
    """Per-domain perplexity and bits per byte of MODEL on the cache's validation split, beside
    the teacher's. Bits per byte (NLL in bits per UTF-8 byte of the predicted text) compares
    across tokenizers; the teacher's is "n/a" for caches built before ddk-cache 0.4.

    A MODEL whose tokenizer is not the cache's is scored in bits per byte only: the rows are
    turned back into text (with the tokenizer the cache keeps, ddk-cache 0.4 on) and tokenized
    by MODEL's; rows whose text does not come back to its bytes are counted, and above 1% of a
    domain's rows the evaluation stops. In chat domains only the responses' bytes count."""
    from ddk_cache.train.distill import load_student
    from ddk_cache.train.evaluate import evaluate_scores
    from ddk_cache.store.cache import Cache
    from ddk_cache.tokenbytes import lengths_or_none

    from ddk_cache.runtime import resolve_device

    c = Cache(cache)
    dev = resolve_device(device)
    other = _other_tokenizer(c, model_path)
    if other is not None:
        _eval_other_tokenizer(c, model_path, other, batch_size, dev, as_json)
        return
    cfg = DistillConfig(cache=cache, out="-", student=model_path)
    model, tok = load_student(cfg, c)
    scores = evaluate_scores(model.to(dev), c, batch_size=batch_size, device=dev, byte_lengths=lengths_or_none(tok))
    teacher = {d: c.meta.ppl(d) if c.meta.teacher_ppl else None for d in c.domains}
    rows = [{"domain": d, "student_ppl": scores[d]["ppl"], "teacher_ppl": teacher[d].ppl if teacher[d] else float("nan"),
             "ratio": scores[d]["ppl"] / teacher[d].ppl if teacher[d] else float("nan"),
             "student_bits_per_byte": scores[d]["bits_per_byte"], "teacher_bits_per_byte": teacher[d].bits_per_byte if teacher[d] else None}
            for d in c.domains]
    if as_json:
        click.echo(json.dumps({"cache": cache, "model": model_path, "rows": rows}, indent=2))
        return
    from ddk_cache.table import format_table, number

    def bpb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    click.echo(format_table(("domain", "student PPL", "teacher PPL", "ratio", "student bits/byte", "teacher bits/byte"),
                            [(r["domain"], number(r["student_ppl"]), number(r["teacher_ppl"]), number(r["ratio"]),
                              bpb(r["student_bits_per_byte"]), bpb(r["teacher_bits_per_byte"])) for r in rows]))


def _other_tokenizer(cache, model_path: str):
    """The model's tokenizer where it is not the cache's (by fingerprint), else None."""
    from ddk_cache.capture.tokenization import check_model_path, load_tokenizer, tokenizer_fingerprint
    from ddk_cache.errors import ConfigError

    check_model_path(model_path, ConfigError)
    tok = load_tokenizer(model_path)
    return tok if tokenizer_fingerprint(tok) != cache.meta.tokenizer.get("fingerprint") else None


def _eval_other_tokenizer(c, model_path: str, tok, batch_size: int, dev, as_json: bool) -> None:
    """`eval` of a model with another tokenizer: bits per byte on the cache's text (its rows
    tokenized again), beside the teacher's; PPL does not compare across tokenizers."""
    import torch

    from ddk_cache.runtime import load_causal_lm
    from ddk_cache.train.evaluate import evaluate_text

    model = load_causal_lm(model_path, dtype=torch.float32).to(dev)
    scores = evaluate_text(model, tok, c, batch_size=batch_size, device=dev)
    rows = []
    for d in c.domains:
        teacher = c.meta.ppl(d).bits_per_byte if c.meta.teacher_ppl else None
        s = scores[d]
        rows.append({"domain": d, "student_bits_per_byte": s["bits_per_byte"], "teacher_bits_per_byte": teacher,
                     "ratio": s["bits_per_byte"] / teacher if teacher and s["bits_per_byte"] else None,
                     "rows": s["rows"], "unusable_rows": s["unusable"], "truncated_rows": s["truncated"], "student_tokens": s["tokens"],
                     "bytes": s["bytes"]})
    if as_json:
        click.echo(json.dumps({"cache": c.path, "model": model_path, "tokenizer": "other", "rows": rows}, indent=2))
        return
    from ddk_cache.table import format_table

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    click.echo(f"{model_path}: another tokenizer than the cache's; the validation rows as text, tokenized again "
               "(bits per byte: PPL does not compare across tokenizers)")
    click.echo(format_table(("domain", "student bits/byte", "teacher bits/byte", "ratio", "rows", "unusable", "cut"),
                            [(r["domain"], num(r["student_bits_per_byte"]), num(r["teacher_bits_per_byte"]), num(r["ratio"]),
                              str(r["rows"]), str(r["unusable_rows"]), str(r["truncated_rows"])) for r in rows]))


@click.command()
@click.argument("run", metavar="RUN_DIR")
def report(run: str) -> None:
    """Plot a distill run (domain weights, per-domain student/teacher PPL, loss) as PNGs and
    write report.md with the per-domain table, all inside RUN_DIR."""
    from ddk_cache.train.report import write_report

    for path in write_report(run):
        click.echo(f"wrote {path}")
