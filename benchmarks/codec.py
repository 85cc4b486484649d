"""Bytes per token and fidelity of the cache encodings on one trained 32k-vocabulary teacher.

    python benchmarks/codec_teacher.py --corpus ../shared/corpora/dev --work /tmp/codec-bench   # the teacher
    python benchmarks/codec.py --teacher /tmp/codec-bench/teacher-run/final --tokens /tmp/codec-bench/tokens.zarr

Scores `--sequences` validation sequences per domain once (full float32 distributions),
then for each setting derives the targets with the build's own functions (targets.py),
packs them with the build's codec (pack-v1), unpacks, and reports per predicted position:
bytes of the targets; coarse KL of the codec (teacher's kept entries + tail vs. the decoded
ones + tail; adaptive rows over what they keep); coarse KL vs. the full teacher (truncation
included); covered teacher mass. Baselines: fp16 values + int32 ids + zstd-3 per sequence,
plain-v1 (float32 + int32, blosc-zstd-5 with shuffle), and DistillKit's recommended formula
(56 + k * ceil(log2 V) / 8 bytes). Encode/decode speed on one core: per sequence the median of --repeats calls, summed.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import zarr
from common import machine, print_table
from numcodecs import Blosc, Zstd

from ddk_cache.store.encodings import PackEncoding
from ddk_cache.capture.fidelity import coarse_kl
from ddk_cache.store.targets import TargetSpec, adaptive_cut, sample_from_logprobs
from ddk_cache.capture.teachers.hf import HFTeacher


def timed(repeats: int, fn, *args):  # noqa: ANN001, ANN202
    """(fn(*args), median seconds of `repeats` calls): single runs of ~1 ms are too noisy here."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--tokens", required=True, help="a cache whose val sequences are scored (codec_teacher.py's tokens.zarr)")
    ap.add_argument("--sequences", type=int, default=6, help="validation sequences per domain")
    ap.add_argument("--kl-budget", type=float, default=1e-4)
    ap.add_argument("--zstd-level", type=int, default=PackEncoding().zstd_level)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per sequence; the median counts")
    ap.add_argument("--only", default=None, help="run the settings whose name contains this")
    args = ap.parse_args()
    torch.set_num_threads(1)
    teacher = HFTeacher(args.teacher, device="cpu", dtype="float32")
    root = zarr.open_group(args.tokens, mode="r")
    meta = root.attrs["ddk_cache"]
    tokens = np.concatenate([root[f"{d}/val/tokens"][: args.sequences] for d in meta["domains"]])
    V = teacher.vocab_size
    full = [logp for _, logp, _ in teacher.rows(tokens)]  # the build's own forward pass (float32)
    P = tokens.shape[1] - 1
    n_pos = len(tokens) * P
    settings = [("top-k", TargetSpec(k=k)) for k in (16, 32, 64, 128)]
    settings += [("adaptive", TargetSpec(k=128, min_mass=m)) for m in (0.5, 0.8)]
    settings += [("adaptive", TargetSpec(k=128, min_prob=1e-3))]
    settings += [("sampled", TargetSpec(kind="sampled", k=64, samples=n)) for n in (16, 50)]
    rows, speed = [], {}
    for label, spec in settings:
        if args.only and args.only not in f"{label} k={spec.k}":
            continue
        codec = PackEncoding(kl_budget=args.kl_budget, zstd_level=args.zstd_level).codec(vocab_size=V, max_entries=spec.entries)
        packed = fp16 = plain = 0
        kl_codec, kl_full, mass, kept = [], [], [], []
        enc_s = dec_s = 0.0
        gen = torch.Generator().manual_seed(0)
        for logp in full:
            if spec.kind == "sampled":
                ids, counts, lps = sample_from_logprobs(logp.float(), spec, gen)
                blob, enc_t = timed(args.repeats, codec.encode_sampled, ids, counts, None)
                (d_ids, d_lw), dec_t = timed(args.repeats, codec.decode_sampled, blob, P, 1.0)
                valid = np.isfinite(d_lw)
                w = np.where(valid, np.exp(d_lw.astype(np.float64)), 0)
                p = np.where(valid, np.exp(np.take_along_axis(logp.double().numpy(), d_ids, 1)), 0)
                kl_full.append(coarse_kl(w, p))  # KL(target || teacher): the target has no tail
                kl_codec.append(np.zeros(P))  # counts are exact
            else:
                lp, ids = logp.float().topk(spec.k, -1)
                ids, lps = ids.numpy().astype(np.int32), adaptive_cut(lp.numpy(), spec)
                blob, enc_t = timed(args.repeats, codec.encode_topk, ids, lps)
                (d_ids, d_lps), dec_t = timed(args.repeats, codec.decode_topk, blob, P)
                order = np.argsort(np.where(np.isfinite(lps), ids, 1 << 30), 1, kind="stable")
                orig = np.exp(np.take_along_axis(lps, order, 1).astype(np.float64))  # exp(-inf) = 0
                dec = np.where(np.isfinite(d_lps), np.exp(d_lps.astype(np.float64)), 0)
                p = np.where(np.isfinite(d_lps), np.exp(np.take_along_axis(logp.double().numpy(), d_ids, 1)), 0)
                kl_codec.append(coarse_kl(orig, dec))
                kl_full.append(coarse_kl(p, dec))
                fp16 += len(Zstd(3).encode(lp.numpy().astype(np.float16).tobytes())) + len(Zstd(3).encode(ids.tobytes()))
                plain += len(Blosc("zstd", 5, Blosc.SHUFFLE).encode(lp.numpy())) + len(Blosc("zstd", 5, Blosc.SHUFFLE).encode(ids))
                p = np.where(np.isfinite(d_lps), p, 0)
            kept.append(np.isfinite(d_lps if spec.kind != "sampled" else d_lw).sum(1))
            mass.append(p.sum(1))
            packed += len(blob)
            enc_s, dec_s = enc_s + enc_t, dec_s + dec_t
        distillkit = 56 + spec.k * math.ceil(math.log2(V)) / 8
        name = (f"{label} k={spec.k}" + (f", min-mass {spec.min_mass}" if spec.min_mass else "") + (f", min-prob {spec.min_prob}" if spec.min_prob else "")
                if spec.kind == "topk" else f"sampled N={spec.samples}")
        rows.append((
            name, f"{np.concatenate(kept).mean():.1f}", f"{packed / n_pos:.1f}",
            f"{fp16 / n_pos:.1f}" if fp16 else "-", f"{plain / n_pos:.1f}" if plain else "-",
            f"{distillkit:.0f}" if spec.kind == "topk" else "-", f"{packed / n_pos / distillkit:.3f}" if spec.kind == "topk" else "-",
            f"{np.concatenate(kl_codec).mean():.2e}", f"{np.concatenate(kl_full).mean():.2e}", f"{np.concatenate(mass).mean():.3f}",
        ))
        speed[name] = (n_pos / enc_s, n_pos / dec_s)
    print(f"machine: {machine()}; teacher {args.teacher} (vocabulary {V}); {len(tokens)} sequences x {P} positions; pack-v1 kl_budget {args.kl_budget}, zstd level {args.zstd_level}\n")
    print_table(("targets", "entries/pos", "pack-v1 B/pos", "fp16+int32+zstd", "plain-v1", "DistillKit formula", "pack / DistillKit",
                 "codec coarse KL", "coarse KL vs full teacher", "covered mass"), rows)
    print()
    print_table(("targets", "encode tok/s (1 core)", "decode tok/s (1 core)"), [(k, f"{e:,.0f}", f"{d:,.0f}") for k, (e, d) in speed.items()])


if __name__ == "__main__":
    main()
