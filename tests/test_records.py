"""Tests of records/records.py against scipy's t-tests, hand-written logs and a fake trainer."""
import importlib.util
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("records_tool", os.path.join(ROOT, "records", "records.py"))
rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rt)

SEP = "=" * 100
CODE = '''"""Tiny trainer stand-in."""
import torch

LR = 0.02


def step(model, batch):
    loss = model(batch).mean()
    loss.backward()
    return loss.item()
'''
VERSIONS = "python 3.11.7\ntorch 2.13.0\ntriton none\ncuda none\nhardware: 2 CPU cores"
SAMPLES = [
    [3.2781, 3.2795, 3.2770, 3.2789, 3.2779],
    [3.95, 3.97, 3.96],
    [4.001, 3.998, 4.010, 3.990, 4.004, 3.987, 4.000],
]


def log_text(final_loss, final_ms, code=CODE, preset="cpu", seed=0, run_id="run0", track=None, config=None):
    """A complete log: val at steps 0/10/20, train lines at 5/15, an unknown line, the final line;
    with `track`, the trainer's backend line naming it; `config`: more config keys."""
    config = {"preset": preset, "seed": seed, "run_id": run_id, "lr": 0.02, **(config or {})}
    half = final_ms // 2
    backend = [f"backend: cpu x 1, accumulation 1, ops torch, compute float32, compile False, records track {track}"]
    return "\n".join([
        code.rstrip("\n"), SEP, VERSIONS, SEP, "config: " + json.dumps(config), *(backend if track else []),
        "step:0/20 val_loss:10.8254 train_time:0ms step_avg:nanms",
        f"step:5/20 train_loss:6.1234 next_token_loss:5.4321 train_time:{half // 2}ms step_avg:{half / 10:.2f}ms",
        f"step:10/20 val_loss:{final_loss + 1:.4f} train_time:{half}ms step_avg:{half / 10:.2f}ms",
        "sink first_token_share:0.42",
        f"step:15/20 train_loss:4.5 train_time:{3 * half // 2}ms step_avg:{half / 10:.2f}ms",
        f"step:20/20 val_loss:{final_loss:.4f} train_time:{final_ms}ms step_avg:{final_ms / 20:.2f}ms",
        f"final val_loss:{final_loss:.4f} train_time:{final_ms}ms tokens:81920 peak_memory:123MiB", ""])


def write_logs(folder, losses, times_ms, **kw):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (loss, ms) in enumerate(zip(losses, times_ms)):
        path = os.path.join(folder, f"run{i}.txt")
        with open(path, "w") as f:
            f.write(log_text(loss, ms, seed=i, run_id=f"run{i}", **kw))
        paths.append(path)
    return paths


def snapshot(root):
    """Every file under root with its bytes: proves a refused command wrote nothing."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("target", [3.28, 4.0])
def test_one_sample_p_matches_scipy(sample, target):
    expected = stats.ttest_1samp(sample, popmean=target, alternative="less").pvalue
    assert rt.p_below_target(sample, target) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("a, b", [(SAMPLES[0], SAMPLES[1]), (SAMPLES[2], SAMPLES[1]),
                                  ([1.0, 2.0, 4.0, 3.5], [1.5, 2.2, 2.9, 3.1, 8.0, 4.4])])
def test_welch_p_matches_scipy(a, b):
    expected = stats.ttest_ind(a, b, equal_var=False).pvalue
    assert rt.welch_p(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_parse_recovers_code_config_and_every_step(tmp_path):
    path = tmp_path / "run.txt"
    path.write_text(log_text(3.9, 2000, seed=7, run_id="abc"))
    log = rt.parse_log(str(path))
    assert log.code == CODE
    assert log.versions == VERSIONS
    assert log.config == {"preset": "cpu", "seed": 7, "run_id": "abc", "lr": 0.02}
    assert math.isnan(log.steps[0].pop("step_avg_ms"))
    assert log.steps == [
        {"step": 0, "total_steps": 20, "val_loss": 10.8254, "train_time_ms": 0},
        {"step": 5, "total_steps": 20, "train_loss": 6.1234, "next_token_loss": 5.4321, "train_time_ms": 500,
         "step_avg_ms": 100.0},
        {"step": 10, "total_steps": 20, "val_loss": 4.9, "train_time_ms": 1000, "step_avg_ms": 100.0},
        {"step": 15, "total_steps": 20, "train_loss": 4.5, "train_time_ms": 1500, "step_avg_ms": 100.0},
        {"step": 20, "total_steps": 20, "val_loss": 3.9, "train_time_ms": 2000, "step_avg_ms": 100.0},
    ]
    assert log.final == {"val_loss": 3.9, "train_time_ms": 2000, "tokens": 81920, "peak_memory_mib": 123}


GOOD = log_text(3.9, 2000)


def assert_log_error(tmp_path, text, what):
    """parse_log of `text` raises a LogError naming the file and saying `what`."""
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(rt.LogError) as e:
        rt.parse_log(str(path))
    assert str(path) in str(e.value) and what in str(e.value)


@pytest.mark.parametrize("text, what", [
    (GOOD[:GOOD.index("final ")], "no 'final val_loss"),
    (GOOD.replace(SEP + "\nconfig", "config"), "no second line of 100 '='"),
    ("# Some README\n\nNot a log at all.\n", "no line of 100 '='"),
    (SEP + "\n" + GOOD.split(SEP, 1)[1], "no source code"),
    (GOOD.replace("config: {", "config: {oops"), "not valid JSON"),
    (GOOD.replace('"seed": 0, ', ""), "lacks seed"),
    (GOOD.replace("final val_loss:", "final loss:"), "expected 'final val_loss:X"),
])
def test_truncated_or_foreign_log_names_file_and_what_is_missing(tmp_path, text, what):
    assert_log_error(tmp_path, text, what)


def test_binary_or_missing_file_is_a_log_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes([0x80, 0xFF, 0x00, 0x9C]) * 8)
    for p in (path, tmp_path / "missing.txt"):
        with pytest.raises(rt.LogError, match="cannot read as a UTF-8 trainer log"):
            rt.parse_log(str(p))


def test_code_diff_shows_exactly_the_changed_lines(tmp_path):
    changed = CODE.replace("LR = 0.02", "LR = 0.03").replace("    return loss.item()\n", "")
    (a,), (b,) = write_logs(tmp_path / "a", [3.9], [1000]), write_logs(tmp_path / "b", [3.9], [1000], code=changed)
    diff = rt.code_diff(rt.parse_log(a), rt.parse_log(b)).splitlines()
    assert diff[0] == f"--- {a}" and diff[1] == f"+++ {b}"
    body = [line for line in diff[2:] if line[:1] in "+-"]
    assert body == ["-LR = 0.02", "+LR = 0.03", "-    return loss.item()"]
    assert rt.code_diff(rt.parse_log(a), rt.parse_log(a)) == ""


SUMMARY_CODE = '''"""Stand-in with a class."""
import torch

LR = 0.02
WD = 0.0


class Model:
    """A model."""
    scale = 1.0

    def forward(self, x):
        return x * self.scale

    @staticmethod
    def name():
        return "m"


def step(model, batch):
    return model.forward(batch)


def unused():
    return 0
'''


def summary(tmp_path, old_code, new_code):
    """code_summary of two one-run logs embedding these sources."""
    (a,), (b,) = write_logs(tmp_path / "a", [3.9], [1000], code=old_code), write_logs(tmp_path / "b", [3.9], [1000], code=new_code)
    return rt.code_summary(rt.parse_log(a), rt.parse_log(b))


@pytest.mark.parametrize("edits, expected", [
    ([("LR = 0.02", "LR = 0.03"), ("x * self.scale", "x * self.scale + 1"), ("import torch", "import torch, math"),
      ("def unused():\n    return 0", "def helper():\n    return 1")],
     "changed in train_gpt.py: (other top-level code), LR, Model.forward\n"
     "added in train_gpt.py: helper\nremoved in train_gpt.py: unused"),
    ([("scale = 1.0", "scale = 2.0"), ("@staticmethod\n    def name():", "@classmethod\n    def name(cls):")],
     "changed in train_gpt.py: Model, Model.name"),
    ([("\n\ndef step", "\n\n# the step\ndef step"), ("WD = 0.0\n", "WD = 0.0\n\n\n")],
     "changed in train_gpt.py: only blank lines, or comments outside the definitions"),
    ([("def step(model, batch):", "def step(model, batch)")], "changed in train_gpt.py: not parsed as Python (--diff shows the lines)"),
    ([], ""),
], ids=["constant, method, import, renamed function", "class attribute, decorator", "comment and blank lines",
        "syntax error", "identical"])
def test_code_summary_names_the_definitions_that_differ(tmp_path, edits, expected):
    changed = SUMMARY_CODE
    for old, new in edits:
        assert old in changed
        changed = changed.replace(old, new)
    assert summary(tmp_path, SUMMARY_CODE, changed) == expected


def test_code_summary_of_a_public_log_names_the_file(tmp_path):
    """Public logs append more source files (triton_kernels.py) after a header of dashes."""
    extra = f"\n{DASHES}\n# extra.py\n{DASHES}\n\nX = 1\n"
    changed = PUBLIC_CODE.replace("import triton\n", "import triton\nBLOCK = 64\n") + extra
    assert summary(tmp_path, PUBLIC_CODE, changed) == "added file extra.py\nadded in triton_kernels.py: BLOCK"


def test_plot_is_a_png_with_one_curve_per_set(tmp_path):
    old = rt.parse_logs(write_logs(tmp_path / "old", [3.95, 3.97], [2000, 2100]))
    new = rt.parse_logs(write_logs(tmp_path / "new", [3.90, 3.92, 3.91], [1800, 1900, 1850]))
    out = tmp_path / "plot.png"
    ax = rt.plot_val_curves([("old", old), ("new", new)], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(ax.lines) == 2
    x, y = ax.lines[1].get_data()
    assert list(x) == pytest.approx([0.925, 1.85]) and list(y) == pytest.approx([4.91, 3.91])


def new_record(root, name, losses, times, *extra, **kw):
    paths = write_logs(os.path.join(root, "..", "incoming", name), losses, times, **kw)
    return rt.main(["new", name, *paths, "--root", str(root), *extra])


TEST_CPU_TARGET = 4.0  # the synthetic logs' losses sit around this; the real CPU_TARGET may change


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setitem(rt.TRACKS["cpu"], "target", TEST_CPU_TARGET)
    monkeypatch.setitem(rt.TRACKS["cpu-fp32"], "target", TEST_CPU_TARGET)
    r = tmp_path / "records"
    r.mkdir()
    (r / "README.md").write_text(f"# Our records\n\nHand-written intro.\n\n{rt.MARKER}\nold table\n")
    return r


def test_new_creates_folder_readme_and_index(root, capsys):
    losses, times = [3.90, 3.92, 3.91], [2000, 2100, 2050]
    assert new_record(root, "baseline", losses, times, "--note", "Baseline: every technique off.") == 0
    (folder,) = (root / "cpu").iterdir()
    assert folder.name.endswith("_baseline")
    assert sorted(os.listdir(folder)) == ["README.md", "record.json", "run0.txt", "run1.txt", "run2.txt"]
    readme = (folder / "README.md").read_text()
    assert "Baseline: every technique off." in readme and "first record at this target" in readme
    p = stats.ttest_1samp(losses, popmean=TEST_CPU_TARGET, alternative="less").pvalue
    rec = json.loads((root / "index.json").read_text())["tracks"]["cpu"]["records"][0]
    assert rec["name"] == "baseline" and rec["path"] == f"cpu/{folder.name}" and rec["n"] == 3
    assert rec["val_loss_mean"] == pytest.approx(np.mean(losses))
    assert rec["val_loss_std"] == pytest.approx(np.std(losses, ddof=1))
    assert rec["time_ms_mean"] == pytest.approx(2050) and rec["time_ms_std"] == pytest.approx(50)
    assert rec["p_value"] == pytest.approx(p)
    assert rec["config"] == {"preset": "cpu", "lr": 0.02}  # the first log's, without seed and run_id
    table = (root / "README.md").read_text()
    assert table.startswith("# Our records\n\nHand-written intro.\n") and "old table" not in table
    assert f"[baseline](cpu/{folder.name})" in table and "3.9100 +- 0.0100" in table

    # a faster record at the same target is accepted, listed after (not alphabetically), compared
    assert new_record(root, "a_faster", [3.90, 3.91, 3.905], [1500, 1550, 1525], "--note", "Faster.") == 0
    recs = json.loads((root / "index.json").read_text())["tracks"]["cpu"]["records"]
    assert [r["name"] for r in recs] == ["baseline", "a_faster"]
    assert "-0.53 s (-25.6%) vs baseline" in (root / "README.md").read_text()

    # `table` rebuilds the same files from the folders alone
    before = snapshot(root)
    (root / "index.json").unlink()
    assert rt.main(["table", "--root", str(root)]) == 0
    assert snapshot(root) == before


def test_new_refuses_slower_and_non_significant_and_writes_nothing(root, capsys):
    assert new_record(root, "baseline", [3.90, 3.92, 3.91], [2000, 2100, 2050]) == 0
    before = snapshot(root)
    assert new_record(root, "slower", [3.80, 3.81, 3.82], [2100, 2100, 2050]) == 1
    err = capsys.readouterr().err
    assert "refused: not faster" in err and "2.08 s is not below" in err and "baseline's 2.05 s" in err
    assert new_record(root, "noisy", [3.99, 4.01, 3.995], [1000, 1000, 1000]) == 1
    err = capsys.readouterr().err
    assert "refused: not significant" in err and ">= 0.01" in err
    assert new_record(root, "single", [3.5], [1000]) == 1
    assert "refused: a record needs at least 2 runs (the t-test needs their spread), got 1" in capsys.readouterr().err
    assert snapshot(root) == before


def test_other_target_is_timed_only_against_its_own_records(root):
    assert new_record(root, "baseline", [3.90, 3.92, 3.91], [2000, 2100, 2050]) == 0
    assert new_record(root, "lower", [3.80, 3.81, 3.805], [3000, 3100, 3050], "--target", "3.85") == 0
    assert new_record(root, "lower2", [3.80, 3.81, 3.805], [3200, 3200, 3200], "--target", "3.85") == 1
    recs = json.loads((root / "index.json").read_text())["tracks"]["cpu"]["records"]
    assert [(r["name"], r["target"]) for r in recs] == [("baseline", TEST_CPU_TARGET), ("lower", 3.85)]


def test_the_track_a_log_names_keeps_its_times_apart(root, tmp_path):
    """A CPU without native bf16 runs the cpu preset in fp32, several times slower: the trainer names
    the cpu-fp32 track in its backend line, and those runs are timed only against each other."""
    assert rt.parse_log(write_logs(tmp_path / "named", [3.9], [10], track="cpu-fp32")[0]).track == "cpu-fp32"
    assert rt.parse_log(write_logs(tmp_path / "older", [3.9], [10])[0]).track == "cpu"  # no backend line: the preset
    assert new_record(root, "bf16", [3.90, 3.92, 3.91], [2000, 2100, 2050]) == 0
    assert new_record(root, "fp32", [3.90, 3.92, 3.91], [9000, 9100, 9050], track="cpu-fp32") == 0
    assert new_record(root, "fp32_slower", [3.90, 3.92, 3.91], [9900, 9900, 9900], track="cpu-fp32") == 1
    tracks = json.loads((root / "index.json").read_text())["tracks"]
    assert [r["name"] for r in tracks["cpu"]["records"]] == ["bf16"]
    assert [r["name"] for r in tracks["cpu-fp32"]["records"]] == ["fp32"]
    assert [f.name[11:] for f in (root / "cpu-fp32").iterdir()] == ["fp32"]


def test_compare_against_latest_record(root, tmp_path, capsys):
    assert new_record(root, "baseline", [3.90, 3.92, 3.91], [2000, 2100, 2050]) == 0
    changed = CODE.replace("LR = 0.02", "LR = 0.03")
    paths = write_logs(tmp_path / "new", [3.88, 3.89, 3.87], [1900, 1950, 1925], code=changed)
    capsys.readouterr()
    assert rt.main(["compare", *paths, "--root", str(root), "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    p = stats.ttest_1samp([3.88, 3.89, 3.87], popmean=TEST_CPU_TARGET, alternative="less").pvalue
    welch = stats.ttest_ind([3.90, 3.92, 3.91], [3.88, 3.89, 3.87], equal_var=False).pvalue
    assert f"= {rt.fmt_p(p)} (one-sided t-test): significant" in out
    assert "-0.0300" in out and rt.fmt_p(welch) in out and "-0.12" in out
    assert "config diff, record's first log -> first new log (seed, run_id, log_dir, progress left out):\n(identical config)\n" in out
    # the names of what changed, not the whole diff, unless --diff asks for it
    assert "\ncode, record's first log -> first new log (--diff shows the lines):\nchanged in train_gpt.py: LR\n" in out
    assert "-LR = 0.02" not in out and "not the same work" not in out
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rt.main(["compare", *paths, "--root", str(root), "--diff"]) == 0
    out = capsys.readouterr().out
    assert "\ncode diff, record's first log -> first new log:\n" in out and "\n-LR = 0.02\n+LR = 0.03\n" in out
    assert "changed in train_gpt.py" not in out


def test_compare_says_first_when_the_runs_did_other_work_than_the_record(root, tmp_path, capsys):
    """Other steps or validation tokens than the record's (train_gpt's COMPARABLE_KEYS): one line
    before any p-value; another learning rate (a technique change) is what compare is for."""
    import train_gpt as tg

    assert rt.comparable_keys() == tg.COMPARABLE_KEYS
    work = {"num_steps": 150, "val_tokens": 65536}
    assert new_record(root, "baseline", [3.90, 3.92, 3.91], [2000, 2100, 2050], config=work) == 0
    (folder,) = (root / "cpu").iterdir()
    capsys.readouterr()
    short = write_logs(tmp_path / "short", [4.5, 4.6], [90, 95], config={"num_steps": 4, "val_tokens": 8192, "lr": 0.05})
    assert rt.main(["compare", *short, "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"not the same work as record {folder.name}: these runs differ in num_steps=4 (record: 150), "
                        "val_tokens=8192 (record: 65536), so the differences and p-values below are not the code's alone")
    assert lines[3].startswith("p(mean val_loss <= 4.0) = ")
    other_lr = write_logs(tmp_path / "lr", [3.9, 3.91], [2000, 2010], config={**work, "lr": 0.05})
    assert rt.main(["compare", *other_lr, "--root", str(root)]) == 0
    assert "not the same work" not in capsys.readouterr().out


def test_compare_skips_the_logs_of_runs_that_did_not_finish(tmp_path, capsys):
    """`compare logs/*.txt` over a folder with failed and interrupted runs: each is named and skipped."""
    folder = tmp_path / "logs"
    done = write_logs(folder, [3.90, 3.92], [2000, 2100])
    unfinished = GOOD[:GOOD.index("final ")]
    endings = {"nan.txt": "error: loss is nan at step 15 (train loss)\n",
               "stopped.txt": "interrupted at step 15 by SIGINT\n", "running.txt": ""}
    for name, ending in endings.items():
        (folder / name).write_text(unfinished + ending)
    paths = sorted(map(str, folder.glob("*.txt")))
    assert rt.main(["compare", *paths, "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    why = "no final line: the run failed, was interrupted or is still running"
    assert out[:3] == [f"skipped {folder / 'nan.txt'}: {why} (its log ends with: error: loss is nan at step 15 (train loss))",
                       f"skipped {folder / 'running.txt'}: {why}",
                       f"skipped {folder / 'stopped.txt'}: {why} (its log ends with: interrupted at step 15 by SIGINT)"]
    assert out[4] == "new: n=2  val_loss 3.9100 +- 0.0141  train_time 2.05 +- 0.07 s"
    assert rt.main(["compare", str(folder / "nan.txt"), str(folder / "running.txt"), "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "error: none of the 2 logs is of a finished run\n"
    (folder / "notes.txt").write_text("# notes\n")  # not a log at all: still an error
    assert rt.main(["compare", *done, str(folder / "notes.txt"), "--root", str(tmp_path)]) == 1
    assert "not a trainer log" in capsys.readouterr().err


def test_compare_shows_the_config_difference_of_runs_with_identical_code(root, tmp_path, capsys):
    assert new_record(root, "baseline", [3.90, 3.92, 3.91], [2000, 2100, 2050]) == 0
    folder = tmp_path / "new"
    folder.mkdir()
    paths = []
    for i, loss in enumerate([3.88, 3.89]):
        config = {"preset": "cpu", "seed": i, "run_id": f"other{i}", "lr": 0.05, "warmup": 3}
        text = log_text(loss, 1900, seed=i, run_id=f"other{i}").replace(
            "config: " + json.dumps({"preset": "cpu", "seed": i, "run_id": f"other{i}", "lr": 0.02}), "config: " + json.dumps(config))
        paths.append(folder / f"other{i}.txt")
        paths[-1].write_text(text)
    capsys.readouterr()
    assert rt.main(["compare", *map(str, paths), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    diff = out.split("config diff, record's first log -> first new log (seed, run_id, log_dir, progress left out):\n")[1]
    assert diff.split("\n\n")[0] == 'lr: 0.02 -> 0.05\nwarmup: "(absent)" -> 3'
    assert "(identical code)" in out


# ------------------------------------------------------------------------------------------------
# The public speedrun's record logs (modded-nanogpt records/track_1_short/*/*.txt), written here in
# their format: source (extra files after 40-dash lines), '=' line, versions and nvidia-smi, '=' line,
# a few free-form lines, step lines (timing-only ones too), and a closing peak-memory line.
# ------------------------------------------------------------------------------------------------

DASHES = "-" * 40
NVIDIA_SMI = """Fri Jul 17 12:58:15 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0     |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:8D:00.0 Off |                    0 |
+-----------------------------------------------------------------------------------------+"""
PUBLIC_VERSIONS = ("Running Python 3.12.3 (main, Jan 22 2026, 20:57:42) [GCC 13.3.0]\n"
                   "Running PyTorch 2.10.0+cu128 compiled for CUDA 12.8\nRunning Triton version 3.6.0\n" + NVIDIA_SMI)
PUBLIC_CODE = CODE + f"\n{DASHES}\n# triton_kernels.py\n{DASHES}\n\nimport triton\n"


def public_log_text(final_loss, final_ms, code=PUBLIC_CODE, total=8, closing=True):
    """Val at steps 0, 4 and the last; a timing-only line at every step; train time grows 10 ms a step."""
    lines = [code.rstrip("\n"), SEP, PUBLIC_VERSIONS, SEP, "Compiling model and warming up kernels",
             "Resetting Model", "step:0/8 val_loss:10.8292 train_time:0ms step_avg:0.04ms"]
    for step in range(1, total + 1):
        ms = final_ms * step // total
        lines.append(f"step:{step}/{total} train_time:{ms}ms step_avg:{ms / step:.2f}ms")
        if step == total // 2:
            lines.append(f"step:{step}/{total} val_loss:{final_loss + 0.5:.4f} train_time:{ms}ms step_avg:{ms / step:.2f}ms")
    lines.append(f"step:{total}/{total} val_loss:{final_loss:.4f} train_time:{final_ms + 90}ms step_avg:{(final_ms + 90) / total:.2f}ms")
    if closing:
        lines.append("peak memory allocated: 29863 MiB reserved: 44438 MiB")
    return "\n".join(lines) + "\n"


def test_parse_a_public_speedrun_log(tmp_path):
    path = tmp_path / "17aaf854.txt"
    path.write_text(public_log_text(3.2783, 1600))
    log = rt.parse_log(str(path))
    assert log.code == PUBLIC_CODE and "# triton_kernels.py" in log.code
    assert log.versions == PUBLIC_VERSIONS
    assert log.config is None and log.track == "speedrun"
    assert [(s["step"], s["val_loss"]) for s in log.steps if "val_loss" in s] == [(0, 10.8292), (4, 3.7783), (8, 3.2783)]
    assert [s for s in log.steps if "val_loss" not in s] == []  # timing-only lines carry no loss
    assert log.final == {"val_loss": 3.2783, "train_time_ms": 1690, "peak_memory_mib": 29863, "reserved_memory_mib": 44438}


@pytest.mark.parametrize("text, what", [
    (public_log_text(3.28, 1600, closing=False), "nor a closing 'peak memory allocated: N MiB reserved: N MiB' line"),
    (public_log_text(3.28, 1600).replace("step:8/8 val_loss", "step:7/8 val_loss"), "at its last step"),
], ids=["no peak-memory line", "no validation at the last step"])
def test_truncated_public_log_says_what_is_missing(tmp_path, text, what):
    assert_log_error(tmp_path, text, what)


def test_compare_public_logs_against_a_public_record_folder(tmp_path, capsys):
    record = tmp_path / "2025-12-22_MultiTokenPrediction"
    record.mkdir()
    for i, (loss, ms) in enumerate([(3.2781, 119600), (3.2790, 119700)]):
        (record / f"run{i}.txt").write_text(public_log_text(loss, ms))
    ours = tmp_path / "ours.txt"
    ours.write_text(public_log_text(3.2770, 118000, code=PUBLIC_CODE.replace("LR = 0.02", "LR = 0.025")))
    mine = write_logs(tmp_path / "mine", [3.2775], [118500])  # a trainer log: it has a config
    assert rt.main(["compare", str(ours), "--against", str(record), "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("track speedrun (8xH100, FineWeb 10B), target val loss 3.28\n")
    assert "p(mean val_loss <= 3.28): needs at least 2 runs" in out
    row = [line for line in out.splitlines() if line.startswith("new ")][-1].split()
    assert row[:3] == ["new", "1", "3.2770"] and row[3] != "+-"  # one run: its mean, no spread
    assert "nan" not in row and "-" in row  # ... and no p (one run has no spread to test against)
    assert f"{3.2770 - (3.2781 + 3.2790) / 2:+.4f}" in row  # d val_loss against the record's mean
    assert f"{(118090 - (119690 + 119790) / 2) / 1000:+.2f}" in row  # times from the last val line
    assert f"(none to show: {record / 'run0.txt'} is a public speedrun log, which records no config)" in out
    assert "changed in train_gpt.py: LR\n" in out
    assert rt.main(["compare", *mine, "--against", str(record), "--track", "speedrun", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "public speedrun log, which records no config" in out and "note: the record's logs" not in out
    # runs of another track against the public logs: compared, with a warning
    cpu = write_logs(tmp_path / "cpu", [5.2, 5.21], [300000, 301000])
    assert rt.main(["compare", *cpu, "--against", str(record), "--root", str(tmp_path)]) == 0
    assert ("note: the record's logs are on track speedrun, these runs on cpu: other hardware or task, so the "
            "differences below are not the code's alone") in capsys.readouterr().out


def test_a_record_folder_with_logs_in_subfolders_names_them(tmp_path, capsys):
    """Newer public record folders keep their logs in subfolders (baseline/, this_pr/, ...)."""
    record = tmp_path / "2026-02-01_Something"
    for sub in ("baseline", "this_pr"):
        (record / sub).mkdir(parents=True)
        (record / sub / "run0.txt").write_text(public_log_text(3.2781, 119600))
    ours = tmp_path / "ours.txt"
    ours.write_text(public_log_text(3.2770, 118000))
    assert rt.main(["compare", str(ours), "--against", str(record), "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: {record}: record folder has no .txt run logs (its subfolders "
                                       f"{record / 'baseline'}, {record / 'this_pr'} hold some: name one of them)\n")
    assert rt.main(["compare", str(ours), "--against", str(record / "this_pr"), "--root", str(tmp_path)]) == 0


FAKE_TRAINER = '''"""Fake trainer: writes a log whose loss depends on --seed and --lr."""
import json, os, sys

args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
seed, lr = int(args["seed"]), float(args.get("lr", "0"))
loss, ms = 3.5 + lr + 0.01 * seed * seed, int(1000 * (1 + lr) + 7 * seed)
code = open(__file__).read()
config = {"preset": "cpu", "seed": seed, "run_id": args["run_id"], "lr": lr}
os.makedirs(args["log_dir"], exist_ok=True)
with open(os.path.join(args["log_dir"], args["run_id"] + ".txt"), "w") as f:
    f.write(code + "=" * 100 + "\\nversions\\n" + "=" * 100 + "\\nconfig: " + json.dumps(config) + "\\n")
    f.write(f"step:1/1 val_loss:{loss:.4f} train_time:{ms}ms step_avg:{ms}.00ms\\n")
    f.write(f"final val_loss:{loss:.4f} train_time:{ms}ms tokens:100 peak_memory:1MiB\\n")
'''


def test_ablate_runs_every_arm_and_tabulates_against_the_control(tmp_path, capsys):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    arms = [0.0, 0.1, 0.3]
    argv = ["ablate", "--runs", "3", "--seed0", "1", "--trainer", f"{sys.executable} {fake}",
            "--log_dir", str(tmp_path / "logs"), "--markdown", "--names", "control,lr0.1,lr0.3"]
    assert rt.main(argv + ["--", "--lr=0.0", "--", "--lr=0.1", "--", "--lr=0.3"]) == 0
    assert len(os.listdir(tmp_path / "logs")) == 9
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    seeds = np.array([1, 2, 3])
    loss = {lr: 3.5 + lr + 0.01 * seeds ** 2 for lr in arms}
    ms = {lr: np.floor(1000 * (1 + lr) + 7 * seeds) for lr in arms}
    for row, lr, name in zip(rows, arms, ["control", "lr0.1", "lr0.3"]):
        assert row[:4] == [name, "3", f"{loss[lr].mean():.4f} +- {loss[lr].std(ddof=1):.4f}",
                           f"{ms[lr].mean() / 1000:.2f} +- {ms[lr].std(ddof=1) / 1000:.2f}"]
        if lr:
            p_loss = stats.ttest_ind(loss[0.0], loss[lr], equal_var=False).pvalue
            p_time = stats.ttest_ind(ms[0.0], ms[lr], equal_var=False).pvalue
            assert row[4:] == [f"{lr:+.4f}", f"{p_loss:.3g}", f"{1000 * lr / 1000:+.2f}", f"{p_time:.3g}"]
        else:
            assert row[4] == "control"


def test_ablate_needs_two_arms_and_a_working_trainer(tmp_path, capsys):
    assert rt.main(["ablate", "--runs", "1", "--", "--lr=1"]) == 1
    assert "at least two arms" in capsys.readouterr().err
    failing = f"{sys.executable} -c 'raise SystemExit(3)'"
    assert rt.main(["ablate", "--runs", "1", "--trainer", failing, "--names", "a,b", "--", "--", "--lr=1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == ["arm a: FAILED in 1 of 1 runs, left out of the table: seed 0: exit status 3",
                   "arm b: FAILED in 1 of 1 runs, left out of the table: seed 0: exit status 3"]


@pytest.mark.parametrize("gpus, launcher", [(0, []), (1, []), (8, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"])])
def test_the_default_trainer_runs_on_every_gpu(monkeypatch, gpus, launcher):
    """Without --trainer, ablate and the ladder start train_gpt.py as run.sh does: on 8 GPUs a process
    each (torchrun), not one process accumulating the 8 ranks' micro-batches; on one GPU or none, one."""
    import torch

    started = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(rt.subprocess, "run", lambda cmd, **kw: started.append(cmd) or SimpleNamespace(returncode=3))
    rt.main(["ablate", "--runs", "1", "--names", "a,b", "--", "--", "--lr=1"])
    assert started and all(cmd[: len(launcher) + 2] == [sys.executable, *launcher, "train_gpt.py"] for cmd in started)


def test_ablate_reports_a_diverged_arm_as_failed_instead_of_averaging_it(tmp_path, capsys):
    """An arm whose runs stop with an error (here: a loss that went nan at lr >= 1) is named with the
    error its log ends with; the table holds only the arms that finished, and the status is 1."""
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER.replace('config = {', 'if lr >= 1:\n'
        '    os.makedirs(args["log_dir"], exist_ok=True)\n'
        '    open(os.path.join(args["log_dir"], args["run_id"] + ".txt"), "w").write("error: loss is nan at step 3\\n")\n'
        '    sys.exit(1)\nconfig = {'))
    argv = ["ablate", "--runs", "2", "--trainer", f"{sys.executable} {fake}", "--log_dir", str(tmp_path / "logs"),
            "--names", "control,ok,diverged"]
    assert rt.main(argv + ["--", "--lr=0.0", "--", "--lr=0.1", "--", "--lr=1.5"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:3]] == ["control", "ok"] and len(out) == 4
    assert out[3] == ("arm diverged: FAILED in 2 of 2 runs, left out of the table: seed 0: error: loss is nan at "
                      "step 3; seed 1: error: loss is nan at step 3")


# ------------------------------------------------------------------------------------------------
# The ladder
# ------------------------------------------------------------------------------------------------


def flag_values(flags):
    """["--a=1", "--b=x"] -> {"a": "1", "b": "x"}"""
    return dict(f[2:].split("=", 1) for f in flags)


@pytest.mark.parametrize("preset", ["speedrun", "cpu"])
def test_ladder_rungs_are_cumulative_real_fields_from_baseline_to_the_preset_to_head(preset, capsys):
    import dataclasses

    import train_gpt as tg

    fields = {f.name for f in dataclasses.fields(tg.Config)}
    names = [name for name, _, _ in rt.LADDER]
    assert len(set(names)) == len(names) and all(rt.NAME_RE.match(n) for n in names)
    records = [record for _, record, _ in rt.LADDER]
    assert records == sorted(records) and records[0] == 1  # record order, from llm.c's baseline (#1)
    for name, _, overrides in rt.LADDER:
        assert set(overrides) <= fields, f"rung {name}: not Config fields: {set(overrides) - fields}"
    rungs = rt.ladder_rungs(tg, preset)
    configs = [dataclasses.asdict(tg.parse_args(r.flags)) for r in rungs]  # every rung's flags are valid
    assert configs[0] == dataclasses.asdict(tg.parse_args([f"--preset={preset}", "--baseline=true"]))
    for below, rung, (name, _, overrides), config, previous in zip(rungs, rungs[1:], rt.LADDER[1:], configs[1:], configs):
        # each rung is the one below plus its own switches, and nothing else changes
        assert flag_values(rung.flags) == {**flag_values(below.flags), **flag_values(rung.switches)}
        assert set(flag_values(rung.switches)) == set(overrides)
        assert {k for k in fields if config[k] != previous[k]} <= set(overrides), name
    # the #53 rungs end at the preset (record #53) itself, the last rung at HEAD's switches
    last_53 = max(i for i, (_, record, _) in enumerate(rt.LADDER) if record <= 53)
    assert configs[last_53] == dataclasses.asdict(tg.parse_args([f"--preset={preset}"]))
    head = {k: v for k, v in tg.PRESETS["head"].items() if k not in tg.HEAD_LENGTH}
    scaled = {"speedrun": {}, "cpu": {"ve_layout": ".01234", "lane_layer": 3, "first_seq_len": 224, "fp8_mlp": False,
                                      "paired_head_layers": (0, 3), "mudd_gate_layer": 2, "mudd_gate_attn": (2, 5),
                                      "xsa_layers": (1, 2, 4), "dc_layers": (5,)}}
    want = {**head, **scaled[preset]}
    top = len(rt.LADDER) - 1
    assert {k: configs[top][k] for k in want} == want
    if preset == "speedrun":
        length = [f"--{k}={getattr(tg.Config, k)}" for k in tg.HEAD_LENGTH]  # the speedrun's
        assert {**configs[top], "preset": "head"} == dataclasses.asdict(tg.parse_args(["--preset=head", *length]))
    else:  # the cpu ladder's top rung is the cpu_head preset
        assert {**configs[top], "preset": "cpu_head"} == dataclasses.asdict(tg.parse_args(["--preset=cpu_head"]))
    # then the seeds' techniques, each alone on the top rung: its flags plus their own, compared with it
    on_top = rungs[len(rt.LADDER):]
    assert [r.name for r in on_top] == [name for name, _ in rt.ON_TOP] and all(r.base == rungs[top].name for r in on_top)
    for rung, (_, overrides), config in zip(on_top, rt.ON_TOP, configs[len(rt.LADDER):]):
        assert rung.flags[:len(rungs[top].flags)] == rungs[top].flags and set(flag_values(rung.switches)) == set(overrides)
        assert {k for k in fields if config[k] != configs[top][k]} == set(overrides), rung.name
    # under cpu the GPU speed switches change nothing (the cpu preset keeps them off), nor does dropping
    # an attention layer (its 6 layers all keep theirs); the GPT-2 baseline keeps the preset's Triton
    # kernels (its fused loss, as llm.c fuses its classifier)
    no_change = {"speedrun": ["triton"], "cpu": ["fp8_head", "triton", "drop_attn", "fp8_mlp"]}
    assert [r.name for r in rungs if r.no_change] == no_change[preset]
    # and each builds its model and optimizers (on the meta device: --dry_run's parameter table)
    for rung in rungs:
        assert tg.main(rung.flags + ["--dry_run=true"]) in (None, 0), rung.name
    assert capsys.readouterr().out.count("\nparameters: ") == len(rungs)


def test_pick_rungs_by_name_and_range():
    names = ["a", "b", "c", "d"]
    assert rt.pick_rungs(names, None) == names
    assert rt.pick_rungs(names, "b..c") == ["b", "c"]
    assert rt.pick_rungs(names, "..b,d") == ["a", "b", "d"]
    assert rt.pick_rungs(names, "c..,a") == ["a", "c", "d"]
    with pytest.raises(rt.RecordsError, match=r"--rungs=b,x: no rung 'x'; the rungs, in order: a, b, c, d"):
        rt.pick_rungs(names, "b,x")
    with pytest.raises(rt.RecordsError, match=r"--rungs=c..a: c..a goes down the ladder"):
        rt.pick_rungs(names, "c..a")


LADDER_TRAINER = '''"""Fake trainer for the ladder: the rung (its run id's first part) and seed decide what it does."""
import json, os, sys

args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
rung, seed = args["run_id"].split("-")[0], int(args["seed"])
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.txt"), "a") as f:
    f.write(args["run_id"] + "\\n")
path = os.path.join(args["log_dir"], args["run_id"] + ".txt")
head = open(__file__).read() + "=" * 100 + "\\nversions\\n" + "=" * 100 + "\\n"
config = {"preset": "cpu", "seed": seed, "run_id": args["run_id"]}
head += "config: " + json.dumps(config) + "\\nstep:0/10 val_loss:10.8000 train_time:0ms step_avg:nanms\\n"
if rung == "x0_mixing":
    sys.exit(3)  # before any log
if rung in ("muon", "softcap"):
    why = "loss is nan at step 3 (train_loss)" if rung == "muon" else "cannot allocate 12 GiB"
    open(path, "w").write(head + f"error: {why}\\n")
    sys.exit(1)
loss = {"baseline": 5.0, "skip": 4.8, "prefix_loss": 4.6, "shell": 4.3, "kv_bias": 4.7, "documents": 4.9,
        "window_schedule": 4.9 - seed, "value_embeds": 4.9, "lr_floor": 4.5}[rung] + 0.2 * seed
loss += 0.05 * seed if rung == "kv_bias" else 0.0  # its seeds differ from the top rung's by 0.1, then 0.15
ms = 1000 + 100 * seed + (7 if rung == "window_schedule" else 0)
mid = loss + (0.6 if rung == "value_embeds" else 0.5)
open(path, "w").write(head + f"step:5/10 val_loss:{mid:.4f} train_time:{ms // 2}ms step_avg:1.00ms\\n"
                      f"step:10/10 val_loss:{loss:.4f} train_time:{ms}ms step_avg:1.00ms\\n"
                      f"final val_loss:{loss:.4f} train_time:{ms}ms tokens:100 peak_memory:1MiB\\n")
'''


def ladder_json(out):
    return {r["name"]: r for r in json.loads((out / "ladder.json").read_text())["rungs"]}


def test_ladder_reports_failed_rungs_and_resumes_only_what_is_missing(tmp_path, capsys):
    """A fake trainer: baseline and skip finish (losses 5.0 + 0.2 seed and 4.8 + 0.2 seed), muon
    diverges, x0_mixing crashes before writing a log, softcap crashes with an error line."""
    fake = tmp_path / "fake.py"
    fake.write_text(LADDER_TRAINER)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "ladder"
    argv = ["ladder", "--preset=cpu", "--seeds=2", "--rungs=baseline,muon,x0_mixing,softcap,skip", "--target=5.1",
            "--trainer", f"{sys.executable} {fake}", "--out", str(out)]
    assert rt.main(argv) == 1
    assert len(calls.read_text().split()) == 10
    rows = ladder_json(out)
    assert list(rows) == ["baseline", "muon", "x0_mixing", "softcap", "skip"]
    assert [r["status"] for r in rows["muon"]["runs"]] == ["diverged", "diverged"]
    assert [r["status"] for r in rows["x0_mixing"]["runs"]] == ["crashed", "crashed"]
    assert rows["softcap"]["runs"][0]["why"] == "error: cannot allocate 12 GiB"
    assert all(rows[n]["n"] == 0 and "val_loss_mean" not in rows[n] for n in ("muon", "x0_mixing", "softcap"))
    base, skip = rows["baseline"], rows["skip"]
    assert base["val_loss_mean"] == pytest.approx(5.1) and base["val_loss_std"] == pytest.approx(0.2 / math.sqrt(2))
    assert base["time_ms_mean"] == pytest.approx(1050)
    # skip against the nearest rung below that finished: Welch's t = -0.2 / sqrt(0.02 / 2 + 0.02 / 2) = -sqrt(2)
    # with 2 degrees of freedom, whose two-sided p is 1 - |t| / sqrt(t^2 + 2) = 1 - 1 / sqrt(2)
    assert skip["against"] == "baseline" and skip["d_val_loss"] == pytest.approx(-0.2)
    assert skip["p_val_loss"] == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-9)
    # time to target 5.1: baseline's seed 0 (5.0) at its last validation, seed 1 (5.2) never; skip's both
    assert base["target_reached"] == 1 and base["target_time_ms_mean"] == pytest.approx(1000)
    assert [r["target_step"] for r in skip["runs"]] == [10, 10] and skip["target_time_ms_mean"] == pytest.approx(1050)
    # a run's log is named relative to the ladder's folder, so the folder can be committed and moved
    assert [r["log"] for r in skip["runs"]] == [f"logs/{r}" for r in sorted(os.listdir(out / "logs"))
                                                if r.startswith("skip-") and r.endswith(".txt")]
    table = (out / "ladder.md").read_text()
    assert table == capsys.readouterr().out.split("ran 10 runs")[0]
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| -0.2000 vs baseline | 0.293 |" in lines["skip"] and "| 1.0 (1/2) |" in lines["baseline"]
    assert lines["muon"].endswith("| diverged 2 of 2 (seed 0: error: loss is nan at step 3 (train_loss); "
                                  "seed 1: error: loss is nan at step 3 (train_loss)) |")
    assert lines["x0_mixing"].endswith("| crashed 2 of 2 (seed 0: exit status 3; seed 1: exit status 3) |")
    assert "| #11 | --skip_from=1 | 2 |" in lines["skip"]

    # again: only the runs that left no log (x0_mixing) run again; a run cut off (no final line, no
    # error) runs again from scratch; finished, diverged and crashed-with-an-error runs are kept
    log = next((out / "logs").glob("baseline-*-seed1.txt"))
    text = log.read_text()
    log.write_text(text[: text.rindex("\nfinal ") + 1])  # the last final line, not one in the source it embeds
    calls.write_text("")
    assert rt.main(argv) == 1
    assert sorted(c.split("-")[0] + c[-1] for c in calls.read_text().split()) == ["baseline1", "x0_mixing0", "x0_mixing1"]
    assert ladder_json(out)["baseline"]["val_loss_mean"] == pytest.approx(5.1)
    # other flags are other runs: none of these is found
    calls.write_text("")
    assert rt.main(argv + ["--rungs=skip", "--num_steps=20"]) == 0
    assert len(calls.read_text().split()) == 2 and list(ladder_json(out)) == ["skip"]


def test_the_seeds_techniques_compare_with_the_top_rung(tmp_path, capsys):
    """ON_TOP's rows (fake losses: skip 4.8, the top rung prefix_loss 4.6, shell 4.3, each + 0.2 seed;
    kv_bias 4.7 + 0.25 seed) take their difference and p against the top rung, not against the row
    above them, and a paired p over the seeds both ran."""
    fake = tmp_path / "fake.py"
    fake.write_text(LADDER_TRAINER)
    out = tmp_path / "ladder"
    assert rt.main(["ladder", "--preset=cpu", "--seeds=2", "--rungs=skip,prefix_loss,shell,kv_bias",
                    "--trainer", f"{sys.executable} {fake}", "--out", str(out)]) == 0
    rows = ladder_json(out)
    assert list(rows) == ["skip", "prefix_loss", "shell", "kv_bias"]
    assert rows["prefix_loss"]["against"] == "skip" and rows["prefix_loss"]["d_val_loss"] == pytest.approx(-0.2)
    assert rows["shell"]["against"] == "prefix_loss" and rows["shell"]["d_val_loss"] == pytest.approx(-0.3)
    assert rows["kv_bias"]["against"] == "prefix_loss" and rows["kv_bias"]["d_val_loss"] == pytest.approx(0.125)
    assert rows["kv_bias"]["p_val_loss"] == pytest.approx(stats.ttest_ind([4.6, 4.8], [4.7, 4.95], equal_var=False).pvalue)
    # paired: differences 0.1 and 0.15, t = 0.125 / (0.025 * sqrt(2) / sqrt(2)) = 5 with 1 degree of
    # freedom, whose two-sided p is 1 - (2 / pi) atan(5); shell's differences are equal (-0.3): p ~ 0
    assert rows["kv_bias"]["paired_seeds"] == 2 and rows["kv_bias"]["d_paired"] == pytest.approx(0.125)
    assert rows["kv_bias"]["p_paired"] == pytest.approx(1 - 2 / math.pi * math.atan(5), rel=1e-9)
    assert rows["shell"]["p_paired"] < 1e-9 and "p_paired" not in rows["prefix_loss"]
    lines = {line.split(" | ")[0][2:]: line for line in (out / "ladder.md").read_text().splitlines() if line.startswith("| ")}
    assert "| on prefix_loss | --kv_bias=true | 2 |" in lines["kv_bias"] and "| +0.1250 vs prefix_loss |" in lines["kv_bias"]
    assert "| +0.1250 (0.126, 2) |" in lines["kv_bias"]
    # --report writes the same table from the logs and runs nothing (this trainer would fail every run)
    table = (out / "ladder.md").read_text()
    (out / "ladder.md").unlink()
    assert rt.main(["ladder", "--preset=cpu", "--seeds=2", "--rungs=skip,prefix_loss,shell,kv_bias", "--report",
                    "--trainer", "false", "--out", str(out)]) == 0
    assert (out / "ladder.md").read_text() == table
    assert "| on prefix_loss | --shell_lambda=0.008 | 2 |" in lines["shell"]
    # ... and with other flags it finds no run: an error, not an empty table
    capsys.readouterr()
    assert rt.main(["ladder", "--preset=cpu", "--seeds=2", "--report", "--num_steps=7", "--out", str(out)]) == 1
    assert capsys.readouterr().err == (f"error: {out / 'logs'}: no run of --preset=cpu with these flags and seeds there, "
                                       "nothing to report (the same --out, --preset and train flags as the ladder's "
                                       "runs find them)\n")
    assert (out / "ladder.md").read_text() == table


def test_a_rung_that_repeats_the_rung_below_runs_one_seed(tmp_path, capsys):
    """Fake trainer: window_schedule's seed 0 logs documents' numbers (its times differ), so its seeds
    1 and 2 are documents' runs and are not run (they would log 3.9 and 3.1); value_embeds ends at
    documents' loss but logs another number at step 5, so it runs every seed."""
    fake = tmp_path / "fake.py"
    fake.write_text(LADDER_TRAINER)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "ladder"
    argv = ["ladder", "--preset=cpu", "--seeds=3", "--rungs=documents..lr_floor", "--trainer", f"{sys.executable} {fake}",
            "--out", str(out)]
    assert rt.main(argv) == 0
    ran = sorted(c.split("-")[0] + c[-1] for c in calls.read_text().split())
    assert ran == sorted([f"{r}{s}" for r in ("documents", "value_embeds", "lr_floor") for s in "012"] + ["window_schedule0"])
    rows = ladder_json(out)
    docs, same, ve = rows["documents"], rows["window_schedule"], rows["value_embeds"]
    assert [r.get("as") for r in same["runs"]] == [None, "documents", "documents"]
    assert [r["log"] for r in same["runs"][1:]] == [r["log"] for r in docs["runs"][1:]]
    assert same["n"] == 3 and same["val_loss_mean"] == pytest.approx(5.1) and same["d_val_loss"] == pytest.approx(0)
    assert same["time_ms_mean"] == pytest.approx(docs["time_ms_mean"] + 7 / 3)  # seed 0's own time
    assert ve["against"] == "window_schedule" and ve["n"] == 3 and all("as" not in r for r in ve["runs"])
    assert rows["lr_floor"]["against"] == "value_embeds" and rows["lr_floor"]["d_val_loss"] == pytest.approx(-0.4)
    table = (out / "ladder.md").read_text()
    assert "| ok; seeds 1, 2: the runs of documents |" in table
    assert ("Not run past seed 0, whose run logged the rung below's numbers to the last digit (the switches change "
            "nothing on this device and data), so the other seeds are that rung's runs: window_schedule (as documents).") in table
    # resumed, it runs nothing; one seed is no evidence of a repeat worth a note
    calls.write_text("")
    assert rt.main(argv) == 0 and calls.read_text() == ""
    # a subset that leaves window_schedule out still shows its row (it has runs), so the note stays
    assert rt.main(argv[:3] + ["--rungs=lr_floor"] + argv[4:]) == 0 and calls.read_text() == ""
    assert "so the other seeds are that rung's runs: window_schedule (as documents)." in (out / "ladder.md").read_text()
    assert rt.main(argv[:2] + ["--seeds=1"] + argv[3:]) == 0
    assert "Not run past" not in (out / "ladder.md").read_text()


def test_ladder_names_the_runs_made_on_another_machine(tmp_path):
    """Seed 1 of documents ran on another CPU (the trainer's `cpu:` line): the note names that run and
    no other; once it is the same CPU's, no note, but one for a log that embeds other code. A public
    log's machine is nvidia-smi's GPU rows."""
    machine = '"\\ncpu: " + ("AMD EPYC" if (rung, seed) == ("documents", 1) else "Intel Xeon") + " | 2 cores | x\\n"'
    fake = tmp_path / "fake.py"
    fake.write_text(LADDER_TRAINER.replace('"\\nversions\\n"', machine))
    out = tmp_path / "ladder"
    argv = ["ladder", "--preset=cpu", "--seeds=2", "--rungs=documents,value_embeds", "--trainer", f"{sys.executable} {fake}",
            "--out", str(out)]
    assert rt.main(argv) == 0
    rows = ladder_json(out)
    assert [r["machine"] for r in rows["documents"]["runs"]] == ["Intel Xeon, 2 cores", "AMD EPYC, 2 cores"]
    assert ("The runs used 2 machines, most on Intel Xeon, 2 cores; their train times do not compare, and a seed's run "
            "on another machine rounds otherwise (another run, not a repeat): documents seed 1 (AMD EPYC, 2 cores).\n"
            ) in (out / "ladder.md").read_text()
    assert "codes" not in (out / "ladder.md").read_text()
    # the same machine, but value_embeds' seed 0 embeds other code
    log = out / rows["documents"]["runs"][1]["log"]
    log.write_text(log.read_text().replace("cpu: AMD EPYC |", "cpu: Intel Xeon |"))
    other = out / rows["value_embeds"]["runs"][0]["log"]
    other.write_text("# edited\n" + other.read_text())
    assert rt.main(argv + ["--report"]) == 0
    text, rows = (out / "ladder.md").read_text(), ladder_json(out)
    digest = rows["value_embeds"]["runs"][0]["code"]
    assert "machines" not in text and len({r["code"] for row in rows.values() for r in row["runs"]}) == 2
    assert ("The runs embed 2 codes (a digest of each log's source), most "
            f"{rows['documents']['runs'][0]['code']}; a run of other code may compute otherwise: value_embeds seed 0 "
            f"({digest}).\n") in text
    public = tmp_path / "public.txt"
    public.write_text(public_log_text(3.2783, 1600))
    assert rt.parse_log(str(public)).machine == "1 x NVIDIA H100 80GB HBM3"


def test_ladder_refuses_bad_flags_before_running(tmp_path, capsys):
    out = ["--out", str(tmp_path / "ladder"), "--trainer", "false"]
    assert rt.main(["ladder", "--preset=cpu", "--seed=3", *out]) == 1
    assert capsys.readouterr().err == "error: --seed=3: the ladder sets --seed itself (see --preset, --seeds and --out)\n"
    assert rt.main(["ladder", "--preset=cpu", "--rungs=muon", "--num_step=3", *out]) == 1
    assert capsys.readouterr().err == "error: rung muon: unknown flag --num_step; did you mean --num_steps?\n"
    assert rt.main(["ladder", "--preset=cpu", "--seeds=0", *out]) == 1
    assert "--seeds=0: expected at least 1" in capsys.readouterr().err
    assert not (tmp_path / "ladder").exists()


TINY_LADDER = ["--compile_elementwise=false", "--n_layer=2", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=128", "--long_window_layers=1",
               "--window_block=64", "--long_windows=1,2,2", "--extension_window=2", "--final_window=2", "--max_seq_len=128",
               "--val_tokens=512", "--val_batch_tokens=512", "--num_steps=2", "--batch_tokens=128,128,128",
               "--val_every=0", "--log_every=0", "--progress=false",
               f"--train_files={ROOT}/data/sample/sample_train_*.bin", f"--val_files={ROOT}/data/sample/sample_val_*.bin"]


def final_line(path):
    """(val loss, train time ms) from a log's final line, read here with a regex of its own."""
    import re

    run = path.read_text().split(rt.SEPARATOR)[-1]  # after the source the log embeds
    m = re.search(r"^final val_loss:([\d.]+) train_time:(\d+)ms", run, re.MULTILINE)
    return float(m[1]), int(m[2])


def test_tiny_ladder_runs_the_trainer_writes_the_table_and_resumes(tmp_path, capsys):
    out = tmp_path / "ladder"
    argv = ["ladder", "--preset=cpu", "--seeds=2", "--rungs=baseline,muon", "--out", str(out), *TINY_LADDER]
    assert rt.main(argv) == 0
    logs = sorted((out / "logs").glob("*.txt"))
    assert [p.name.split("-")[0] + p.name[-5] for p in logs] == ["baseline0", "baseline1", "muon0", "muon1"]
    config = json.loads(next(line for line in logs[2].read_text().split(SEP)[-1].splitlines() if line.startswith("config: "))[8:])
    assert config["muon"] is True and config["smear"] is False and config["num_steps"] == 2 and config["save_final"] is False
    rows = ladder_json(out)
    finals = {name: [final_line(p) for p in logs if p.name.startswith(name)] for name in ("baseline", "muon")}
    for name, runs in finals.items():
        loss = [v for v, _ in runs]
        assert rows[name]["val_loss_mean"] == pytest.approx(np.mean(loss), abs=1e-9)
        assert rows[name]["val_loss_std"] == pytest.approx(np.std(loss, ddof=1), abs=1e-9)
        assert rows[name]["time_ms_mean"] == pytest.approx(np.mean([ms for _, ms in runs]))
    loss = {name: [v for v, _ in runs] for name, runs in finals.items()}
    assert rows["muon"]["p_val_loss"] == pytest.approx(stats.ttest_ind(loss["baseline"], loss["muon"], equal_var=False).pvalue)
    assert "| muon | #3 | --muon=true --grad_clip=0.0 --norm=rmsnorm --bias=false | 2 |" in (out / "ladder.md").read_text()

    before = {p.name: p.stat().st_mtime_ns for p in logs}
    capsys.readouterr()
    assert rt.main(argv) == 0
    assert "ran 0 runs, found 4 from before" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in logs} == before
    logs[1].unlink()
    assert rt.main(argv) == 0
    assert "ran 1 runs, found 3 from before" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in logs}
    assert [name for name in after if after[name] != before[name]] == [logs[1].name]
