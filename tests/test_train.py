"""Training end to end: a cpu-preset smoke run whose log records/records.py parses and whose console
says what it does, loss going down, the comparison with the record, and one-line errors."""
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import head_params_ref as hr
import record_ref as rr
import torch

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("records_tool", os.path.join(ROOT, "records", "records.py"))
records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(records)

SAMPLE = [f"--train_files={ROOT}/data/sample/sample_train_*.bin", f"--val_files={ROOT}/data/sample/sample_val_*.bin"]
TINY = ["--preset=cpu", "--compile_elementwise=false", "--n_layer=2", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=128",
        "--long_window_layers=1", "--value_embeds=2", "--window_block=64", "--long_windows=1,2,2", "--extension_window=2",
        "--final_window=2", "--max_seq_len=512", "--val_tokens=2048", "--val_batch_tokens=1024",
        "--skip_from=0", "--skip_to=1", "--backout_layer=0"]
QUIET = ["--progress=false"]


def run(tmp_path, run_id, extra):
    argv = TINY + SAMPLE + [f"--log_dir={tmp_path}", f"--run_id={run_id}"] + extra
    torch.set_num_threads(2)
    result = tg.main(argv)
    with open(os.path.join(tmp_path, f"{run_id}.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return result, records.parse_log(os.path.join(tmp_path, f"{run_id}.txt")), metrics


def write_index(tmp_path, monkeypatch, config):
    """A records index whose cpu record has these numbers and this config; the trainer reads it."""
    record = {"name": "rec", "val_loss_mean": 5.25, "time_ms_mean": 300000.0, "config": config}
    path = tmp_path / "index.json"
    # the track a cpu run is on here: cpu, or cpu-fp32 on a host without native bf16
    track = tg.setup_backend(tg.parse_args(["--preset=cpu"])).records_track("cpu")
    path.write_text(json.dumps({"tracks": {track: {"target": 5.3, "records": [{**record, "target": 5.3}]}}}))
    monkeypatch.setattr(tg, "RECORDS_INDEX", str(path))


def test_smoke_run_log_parses_and_the_console_says_what_happens(tmp_path, monkeypatch, capsys):
    write_index(tmp_path, monkeypatch, {"preset": "cpu", "train_files": f"{ROOT}/data/sample/sample_train_*.bin",
                                        "val_files": f"{ROOT}/data/sample/sample_val_*.bin", "vocab_size": 50257,
                                        "num_steps": 150, "extension_steps": 0, "batch_tokens": [2048, 4096, 6144],
                                        "max_seq_len": 512, "val_tokens": 65536})
    (val_loss, train_ms), log, metrics = run(
        tmp_path, "smoke", ["--num_steps=3", "--extension_steps=0", "--batch_tokens=256,256,256", "--val_every=2",
                            "--log_every=1"])
    console = capsys.readouterr().out.splitlines()
    # the log's path first, then one short config line: the preset and what differs from it
    assert console[0] == f"log: {os.path.join(tmp_path, 'smoke.txt')}"
    assert console[1].startswith("config: --preset=cpu ") and console[1].endswith(" (the full config is in the log)")
    assert " --num_steps=3 " in console[1] and " --n_layer=2 " in console[1] and "--seed" not in console[1]
    assert len(console[1]) < 1000 and not any(line.startswith("config: {") for line in console)
    note = next(line for line in console if line.startswith("note: train_loss is the multi-token-prediction loss"))
    assert "next_token_loss is the plain next-token cross-entropy" in note and "#88" not in note
    # every validation announced before it runs, then its result
    starts = [i for i, line in enumerate(console) if line.startswith("validating at step")]
    assert [console[i] for i in starts] == [f"validating at step {s}/3: 2,048 tokens, clock stopped" for s in (0, 2, 3)]
    assert all(console[i + 1].startswith(f"step:{s}/3 val_loss:") for i, s in zip(starts, (0, 2, 3)))
    # not comparable with the record: said, with what differs, instead of a meaningless difference
    assert console[-1] == ("not compared with record rec: this run differs in num_steps=3 (record: 150), "
                           "batch_tokens=256,256,256 (record: 2048,4096,6144), val_tokens=2048 (record: 65536)")
    # the log's first lines after the config: the parameter table, as --dry_run prints it for these flags
    argv = TINY + SAMPLE + [f"--log_dir={tmp_path}", "--num_steps=3", "--extension_steps=0", "--batch_tokens=256,256,256"]
    tg.main(argv + ["--dry_run=true"])
    dry = capsys.readouterr().out.splitlines()
    table = dry[next(i for i, line in enumerate(dry) if line.startswith("parameter ")) :]
    with open(os.path.join(tmp_path, "smoke.txt")) as f:
        after = f.read().split(tg.SEPARATOR)[-1].splitlines()[1:]  # after the source and versions
    assert after[0].startswith("config: {") and after[1 : 1 + len(table)] == table
    assert table[-1] in console  # the total on the console too
    # the source before the first '=' line reproduces the run
    with open(os.path.join(ROOT, "train_gpt.py")) as f:
        assert log.code == f.read()
    assert f"torch {torch.__version__}" in log.versions
    # config line: the whole Config as JSON
    assert log.config["preset"] == "cpu" and log.config["run_id"] == "smoke" and log.config["seed"] == 0
    assert log.config["n_layer"] == 2 and log.config["d_model"] == 64 and log.config["batch_tokens"] == [256, 256, 256]
    assert log.track == tg.setup_backend(tg.parse_args(["--preset=cpu"])).records_track("cpu")  # from the backend line
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
    train_metrics = [m for m in metrics if m["kind"] == "train"]
    for name in ("train_loss", "next_token_loss"):
        assert [m[name] for m in train_metrics] == pytest.approx([s[name] for s in trains], abs=1e-4)
    # a fresh model predicts about uniformly over the padded vocabulary: loss ~ ln(50304) = 10.83
    assert vals[0]["val_loss"] == pytest.approx(10.83, abs=0.1)
    # the first step's (of that model) too, where the MTP loss weighs the next three tokens 1, 0.5, 0.25
    assert trains[0]["next_token_loss"] == pytest.approx(10.83, abs=0.1)
    assert trains[0]["train_loss"] == pytest.approx(1.75 * trains[0]["next_token_loss"], rel=0.02)


def test_train_loss_falls(tmp_path):
    (val_loss, _), log, metrics = run(
        tmp_path, "falls", QUIET + ["--num_steps=20", "--extension_steps=0", "--batch_tokens=512,512,512",
                                    "--val_every=10", "--log_every=5", "--mtp=false"])
    vals = {s["step"]: s["val_loss"] for s in log.steps if "val_loss" in s}
    trains = [s["train_loss"] for s in log.steps if "train_loss" in s]
    assert sorted(vals) == [0, 10, 20] and len(trains) == 4
    print("val", vals, "train", trains)
    assert vals[10] < vals[0] - 1.0 and vals[20] < vals[10]
    assert trains[-1] < trains[0] - 0.5
    # without MTP (and the prefix loss) the step minimizes the plain next-token loss itself
    assert [s["next_token_loss"] for s in log.steps if "train_loss" in s] == trains
    train_metrics = [m for m in metrics if m["kind"] == "train"]
    assert len(train_metrics) == 4
    assert [m["next_token_loss"] for m in train_metrics] == pytest.approx([m["train_loss"] for m in train_metrics], rel=1e-6)


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
    (cold, _), _, _ = run(tmp_path, "cold", QUIET + extra + ["--warmup_steps=0"])
    (warm, _), log, _ = run(tmp_path, "warm", QUIET + extra + ["--warmup_steps=2"])
    assert log.config["warmup_steps"] == 2
    assert warm == cold


# the head preset's schedule rules on 5 steps: thirds at 0, 2, 3 (rounded), the untie after step 3's
# Adam step, a shorter max_seq_len in the first third
HEAD_SCHEDULE = ["--num_steps=5", "--rounded_stages=true", "--untie_after_adam=true", "--first_seq_len=128"]


@pytest.mark.parametrize("schedule", [[], HEAD_SCHEDULE], ids=["record", "head"])
def test_warmup_compiles_every_graph_the_run_uses_and_no_other(tmp_path, monkeypatch, schedule):
    """With --compile the untimed warmup compiles one graph per distinct forward of the run (a
    stage's batch, windows and YaRN scale, tied or not, training or validating, the prefix loss on
    or off; the final windows),
    restores the rotary state exactly, and the timed run compiles nothing. Counted by dynamo, which
    decides what recompiles, with its eager backend: inductor would build the same graphs, far more
    slowly (tests/test_backend.py runs it)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    argv = TINY + SAMPLE + QUIET + [f"--log_dir={tmp_path}", "--run_id=graphs", "--compile=true", "--warmup_steps=1",
                                    "--num_steps=3", "--extension_steps=0", "--batch_tokens=256,256,256", "--mtp=false",
                                    "--long_windows=1,2,2", "--final_window=3", "--val_every=2", "--log_every=0",
                                    *schedule]
    cfg = tg.parse_args(argv)
    backend = tg.setup_backend(cfg)
    trainer = tg.Trainer(cfg, backend, tg.RunLog(cfg, backend))
    model, rotary = trainer.model, trainer.model.rotary
    fresh = rotary.freqs.clone(), rotary.window, rotary.attn_scale
    calls = []  # per forward: what its graph depends on, and how many graphs it compiled
    forward, warmup, marks = trainer.forward, trainer.warmup, {}

    def spy_forward(inputs, targets, windows, weights, prefix_weight=None, **kwargs):
        before = counters["stats"]["unique_graphs"]
        loss = forward(inputs, targets, windows, weights, prefix_weight, **kwargs)
        key = (inputs.numel(), windows, weights.numel(), rotary.attn_scale, model.tied, model.training, prefix_weight is None)
        calls.append((key, counters["stats"]["unique_graphs"] - before))
        return loss

    def spy_warmup():
        warmup()
        marks.update(calls=len(calls), graphs=counters["stats"]["unique_graphs"],
                     rotary=(rotary.freqs.clone(), rotary.window, rotary.attn_scale))

    trainer.forward, trainer.warmup = spy_forward, spy_warmup
    trainer.run()
    warm, timed = calls[: marks["calls"]], calls[marks["calls"]:]
    freqs, window, scale = marks["rotary"]
    assert torch.equal(freqs, fresh[0]) and (window, scale) == fresh[1:]
    # the run trains and validates at two YaRN scales, tied and untied, and at the final windows
    run_keys = {key for key, _ in timed}
    assert len({key[3] for key in run_keys}) == 2 and {key[4] for key in run_keys} == {True, False}
    assert any(key[1] == (3 * 64, 64) and not key[5] for key in run_keys)
    assert sum(n for _, n in timed) == 0 and counters["stats"]["unique_graphs"] == marks["graphs"]
    assert sum(n for _, n in warm) == len(run_keys) and {key for key, _ in warm} == run_keys


def test_train_step_never_reads_the_device(tmp_path, monkeypatch):
    """On a GPU, reading a tensor's value on the host (item, int, float, bool, tolist, numpy, a copy
    to the CPU) stalls until the stream catches up, and a tensor made from host values
    (torch.tensor, as_tensor on a device) is a blocking copy from pageable memory. No step of any stage does
    either: stage changes, YaRN, the MTP weights, the untie, the FP8 head and accumulation included
    (train-loss logging, outside train_step, is the only read and happens every log_every). The
    loader's prefetch thread, which reads shards on the host, is left alone."""
    argv = TINY + SAMPLE + [f"--log_dir={tmp_path}", "--run_id=nosync", "--num_steps=6", "--extension_steps=2",
                            "--batch_tokens=256,256,256", "--shell_lambda=0.008", "--fp8_head=true",
                            "--accum_world_size=2",
                            "--compile_elementwise=false"]  # inductor reads values as it compiles (on a GPU, in the warmup)
    cfg = tg.parse_args(argv)
    backend = tg.setup_backend(cfg)
    trainer = tg.Trainer(cfg, backend, tg.RunLog(cfg, backend))
    assert trainer.schedule.untie_step is not None and trainer.accum == 2

    def forbidden(owner, name, only_to_a_device=False):
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            to_device = kwargs.get("device") is not None  # a host-only tensor (the loader's cu_seqlens) is fine
            if threading.current_thread() is threading.main_thread() and (to_device or not only_to_a_device):
                raise AssertionError(f"{name} inside train_step")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, guarded)

    for name in ("item", "__int__", "__float__", "__bool__", "tolist", "numpy", "cpu"):
        forbidden(torch.Tensor, name)
    trainer.train_step(0)  # makes the optimizers' state, once per run (NorMuon's lr multipliers from the host)
    for name in ("tensor", "as_tensor"):
        forbidden(torch, name, only_to_a_device=True)
    for step in range(1, trainer.schedule.total):
        trainer.train_step(step)
    monkeypatch.undo()
    assert not trainer.model.tied


def test_versus_record_only_when_the_run_did_the_same_work():
    cfg = tg.parse_args(["--preset=cpu", "--smear=false"])  # a technique may differ: that is what is compared
    config = json.loads(json.dumps(dataclasses.asdict(tg.parse_args(["--preset=cpu"]))))
    record = {"name": "recipe", "val_loss_mean": 5.2642, "time_ms_mean": 316620.0, "config": config}
    assert tg.versus_record(cfg, record, 5.2500, 300000.0) == (
        "vs record recipe: val_loss 5.2642 (this run -0.0142), train_time 316620ms (this run -16620ms)")
    short = tg.parse_args(["--preset=cpu", "--num_steps=4", "--val_tokens=8192"])
    assert tg.versus_record(short, record, 9.0, 1000.0) == (
        "not compared with record recipe: this run differs in num_steps=4 (record: 150), val_tokens=8192 (record: 65536)")
    own_text = tg.parse_args(["--preset=cpu", "--train_files=mine/t_*.bin", "--val_files=mine/v_*.bin"])
    assert tg.versus_record(own_text, record, 5.0, 3e5) == (
        "not compared with record recipe: this run differs in train_files=mine/t_*.bin (record: "
        f"{config['train_files']}), val_files=mine/v_*.bin (record: {config['val_files']})")
    assert tg.versus_record(cfg, {**record, "config": None}, 5.25, 3e5) == (
        "not compared with record recipe: its logs carry no config to check this run against")


def shard_path(folder, name, tokens):
    path = os.path.join(folder, name)
    tg.write_shard(path, np.asarray(tokens))
    return path


def failing_run(tmp_path, extra, run_id="fails"):
    """Run main, expecting one `error:` line: returns it, checking it is also the log's last line."""
    argv = TINY + SAMPLE + QUIET + [f"--log_dir={tmp_path}", f"--run_id={run_id}", "--num_steps=3",
                                    "--batch_tokens=256,256,256", "--val_every=0"] + extra
    with pytest.raises(SystemExit) as e:
        tg.main(argv)
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    log = os.path.join(tmp_path, f"{run_id}.txt")
    if os.path.exists(log):
        with open(log) as f:
            assert f.read().splitlines()[-1] == message
    return message


def test_val_tokens_that_do_not_fill_whole_slices_are_one_error_line(tmp_path):
    message = failing_run(tmp_path, ["--val_tokens=1000"])
    assert message == "error: --val_tokens=1000: expected a multiple of 1024 (the validation slice x the world size)"


def test_a_bad_shard_is_one_error_line(tmp_path):
    bad = os.path.join(tmp_path, "bad_val_000000.bin")
    with open(bad, "wb") as f:
        f.write(np.zeros(tg.HEADER_INTS, dtype="<i4").tobytes())
    message = failing_run(tmp_path, [f"--val_files={bad}"])
    assert message == f"error: {bad}: bad magic number 0 (expected {tg.SHARD_MAGIC}); not a token shard"


def test_too_little_training_data_is_one_honest_error_line(tmp_path):
    """The start check reads only the shard headers, so it can promise a lower bound, and says so."""
    small = shard_path(tmp_path, "small_000000.bin", ([tg.BOS_ID] + [5] * 99) * 5)  # 500 tokens
    message = failing_run(tmp_path, [f"--train_files={small}"])
    # 3 steps of 256 tokens, each with one more token for the last target (one micro-batch a step)
    assert message == (f"error: the schedule needs at least {3 * 257:,} training tokens but {small} holds 500; "
                       "download more shards or shorten the schedule")


def test_a_bad_token_in_a_later_shard_stops_the_run_at_once(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 1000, 10000)
    good[::100] = tg.BOS_ID  # 100 documents of 100 tokens: enough for all 3 steps
    shard_path(tmp_path, "mix_000000.bin", good)
    bad = shard_path(tmp_path, "mix_000001.bin", [tg.BOS_ID, 5, 60000, 7])
    message = failing_run(tmp_path, [f"--train_files={tmp_path}/mix_*.bin"])
    assert message == f"error: {bad}: token id 60000 at position 2 is out of range (vocab size 50257)"
    with open(os.path.join(tmp_path, "fails.txt")) as f:
        assert not any(line.startswith("final ") for line in f)  # stopped, although shard 0 had enough


def test_a_shard_without_bos_is_named(tmp_path):
    """Not "ran out after 0 tokens": the shard and the missing document marker are named."""
    bad = shard_path(tmp_path, "nobos_000000.bin", [5, 6, 7] * 1000)
    message = failing_run(tmp_path, [f"--train_files={tmp_path}/nobos_*.bin"])
    assert message == (f"error: {bad}: no <|endoftext|> (token 50256) among its 3,000 tokens, and every document "
                       "must start with one (data/tokenize_corpus.py writes them)")


def test_training_shards_as_validation_shards_are_refused(tmp_path):
    """The same files (here a link to a training shard among the val shards) would score trained-on tokens."""
    train = sorted((tg.glob.glob(f"{ROOT}/data/sample/sample_train_*.bin")))
    os.symlink(train[0], tmp_path / "v_000000.bin")
    message = failing_run(tmp_path, [f"--val_files={tmp_path}/v_*.bin"])
    assert message == (f"error: --train_files={ROOT}/data/sample/sample_train_*.bin and --val_files={tmp_path}/v_*.bin "
                       f"both take {tmp_path}/v_000000.bin: the val loss would score tokens the model trained on; "
                       "point them at different shards")


def test_an_unusable_log_dir_is_one_error_line(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    message = failing_run(tmp_path, [f"--log_dir={not_a_dir}"])
    assert message.startswith(f"error: --log_dir={not_a_dir}: cannot write the run's log there (")


class FakeWandb:
    """Stands in for the wandb module (not a test dependency): keeps what the trainer sends it."""

    def __init__(self):
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, scalars, step):
        self.logs.append((step, scalars))

    def finish(self):
        self.finished += 1


class FakeTensorBoard:
    """Stands in for torch.utils.tensorboard: its SummaryWriter keeps the scalars and texts."""

    def __init__(self):
        self.dirs, self.scalars, self.texts, self.closed = [], [], [], 0

    def SummaryWriter(self, log_dir):
        self.dirs.append(log_dir)
        return self

    def add_scalar(self, name, value, step):
        self.scalars.append((step, name, value))

    def add_text(self, name, text):
        self.texts.append((name, json.loads(text)))

    def flush(self):
        pass

    def close(self):
        self.closed += 1


def test_wandb_and_tensorboard_get_every_scalar_the_metrics_file_holds(tmp_path, monkeypatch):
    wandb, tensorboard = FakeWandb(), FakeTensorBoard()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    _, _, metrics = run(tmp_path, "tracked", QUIET + ["--num_steps=3", "--extension_steps=0", "--batch_tokens=256,256,256",
                                                      "--val_every=2", "--log_every=1", "--wandb=proj", "--tensorboard=true"])
    [init] = wandb.inits
    assert (init["project"], init["id"], init["name"], init["config"]["num_steps"]) == ("proj", "tracked", "tracked", 3)
    assert tensorboard.dirs == [str(tmp_path / "tensorboard" / "tracked")] and tensorboard.texts[0][1]["num_steps"] == 3
    # what the .jsonl holds, as (step, kind/name, value): every number but the config's, the final one at the last step
    expected, step = [], 0
    for m in metrics[1:]:
        step = m.get("step", step)
        expected += [(step, f"{m['kind']}/{k}", v) for k, v in m.items() if k not in ("kind", "step") and isinstance(v, (int, float))]
    assert {(s, "val/val_loss") for s, name, _ in expected if name == "val/val_loss"} == {(0, "val/val_loss"), (2, "val/val_loss"), (3, "val/val_loss")}
    assert ("train/grad_norm" in {name for _, name, _ in expected}) and (3, "final/tokens", 768) in expected
    assert [(s, n, v) for s, scalars in wandb.logs for n, v in scalars.items()] == expected
    assert tensorboard.scalars == expected
    assert wandb.finished == 1 and tensorboard.closed == 1


@pytest.mark.parametrize("flag, package", [("--wandb=proj", "wandb"), ("--tensorboard=true", "tensorboard")])
def test_a_tracker_that_is_not_installed_is_one_error_line_and_leaves_no_log(tmp_path, monkeypatch, flag, package):
    monkeypatch.setitem(sys.modules, "wandb", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    message = failing_run(tmp_path, [flag])
    assert message == f"error: {flag.split('=')[0]} needs the {package} package, which is not installed (pip install {package})"
    assert not list(tmp_path.glob("*.txt")) and not list(tmp_path.glob("*.jsonl"))


def test_eta_counts_the_remaining_flops_and_validations():
    # 0.5 ms a GFLOP, 6000 GFLOP to go, two validations of 1 s and 3 s so far, two to come
    assert tg.eta_seconds(0.5e-9, 6000e9, 2, [1.0, 3.0]) == pytest.approx(3.0 + 2 * 2.0)
    assert tg.eta_seconds(0.5e-9, 6000e9, 1, []) == pytest.approx(3.0)  # no validation measured yet


def test_train_line_reports_rate_mfu_lr_and_grad_norm(tmp_path):
    """Each train line: tokens/s over the steps since the previous line (the stages' batches differ),
    MFU = those steps' model FLOPs per second / the timed matmul peak, the last step's lr multiplier,
    the gradient's norm, and an ETA from the remaining steps' FLOPs at that rate (later stages have
    longer windows); records.py reads the line (mfu's %)."""
    steps = ["--num_steps=6", "--batch_tokens=256,512,768", "--log_every=2", "--val_every=0"]
    _, log, metrics = run(tmp_path, "line", steps)
    cfg = tg.parse_args(TINY + steps)
    sched = tg.Schedule(cfg)
    step_flops = [tg.flops_per_token(cfg, sched.windows(sched.window_blocks(s))) * sched.batch_tokens(s) for s in range(6)]
    assert len(set(f / sched.batch_tokens(s) for s, f in enumerate(step_flops))) > 1  # windows change the FLOPs per token
    trains = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in trains] == [2, 4, 6]
    # the MFU's peak, as the log states it
    peak = float(re.search(r"matmul peak (\d+) GFLOP/s", open(tmp_path / "line.txt").read().split(tg.SEPARATOR)[-1])[1]) * 1e9
    parsed = [s for s in log.steps if "train_loss" in s]
    previous_step, previous_ms = 0, 0.0
    for m, line in zip(trains, parsed):
        seconds = (m["train_time_ms"] - previous_ms) / 1000
        tokens = sum(sched.batch_tokens(s) for s in range(previous_step, m["step"]))
        flops = sum(step_flops[previous_step:m["step"]])
        assert m["tokens_per_s"] == pytest.approx(tokens / seconds)
        assert m["mfu"] == pytest.approx(flops / seconds / peak, rel=0.01)  # the peak is shown to 1 GFLOP/s
        assert line["eta_s"] == pytest.approx(seconds / flops * sum(step_flops[m["step"]:]), abs=0.51)  # shown to 1 s
        assert m["lr_mult"] == sched.lr_mult(m["step"] - 1)
        assert 0 < m["mfu"] < 1 and m["grad_norm"] > 0
        previous_step, previous_ms = m["step"], m["train_time_ms"]
    assert [s["mfu_pct"] for s in parsed] == [round(100 * m["mfu"], 1) for m in trains]
    # the cost line: the schedule's FLOPs at that peak, step by step
    text = open(tmp_path / "line.txt").read().split(tg.SEPARATOR)[-1]
    least = sum(step_flops) / peak
    shown = re.search(r"cost: at least ([\d.]+)s of training here \(the schedule's 3,072 tokens", text)
    assert shown and float(shown[1]) == pytest.approx(least, abs=0.051 + 0.01 * least)  # shown to 0.1 s, peak to 1 GFLOP/s
    # the gradient's norm equals one computed by hand from the parameters' gradients
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))
    p.grad, q.grad = torch.tensor([3.0, 0.0, 0.0]), torch.full((2, 2), 2.0)
    assert tg.gradient_norm([p, q, torch.nn.Parameter(torch.ones(1))]).item() == pytest.approx(5.0)


def test_durations_read_as_a_person_reads_them():
    assert [tg.format_duration(s) for s in (0.04, 59.9, 90, 5400, 3 * 86400)] == ["0.0s", "59.9s", "1.5min", "1.5h", "3.0 days"]


def test_flops_per_token_hand_count():
    """A 3-layer model of width 64, 2 heads of 32, MLP 256, attention in layers 0 and 2 (layer 2
    long), the 12-channel head gate and smear gate, vocabulary 50,257 padded to 50,304."""
    cfg = tg.parse_args(["--preset=cpu", "--n_layer=3", "--d_model=64", "--n_head=2", "--head_dim=32",
                         "--mlp_hidden=256", "--no_attn_layers=1", "--long_window_layers=2", "--skip_from=0",
                         "--skip_to=2", "--backout_layer=1", "--max_seq_len=256"])
    attention_layer = 4 * 64 * 64 + 2 * 12  # Q, K, V, O; the per-head gate
    mlp_layer = 2 * 64 * 256
    weights = 2 * attention_layer + 3 * mlp_layer + 50304 * 64 + 12  # ... the head, the smear gate
    assert tg.matmul_params(cfg) == weights == 3350588
    # q.k and p.v, 2 FLOPs a multiply-add, 3x for forward + backward, 64 channels of queries:
    # layer 0 sees the short window, layer 2 the long one, each the query itself and w keys before it
    assert tg.flops_per_token(cfg, (192, 64)) == 6 * weights + 3 * 2 * 2 * 64 * (65 + 193)
    # no query sees more keys than max_seq_len (256) holds
    assert tg.attention_flops(cfg, (512, 320)) == 12 * 64 * (256 + 256)


def test_config_summary_names_the_preset_and_only_what_differs():
    cfg = tg.parse_args(["--preset=cpu", "--baseline", "--num_steps=4", "--batch_tokens=8,8,8", "--run_id=x"])
    assert tg.config_summary(cfg) == "config: --preset=cpu --baseline --num_steps=4 --batch_tokens=8,8,8 (the full config is in the log)"
    cfg = tg.parse_args(["--preset=cpu", "--all_off", "--num_steps=7"])
    assert tg.config_summary(cfg) == "config: --preset=cpu --all_off --num_steps=7 (the full config is in the log)"
    assert tg.config_summary(tg.parse_args([])) == "config: --preset=speedrun (the full config is in the log)"


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


def test_a_diverged_run_stops_with_one_error_line(tmp_path):
    """A learning rate of 1e30 overflows the weights within a step or two: the run stops at the next
    log line with the loss that went non-finite, exit status 1, and no final or "vs record" line."""
    message = failing_run(tmp_path, ["--all_off", "--adamw_lr=1e30", "--log_every=1"], run_id="diverged")
    assert re.fullmatch(r"error: loss is (nan|inf|-inf) at step [1-3] \(train_loss\)", message), message
    with open(os.path.join(tmp_path, "diverged.txt")) as f:
        run_lines = f.read().split(tg.SEPARATOR)[-1].splitlines()  # after the source and versions
    assert any(line.startswith("step:1/") for line in run_lines)
    assert not any(line.startswith(("final ", "vs record")) for line in run_lines)


def test_on_the_cpu_a_diverged_run_stops_at_once_without_log_lines(tmp_path):
    """Reading the loss is free on the CPU, so it is checked after every step, not only at log lines
    and validations (here: none before step 10)."""
    message = failing_run(tmp_path, ["--all_off", "--adamw_lr=1e30", "--log_every=0", "--num_steps=10",
                                     "--save_every=5"], run_id="quiet")
    assert re.fullmatch(r"error: loss is (nan|inf|-inf) at step [1-3] \(train_loss\)", message), message
    assert not os.path.exists(os.path.join(tmp_path, "quiet"))  # no checkpoint of a diverged model


# ------------------------------------------------------------------------------------------------
# --dry_run: config, schedule and parameter table from a model on the meta device, in seconds
# ------------------------------------------------------------------------------------------------


def dry_run(tmp_path, flags):
    """`train_gpt.py <flags> --dry_run=true` in a fresh process, in an empty folder (no data, no logs
    there) and with no GPU visible: its stdout lines, once it has exited 0 and left the folder empty."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py"), *flags, "--dry_run=true"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path) == []  # no log, checkpoint or data folder made
    return done.stdout.splitlines()


NANOGPT_COUNT = "without the padding rows past vocab_size, as nanoGPT counts GPT-2: "  # the line before the last
TABLE_HEADER = ["parameter", "shape", "count", "dtype", "init", "optimizer", "lr", "betas", "weight_decay"]


def table_cells(lines):
    """The parameter table's rows split into their cells (after checking the header)."""
    header = next(i for i, line in enumerate(lines) if line.startswith("parameter "))
    assert re.split(r" {2,}", lines[header]) == TABLE_HEADER
    return [re.split(r" {2,}", line) for line in lines[header + 1 : -1] if not line.startswith(NANOGPT_COUNT)]


def table_dtypes(lines):
    """{name: the dtype column} of the parameter table."""
    return {cells[0]: cells[3] for cells in table_cells(lines)}


def table_rows(lines):
    """The parameter table's rows as {name: (shape, count, init, optimizer, lr, betas, wd)}, and N
    from the last line, which must be `parameters: N` (digits only; the line before it may give nanoGPT's count)."""
    total = re.fullmatch(r"parameters: (\d+)", lines[-1])
    assert total, lines[-1]
    rows = {}
    for name, shape, count, _, init, optimizer, lr, betas, wd in table_cells(lines):
        shape = () if shape == "()" else tuple(int(n) for n in shape.split("x"))
        betas = tuple(float(b) for b in betas.split(","))
        rows[name] = (shape, int(count), init, optimizer, float(lr), betas, float(wd))
    return rows, int(total[1])


def assert_init_describes(init, value, name):
    """The table's init phrase says what the real parameter holds (a freshly built one)."""
    v = value.detach().float()
    if init == "zeros" or init.startswith("copy of lm_head at untie (zeros before)"):
        assert torch.all(v == 0), name
    elif m := re.fullmatch(r"normal\(0, ([\d.e-]+)\)", init):
        assert v.mean().abs() < 0.01 * float(m[1]) and v.std() == pytest.approx(float(m[1]), rel=0.01), name
    elif m := re.fullmatch(r"uniform\(\+-([\d.e-]+)\)", init):
        bound = float(m[1])
        assert v.abs().max() <= bound * (1 + 1e-3) and v.abs().max() > 0.99 * bound, name
        assert v.std() == pytest.approx(bound / 3**0.5, rel=0.02), name  # uniform, not normal
    else:  # constants, one per element or one for all
        want = [float(x) for x in init.split(", ")]
        assert v.flatten().tolist() == pytest.approx(want if len(want) == v.numel() else want * v.numel()), name


def test_dry_run_cpu_prints_config_schedule_and_the_real_models_table(tmp_path):
    """The cpu preset's dry run: the config (summary and full JSON), the schedule by stage, the memory
    estimate (tests/test_memory.py), then one row per parameter of the real model, built here on the
    CPU, with its shape, count and init, and
    the optimizer, lr, betas and weight decay its real optimizer groups hold; last `parameters: N`."""
    lines = dry_run(tmp_path, ["--preset=cpu"])
    cfg = tg.parse_args(["--preset=cpu", "--dry_run=true"])
    assert lines[0] == "config: --preset=cpu --dry_run=true"
    assert json.loads(lines[1].removeprefix("config: ")) == tg.config_json(cfg)
    schedule = ["schedule: " + line for line in tg.Schedule(cfg).describe()]
    assert lines[2 : 2 + len(schedule)] == schedule and lines[2 + len(schedule)].startswith("memory: estimated peak ")
    assert lines[3 + len(schedule)].startswith("parameter ")
    rows, total = table_rows(lines)
    assert set(table_dtypes(lines).values()) == {"float32"}  # --device=cpu: no bf16 tables, no #57 weights
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg, tg.TorchOps, None, torch.float32)
    optimizers = tg.Optimizers(model, cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))
    params = dict(model.named_parameters())
    assert total == sum(p.numel() for p in params.values()) == 69108039
    assert list(rows) == list(params)
    want = {}
    for group in optimizers.muon.param_groups:  # NorMuon steps group lr x the matrix's lr_mul
        for p in group["params"]:
            want[p] = ("NorMuon", group["lr"] * p.lr_mul, (group["momentum"], group["beta2"]), group["weight_decay"])
    for group in optimizers.adam.param_groups:
        for p in group["params"]:
            want[p] = ("Adam", group["lr"], group["betas"], group["weight_decay"])
    for name, p in params.items():
        shape, count, init, optimizer, lr, betas, wd = rows[name]
        assert (shape, count) == (tuple(p.shape), p.numel()), name
        assert (optimizer, lr, betas, wd) == (want[p][0], pytest.approx(want[p][1], rel=1e-5), want[p][2], want[p][3]), name
        assert_init_describes(init, p, name)
    # a few by hand: the MLP down projection's lr 0.023 x 2 (4 hidden/d) x 2; the value embeddings' 0.008 x 75
    assert rows["blocks.0.mlp.down"][3:] == ("NorMuon", pytest.approx(0.092), (0.95, 0.95), 1.2)
    assert rows["value_embeds.0"][3:] == ("Adam", pytest.approx(0.6), (0.65, 0.95), 0.005)
    assert rows["skip_gate"][2:] == ("-1.5", "Adam", pytest.approx(0.04), (0.9, 0.99), 0.0)


def test_dry_run_all_off_is_adamw_on_everything(tmp_path):
    """`--all_off`: plain AdamW (lr 0.0036, betas 0.9, 0.95, no decay) holds every parameter."""
    rows, _ = table_rows(dry_run(tmp_path, ["--preset=cpu", "--all_off"]))
    assert {row[3:] for row in rows.values()} == {("AdamW", 0.0036, (0.9, 0.95), 0.0)}


def test_dry_run_head_lists_the_sublayer_lambdas(tmp_path):
    """--preset=head: #73/#77's [11, 2] residual (sqrt(1.1), Adam lr 0.008 x 5) and post (1, lr 0.008)
    lambdas with betas (0.9, 0.95) and no decay, HEAD's param_table; no x0, bigram or backout lambdas:
    the MUDD gate's and MUDD's coefficients (#81/#85: Adam lr 0.008 x 0.25 and x 0.1, betas 0.9, 0.99)."""
    rows, _ = table_rows(dry_run(tmp_path, ["--preset=head"]))
    shape, count, init, *settings = rows["resid_lambdas"]
    assert (shape, count, float(init)) == ((11, 2), 22, pytest.approx(math.sqrt(1.1), rel=1e-5))
    assert settings == ["Adam", pytest.approx(0.04), (0.9, 0.95), 0.0]
    assert rows["post_lambdas"] == ((11, 2), 22, "1", "Adam", pytest.approx(0.008), (0.9, 0.95), 0.0)
    assert not {"x0_lambdas", "bigram_embed.lambdas", "backout_lambda"} & set(rows)
    assert rows["mudd.w2"] == ((2, 14, 64), 2 * 14 * 64, "zeros", "Adam", pytest.approx(0.002), (0.9, 0.99), 0.005)
    assert rows["mudd_gate.b2"][3:] == ("Adam", pytest.approx(0.0008), (0.9, 0.99), 0.0)
    # #64/#67: Q, K, V and O uniform with bound sqrt(3) * 0.5 / sqrt(768) = 1/32 (O not zero)
    for name in ("q", "k", "v", "o"):
        assert rows[f"blocks.0.attn.{name}"][2] == "uniform(+-0.03125)", name


def test_dry_run_head_lists_xsa_and_dc(tmp_path):
    """--preset=head: no XSA or DC parameter of a layer's own (HEAD's MUDD gate makes their strengths and
    weights per token: its output weights [2, 41, 64] and biases [2, 41]). With --mudd_gate=false, one zero
    strength per head on each of HEAD's XSA layers (#82's [layer, head] bank, Adam lr 0.008, betas (0.9,
    0.95), no decay), none on the others; DC's weight MLP on HEAD's DC layer (#85's first form: its dc
    banks' rows for that layer, Adam lr 0.008 x 0.25, betas (0.9, 0.99), no decay)."""
    rows, _ = table_rows(dry_run(tmp_path, ["--preset=head"]))
    assert not [name for name in rows if name.endswith(".xsa") or ".composition." in name]
    for name in ("mudd_gate.w2", "mudd_gate.b2"):
        shape = hr.SHAPES[name.replace(".", "_")][0]
        assert rows[name][:2] == (shape, math.prod(shape)), name
    rows, _ = table_rows(dry_run(tmp_path, ["--preset=head", "--mudd_gate=false"]))
    for leaf, label in (("in_proj", "dc_w1_bank"), ("out_proj", "dc_w2_bank")):
        lr, betas, _, _ = hr.adam_settings(label)
        dc = {int(name.split(".")[1]): row for name, row in rows.items() if name.endswith(f".composition.{leaf}")}
        shape = hr.SHAPES[label][0][1:]
        assert sorted(dc) == hr.DC_LAYERS, label
        assert all(row[:2] + row[3:] == (shape, math.prod(shape), "Adam", pytest.approx(lr), betas, 0.0)
                   for row in dc.values()), label
    init = rows[f"blocks.{hr.DC_LAYERS[0]}.attn.composition.in_proj"][2]
    assert float(re.fullmatch(r"normal\(0, ([\d.e-]+)\)", init)[1]) == pytest.approx(hr.SHAPES["dc_w1_bank"][2][1], rel=1e-4)
    lr, betas, _, _ = hr.adam_settings("xsa_alphas")
    want = (hr.SHAPES["xsa_alphas"][0][1:], hr.N_HEAD, "zeros", "Adam", pytest.approx(lr), betas,
            hr.ADAM_WD * hr.RECORD_PARAM_TABLE["xsa_alphas"][3])
    xsa = {int(name.split(".")[1]): row for name, row in rows.items() if name.endswith(".xsa")}
    assert sorted(xsa) == hr.XSA_LAYERS and all(row == want for row in xsa.values())


@pytest.mark.parametrize("preset", ["speedrun", "head"])
def test_dry_run_shows_the_storage_dtypes(tmp_path, preset):
    """The dtype column: the head, embeddings and gates in bf16 as a CUDA run stores them, the scalars
    in fp32; Q, K, V, O and the MLP's matrices fp32 in speedrun, bf16 in head (#57's bf16 weights)."""
    dtypes = table_dtypes(dry_run(tmp_path, [f"--preset={preset}"]))
    matrices = [name for name in dtypes if re.fullmatch(r"blocks\.\d+\.(attn\.[qkvo]|mlp\.(up|down))", name)]
    assert len(matrices) == 10 * 4 + 11 * 2
    assert {dtypes[name] for name in matrices} == {"bfloat16" if preset == "head" else "float32"}
    assert dtypes["lm_head"] == dtypes["value_embeds.0"] == dtypes["smear_gate"] == "bfloat16"
    assert dtypes["skip_gate"] == dtypes["blocks.0.attn.lambdas"] == "float32"


def test_dry_run_speedrun_needs_no_gpu_and_matches_the_record(tmp_path):
    """The speedrun preset without a GPU or data: N by hand from SPEC's shapes, and every row's
    optimizer, lr, betas and weight decay as record #53 (tests/record_ref.py) sets them, at lr_mult 1
    and NorMuon's peak momentum."""
    rows, total = table_rows(dry_run(tmp_path, ["--preset=speedrun"]))
    vocab, d, hidden, heads, gate = 50304, 768, 3072, 6, 12  # 50,257 padded to a multiple of 128
    attention = 4 * d * d + heads * gate + 2  # Q, K, V, O, the per-head gate, the two lambdas
    tables = 2 + 3  # lm_head, embed, three value embeddings
    scalars = 1 + gate + 11 + 11 + 1 + 1  # smear lambda and gate, resid and x0 lambdas, skip gate, backout
    assert total == tables * vocab * d + 10 * attention + 11 * 2 * d * hidden + scalars == 268665609
    assert sum(row[1] for row in rows.values()) == total
    assert sorted(rows) == sorted(rr.record_parameter_names())
    peak_momentum = max(rr.record_momentum(s) for s in range(rr.TOTAL))
    for name, (shape, _, _, optimizer, lr, betas, wd) in rows.items():
        kind, storage, lr_mul, wd_mul, _ = rr.record_label(name, *rr.RECORD_DIMS)
        if kind.startswith("muon"):
            want_lr = rr.MUON_LR * math.sqrt(max(1.0, storage[-2] / storage[-1])) * lr_mul
            want = ("NorMuon", want_lr, (peak_momentum, rr.MUON_BETA2), rr.MUON_WD * wd_mul)
        else:
            want = ("Adam", rr.ADAM_LR * lr_mul, rr.ADAM_BETAS if kind == "adam" else rr.SCALAR_BETAS, rr.ADAM_WD * wd_mul)
        assert (optimizer, lr, betas, wd) == (want[0], pytest.approx(want[1], rel=1e-5), want[2], want[3]), name


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_out_of_memory_is_one_line_naming_the_size_and_the_flags(tmp_path, monkeypatch, device):
    """A step whose allocation fails: the CPU allocator's real error (1 PiB asked for), and CUDA's
    OutOfMemoryError as torch words it; one error line, no traceback, the log kept (the run had started)."""
    def step_that_allocates_too_much(self, step):
        if device == "cpu":
            torch.empty(2**50, dtype=torch.uint8)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB")

    monkeypatch.setattr(tg.Trainer, "train_step", step_that_allocates_too_much)
    message = failing_run(tmp_path, [])
    size = "1048576.00 GiB" if device == "cpu" else "2.00 GiB"
    assert message.startswith(f"error: out of memory ({size} more could not be allocated). Less is needed per step with "
                              "--activation_checkpointing=true")
    assert "a larger --accum_world_size" in message
    assert (tmp_path / "fails.txt").exists()


def test_compiled_elementwise_trains_as_eager(tmp_path):
    """The cpu preset's --compile_elementwise (inductor's loss blocks and optimizer updates) against the
    same run eager: the same losses at every step through every stage (the untie and Adam's steps
    included), up to the order of fp32 sums, while the loss falls by 40%; and the compiled pieces are
    the ones in use. (The weights themselves drift apart further: Polar Express turns the rounding
    noise of small singular directions into full-size updates, eager against eager as well.)"""
    flags = SAMPLE + QUIET + ["--num_steps=6", "--extension_steps=0", "--batch_tokens=256,256,256", "--val_every=0"]

    def trained(compiled):
        cfg = tg.parse_args([a for a in TINY if not a.startswith("--compile_elementwise")] + flags
                            + [f"--compile_elementwise={str(compiled).lower()}", f"--log_dir={tmp_path}",
                               f"--run_id=compiled_{compiled}"])
        backend = tg.setup_backend(cfg)
        trainer = tg.Trainer(cfg, backend, tg.RunLog(cfg, backend))
        losses = [float(trainer.train_step(step)["train_loss"]) for step in range(trainer.schedule.total)]
        return trainer, losses

    eager, eager_losses = trained(False)
    compiled, compiled_losses = trained(True)
    assert eager.backend.ops is tg.TorchOps and compiled.backend.ops is tg.compiled_torch_ops()
    assert compiled.optimizers.adam.update is not tg.adam_update and eager.optimizers.adam.update is tg.adam_update
    assert compiled.optimizers.muon.update is not tg.normuon_update and not compiled.model.tied
    assert eager_losses[-1] < 0.6 * eager_losses[0]
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-3, atol=0)
