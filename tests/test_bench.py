"""Benchmark scripts: the GPU check and the throughput benchmark run end to end on the CPU (their
--smoke modes), so they do not rot between the rare sessions that have a GPU to run them on; the
throughput benchmark's FLOP count is checked against a hand count."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402

T = gpu_check.T


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", f"--out={out}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    kernels = {row["op"]: row for row in report["kernels"]}
    assert set(kernels) == {"sym_mm", "sym_axpby", "linear_relu2", "softcap_mtp_ce", "fp8_linear"}
    failed = {name: row["errors"] for name, row in kernels.items() if not row["ok"]}
    assert not failed, failed
    # every stage start (the untie coincides with the last third's) with a timed step and finite losses
    stages = report["stages"]
    assert [row["first_step"] for row in stages] == [0, 2, 4, 6] and [row["stage"] for row in stages] == [0, 1, 2, 3]
    assert all(row["steps_timed"] == 1 and row["ms_per_step"] > 0 and row["peak_memory_mib"] > 0 for row in stages)
    assert stages[0]["loss_first"] > 10 and all(row["loss_last"] < 20 for row in stages)
    assert report["final"]["world_size"] == 1 and report["final"]["projected_train_time_s"] > 0
    assert "stage 3 from step" in run.stdout and "projected train time" in run.stdout
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(stages) and table[2].startswith("| 0 | 0 | 256 | ")
    assert run.stdout.rstrip().endswith("kernels: all within tolerance")


def test_gpu_check_says_what_it_needs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for argv, expected in [([], "error: no CUDA device"), (["--smoke"], "error: --smoke runs the Triton kernels")]:
        run = subprocess.run([sys.executable, "bench/gpu_check.py", *argv], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 1 and run.stderr.startswith(expected) and "Traceback" not in run.stderr


def test_step_bench_smoke(tmp_path):
    out = tmp_path / "step.json"
    run = subprocess.run([sys.executable, "bench/step.py", "--smoke", "--cpu_dtype=fp32", f"--out={out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    peaks = report["peaks"]
    assert set(peaks) == {"bf16", "fp32"} and all(p > 0 for p in peaks.values())
    assert report["config"]["compute_dtype"] == "float32"  # the train_gpt flag reached the backend
    cfg = T.parse_args(report["config"]["argv"])
    stages = report["stages"]
    assert [row["first_step"] for row in stages] == [0, 2, 4, 6] and [row["stage"] for row in stages] == [0, 1, 2, 3]
    for row in stages:
        assert row["steps_timed"] == 1 and row["ms_per_step"] > 0
        assert row["flops_per_token"] == T.flops_per_token(cfg, tuple(row["windows"]))
        tokens_per_s = row["batch_tokens"] / (row["ms_per_step"] / 1000)
        assert abs(row["tokens_per_s_per_device"] - tokens_per_s) < 1e-9 * tokens_per_s
        assert abs(row["flop_per_s"] - row["flops_per_token"] * tokens_per_s) < 1e-9 * row["flop_per_s"]
        assert set(row["mfu"]) == {"bf16", "fp32"}
        assert all(abs(share - row["flop_per_s"] / peaks[name]) < 1e-9 * share for name, share in row["mfu"].items())
    assert "MFU bf16" in run.stdout and "MFU fp32" in run.stdout


def run_tool(script, *argv, timeout=120):
    """A bench script run as a user runs it: (exit status, stdout, stderr)."""
    run = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return run.returncode, run.stdout, run.stderr


@pytest.mark.parametrize("script, usage, options", [
    ("bench/kernels.py", "usage: kernels.py [-h]\n", []),
    ("bench/step.py", "usage: bench/step.py [-h] [--steps STEPS]", ["--steps STEPS", "--untimed UNTIMED", "--out OUT", "--smoke"]),
    ("bench/optim.py", "usage: optim.py [-h] [--before BEFORE]", ["--before BEFORE", "--compile", "--steps STEPS"]),
], ids=["kernels", "step", "optim"])
def test_help_lists_the_tools_own_options_and_runs_nothing(script, usage, options):
    status, out, err = run_tool(script, "--help", timeout=60)
    assert status == 0 and err == "" and out.startswith(usage)
    assert all(f"\n  {option}" in out for option in options)
    assert "--preset=NAME" not in out  # not the trainer's help
    assert "GFLOP" not in out and "ms per optimizer step" not in out  # nothing measured


def test_step_help_points_to_the_trainer_flags_after_its_own():
    _, out, _ = run_tool("bench/step.py", "--help", timeout=60)
    assert out.index("--smoke") < out.index("Every other --name=value is a train_gpt.py flag")
    assert "`python train_gpt.py --help` lists them" in " ".join(out.split())


@pytest.mark.parametrize("script, argv, status, message", [
    ("bench/step.py", ["--steps=0"], 2, "error: argument --steps: expected an integer >= 1, got '0'"),
    ("bench/step.py", ["--smoke", "--steps=-3"], 2, "error: argument --steps: expected an integer >= 1, got '-3'"),
    ("bench/step.py", ["--untimed=-1"], 2, "error: argument --untimed: expected an integer >= 0, got '-1'"),
    ("bench/optim.py", ["--steps=0"], 2, "optim.py: error: argument --steps: expected an integer >= 1, got '0'"),
    ("bench/optim.py", ["--steps=-1"], 2, "optim.py: error: argument --steps: expected an integer >= 1, got '-1'"),
    ("bench/optim.py", ["--before=no-such-revision"], 1,
     "error: --before=no-such-revision: git cannot show train_gpt.py there (fatal: "),
], ids=["step steps=0", "step steps<0", "step untimed<0", "optim steps=0", "optim steps<0", "optim bad revision"])
def test_bad_input_is_one_error_line_before_any_work(script, argv, status, message):
    """Refused before anything is timed: no table of nan, no traceback."""
    code, out, err = run_tool(script, *argv)
    lines = err.splitlines()
    assert code == status and out == "" and "Traceback" not in err
    assert lines[-1].startswith(message)
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage: "))  # argparse's usage line
