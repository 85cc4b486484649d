"""`ddk-cache distill`, `ddk-cache eval`, `ddk-cache report`: train from a cache, measure, plot."""

from __future__ import annotations

import dataclasses
import json

import click

from ddk_cache.train.distill import DistillConfig, distill as run_distill

HELP = {
    "cache": "The cache to learn from (complete; see `ddk-cache inspect`).",
    "out": "Run directory: checkpoints/, metrics.jsonl, final/ (save_pretrained + tokenizer).",
    "student": "Student causal LM: local directory or hub id (pretrained, as in DDK).",
    "student_config": "Or a transformers config.json: start the student from random weights.",
    "tokenizer": "Tokenizer directory (default: --student). Its fingerprint must equal the cache's.",
    "kd_loss": "fkl (forward KL), rkl (reverse KL, MiniLLM's token-level term), skl, srkl (DistiLLM skew, alpha 0.1), jsd (generalised JSD), akl (adaptive KL), none (CE only).",
    "online_teacher": "Dense online KD instead of the cache's targets: this teacher (transformers) runs every step and its full distribution is the target; the cache gives tokens and the teacher PPL table. The baseline the cache replaces.",
    "kd_weight": "gamma in loss = CE + gamma * KD (DDK: 0.2).",
    "temperature": "T of both distributions in the KD term.",
    "tail": "Teacher mass outside the top-k: 'bucket' (one extra category on both sides) or 'renorm'.",
    "skew_alpha": "alpha of skl/srkl.", "jsd_beta": "beta of jsd.", "akl_mu": "head mass mu of akl.",
    "mixing": "ddk, ddk-nosmooth, uniform, natural (by size) or static:DOMAIN=W,...",
    "ddk_interval": "Steps between per-domain evaluations and DDK weight updates (DDK: 1000; scale down for small runs).",
    "ddk_alpha": "DDK smoothing alpha: r = alpha * psi/sum(psi) + (1 - alpha)/N.",
    "batch_size": "Sequences per rank per micro-step.", "grad_accum": "Micro-steps per optimizer step.",
    "lr": "Peak learning rate (AdamW).", "min_lr_ratio": "Cosine decays to lr * this.", "warmup_steps": "Linear warm-up steps.",
    "weight_decay": "AdamW weight decay (matrices only).", "grad_clip": "Max gradient norm (0 = off).",
    "max_steps": "Optimizer steps.", "max_tokens": "If > 0: train on this many tokens (all ranks) instead of --max-steps.",
    "seed": "Seed of the sampling and of a random-init student.", "device": "auto = cuda:LOCAL_RANK if available, else cpu.",
    "bf16": "bfloat16 autocast: auto (GPU only), on, off.", "gradient_checkpointing": "Trade compute for activation memory.",
    "eval_batch_size": "Sequences per evaluation forward pass.", "save_every": "Checkpoint every N steps.",
    "keep_checkpoints": "Newest checkpoints kept.", "resume": "Continue from the newest checkpoint in --out, exactly.",
    "prefetch": "Batches the reader thread reads ahead.",
    "loader_workers": "Reader processes that decode batches in parallel (0: the reader thread alone). Use a few on a GPU, whose student consumes more than one core decodes.",
}


def _options(func):
    """One flag per DistillConfig field; flags default to None so the config file can fill them."""
    for f in reversed(dataclasses.fields(DistillConfig)):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            func = click.option(flag, f.name, is_flag=True, default=None, help=HELP[f.name])(func)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            shown = f" [default: {f.default}]" if f.default not in ("", None) else ""
            func = click.option(flag, f.name, type=kind, default=None, help=HELP[f.name] + shown)(func)
    return func


@click.command()
@click.option("--config", "config_file", type=click.Path(), help="YAML file of options (keys as the flags, - or _); flags override it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_options
def distill(config_file: str | None, quiet: bool, **overrides: object) -> None:
    """Train a student from a cache alone: CE + gamma * KD on the cached top-k teacher
    log-probabilities, with DDK domain mixing (arXiv 2407.16154) by default.

    \b
    ddk-cache distill --cache cache.zarr --student student/ --out runs/s1 --max-steps 2000 --ddk-interval 100
    torchrun --nproc-per-node 4 -m ddk_cache distill --config distill.yaml     # DDP
    ddk-cache distill --config distill.yaml --resume                           # continue exactly
    """
    cfg = DistillConfig.from_sources(config_file, overrides)
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
    """Per-domain perplexity of MODEL on the cache's validation split, beside the teacher's."""
    import torch

    from ddk_cache.train.distill import load_student
    from ddk_cache.train.evaluate import evaluate_domains
    from ddk_cache.store.cache import Cache

    c = Cache(cache)
    cfg = DistillConfig(cache=cache, out="-", student=model_path)
    model, _ = load_student(cfg, c)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    ppl = evaluate_domains(model.to(dev), c, batch_size=batch_size, device=dev)
    rows = [{"domain": d, "student_ppl": ppl[d], "teacher_ppl": c.teacher_ppl(d), "ratio": ppl[d] / c.teacher_ppl(d)} for d in c.domains]
    if as_json:
        click.echo(json.dumps({"cache": cache, "model": model_path, "rows": rows}, indent=2))
        return
    click.echo(f"{'domain':<16}{'student PPL':>14}{'teacher PPL':>14}{'ratio':>8}")
    for r in rows:
        click.echo(f"{r['domain']:<16}{r['student_ppl']:>14.3f}{r['teacher_ppl']:>14.3f}{r['ratio']:>8.3f}")


@click.command()
@click.argument("run", metavar="RUN_DIR")
def report(run: str) -> None:
    """Plot a distill run (domain weights, per-domain student/teacher PPL, loss) as PNGs and
    write report.md with the per-domain table, all inside RUN_DIR."""
    from ddk_cache.train.report import write_report

    for path in write_report(run):
        click.echo(f"wrote {path}")
