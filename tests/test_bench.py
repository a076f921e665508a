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
    assert set(kernels) == {"sym_mm", "sym_axpby", "linear_relu2", "softcap_mtp_ce", "softcap_mtp_ce_prefix", "fp8_linear"}
    failed = {name: row["errors"] for name, row in kernels.items() if not row["ok"]}
    assert not failed, failed
    # both presets by default, each beside its own record
    assert report["presets"] == ["speedrun", "head"]
    assert report["records"]["speedrun"]["train_time_s"] == 119.7 and report["records"]["head"]["train_time_s"] == 73.8
    assert report["records"]["head"]["steps"] == 1270 + 15 and report["records"]["head"]["ms_per_step_8gpu"] == 57.4
    # every stage start (on speedrun the untie coincides with the last third's) with a timed step and finite losses
    stages = [row for row in report["stages"] if row["preset"] == "speedrun"]
    assert [row["first_step"] for row in stages] == [0, 2, 4, 6] and [row["stage"] for row in stages] == [0, 1, 2, 3]
    head_cfg = T.parse_args(["--preset=head"] + gpu_check.SMOKE_FLAGS + gpu_check.HEAD_SMOKE_FLAGS)
    assert head_cfg.mudd and head_cfg.dc_layers and head_cfg.paired_head_layers and head_cfg.prefix_loss and head_cfg.fp8_mlp
    head_schedule = T.Schedule(head_cfg)
    head_stages = [row for row in report["stages"] if row["preset"] == "head"]
    assert [row["first_step"] for row in head_stages] == sorted(set(head_schedule.stage_starts()) | {head_schedule.untie_step})
    for row in stages + head_stages:
        assert row["steps_timed"] == 1 and row["ms_per_step"] > 0 and row["peak_memory_mib"] > 0
        assert row["loss_first"] > 10 and row["loss_last"] < 20
    assert [(f["preset"], f["world_size"]) for f in report["final"]] == [("speedrun", 1), ("head", 1)]
    assert all(f["projected_train_time_s"] > 0 and 10 < f["val_loss_one_batch"] < 12 for f in report["final"])
    assert "speedrun stage 3 from step" in run.stdout and "projected head train time for " in run.stdout
    lines = run.stdout.splitlines()
    for preset, rows in (("speedrun", stages), ("head", head_stages)):
        at = lines.index(f"{preset}:")
        assert lines[at + 1].startswith("| stage | first step |") and lines[at + 3].startswith(f"| 0 | 0 | 256 | ")
        assert lines[at + 3 + len(rows)].startswith(f"projected {preset} train time on 1 GPU(s): ")
    assert "HEAD (record #89) on 8 H100s: 73.8 s for 1285 steps, 57.4 ms/step, peak not published" in run.stdout
    assert run.stdout.rstrip().endswith("kernels: all within tolerance")


# the smoke model for in-process runs of the quick mode: on the sample shards (no synthetic ones to
# write) and without the FP8 head, whose CPU emulation is slow (the smoke test above runs it)
QUICK_SMOKE = ["--smoke", "--quick", f"--train_files={ROOT}/data/sample/sample_train_*.bin",
               f"--val_files={ROOT}/data/sample/sample_val_*.bin", "--fp8_head=false"]


def quick_check(tmp_path, monkeypatch, capsys, budget, presets="speedrun"):
    """gpu_check --smoke --quick in this process, a stub in place of the kernel checks (the smoke test
    runs them): (report, stdout lines, text file lines)."""
    out = tmp_path / "check.json"

    def kernels(report, device, shapes):
        report.add("kernels", dict(op="stub", ok=True), "kernel stub")

    monkeypatch.setattr(gpu_check, "check_kernels", kernels)
    report = gpu_check.main(QUICK_SMOKE + [f"--presets={presets}", f"--budget={budget}", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report, capsys.readouterr().out.splitlines(), (tmp_path / "check.txt").read_text().splitlines()


def test_gpu_check_quick_runs_the_kernels_then_two_stages_then_the_validation(tmp_path, monkeypatch, capsys):
    """--quick: the kernels first, then the first stage and the untie's (the smoke schedule's stage 2,
    from step 4), then the final validation; it says which stages it leaves out, estimates the rest
    after the first stage, and its text file holds what it printed."""
    report, lines, text = quick_check(tmp_path, monkeypatch, capsys, 100000)
    assert text == lines
    starts = [line for line in lines if line.startswith(("kernel stub", "plan:", "skipped:", "speedrun stage ", "time:", "projected"))]
    assert starts[:6] == ["kernel stub", "plan: speedrun stage 0 from step 0, speedrun stage 2 from step 4, speedrun final validation",
                          "skipped: speedrun stage 1 from step 2 (--quick)", "skipped: speedrun stage 3 from step 6 (--quick)"] + starts[4:6]
    assert starts[4].startswith("speedrun stage 0 from step     0: batch     256, compile ")
    assert starts[5].startswith("time: ") and starts[5].endswith(" of the 100000 s budget")
    assert starts[6].startswith("speedrun stage 2 from step     4: batch     512, compile ") and starts[7].startswith("time: ")
    assert starts[8].startswith("projected speedrun train time for 8 steps on 1 GPU(s): ")
    assert "(stages 1, 3 scaled from the measured ones by batch size)" in starts[8] and "final validation " in starts[8]
    stages = report["stages"]
    assert [(row["stage"], row["first_step"]) for row in stages] == [(0, 0), (2, 4)]
    assert all(row["steps_timed"] == 1 and row["graphs"] == 0 and row["ms_per_step"] > 0 for row in stages)
    assert [(row["part"], row["reason"]) for row in report["skipped"]] == [
        ("speedrun stage 1 from step 2", "--quick"), ("speedrun stage 3 from step 6", "--quick")]
    (final,) = report["final"]
    assert final["scaled_stages"] == [1, 3] and 10 < final["val_loss_one_batch"] < 12
    # 2 steps per stage at 256, 384, 512 and 512 tokens: stages 1 and 3 take the measured stage of the
    # nearest batch, scaled (384 is as near 256 as 512: the earlier stage's, 0)
    ms0, ms2 = stages[0]["ms_per_step"], stages[1]["ms_per_step"]
    want = (2 * ms0 + 2 * ms0 * 384 / 256 + 2 * ms2 + 2 * ms2) / 1000
    assert abs(final["projected_train_time_s"] - want) < 1e-9 * want


def test_gpu_check_quick_skips_what_it_expects_past_the_budget(tmp_path, monkeypatch, capsys):
    """The first stage always runs; the parts after it, expected to end past a budget already spent,
    are skipped and said to be, each with its estimate, then once more under the table. The second
    preset's parts are estimated from the first preset's first stage, so none of them runs."""
    report, lines, text = quick_check(tmp_path, monkeypatch, capsys, 1e-6, presets="speedrun,head")
    assert text == lines
    assert [(row["preset"], row["first_step"]) for row in report["stages"]] == [("speedrun", 0)]
    assert all("val_loss_one_batch" not in final for final in report["final"])
    assert [final["preset"] for final in report["final"]] == ["speedrun", "head"]
    skipped = [line for line in lines if line.startswith("skipped: ")]
    budget = [line for line in skipped if line.endswith(" s, 0 s of the 0 s budget left")]
    assert [line.split(":")[1] for line in budget[:2]] == [" speedrun stage 2 from step 4", " speedrun final validation"]
    assert lines.index(budget[0]) > lines.index(next(line for line in lines if line.startswith("speedrun stage 0 from step")))
    head = [row for row in report["skipped"] if row["preset"] == "head"]
    head_plan = next(line for line in lines if line.startswith("plan: head stage 0 from step 0, "))
    assert [row["part"] for row in head if row["reason"] == "budget"] == head_plan.removeprefix("plan: ").split(", ")
    assert [row["reason"] for row in report["skipped"] if row["preset"] == "speedrun"] == ["--quick", "--quick", "budget", "budget"]
    assert skipped[-1] == "skipped: " + ", ".join(row["part"] for row in report["skipped"])


def test_gpu_check_refuses_an_unknown_preset():
    for value in ("speedrun,cpu", "head,head", ""):
        with pytest.raises(SystemExit) as e:
            gpu_check.main(["--smoke", f"--presets={value}"])
        assert e.value.code == f"error: --presets={value}: expected presets among speedrun, head, comma-separated, each once"


def test_gpu_check_report_writes_each_line_as_it_comes(tmp_path):
    """A run cut short (a lease's time limit) keeps every row it printed: the text file and the JSON
    hold each one as soon as it is added, before the next."""
    report = gpu_check.Report(str(tmp_path / "r.json"), True, stages=[])
    report.add("stages", dict(stage=0), "row 0")
    assert (tmp_path / "r.txt").read_text().splitlines()[1:] == ["row 0"]
    assert json.loads((tmp_path / "r.json").read_text())["stages"] == [dict(stage=0)]
    report.note("a note")
    assert (tmp_path / "r.txt").read_text().splitlines()[1:] == ["row 0", "a note"]


def test_gpu_check_help_and_bad_options(capsys):
    assert gpu_check.main(["--help"]) is None
    assert capsys.readouterr().out.strip() == gpu_check.__doc__.strip() and "--quick" in gpu_check.__doc__
    for argv, message in [(["--steps=x"], "error: --steps=x: expected a positive whole number"),
                          (["--budget=-5"], "error: --budget=-5: expected a positive number")]:
        with pytest.raises(SystemExit) as e:
            gpu_check.main(argv)
        assert e.value.code == message


def test_gpu_check_says_what_it_needs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for argv, expected in [([], "error: no CUDA device"), (["--smoke"], "error: --smoke runs the Triton kernels")]:
        run = subprocess.run([sys.executable, "bench/gpu_check.py", *argv], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 1 and run.stderr.startswith(expected) and "Traceback" not in run.stderr


def test_step_bench_smoke(tmp_path):
    out = tmp_path / "step.json"
    run = subprocess.run([sys.executable, "bench/step.py", "--smoke", "--cpu_dtype=fp32", "--profile=5", f"--out={out}"], cwd=ROOT,
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
        assert row["flops_per_token"] == T.flops_per_token(cfg, tuple(row["windows"]), T.Schedule(cfg).max_seq_len(row["first_step"]))
        tokens_per_s = row["batch_tokens"] / (row["ms_per_step"] / 1000)
        assert abs(row["tokens_per_s_per_device"] - tokens_per_s) < 1e-9 * tokens_per_s
        assert abs(row["flop_per_s"] - row["flops_per_token"] * tokens_per_s) < 1e-9 * row["flop_per_s"]
        assert set(row["mfu"]) == {"bf16", "fp32"}
        assert all(abs(share - row["flop_per_s"] / peaks[name]) < 1e-9 * share for name, share in row["mfu"].items())
    assert "MFU bf16" in run.stdout and "MFU fp32" in run.stdout
    # --profile: per stage, its last timed step's 5 costliest operators by self time, in order
    schedule = T.Schedule(cfg)
    assert [(p["stage"], schedule.stage(p["step"])) for p in report["profiles"]] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    for p in report["profiles"]:
        times = [op["self_ms"] for op in p["ops"]]
        assert len(p["ops"]) == 5 == len({op["op"] for op in p["ops"]}) and times == sorted(times, reverse=True)
        assert all(0 < op["share"] <= 1 and op["calls"] >= 1 for op in p["ops"]) and sum(op["share"] for op in p["ops"]) <= 1 + 1e-9
        assert f"profile of step {p['step']}" in run.stdout and p["ops"][0]["op"] in run.stdout


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
