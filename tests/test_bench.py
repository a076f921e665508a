"""Benchmark scripts: the GPU check runs end to end on the CPU (its --smoke mode), so it does not rot
between the rare sessions that have a GPU to run it on."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
