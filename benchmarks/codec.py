"""Bytes per token and fidelity of the cache's target encodings, for one or more teachers.

    python benchmarks/codec_teacher.py --corpus ../shared/corpora/dev --work /tmp/codec-bench        # the teacher
    python benchmarks/peaked_teacher.py --teacher /tmp/codec-bench/teacher-run/final \
        --tokens /tmp/codec-bench/tokens.zarr --scale 8 --out /tmp/codec-bench/peaked                  # a peaked one
    python benchmarks/codec.py --tokens /tmp/codec-bench/tokens.zarr \
        --teacher flat:/tmp/codec-bench/teacher-run/final peaked:/tmp/codec-bench/peaked/x8
    python benchmarks/codec.py --tokens /tmp/rt/tokens.zarr --teacher smollm2:smollm2 smollm2-x8:smollm2:8 \
        --encodings pack-v3 pack-v2          # the real teacher (SmolLM2-135M), and it with logits x 8 (a stress test)

Scores `--sequences` validation sequences per domain once per teacher (full float32
distributions, the build's own forward pass; `NAME:DIR:S` multiplies the logits by S, a
stress test), derives the targets with the build's own functions (targets.py; the tail
from the full distribution, as the transformers backend does), packs them with each
`--encodings` exactly as the build does, unpacks, and reports per predicted position:
bytes of the targets (the target token's log-prob included: pack stores it); the codec's
coarse KL (teacher's kept entries + tail vs the decoded ones + tail, the decoded tail as
stored) as mean, p99 and max over positions; the coarse KL vs the full teacher (truncation
included); covered mass.
Baselines at the same k and vocabulary: fp16 values + int32 ids + zstd-3 per sequence,
plain-v1 (float32 + int32, blosc-zstd-5 with shuffle), both plus 4 B of target log-prob,
and DistillKit's recommended formula (56 + k * ceil(log2 V) / 8 bytes). Sampled rows:
KL(target || teacher) over the sampled ids (an unbiased estimate is noisy per position),
unique ids kept. Speeds: encode per sequence (median of --repeats) and decode per batch of
--decode-batch sequences as the loader does (median), positions/s on one core. With
`--baseline REV` the decoders of git revision REV decode the same frames, call for call
in turn with today's (this VM's run-to-run spread, +-25%, hides a 20% change between two
runs), and must give the same ids and log-probs to 1e-6 (relative, or absolute near 0).
"""

from __future__ import annotations

import argparse
import importlib
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Blosc, Zstd

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table  # noqa: E402

from ddk_cache.capture.fidelity import coarse_kl  # noqa: E402
from ddk_cache.capture.teachers.hf import HFTeacher  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402
from ddk_cache.store.encodings import Layout, PackV2, PackV3, RowScores  # noqa: E402
from common import real_teacher  # noqa: E402

ENCODINGS = {"pack-v3": PackV3, "pack-v2": PackV2}
from ddk_cache.store.targets import TargetSpec, adaptive_cut, sample_from_logprobs  # noqa: E402

SETTINGS = [("top-k", TargetSpec(k=k)) for k in (16, 64, 128, 256)]
SETTINGS += [("adaptive", TargetSpec(k=256, min_mass=0.9)), ("adaptive", TargetSpec(k=256, min_mass=0.99)),
             ("adaptive", TargetSpec(k=256, min_prob=1e-3))]
SETTINGS += [("sampled", TargetSpec(kind="sampled", k=1, samples=n)) for n in (16, 50)]


def median_time(repeats: int, fn, *args):  # noqa: ANN001, ANN202
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def baseline_encodings(rev: str) -> dict:
    """PackV2 and PackV3 whose codecs are the pack modules of git revision `rev`, imported
    as a package of their own so that both versions run in one process."""
    from ddk_cache.store import encodings

    root = Path(__file__).resolve().parent.parent
    pkg = Path(tempfile.mkdtemp(prefix="codec-baseline-")) / "baseline_pack"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("pack2.py", "pack3.py", "planes.py"):
        (pkg / name).write_text(subprocess.run(["git", "show", f"{rev}:ddk_cache/store/{name}"], cwd=root, check=True,
                                               capture_output=True, text=True).stdout)
    sys.path.insert(0, str(pkg.parent))
    pack2, pack3 = importlib.import_module("baseline_pack.pack2"), importlib.import_module("baseline_pack.pack3")

    def built_with(module_name: str, module):  # noqa: ANN001, ANN202
        """An Encoding whose codec() constructs the baseline module's class (the encodings
        import their codec module when they first build one)."""
        def codec(self, layout: Layout):  # noqa: ANN001, ANN202
            saved = sys.modules[module_name]
            sys.modules[module_name] = module
            try:
                return type(self).__mro__[1].codec(self, layout)
            finally:
                sys.modules[module_name] = saved
        return codec

    import ddk_cache.store.pack2, ddk_cache.store.pack3  # noqa: E401, F401  (so that sys.modules holds both)

    Base2 = type("Base2", (encodings.PackV2,), {"codec": built_with("ddk_cache.store.pack2", pack2)})
    Base3 = type("Base3", (encodings.PackV3,), {"codec": built_with("ddk_cache.store.pack3", pack3)})
    return {"pack-v2": Base2, "pack-v3": Base3}


def name_of(label: str, spec: TargetSpec) -> str:
    if spec.kind == "sampled":
        return f"sampled N={spec.samples}"
    cut = (f", min-mass {spec.min_mass}" if spec.min_mass else "") + (f", min-prob {spec.min_prob}" if spec.min_prob else "")
    return f"{label} k={spec.k}{cut}"


def evaluate(teacher_path: str, tokens: np.ndarray, args: argparse.Namespace, scale: float = 1.0, encoding: str = "pack-v3") -> tuple[list, dict]:
    teacher = HFTeacher(teacher_path, device="cpu", dtype="float32", batch_size=4)
    V = teacher.vocab_size
    rows_full = [(logp if scale == 1 else torch.log_softmax(logp.double() * scale, -1).float(), nxt) for _, logp, nxt in teacher.rows(tokens)]
    teacher.close()
    P = tokens.shape[1] - 1
    n_pos = len(tokens) * P
    rows, speed = [], {}
    for label, spec in SETTINGS:
        name = name_of(label, spec)
        if args.only and args.only not in name:
            continue
        layout = Layout(positions=P, entries=spec.entries, vocab_size=V, targets=spec)
        enc = PackV2(kl_budget=args.kl_budget, zstd_level=args.zstd_level) if encoding == "pack-v2" else PackV3(zstd_level=args.zstd_level)
        codec = enc.codec(layout)
        base = None
        if args.baseline:
            Base = args.baseline_encodings[encoding]
            base = (Base(kl_budget=args.kl_budget, zstd_level=args.zstd_level) if encoding == "pack-v2"
                    else Base(zstd_level=args.zstd_level)).codec(layout)
        packed = fp16 = plain = 0
        kl_codec, kl_full, mass, kept, blobs = [], [], [], [], []
        enc_s = 0.0
        gen = torch.Generator().manual_seed(0)
        for logp, nxt in rows_full:
            target = logp.gather(-1, nxt[:, None]).squeeze(-1).numpy()
            if spec.kind == "sampled":
                ids, counts, lps = sample_from_logprobs(logp, spec, gen)
                row = RowScores(ids.astype(np.int32), lps, target, nxt.numpy(), counts)
            else:
                lp, ids = logp.topk(spec.k, -1)
                kept_lp = adaptive_cut(lp.numpy(), spec)
                outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, torch.from_numpy(~np.isfinite(kept_lp)))
                tail = torch.logsumexp(logp.double().masked_fill(~outside, float("-inf")), -1).numpy()
                row = RowScores(ids.numpy().astype(np.int32), kept_lp, target, nxt.numpy(), tail_logprob=tail)
                fp16 += len(Zstd(3).encode(lp.numpy().astype(np.float16).tobytes())) + len(Zstd(3).encode(row.ids.tobytes())) + 4 * P
                plain += len(Blosc("zstd", 5, Blosc.SHUFFLE).encode(lp.numpy())) + len(Blosc("zstd", 5, Blosc.SHUFFLE).encode(row.ids)) + 4 * P
            blob, t = median_time(args.repeats, lambda r=row: enc.encode(r, layout)["targets"])
            enc_s += t
            packed += len(blob)
            blobs.append(blob)
            decoded = enc.decode({"targets": [blob]}, layout)
            d_ids, d_lps = decoded.ids[0], decoded.logprobs[0]
            d_tail = None if decoded.tail_logprob is None else np.exp(decoded.tail_logprob[0].astype(np.float64))
            valid = np.isfinite(d_lps)
            dec = np.where(valid, np.exp(d_lps.astype(np.float64)), 0.0)
            full64 = logp.double().numpy()
            p = np.where(valid, np.exp(np.take_along_axis(full64, d_ids.astype(np.int64), 1)), 0.0)
            if spec.kind == "sampled":
                kl_full.append(coarse_kl(dec, p))
                kl_codec.append(np.zeros(P))  # counts are exact
            else:
                # The teacher's exact tail outside the decoded ids (the same ids the codec kept).
                inside = np.zeros_like(full64, bool)
                np.put_along_axis(inside, np.where(valid, d_ids, d_ids[:, :1]).astype(np.int64), True, 1)
                p_tail = np.exp(np.logaddexp.reduce(np.where(inside, -np.inf, full64), 1))
                kl_codec.append(coarse_kl(p, dec, p_tail, d_tail))
                kl_full.append(coarse_kl(p, dec, p_tail, d_tail))
            kept.append(valid.sum(1))
            mass.append(p.sum(1))
        B = args.decode_batch
        batches = [blobs[i : i + B] for i in range(0, len(blobs) - B + 1, B)] or [blobs]
        out = tuple(np.empty((len(batches[0]), P, spec.entries), dt) for dt in (np.int32, np.float32)) + (np.empty((len(batches[0]), P), np.float32),)
        out2 = tuple(a.copy() for a in out)
        dec_s, base_s = [], []
        for _ in range(args.repeats):
            for b in batches:
                t0 = time.perf_counter()
                got = codec.decode(b, P, spec.sample_temperature, out=out if len(b) == len(batches[0]) else None)
                dec_s.append((time.perf_counter() - t0) / len(b))
                if base is not None:
                    got = tuple(a.copy() for a in got)
                    t0 = time.perf_counter()
                    was = base.decode(b, P, spec.sample_temperature, out=out2 if len(b) == len(batches[0]) else None)
                    base_s.append((time.perf_counter() - t0) / len(b))
                    assert np.array_equal(got[0], was[0]) and np.array_equal(np.isfinite(got[1]), np.isfinite(was[1]))
                    fin = np.isfinite(was[1])
                    assert np.allclose(got[1][fin], was[1][fin], rtol=1e-6, atol=1e-6) and np.allclose(got[2], was[2], rtol=1e-6, atol=1e-6)
        kc, kf = np.concatenate(kl_codec), np.concatenate(kl_full)
        distillkit = 56 + spec.k * math.ceil(math.log2(V)) / 8
        topk = spec.kind == "topk"
        rows.append((
            name, f"{np.concatenate(kept).mean():.1f}", f"{packed / n_pos:.1f}",
            f"{fp16 / n_pos:.1f}" if fp16 else "-", f"{plain / n_pos:.1f}" if plain else "-",
            f"{distillkit:.0f}" if topk else "-", f"{packed / n_pos / distillkit:.3f}" if topk else "-",
            f"{kc.mean():.1e} / {np.quantile(kc, 0.99):.1e} / {kc.max():.1e}" if topk else "exact counts",
            f"{kf.mean():.2e}", f"{np.concatenate(mass).mean():.3f}",
        ))
        speed[name] = (n_pos / enc_s, P / float(np.median(dec_s))) + ((P / float(np.median(base_s)),) if base_s else ())
    return rows, speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", nargs="+", required=True, metavar="NAME:DIR[:SCALE]", help="DIR may be 'smollm2'")
    ap.add_argument("--encodings", nargs="+", default=["pack-v3"], choices=list(ENCODINGS))
    ap.add_argument("--tokens", required=True, help="a cache whose validation sequences are scored (codec_teacher.py's tokens.zarr)")
    ap.add_argument("--sequences", type=int, default=6, help="validation sequences per domain")
    ap.add_argument("--kl-budget", type=float, default=1e-4)
    ap.add_argument("--zstd-level", type=int, default=PackV3().zstd_level)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls; the median counts")
    ap.add_argument("--decode-batch", type=int, default=8, help="sequences per decode call (the loader decodes a batch at once)")
    ap.add_argument("--only", default=None, help="run the settings whose name contains this")
    ap.add_argument("--baseline", default=None, metavar="REV", help="also time the decoders of this git revision, interleaved")
    args = ap.parse_args()
    args.baseline_encodings = baseline_encodings(args.baseline) if args.baseline else None
    torch.set_num_threads(1)
    cache = Cache(args.tokens)
    tokens = np.concatenate([cache.tokens(d, "val", np.arange(min(args.sequences, cache.num_sequences(d, "val")))) for d in cache.domains])
    print(f"machine: {machine()}; {len(tokens)} sequences x {tokens.shape[1] - 1} positions; pack-v3 step 2^-9; pack-v2 kl_budget "
          f"{args.kl_budget}; zstd level {args.zstd_level} (ids)\n")
    for spec in args.teacher:
        name, path, *scale = spec.split(":")
        path = real_teacher(path)
        for encoding in args.encodings:
            rows, speed = evaluate(path, tokens, args, float(scale[0]) if scale else 1.0, encoding)
            print(f"### {name} teacher ({path}{f', logits x {scale[0]}: a stress test' if scale else ''}), {encoding}\n")
            print_table(("targets", "entries/pos", f"{encoding} B/pos", "fp16+int32+zstd", "plain-v1", "DistillKit formula", "pack / DistillKit",
                         "codec coarse KL mean / p99 / max", "coarse KL vs full teacher (mean)", "covered mass"), rows)
            print()
            head = ("targets", "encode pos/s (1 core)", f"decode pos/s (1 core, batches of {args.decode_batch})")
            if args.baseline:
                head += (f"decode at {args.baseline}", "speed-up")
            print_table(head, [(k, f"{v[0]:,.0f}", f"{v[1]:,.0f}") + ((f"{v[2]:,.0f}", f"{v[1] / v[2]:.2f}x") if len(v) > 2 else ())
                               for k, v in speed.items()])
            print()


if __name__ == "__main__":
    main()
