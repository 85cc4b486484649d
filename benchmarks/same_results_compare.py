"""Compare two output folders of benchmarks/same_results.sh; exit 1 on any difference."""

import json
import os
import sys

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
            if len(x) != len(y) or x[:-64] != y[:-64]:  # the trailer holds each build's random id
                bad += 1
                print("differs:", pa[len(a):])
    meta = [json.load(open(f"{r}/zarr.json"))["attributes"] for r in (ra, rb)]
    same = all(json.dumps(meta[0]["ddk_cache"].get(k), sort_keys=True) == json.dumps(meta[1]["ddk_cache"].get(k), sort_keys=True) for k in ("domains", "teacher_ppl"))
    bad += not same
    print(f"{enc}: domain metadata (splits, teacher PPL table) identical: {same}")
print(f"{compared} shard objects compared before the identity trailer: {bad} differ")
for loss in ("fkl", "rkl", "akl"):
    rows = [[json.loads(line) for line in open(f"{r}/d-{loss}/metrics.jsonl")] for r in (a, b)]
    key = [[(r.get("type"), r.get("step"), r.get("loss"), r.get("kd"), r.get("ce"), json.dumps(r.get("weights"), sort_keys=True))
            for r in rs if r.get("type") in ("step", "eval")] for rs in rows]
    same = key[0] == key[1]
    bad += not same
    print(f"distill --kd-loss {loss}: {sum(k[0] == 'step' for k in key[0])} steps, losses and DDK weights identical: {same}")
sys.exit(1 if bad else 0)
