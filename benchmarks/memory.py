"""Memory of the training step: the chunked loss, and FSDP2 against DDP.

    python benchmarks/memory.py loss --vocab 32000 151936 --tokens 8192 --chunk 256 512 1024
    python benchmarks/memory.py loss --objective minillm --vocab 32000 151936 --tokens 8192
    torchrun --nproc-per-node 2 benchmarks/memory.py shard --work /tmp/mem     # per-rank state, checkpoint times

`loss`: peak memory and time of one forward + backward of CE + gamma * KD (top-64 forward
KL with the tail bucket) from the decoder's last hidden states [tokens, 1024], unchunked
(whole-batch logits, as before) and chunked (losses.chunked_loss): `recompute` (each chunk's
logits recomputed in the backward pass) and `fused` (the head's gradients computed in the
forward pass, the default of `distill`), at each `--chunk`. Each variant runs in a
fresh process; memory is its peak RSS (ru_maxrss) minus the RSS after the inputs were made
(CPU tensors: what the loss itself adds). Time: median of 3 after one warm-up.
`--objective minillm`: MiniLLM's loss instead (train/minillm.py: whole-logits minillm_loss
against chunked_minillm), on sequences of 512 whose second half is the response.

`shard` (under torchrun, gloo): a ~100M-parameter Llama student; after one optimizer step,
each rank's bytes of parameters, gradients and optimizer state under DDP and under FSDP2
(the tensors this rank holds: local shards under FSDP), and the time of a checkpoint save
and load (torch.distributed.checkpoint, every rank writing its part).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_loss(vocab: int, tokens: int, hidden: int, impl: str, chunk: int, objective: str = "kd") -> dict:
    from ddk_cache.train.losses import KDConfig, ce_and_sparse_kd
    from ddk_cache.train.minillm import MiniLLMConfig, chunked_minillm, minillm_loss
    from ddk_cache.train.losses import chunked_loss

    torch.manual_seed(0)
    torch.set_num_threads(2)
    h = torch.randn(tokens, hidden, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    labels = torch.randint(0, vocab, (tokens,))
    ids = torch.randint(0, vocab, (tokens, 64))
    lps = torch.log_softmax(torch.randn(tokens, 64), -1) - 0.5
    cfg = KDConfig("fkl")

    T = 512
    B = max(1, tokens // T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 2:] = True  # the response
    y = labels[: B * T].view(B, T)
    teacher_lp, old_lp = (torch.log_softmax(torch.randn(B, T, 8), -1)[..., 0] for _ in range(2))

    chunked = impl != "unchunked"

    def step() -> None:
        if objective == "minillm":
            hb = h[: B * T].view(B, T, hidden)
            if chunked:
                _, total, _ = chunked_minillm(hb, head, torch.where(mask, y, torch.full_like(y, -100)), ids[: B * T].view(B, T, -1),
                                              lps[: B * T].view(B, T, -1), teacher_lp, old_lp, MiniLLMConfig(), chunk=chunk,
                                              fused=impl == "fused")
            else:
                total = minillm_loss(head(hb), y, mask, ids[: B * T].view(B, T, -1), lps[: B * T].view(B, T, -1), teacher_lp, old_lp)
            total.backward()
        elif chunked:
            ce, kd, _ = chunked_loss(h, head, labels, cfg, topk_ids=ids, topk_logprobs=lps, chunk=chunk, fused=impl == "fused", kd_weight=0.2)
            (ce + 0.2 * kd).backward()
        else:
            ce, kd = ce_and_sparse_kd(head(h), labels, ids, lps, cfg)
            (ce.sum() + 0.2 * kd.sum()).backward()
        h.grad = head.weight.grad = None

    base = rss_mib()
    step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"extra_mib": peak - base, "seconds": sorted(times)[1]}


def cmd_loss(args: argparse.Namespace) -> None:
    impls = ["recompute", "fused"]
    rows = []
    for vocab in args.vocab:
        def run(impl: str, chunk: int) -> dict:
            out = subprocess.run([sys.executable, __file__, "_one", "--vocab", str(vocab), "--tokens", str(args.tokens),
                                  "--hidden", str(args.hidden), "--chunk", str(chunk), "--objective", args.objective, "--impl", impl],
                                 capture_output=True, text=True, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        u = run("unchunked", 0)
        rows.append((f"{vocab:,}", f"{args.tokens:,}", "unchunked", "-", f"{u['extra_mib']:,.0f}", "1", f"{u['seconds']:.2f}", "1"))
        # recompute (the previous default) at the largest chunk only: the before of each table
        for impl, chunk in [(i, c) for c in args.chunk for i in impls if i == "fused" or c == max(args.chunk)]:
            c = run(impl, chunk)
            rows.append((f"{vocab:,}", f"{args.tokens:,}", impl, f"{chunk:,}", f"{c['extra_mib']:,.0f}", f"{c['extra_mib'] / u['extra_mib']:.3f}",
                         f"{c['seconds']:.2f}", f"{c['seconds'] / u['seconds']:.2f}"))
    what = "top-64 forward KL + CE" if args.objective == "kd" else "MiniLLM (sequences of 512, response = second half)"
    print(f"machine: {machine()}; hidden {args.hidden}, {what}")
    print_table(("vocabulary", "tokens", "loss", "chunk", "extra MiB", "/ unchunked", "seconds", "time / unchunked"), rows)


def local_bytes(tensors) -> int:  # noqa: ANN001
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def cmd_shard(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ddk_cache.runtime import init_distributed, resolve_worker
    from ddk_cache.train import checkpoint
    from ddk_cache.train.losses import KDConfig
    from ddk_cache.train.student import StudentLoss, parallelize

    worker = resolve_worker()
    device = torch.device("cpu")
    init_distributed(worker, device)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12,
                         num_key_value_heads=12, max_position_embeddings=512, tie_word_embeddings=False)
    rows = []
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        module = StudentLoss(LlamaForCausalLM(config), KDConfig("none"), chunk=512)
        n_params = sum(p.numel() for p in module.parameters())
        trained = parallelize(module, mode, device, worker.world_size, bf16=False)
        opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)
        x = torch.randint(0, 32000, (2, 256))
        ce, _, _ = trained(x, x[:, 1:])
        ce.backward()
        opt.step()
        params = local_bytes(trained.parameters())
        grads = local_bytes(p.grad for p in trained.parameters() if p.grad is not None)
        states = local_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        run = Path(args.work) / mode
        state = {"step": 1}
        t0 = time.perf_counter()
        ckpt = checkpoint.save(run, 1, trained, opt, state, keep=1, rank=worker.rank)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        checkpoint.load(ckpt, trained, opt, worker.rank)
        load_s = time.perf_counter() - t0
        total = torch.tensor([params, grads, states], dtype=torch.float64)
        if worker.rank == 0:
            size = sum(f.stat().st_size for f in (ckpt / "dcp").iterdir())
            rows.append((mode, f"{n_params / 1e6:.1f}M", f"{params / 2**20:,.0f}", f"{grads / 2**20:,.0f}", f"{states / 2**20:,.0f}",
                         f"{(params + grads + states) / 2**20:,.0f}", f"{save_s:.2f}", f"{load_s:.2f}", f"{size / 2**20:,.0f}"))
        del trained, opt, module, total
    if worker.rank == 0:
        print(f"machine: {machine()}; {worker.world_size} ranks (gloo, CPU), float32, AdamW")
        print_table(("mode", "student", "params MiB/rank", "grads MiB/rank", "optimizer MiB/rank", "total MiB/rank", "checkpoint save s",
                     "checkpoint load s", "checkpoint MiB (all ranks)"), rows)
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["loss", "shard", "_one"])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, nargs="+", default=[1024])
    ap.add_argument("--impl", choices=["unchunked", "recompute", "fused"], default="fused")  # _one
    ap.add_argument("--objective", choices=["kd", "minillm"], default="kd")
    ap.add_argument("--work", default="/tmp/ddk-memory")
    args = ap.parse_args()
    if args.stage == "_one":
        print(json.dumps(one_loss(args.vocab[0], args.tokens, args.hidden, args.impl, args.chunk[0], args.objective)))
    elif args.stage == "loss":
        cmd_loss(args)
    else:
        cmd_shard(args)


if __name__ == "__main__":
    main()
