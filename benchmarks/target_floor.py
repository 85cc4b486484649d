"""How small can top-k targets get on a real teacher? The bytes pack-v3 writes per stream, next
to the empirical entropies of those streams under simple models (issue #32, "report the floor").

    python benchmarks/target_floor.py --teacher smollm2 --tokens /tmp/rt/tokens.zarr --sequences 16 --k 64

Scores `--sequences` validation sequences per domain with the teacher (float64 log-softmax
of the float32 logits, the tail from the full distribution), packs each sequence with
pack-v3 exactly as the build does, and prints, per predicted position:

* **written**: pack-v3's bytes per stream (per-position fields, ids, value steps, exact
  target log-probs), zstd as stored;
* **ids**: other generic coders of the same rank-ordered id stream (zstd over raw uint16 per
  sequence and per 16 sequences, and after remapping ids by their frequency in the other
  half of the sample), and order-0 entropies (what an ideal entropy coder with that model
  spends): one frequency table for all ranks; one per rank; one per rank conditioned on the
  current input token's candidate list (ids seen after that token in the other half); and
  the *set* floor (order-0 minus log2(k!) per row: what coding the ids as an unordered set
  would save, if the values then cost nothing extra; they do: see values);
* **values**: the empirical entropy of pack-v3's rank-order level steps (order-0) at its
  step 2^-9 and at 2^-8, and of the levels themselves in id order (what set coding of the
  ids would have to store instead).

Entropies fitted on the sample they measure are optimistic for small samples (a per-rank
table over 20k positions), so the floors are lower bounds for those models, not coders.
"""

from __future__ import annotations

import argparse
import math
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, print_table, real_teacher  # noqa: E402

from ddk_cache.capture.teachers.hf import HFTeacher  # noqa: E402
from ddk_cache.store.cache import Cache  # noqa: E402
from ddk_cache.store.pack2 import HEADER  # noqa: E402
from ddk_cache.store.pack3 import DEFAULT_KNEE, Pack3Codec, compand  # noqa: E402


def entropy_bits(values: np.ndarray) -> float:
    """Empirical order-0 entropy, bits per value."""
    counts = np.unique(np.asarray(values).ravel(), return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def score(teacher: str, tokens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(top-k ids [S, P, k], their float64 log-probs, the target tokens' log-probs [S, P], V)."""
    model = HFTeacher(teacher, device="cpu", dtype="float32", batch_size=4)
    V = model.vocab_size
    S, P = len(tokens), tokens.shape[1] - 1
    ids, lps, tgt = np.empty((S, P, k), np.int64), np.empty((S, P, k)), np.empty((S, P))
    with torch.inference_mode():
        for row, logp, nxt in model.rows(tokens):
            logp = logp.double()
            v, i = logp.topk(k, -1)
            ids[row], lps[row] = i.numpy(), v.numpy()
            tgt[row] = logp.gather(-1, nxt[:, None]).squeeze(-1).numpy()
    model.close()
    return ids, lps, tgt, V


def levels_of(lps: np.ndarray, step: float, knee: float = DEFAULT_KNEE) -> np.ndarray:
    """pack-v3's levels at the base step (no refinement): companded log-ratio to the top-1 / step."""
    return np.rint(compand(lps[..., :1] - lps, knee) / step).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2", help="'smollm2' or a transformers directory")
    ap.add_argument("--tokens", required=True, help="a cache whose validation sequences are scored (tokens-only is enough)")
    ap.add_argument("--sequences", type=int, default=16, help="validation sequences per domain")
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()

    cache = Cache(args.tokens)
    tokens = np.concatenate([cache.tokens(d, "val", np.arange(min(args.sequences, cache.num_sequences(d, "val")))) for d in cache.domains])
    teacher = real_teacher(args.teacher)
    ids, lps, tgt, V = score(teacher, tokens, args.k)
    S, P, K = ids.shape
    n = S * P
    print(f"machine: {machine()}; teacher {args.teacher} (V = {V:,}); {S} sequences x {P} positions = {n:,} positions; k = {K}")
    formula = 56 + K * math.ceil(math.log2(V)) / 8

    # ---- what pack-v3 writes, per stream
    codec = Pack3Codec(vocab_size=V, max_entries=K)
    streams, total = np.zeros(4), 0
    for s in range(S):
        frame = codec.encode_topk(ids[s], lps[s], tgt[s], tokens[s, 1:])
        total += len(frame)
        m = HEADER.unpack_from(frame, 0)[-1]
        streams += np.array(struct.unpack_from(f"<{2 * m}I", frame, HEADER.size)[:m])
    overhead = total - streams.sum()
    print(f"\npack-v3 as written: {total / n:.1f} B/position ({total / n / formula:.2f}x DistillKit's formula, {formula:.0f} B)\n")
    print_table(("stream", "B/position"), [
        ("ids (2 byte planes, zstd-7 per sequence)", f"{streams[1] / n:.1f}"),
        ("value steps (byte planes, zstd-3)", f"{streams[2] / n:.1f}"),
        ("per-position (count, flags, target ref, tail)", f"{streams[0] / n:.1f}"),
        ("exact target log-probs (target not kept)", f"{streams[3] / n:.2f}"),
        ("frame headers", f"{overhead / n:.2f}"),
    ])

    # ---- the id stream under other coders and models
    half = S // 2
    z = lambda b, lv: len(Zstd(level=lv).encode(b))  # noqa: E731
    rows = []
    for lv in (3, 19):
        rows.append((f"zstd-{lv}, raw uint16, per sequence", np.mean([z(ids[s].astype("<u2").tobytes(), lv) for s in range(S)]) / P))
    for lv in (3, 19):
        rows.append((f"zstd-{lv}, raw uint16, per 16 sequences", sum(z(ids[s:s + 16].astype("<u2").tobytes(), lv) for s in range(0, S, 16)) / n))
    # Frequency remap: a table made from one half of the sample, applied to the other.
    freq = np.bincount(ids[:half].ravel(), minlength=V)
    remap = np.empty(V, np.int64)
    remap[np.argsort(-freq, kind="stable")] = np.arange(V)
    remapped = remap[ids[half:]]
    rows.append(("zstd-19 after a frequency remap, per sequence",
                 np.mean([z(remapped[s].astype("<u2").tobytes(), 19) for s in range(len(remapped))]) / P))
    h_global = entropy_bits(ids)
    h_rank = float(np.mean([entropy_bits(ids[:, :, j]) for j in range(K)]))
    set_saving = math.lgamma(K + 1) / math.log(2) / K
    # Context: the current input token; the id coded as its index in that token's list of ids
    # seen (in the other half) at the same rank or any rank, else an escape into the frequency order.
    ctx = tokens[:, :P].astype(np.int64)
    key = np.repeat(ctx[:half].ravel(), K) * V + ids[:half].ravel()
    pairs, counts = np.unique(key, return_counts=True)
    c_ctx, c_id = pairs // V, pairs % V
    order = np.lexsort((remap[c_id], -counts, c_ctx))
    c_ctx, c_id = c_ctx[order], c_id[order]
    start = np.searchsorted(c_ctx, np.arange(V + 1))
    index = {}
    for c in np.unique(ctx[half:]):
        index[int(c)] = {int(v): i for i, v in enumerate(c_id[start[c]:start[c + 1]])}
    coded = np.empty_like(ids[half:])
    for s in range(S - half):
        for t in range(P):
            table = index.get(int(ctx[half + s, t]), {})
            coded[s, t] = [table.get(int(v), len(table) + int(remap[v])) for v in ids[half + s, t]]
    h_ctx = entropy_bits(coded)
    rows += [
        ("order-0, one table (rank order)", h_global * K / 8),
        ("order-0, one table per rank", h_rank * K / 8),
        ("order-0 of the index in the input token's list (other half's lists)", h_ctx * K / 8),
        ("set floor: one table minus log2(k!) per row", (h_global - set_saving) * K / 8),
    ]
    print("\nThe ids (what pack-v3 writes: " f"{streams[1] / n:.1f} B/position)\n")
    print_table(("coder or model", "B/position"), [(name, f"{v:.1f}") for name, v in rows])

    # ---- the values
    vrows = []
    for step in (2.0**-9, 2.0**-8):
        lv = levels_of(lps, step)
        steps = np.diff(lv, axis=-1)
        vrows.append((f"rank-order level steps, step 2^{int(math.log2(step))}", entropy_bits(steps) * (K - 1) / 8))
        vrows.append((f"levels in id order (set coding), step 2^{int(math.log2(step))}", entropy_bits(lv[..., 1:]) * (K - 1) / 8))
    print(f"\nThe values (what pack-v3 writes: {streams[2] / n:.1f} B/position)\n")
    print_table(("model", "B/position (order-0 entropy)"), [(name, f"{v:.1f}") for name, v in vrows])


if __name__ == "__main__":
    main()
