"""Compare two output folders of benchmarks/same_results.sh; exit 1 on any difference."""

import json
import os
import sys

from ddk_cache.store.shards import TRAILER_MAGIC



def masked(blob: bytes) -> bytes:
    """A shard object with its build id blanked: the identity trailer (storage_layout.md) names
    the build by its fingerprint, which two revisions' builds need not share; every other byte
    (rows, the trailer's place and content hash, the index) must match."""
    at = blob.rfind(TRAILER_MAGIC)
    if at < 0:
        return blob
    start = at + len(TRAILER_MAGIC)
    return blob[:start] + bytes(16) + blob[start + 16:]


a, b = sys.argv[1], sys.argv[2]
bad = compared = 0
for enc in ("pack", "pack-v2", "plain"):
    ra, rb = f"{a}/c-{enc}.zarr", f"{b}/c-{enc}.zarr"
    for root, _, files in os.walk(ra):
        if "_build" in root:
            continue
        for name in files:
            if name == "zarr.json":
                continue
            pa = os.path.join(root, name)
            x, y = open(pa, "rb").read(), open(rb + pa[len(ra):], "rb").read()
            compared += 1
            if len(x) != len(y) or masked(x) != masked(y):
                bad += 1
                print("differs:", pa[len(a):])
    meta = [json.load(open(f"{r}/zarr.json"))["attributes"] for r in (ra, rb)]
    same = all(json.dumps(meta[0]["ddk_cache"].get(k), sort_keys=True) == json.dumps(meta[1]["ddk_cache"].get(k), sort_keys=True) for k in ("domains", "teacher_ppl"))
    bad += not same
    print(f"{enc}: domain metadata (splits, teacher PPL table) identical: {same}")
print(f"{compared} shard objects compared, every byte but the build id: {bad} differ")
for loss in ("fkl", "rkl", "akl"):
    rows = [[json.loads(line) for line in open(f"{r}/d-{loss}/metrics.jsonl")] for r in (a, b)]
    key = [[(r.get("type"), r.get("step"), r.get("loss"), r.get("kd"), r.get("ce"), json.dumps(r.get("weights"), sort_keys=True))
            for r in rs if r.get("type") in ("step", "eval")] for rs in rows]
    same = key[0] == key[1]
    bad += not same
    print(f"distill --kd-loss {loss}: {sum(k[0] == 'step' for k in key[0])} steps, losses and DDK weights identical: {same}")
sys.exit(1 if bad else 0)
