"""Training end to end: a cpu-preset smoke run whose log records/records.py parses, loss going down,
and a clear error for a missing data directory."""
import importlib.util
import json
import os

import pytest
import torch

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("records_tool", os.path.join(ROOT, "records", "records.py"))
records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(records)

SAMPLE = [f"--train_files={ROOT}/data/sample/sample_train_*.bin", f"--val_files={ROOT}/data/sample/sample_val_*.bin"]
TINY = ["--preset=cpu", "--n_layer=2", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=128",
        "--long_window_layers=1", "--window_block=64", "--long_windows=1,2,2", "--extension_window=2",
        "--final_window=2", "--max_seq_len=512", "--val_tokens=2048", "--val_batch_tokens=1024",
        "--skip_from=0", "--skip_to=1", "--backout_layer=0", "--progress=false"]


def run(tmp_path, run_id, extra):
    argv = TINY + SAMPLE + [f"--log_dir={tmp_path}", f"--run_id={run_id}"] + extra
    torch.set_num_threads(2)
    result = tg.main(argv)
    with open(os.path.join(tmp_path, f"{run_id}.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return result, records.parse_log(os.path.join(tmp_path, f"{run_id}.txt")), metrics


def test_smoke_run_log_parses(tmp_path):
    (val_loss, train_ms), log, metrics = run(
        tmp_path, "smoke", ["--num_steps=3", "--extension_steps=0", "--batch_tokens=256,256,256", "--val_every=2",
                            "--log_every=1"])
    # the source before the first '=' line reproduces the run
    with open(os.path.join(ROOT, "train_gpt.py")) as f:
        assert log.code == f.read()
    assert f"torch {torch.__version__}" in log.versions
    # config line: the whole Config as JSON
    assert log.config["preset"] == "cpu" and log.config["run_id"] == "smoke" and log.config["seed"] == 0
    assert log.config["n_layer"] == 2 and log.config["d_model"] == 64 and log.config["batch_tokens"] == [256, 256, 256]
    # step lines: val at 0, 2 and the end, train at 1..3, all out of 3 steps
    vals = [s for s in log.steps if "val_loss" in s]
    trains = [s for s in log.steps if "train_loss" in s]
    assert [s["step"] for s in vals] == [0, 2, 3] and [s["step"] for s in trains] == [1, 2, 3]
    assert all(s["total_steps"] == 3 for s in log.steps)
    assert all(s["train_time_ms"] >= 0 for s in log.steps)
    times = [s["train_time_ms"] for s in vals]
    assert times == sorted(times)
    # the final line agrees with the last validation and with what main returned
    assert log.final["val_loss"] == pytest.approx(vals[-1]["val_loss"], abs=1e-4)
    assert log.final["val_loss"] == pytest.approx(val_loss, abs=1e-4)
    assert log.final["tokens"] == 3 * 256
    assert "peak_memory_mib" in log.final
    # the JSON-lines twin holds the same numbers
    kinds = [m["kind"] for m in metrics]
    assert kinds[0] == "config" and kinds[-1] == "final"
    assert [m["val_loss"] for m in metrics if m["kind"] == "val"] == pytest.approx([s["val_loss"] for s in vals], abs=1e-4)
    assert metrics[-1]["val_loss"] == val_loss and metrics[-1]["train_time_ms"] == train_ms
    # a fresh model predicts about uniformly over the padded vocabulary: loss ~ ln(50304) = 10.83
    assert vals[0]["val_loss"] == pytest.approx(10.83, abs=0.1)


def test_train_loss_falls(tmp_path):
    (val_loss, _), log, _ = run(
        tmp_path, "falls", ["--num_steps=20", "--extension_steps=0", "--batch_tokens=512,512,512",
                            "--val_every=10", "--log_every=5", "--mtp=false"])
    vals = {s["step"]: s["val_loss"] for s in log.steps if "val_loss" in s}
    trains = [s["train_loss"] for s in log.steps if "train_loss" in s]
    assert sorted(vals) == [0, 10, 20] and len(trains) == 4
    print("val", vals, "train", trains)
    assert vals[10] < vals[0] - 1.0 and vals[20] < vals[10]
    assert trains[-1] < trains[0] - 0.5


def test_missing_data_directory(tmp_path):
    missing = str(tmp_path / "no_such_dir" / "fineweb_train_*.bin")
    argv = TINY + SAMPLE + [f"--train_files={missing}", f"--log_dir={tmp_path}", "--run_id=missing"]
    with pytest.raises(SystemExit) as e:
        tg.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error:") and missing in msg and "does not exist" in msg
    assert "cached_fineweb10B.py" in msg  # says how to get the data


def test_warmup_leaves_no_trace(tmp_path):
    """Untimed warmup steps (every stage and the untie step) are undone: the run that follows
    ends exactly where a run without warmup ends."""
    extra = ["--num_steps=6", "--extension_steps=0", "--batch_tokens=256,256,256", "--val_every=0", "--log_every=0"]
    (cold, _), _, _ = run(tmp_path, "cold", extra + ["--warmup_steps=0"])
    (warm, _), log, _ = run(tmp_path, "warm", extra + ["--warmup_steps=2"])
    assert log.config["warmup_steps"] == 2
    assert warm == cold


def test_final_validation_widens_without_yarn(tmp_path, monkeypatch):
    """The last validation takes the long window to final_window as it is (no YaRN step: the
    attention scale stays) and keeps the extension's short window."""
    calls, validate = [], tg.Trainer.validate

    def spy(self, blocks, yarn=True):
        before = float(self.model.rotary.attn_scale)
        loss = validate(self, blocks, yarn)
        calls.append((tuple(blocks), yarn, before, float(self.model.rotary.attn_scale)))
        return loss

    monkeypatch.setattr(tg.Trainer, "validate", spy)
    run(tmp_path, "final", ["--num_steps=3", "--extension_steps=1", "--batch_tokens=256,256,256",
                            "--final_window=4", "--val_every=0", "--log_every=0"])
    blocks, yarn, before, after = calls[-1]
    assert blocks == (4, 1) and yarn is False and after == before
