"""MiniLLM rounds vs SFT and token-level KD, at equal student updates (arXiv 2306.08543's comparison, tiny).

    python benchmarks/codec_teacher.py --corpus ../shared/corpora/dev --work /tmp/codec-bench   # the teacher (if not there)
    python benchmarks/minillm.py --teacher /tmp/codec-bench/teacher-run/final --tokens /tmp/codec-bench/tokens.zarr \
        --corpus ../shared/corpora/dev --work /tmp/minillm-bench --seeds 0 1 2

Instruction-style data from plain text: a prompt is the start of a document (about
--prompt-chars characters, cut at a word), its reference response the teacher's sampled
continuation; the "chat template" concatenates the two, so prompt and response are the text
the teacher was trained on and only the response carries loss. Train prompts and held-out
prompts come from different documents.

Student: a small Llama of the teacher's tokenizer, first pre-trained with CE on the
teacher's tokens-only cache (`student0`, shared by every method). Then, for each seed, the
same number of optimizer steps (--steps) of:
  SFT        distill --kd-loss none on the teacher's responses (the response tokens' CE)
  FKL        distill --kd-loss fkl  (CE + 0.2 forward KL to the cached top-64) on them
  RKL        distill --kd-loss rkl  (CE + 0.2 token-level reverse KL) on them
  MiniLLM    ddk-cache minillm: --rounds rounds of --steps/rounds steps on the student's own samples
  + mixed    the same with teacher-mixed sampling (each token from 0.2 p + 0.8 q)
  + mixed + L_PT   and the paper's pre-training LM term (--pretrain-cache: the tokens cache
             student0 was pre-trained on, weight 1)
Metrics on the held-out prompts, from one seeded sample (temperature 1) per prompt of each
student (the teacher's own row: a second sample of the teacher, its ceiling): Rouge-L F1 (words) against the teacher's response, the teacher's per-token NLL of
the student's response (the reverse-KL reward, lower = closer to what the teacher would
say), mean response length, and the share of repeated word 3-grams within a response.
Prints mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.capture.build import BuildConfig, build  # noqa: E402
from ddk_cache.capture.generate import GenerateConfig, generate  # noqa: E402
from ddk_cache.capture.tokenization import load_tokenizer  # noqa: E402
from ddk_cache.minillm_rounds import RoundsConfig, run_rounds  # noqa: E402
from ddk_cache.models import ModelSpec, init_model  # noqa: E402
from ddk_cache.train.distill import DistillConfig, distill  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # prompt, then response: plain text


def prompts_from(corpus: Path, work: Path, chars: int, n_train: int, n_eval: int) -> tuple[Path, Path]:
    train, held = work / "prompts-train.jsonl", work / "prompts-eval.jsonl"
    if train.exists() and held.exists():
        return train, held
    rows = []
    files = sorted(corpus.glob("*.jsonl"))
    per = (n_train + n_eval) // len(files) + 1
    for f in files:
        docs = [json.loads(line)["text"] for line in open(f, encoding="utf-8")]
        docs = [d for d in docs if len(d) > 3 * chars]
        step = max(1, len(docs) // per)
        for d in docs[::step][:per]:
            cut = d[:chars].rsplit(" ", 1)[0]
            rows.append({"prompt": cut})
    held_rows, train_rows = rows[::5][:n_eval], [r for i, r in enumerate(rows) if i % 5][:n_train]
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in held_rows))
    return train, held


def words(text: str) -> list[str]:
    return text.split()


def rouge_l(candidate: str, reference: str) -> float:
    a, b = words(candidate), words(reference)
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def repetition(text: str) -> float:
    w = words(text)
    grams = [tuple(w[i: i + 3]) for i in range(len(w) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def teacher_nll(teacher, tok, records: list[dict]) -> float:
    total, count = 0.0, 0
    for r in records:
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True, chat_template=TEMPLATE)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        resp = r["response_ids"]
        if not resp:
            continue
        x = torch.tensor([ids + resp])
        logp = torch.log_softmax(teacher(input_ids=x).logits[0, len(ids) - 1: -1].float(), -1)
        total -= float(logp.gather(-1, torch.tensor(resp).unsqueeze(-1)).sum())
        count += len(resp)
    return total / max(count, 1)


def evaluate(model_dir: Path, held: Path, references: list[dict], teacher, tok, out: Path, max_new: int) -> dict[str, float]:
    if not out.exists():
        generate(GenerateConfig(model=str(model_dir), prompts=str(held), out=str(out), max_new_tokens=max_new, seed=1234,
                                chat_template=TEMPLATE, device="cpu", engine="hf"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    texts = [r["messages"][-1]["content"] for r in records]
    refs = [r["messages"][-1]["content"] for r in references]
    return {
        "rouge_l": 100 * statistics.mean(rouge_l(a, b) for a, b in zip(texts, refs)),
        "teacher_nll": teacher_nll(teacher, tok, records),
        "length": statistics.mean(len(r["response_ids"]) for r in records),
        "rep3": 100 * statistics.mean(repetition(t) for t in texts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--tokens", type=Path, required=True, help="the teacher's tokens-only cache (student pre-training)")
    ap.add_argument("--corpus", type=Path, default=Path("../shared/corpora/dev"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/minillm-bench"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per method (after the shared pre-training)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-chars", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--train-prompts", type=int, default=160)
    ap.add_argument("--eval-prompts", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--reference-seed", type=int, default=4321,
                    help="seed of the teacher's reference responses (1234, the students' evaluation seed: common random numbers)")
    ap.add_argument("--variants", nargs="*", default=[], help="MiniLLM variants to run (minillm, minillm-mixed, minillm-mixed-pt; default all)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_prompts, held = prompts_from(args.corpus.resolve(), work, args.prompt_chars, args.train_prompts, args.eval_prompts)
    seq_len = 128
    common = dict(seq_len=seq_len, backend="hf", device="cpu", dtype="float32", chat_template=TEMPLATE, val_tokens=8 * seq_len)

    # The teacher's responses: SFT / KD data (train prompts) and references (held-out prompts).
    sft_dir = work / "teacher-responses"
    generate(GenerateConfig(model=str(args.teacher), prompts=str(train_prompts), out=str(sft_dir / "resp.jsonl"),
                            max_new_tokens=args.max_new_tokens, seed=7, chat_template=TEMPLATE, device="cpu", engine="hf"))
    # References: another seed than the students' evaluation samples (1234), so the teacher's
    # own row is the ceiling a second teacher sample reaches.
    generate(GenerateConfig(model=str(args.teacher), prompts=str(held), out=str(work / f"references-seed{args.reference_seed}.jsonl"),
                            max_new_tokens=args.max_new_tokens, seed=args.reference_seed, chat_template=TEMPLATE, device="cpu",
                            engine="hf"))
    references = [json.loads(line) for line in (work / f"references-seed{args.reference_seed}.jsonl").read_text().splitlines()]
    kd_cache = work / "teacher-responses.zarr"
    build(BuildConfig(teacher=str(args.teacher), data=str(sft_dir), out=str(kd_cache), top_k=64, encoding="plain", **common),
          progress=False)

    # student0: a small Llama of the teacher's tokenizer, pre-trained with CE on the teacher's corpus.
    tok = load_tokenizer(str(args.teacher))
    init = work / "student-init"
    if not init.exists():
        init_model(ModelSpec(vocab_size=len(tok), hidden_size=64, layers=2, heads=1, max_position_embeddings=512, seed=0),
                   tok).save_pretrained(init)
        tok.save_pretrained(init)
    pre = work / "student0"
    if not (pre / "final").exists():
        distill(DistillConfig(cache=str(args.tokens), student=str(init), out=str(pre), kd_loss="none", mixing="natural", max_steps=300,
                              batch_size=8, lr=3e-3, warmup_steps=20, ddk_interval=300, save_every=100, device="cpu", resume=True),
                progress=False)
    student0 = pre / "final"

    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    results: dict[str, list[dict]] = {}
    results["teacher"] = [evaluate(args.teacher, held, references, teacher, tok, work / "eval-teacher.jsonl", args.max_new_tokens)]
    results["student0 (pre-trained only)"] = [evaluate(student0, held, references, teacher, tok, work / "eval-student0.jsonl", args.max_new_tokens)]
    for seed in args.seeds:
        for name, kind in (("SFT", "none"), ("FKL", "fkl"), ("RKL (token-level)", "rkl")):
            run = work / f"{kind}-s{seed}"
            if not (run / "final").exists():
                distill(DistillConfig(cache=str(kd_cache), student=str(student0), out=str(run), kd_loss=kind, mixing="uniform",
                                      max_steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=5, ddk_interval=args.steps,
                                      save_every=args.steps, seed=seed, device="cpu", resume=True), progress=False)
            results.setdefault(name, []).append(evaluate(run / "final", held, references, teacher, tok, work / f"eval-{kind}-s{seed}.jsonl",
                                                         args.max_new_tokens))
        variants = {"MiniLLM rounds": ("minillm", {}), "MiniLLM + teacher-mixed": ("minillm-mixed", {"mix_alpha": 0.2}),
                    "MiniLLM + teacher-mixed + L_PT": ("minillm-mixed-pt", {"mix_alpha": 0.2, "pretrain_cache": str(args.tokens)})}
        for name, (tag, extra) in variants.items():
            if args.variants and tag not in args.variants:
                continue
            final = run_rounds(RoundsConfig(student=str(student0), teacher=str(args.teacher), prompts=str(train_prompts),
                                            out=str(work / f"{tag}-s{seed}"), rounds=args.rounds, steps_per_round=args.steps // args.rounds,
                                            max_new_tokens=args.max_new_tokens, seq_len=seq_len, top_k=64, batch_size=8, lr=args.lr,
                                            warmup_steps=5, chat_template=TEMPLATE, seed=seed, device="cpu", engine="hf", **extra),
                               progress=False, say=lambda line: None)
            results.setdefault(name, []).append(evaluate(final, held, references, teacher, tok, work / f"eval-{tag}-s{seed}.jsonl",
                                                         args.max_new_tokens))

    def cell(values: list[float], fmt: str) -> str:
        if len(values) == 1:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

    print(f"machine: {machine()}")
    print(f"{len(references)} held-out prompts, {args.max_new_tokens} new tokens at most, {args.steps} steps per method, "
          f"seeds {args.seeds}, MiniLLM {args.rounds} rounds\n")
    rows = [(name, cell([r["rouge_l"] for r in rs], ".1f"), cell([r["teacher_nll"] for r in rs], ".3f"),
             cell([r["length"] for r in rs], ".1f"), cell([r["rep3"] for r in rs], ".1f")) for name, rs in results.items()]
    print_table(("student", "Rouge-L vs teacher", "teacher NLL of its samples (nats/token)", "length (tokens)", "repeated 3-grams (%)"), rows)


if __name__ == "__main__":
    main()
