"""`distill` under Ray Train (issue #27, item 7): README's TorchTrainer example, run on a local
cluster with two CPU workers, trains exactly what one process trains (as two torchrun ranks
do, test_parallel.py): Ray Train starts the process group and sets torchrun's variables, and
`distill` joins them as it joins torchrun's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_parallel import COMMON, records, single, student  # noqa: F401  (fixtures)

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")
pytestmark = pytest.mark.slow


def test_readme_ray_train_example_equals_one_process(tmp_path, built_cache, student, single):  # noqa: F811
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### On a Ray cluster"):]
    section = section[: section.index("\n## ", 1)]
    [code] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert "TorchTrainer(" in code and "distill(DistillConfig(**config)" in code
    out = tmp_path / "run"
    settings = {"cache": str(built_cache), "student": str(student), "out": str(out), "batch_size": 2, "device": "cpu", **COMMON}
    code = code.replace("ScalingConfig(num_workers=8, use_gpu=True)", "ScalingConfig(num_workers=2, use_gpu=False)")
    code = re.sub(r"train_loop_config=dict\(.*?\)\)?,\n", "train_loop_config=SETTINGS,\n", code, flags=re.DOTALL)
    code = code.replace('RunConfig(storage_path="/shared/ray-results")', f'RunConfig(storage_path="{tmp_path / "ray"}")')
    assert "SETTINGS" in code and "num_workers=2" in code and str(tmp_path) in code, code
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        exec(compile(code, "README.md", "exec"), {"SETTINGS": settings})
    finally:
        ray.shutdown()
    a, b = records(single, "step"), records(out, "step")
    assert [s["step"] for s in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["tokens"] == x["tokens"]
    ref, got = load_file(single / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
