"""The fault matrix: what a hostile but realistic user does to a cache or a run, on the real
CLI in temporary directories. Each case asserts the one-line message (what happened, what to
do) and, where something was interrupted, that the resumed result equals the uninterrupted one.

Full-disk cases mount a small tmpfs (they need root; skipped with the reason otherwise)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ddk_cache.capture.build import build
from ddk_cache.cli.main import main
from ddk_cache.store.cache import Cache
from ddk_cache.train.distill import distill

from .helpers import build_argv, copy_cache, distill_config, make_student, small_config
from .test_kill_resume import assert_same_cache

CLI = [sys.executable, "-c", "from ddk_cache.cli.main import main; main()"]


@pytest.fixture(scope="module")
def student(tmp_path_factory, teacher_dir):
    return make_student(teacher_dir, tmp_path_factory.mktemp("faults") / "student", hidden_size=32, layers=1)


def distill_argv(cache: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "distill", "--cache", str(cache), "--student", str(student), "--out", str(out), "--batch-size", "4",
            "--ddk-interval", "2", "--warmup-steps", "2", "--lr", "1e-3", "--eval-batch-size", "4", "--device", "cpu", "--quiet", *extra]


def one_line_error(result) -> str:
    """The CLI's message: exit code 1, one 'Error: ...' line, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and "%|" not in line]  # transformers' loading bars
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, built_cache, student):
    """An uninterrupted 6-step run: what every interrupted-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    distill(distill_config(built_cache, student, out, max_steps=6, save_every=2, warmup_steps=2), progress=False)
    return out


# ----------------------------------------------------------------------------- missing objects


@pytest.mark.parametrize("command,victim", [
    ("distill", "beta/train/tokens/c/0/0"),
    ("distill", "beta/train/topk_logprobs/c/0/0/0"),
    ("eval", "gamma/val/tokens/c/0/0"),
    ("inspect --fidelity", "alpha/val/tokens/c/0/0"),
])
def test_a_missing_object_is_named_never_read_as_zeros(tmp_path, built_cache, student, command, victim):
    cache = copy_cache(built_cache, tmp_path / "c.zarr")
    assert (cache / victim).is_file(), f"the test's object key {victim} is not in the store"
    (cache / victim).unlink()
    args = {
        "distill": ["distill", "--cache", str(cache), "--student", str(student), "--out", str(tmp_path / "run"), "--max-steps", "30",
                    "--batch-size", "4", "--device", "cpu", "--quiet"],
        "eval": ["eval", "--cache", str(cache), "--model", str(student), "--device", "cpu"],
        "inspect --fidelity": ["inspect", str(cache), "--fidelity", "--sequences", "2", "--device", "cpu"],
    }[command]
    line = one_line_error(CliRunner().invoke(main, args))
    assert f"{victim} is missing: the cache is damaged; run `ddk-cache verify" in line


# ----------------------------------------------------------------------------- concurrent runs


@pytest.mark.slow
def test_two_identical_builds_started_together_end_complete_and_identical(tmp_path, teacher_dir, corpus_dir, built_cache):
    out = tmp_path / "c.zarr"
    argv = build_argv(small_config(teacher_dir, corpus_dir, out))
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    # They cooperate (both 0), or one refuses in one line: never a traceback, never a broken store.
    for code, text in zip(codes, outputs):
        assert "Traceback" not in text, text
        assert code == 0 or (code == 1 and text.strip().startswith("Error: ") and len(text.strip().splitlines()) == 1), text
    assert 0 in codes
    if 1 in codes:  # the refused one, run again, finds the cache complete
        rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_same_cache(out, built_cache)


@pytest.mark.slow
def test_two_distills_into_one_out_then_ctrl_c_then_resume(tmp_path, built_cache, student):
    """Two identical distills started together: one runs, the other is refused at once (the
    run-directory lock). Ctrl-C stops the first with exit 130 and a resume hint; the lock dies
    with it, and `--resume` finishes with the weights of an uninterrupted run."""
    steps = ["--max-steps", "200", "--save-every", "20", "--ddk-interval", "50"]
    reference = tmp_path / "reference"
    distill(distill_config(built_cache, student, reference, max_steps=200, save_every=20, ddk_interval=50, warmup_steps=2,
                           eval_batch_size=4), progress=False)
    out = tmp_path / "run"
    argv = distill_argv(built_cache, student, out, *steps)
    procs = [interruptible(argv) for _ in range(2)]
    deadline = time.time() + 120
    while time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    text = loser.communicate()[0]
    assert loser.returncode == 1 and f"Error: a distill into {out} is already running" in text and "Traceback" not in text, text
    ctrl_c_when(winner, lambda: (out / "checkpoints" / "step_00000020").is_dir(), deadline,
                "run the same command with --resume")
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(out, reference)


# ----------------------------------------------------------------------------- checkpoints and --resume


def interrupted_first_save(reference: Path, run: Path) -> None:
    """What kill -9 (or a full disk) during the first save leaves: the run's files and a
    `.tmp` checkpoint folder without state.json (written last), no complete checkpoint."""
    run.mkdir(parents=True)
    shutil.copy(reference / "config.json", run / "config.json")
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    tmp = run / "checkpoints" / "step_00000002.tmp"
    shutil.copytree(sorted((reference / "checkpoints").glob("step_*"))[-1], tmp)  # a whole save's files, minus state.json
    (tmp / "state.json").unlink()


@pytest.mark.parametrize("resume", [False, True])
def test_an_interrupted_first_checkpoint_never_blocks(tmp_path, built_cache, student, reference_run, resume):
    run = tmp_path / "run"
    interrupted_first_save(reference_run, run)
    result = distill(distill_config(built_cache, student, run, max_steps=6, save_every=2, warmup_steps=2, resume=resume), progress=False)
    assert result.steps == 6
    assert_same_weights(run, reference_run)
    assert not list((run / "checkpoints").glob("*.tmp"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # the interrupted run's lines are not doubled


@pytest.mark.parametrize("change,message", [
    ({"lr": 2e-3}, "--lr: 0.001 before, 0.002 now"),
    ({"kd_loss": "rkl"}, "--kd-loss: 'fkl' before, 'rkl' now"),
    ({"mixing": "uniform"}, "--mixing: 'ddk' before, 'uniform' now"),
    ({"batch_size": 2}, "the global batch (--batch-size x --grad-accum x ranks): 4 sequences before, 2 now"),
    ({"cache": "other"}, "holds other content than the cache this run was trained on"),
])
def test_resume_refuses_another_setting_or_cache_naming_it(tmp_path, built_cache, teacher_dir, corpus_dir, student, reference_run,
                                                           change, message):
    from ddk_cache.errors import ConfigError

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    shutil.rmtree(run / "final")
    for old in sorted((run / "checkpoints").iterdir())[:-1]:
        shutil.rmtree(old)
    state_file = next((run / "checkpoints").iterdir()) / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["max_steps"] = 8  # continue past the reference's end
    state_file.write_text(json.dumps(state))
    cache = built_cache
    if change.get("cache"):
        cache = tmp_path / "other.zarr"
        build(small_config(teacher_dir, corpus_dir, cache, seed=7), progress=False)
        change = {}
    with pytest.raises(ConfigError) as e:
        distill(distill_config(cache, student, run, max_steps=8, save_every=2, warmup_steps=2, resume=True, **change), progress=False)
    text = str(e.value)
    assert text.startswith(f"--resume: {run} was trained with other settings: ") and message in text
    assert "Only these may change on resume: " in text and "--eval-batch-size" in text and "--device" in text
    # The flags that may change do not stop it.
    ok = distill(distill_config(built_cache, student, run, max_steps=8, save_every=2, warmup_steps=2, resume=True, eval_batch_size=2,
                                loss_chunk=7, keep_checkpoints=1), progress=False)
    assert ok.steps == 8


# ----------------------------------------------------------------------------- a full disk


def mount_tmpfs(path: Path, size: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def make(size: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_build_on_a_full_disk_says_so_and_resumes(tmp_path, teacher_dir, corpus_dir, built_cache, small_disk):
    size = sum(f.stat().st_size for f in built_cache.rglob("*") if f.is_file())
    disk = small_disk(max(64 * 1024, size // 2))
    out = disk / "c.zarr"
    argv = build_argv(small_config(teacher_dir, corpus_dir, out))
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    assert f"no space left on the device holding {out}" in failed.stderr and "run the same command again: it resumes" in failed.stderr
    # Room again (the store moved to a larger disk): the same command completes it, identical.
    bigger = tmp_path / "big" / "c.zarr"
    shutil.copytree(out, bigger)
    resumed = subprocess.run(build_argv(small_config(teacher_dir, corpus_dir, bigger)), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_cache(bigger, built_cache)


@pytest.mark.slow
def test_distill_on_a_full_disk_says_so_and_resumes(tmp_path, built_cache, student, reference_run, small_disk):
    ckpt = sorted((reference_run / "checkpoints").glob("step_*"))[-1]
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    disk = small_disk(max(32 * 1024, size * 3 // 4))  # room for the run's logs, not for a checkpoint
    out = disk / "run"
    argv = distill_argv(built_cache, student, out, "--max-steps", "6", "--save-every", "2")
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    assert "no space left on the device" in failed.stderr and "run the same command with --resume" in failed.stderr
    assert not list((out / "checkpoints").glob("step_????????")) if (out / "checkpoints").exists() else True
    moved = tmp_path / "run"
    shutil.copytree(out, moved)
    done = subprocess.run([*distill_argv(built_cache, student, moved, "--max-steps", "6", "--save-every", "2"), "--resume"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_weights(moved, reference_run)


# ----------------------------------------------------------------------------- signals


def interruptible(argv: list[str]) -> subprocess.Popen:
    """The command in a session of its own with SIGINT at its default: a suite started in the
    background of a non-interactive shell (`cmd &`) has SIGINT ignored, and a process that
    starts with it ignored keeps ignoring it (Python installs no handler), so Ctrl-C could
    not reach it."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def ctrl_c_when(proc: subprocess.Popen, ready, deadline: float, hint: str) -> None:
    """Send SIGINT to `proc`'s session once `ready()`; it must exit 130 with `hint`, no traceback."""
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "it finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, text
    assert f"interrupted; nothing complete was lost: {hint}" in text and "Traceback" not in text


@pytest.mark.slow
def test_ctrl_c_during_a_build_exits_130_and_the_same_command_resumes(tmp_path, teacher_dir, corpus_dir, built_cache):
    from .test_kill_resume import shards_logged

    out = tmp_path / "c.zarr"
    argv = build_argv(small_config(teacher_dir, corpus_dir, out, batch_size=1))
    proc = interruptible(argv)
    ctrl_c_when(proc, lambda: shards_logged(out) >= 2, time.time() + 120, "run the same command again: it resumes")
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_same_cache(out, built_cache)


# ----------------------------------------------------------------------------- one-line errors


def test_inspect_on_a_store_still_initializing(tmp_path, teacher_dir, corpus_dir):
    class Stop(Exception):
        pass

    def stop(event, info):
        if event == "piece_tokenized":  # killed while the corpus is tokenized: state initializing
            raise Stop

    out = tmp_path / "c.zarr"
    with pytest.raises(Stop):
        build(small_config(teacher_dir, corpus_dir, out), progress=False, hook=stop)
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "state: initializing): the corpus is still being tokenized" in result.output
    assert "Error: INCOMPLETE cache" in result.output and "rerun the same `ddk-cache build` command(s)" in result.output


def test_a_batch_that_cannot_fit_is_refused_before_training(tmp_path, built_cache, student):
    line = one_line_error(CliRunner().invoke(main, ["distill", "--cache", str(built_cache), "--student", str(student), "--out",
                                                    str(tmp_path / "run"), "--batch-size", "100000000", "--device", "cpu", "--quiet"]))
    assert "--batch-size 100000000 needs at least" in line and "lower --batch-size (raise --grad-accum" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("flag", ["--model", "--student"])
def test_a_missing_model_directory_is_not_a_hub_lookup(tmp_path, built_cache, flag, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "runs" / "s1" / "final"), "runs/s1/final"):
        if flag == "--model":
            args = ["eval", "--cache", str(built_cache), "--model", missing]
        else:
            args = ["distill", "--cache", str(built_cache), "--student", missing, "--out", str(tmp_path / "r"), "--quiet"]
        line = one_line_error(CliRunner().invoke(main, args))
        assert f"{missing}: no such file or directory (a local model directory was expected)" in line


def test_a_student_of_another_vocabulary_is_refused_in_one_line(tmp_path, built_cache, teacher_dir):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, max_position_embeddings=64)
    cfg.save_pretrained(tmp_path / "small-vocab")
    line = one_line_error(CliRunner().invoke(main, ["distill", "--cache", str(built_cache), "--student-config",
                                                    str(tmp_path / "small-vocab" / "config.json"), "--tokenizer", str(teacher_dir),
                                                    "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet"]))
    assert "the student's vocabulary (50 rows) is smaller than the tokenizer" in line


@pytest.mark.parametrize("flag,value,message", [
    ("--warmup-steps", "-10", "--warmup-steps must be >= 0, got -10"),
    ("--lr", "0", "--lr must be > 0"),
])
def test_bad_distill_numbers(tmp_path, built_cache, student, flag, value, message):
    line = one_line_error(CliRunner().invoke(main, ["distill", "--cache", str(built_cache), "--student", str(student), "--out",
                                                    str(tmp_path / "r"), flag, value, "--quiet"]))
    assert message in line


def test_a_json_array_corpus_file_says_what_it_is(tmp_path, teacher_dir):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "web.jsonl").write_text(json.dumps([{"text": "a b c"}, {"text": "d e f"}]) + "\n")
    line = one_line_error(CliRunner().invoke(main, ["build", "--teacher", str(teacher_dir), "--data", str(tmp_path / "corpus"),
                                                    "--out", str(tmp_path / "c.zarr"), "--seq-len", "32", "--backend", "hf", "--quiet"]))
    assert "JSON array" in line and "--text-field" not in line


def test_a_huge_single_line_document_is_read_in_parts(tmp_path, teacher_dir):
    """A 4 MB one-line document with a small --max-document-chars: split into parts (each a
    document), so memory follows the part size; the cache holds all its tokens."""
    (tmp_path / "corpus").mkdir()
    text = "the market rose as investors weighed rates " * 100_000
    (tmp_path / "corpus" / "web.jsonl").write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "c.zarr"
    build(small_config(teacher_dir, tmp_path / "corpus", out, max_document_chars=65536, max_tokens_per_domain=4096, val_tokens=64),
          progress=False)
    assert Cache(str(out)).meta.domains["web"].train.sequences > 0
