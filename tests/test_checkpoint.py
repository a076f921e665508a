"""Checkpoints: a run killed after a checkpoint and resumed ends bitwise where an uninterrupted run
ends (1 process and 2 gloo ranks; a rank killed under torchrun --max-restarts); a checkpoint of
another config or source is refused; SIGINT and SIGTERM stop at a step boundary with a checkpoint
and exit 130 / 143; a log is never overwritten; a failed save never replaces a good file."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sample
import train_gpt as tg
import test_distributed
from test_distributed import ROOT, TINY, data, env, failure, free_port, threads_alive  # noqa: F401 (data is a fixture)

# 8 steps: stages start at 3 (a wider window, with YaRN) and 6 (the untie), Adam steps every 2. A
# checkpoint at step 3 leaves step 2's Adam gradients accumulated but not yet applied.
# every checkpoint kept (--keep_checkpoints=0): the tests resume from ones a later save would delete
STEPS = [a for a in TINY if not a.startswith(("--num_steps", "--save_final"))] + ["--num_steps=8", "--val_every=4",
                                                                                  "--keep_checkpoints=0"]
KILL_AT = 3


def command(args, nproc, log_dir, run_id, torchrun=()):
    """The run's command line; with several processes under torchrun (`torchrun`: its rendezvous and
    restart flags, by default a static rendezvous on a free port)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *(torchrun or [f"--master_port={free_port()}"])]
    return cmd + [os.path.join(ROOT, "train_gpt.py"), *args, f"--log_dir={log_dir}", f"--run_id={run_id}"]


def run(args, nproc, log_dir, run_id):
    out = subprocess.run(command(args, nproc, log_dir, run_id), cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, failure(out)
    return out


def run_and_kill(args, nproc, log_dir, run_id, wait_for):
    """Start a run and SIGKILL it (and all its ranks) as soon as `wait_for` exists (if it has not
    finished by then: the resume from `wait_for` is what the test checks either way)."""
    proc = subprocess.Popen(command(args, nproc, log_dir, run_id), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(wait_for) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # it may have finished
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(wait_for), "the run never wrote its checkpoint"
    return proc.returncode


def final(log_dir, run_id):
    """(final val loss from the metrics log, the model state of the final checkpoint)."""
    with open(os.path.join(log_dir, f"{run_id}.jsonl")) as f:
        val_loss = [json.loads(line) for line in f][-1]["val_loss"]
    state = tg.load_checkpoint(tg.latest_checkpoint(os.path.join(log_dir, run_id)))
    return val_loss, state["model"]


@pytest.mark.parametrize("nproc, bf16_weights, compiled", [(1, False, True), (2, False, False), (2, True, False)])
def test_killed_and_resumed_run_ends_bitwise_where_an_uninterrupted_run_ends(tmp_path, data, nproc, bf16_weights,
                                                                           compiled):
    """With the untimed warmup on, as in the speedrun preset: its steps are undone before the
    timed run, and a resumed run warms up again before it loads the checkpoint. With #57's bf16
    weights each rank's checkpoint part carries its share's mantissas (and fp32 NorMuon state);
    `compiled`: the cpu preset's compiled loss and optimizer updates."""
    # with the FP8 MLP (#84/#89), whose delayed scales carry from step to step
    args = STEPS + data + [f"--accum_world_size={nproc}", "--warmup_steps=1", "--fp8_mlp=true",
                           f"--bf16_weights={str(bf16_weights).lower()}", f"--compile_elementwise={str(compiled).lower()}"]
    run(args, nproc, tmp_path, "whole")
    saved = tg.checkpoint_path(str(tmp_path / "cut"), KILL_AT)
    status = run_and_kill(args + ["--save_every=3"], nproc, tmp_path, "cut", saved)
    assert status == -signal.SIGKILL  # killed, not finished: its final checkpoint is missing
    assert tg.latest_checkpoint(str(tmp_path / "cut")) != tg.checkpoint_path(str(tmp_path / "cut"), 8)
    run(args + [f"--resume={saved}"], nproc, tmp_path, "resumed")
    with open(tmp_path / "resumed.txt") as f:
        text = f.read().split(tg.SEPARATOR)[-1]  # after the embedded source
        assert f"resumed from {saved} at step {KILL_AT}/8, train_time " in text and f"ms, written by {nproc} process(es)\n" in text
    (loss_whole, whole), (loss_resumed, again) = final(tmp_path, "whole"), final(tmp_path, "resumed")
    assert loss_resumed == loss_whole
    assert whole.keys() == again.keys()
    for name in whole:
        if torch.is_tensor(whole[name]):
            assert torch.equal(whole[name], again[name]), name
        else:
            assert whole[name] == again[name], name
    # a checkpoint's step is the number of steps done: the uninterrupted run moved on from there
    cut = tg.load_checkpoint(saved)
    assert cut["step"] == KILL_AT and not torch.equal(cut["model"]["lm_head"], whole["lm_head"])
    # sample.py (and evals/hellaswag.py, which loads through it) reads a checkpoint of any world size
    _, model = sample.load_model(tg.latest_checkpoint(str(tmp_path / "resumed")), "cpu")
    state = model.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) if torch.is_tensor(again[k]) else state[k] == again[k] for k in state)
    assert cut["model"]["blocks.0.mlp.act_scale"] != 1  # step 3's scale, set from step 2's amax
    assert again["blocks.0.attn.q"].dtype == (torch.bfloat16 if bf16_weights else torch.float32)
    if bf16_weights:  # each rank's part holds its own share's mantissas, not all zero
        for rank in range(nproc):
            muon = torch.load(tg.checkpoint_path(str(tmp_path / "cut"), KILL_AT, rank), weights_only=True)["optimizers"][0]
            mantissas = [state["mantissa"] for state in muon["state"].values() if "mantissa" in state]
            assert len(mantissas) == 2 and all(m.dtype == torch.uint16 and m.view(torch.int16).any() for m in mantissas), rank


RESHARD_TOL = 1e-10  # float64 runs: only the order of the sums differs


def float64_run(args, nproc, log_dir, run_id):
    """A run in float64 (test_distributed's hook; the loss itself is computed in fp32): its val losses
    by step and its log's lines after the source it embeds."""
    out = test_distributed.run(args, nproc, log_dir, run_id)
    assert out.returncode == 0, f"{run_id} on {nproc} rank(s):\n{failure(out)}"
    with open(os.path.join(log_dir, f"{run_id}.jsonl")) as f:
        val = {m["step"]: m["val_loss"] for m in map(json.loads, f) if m["kind"] == "val"}
    return val, (log_dir / f"{run_id}.txt").read_text().split(tg.SEPARATOR)[-1]  # after the embedded source


def model_floats(path):
    """The floating-point tensors of a checkpoint's model."""
    return {k: v for k, v in tg.load_checkpoint(path)["model"].items() if torch.is_tensor(v) and v.is_floating_point()}


def final_model(log_dir, run_id):
    return model_floats(tg.latest_checkpoint(str(log_dir / run_id)))


def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path, data):
    """Written by 2 ranks, resumed on 1 and on 4; by 1, resumed on 2; by 4, resumed on 2. At step 3
    Adam holds step 2's gradients, accumulated per rank but not applied, and NorMuon's state is cut
    into other shares on each number of ranks (its 12 attention matrices 6 or 3 per rank, its 3 gates
    padded to 4 on 2 or 4 ranks). Each resumed run ends at the uninterrupted run's val loss."""
    args = STEPS + data + ["--accum_world_size=4", "--save_every=3"]
    whole, gaps = {}, []
    for written_by in (1, 2, 4):
        whole[written_by], _ = float64_run(args, written_by, tmp_path, f"w{written_by}")
    for written_by, resumed_on in ((2, 1), (2, 4), (1, 2), (4, 2)):
        saved = tg.checkpoint_path(str(tmp_path / f"w{written_by}"), KILL_AT)
        loss, text = float64_run(args + [f"--resume={saved}"], resumed_on, tmp_path, f"w{written_by}_on{resumed_on}")
        assert f"resumed from {saved} at step {KILL_AT}/8, " in text
        assert f"written by {written_by} process(es), resharded to {resumed_on}\n" in text
        assert [loss[step] for step in (4, 8)] == [whole[written_by][step] for step in (4, 8)]  # the loss is fp32
        gaps.append(test_distributed.largest_gap(final_model(tmp_path, f"w{written_by}"),
                                                 final_model(tmp_path, f"w{written_by}_on{resumed_on}")))
    print("resharded final parameters, largest gaps:", ", ".join(f"{g:.1e}" for g in gaps))
    assert max(gaps) < RESHARD_TOL
    # not vacuous: the steps after the checkpoint move the loss and the parameters far more than that
    assert abs(whole[2][8] - whole[2][4]) > 1e-3
    assert test_distributed.largest_gap(final_model(tmp_path, "w2"), model_floats(tg.checkpoint_path(str(tmp_path / "w2"), KILL_AT))) > 1e-3


def test_resume_refuses_another_config_unless_told(tmp_path, data):
    args = STEPS + data + ["--accum_world_size=1"]
    run(args + ["--num_steps=4", "--save_every=2"], 1, tmp_path, "first")
    saved = tg.checkpoint_path(str(tmp_path / "first"), 2)
    out = subprocess.run(command(args + [f"--resume={saved}", "--muon_lr=0.01"], 1, tmp_path, "other"),
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --resume={saved}: the checkpoint comes from another run: num_steps=4 (this run: 8); "
        "muon_lr=0.023 (this run: 0.01) (--resume_any=true resumes anyway)")
    run(args + [f"--resume={saved}", "--num_steps=4", "--muon_lr=0.01", "--resume_any=true"], 1, tmp_path, "forced")


def test_checkpoint_differences_names_the_source(tmp_path):
    cfg = tg.parse_args(["--preset=cpu"])
    state = dict(config=tg.config_json(cfg), source=tg.source_code())
    assert tg.checkpoint_differences(state, cfg) == []
    state["source"] += "# an edit\n"
    state["config"]["run_id"], state["config"]["seed"] = "another", 7
    assert tg.checkpoint_differences(state, cfg) == ["seed=7 (this run: 0)", "the source of train_gpt.py"]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, data, sig, status):
    args = STEPS + data + ["--accum_world_size=1", "--num_steps=30", "--val_every=0", "--progress=true"]
    proc = subprocess.Popen(command(args, 1, tmp_path, "stopped"), cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # the first train line: the timed loop is running
        if line.startswith("step:1/"):
            break
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    with open(tmp_path / "stopped.txt") as f:
        lines = f.read().splitlines()
    stop = next(line for line in lines if line.startswith("interrupted at step "))
    step = int(stop.split()[3])
    assert stop == f"interrupted at step {step} by {sig.name}" and 1 <= step < 30
    assert lines[-2].startswith(f"checkpoint: {tg.checkpoint_path(str(tmp_path / 'stopped'), step)} (") and lines[-1] == stop
    state = tg.load_checkpoint(tg.latest_checkpoint(str(tmp_path / "stopped")))
    assert state["step"] == step
    # --resume=auto with the same run id (what a torchrun restart re-runs) continues the same log; a
    # shorter schedule, to keep the test short, is a config difference that only --resume_any allows
    run(args + ["--resume=auto", f"--num_steps={step + 1}", "--resume_any=true"], 1, tmp_path, "stopped")
    with open(tmp_path / "stopped.txt") as f:
        after = f.read().splitlines()[len(lines):]
    assert after[0].startswith("continued by a resumed run: config: --preset=cpu ")
    saved = tg.checkpoint_path(str(tmp_path / "stopped"), step)
    at = next(i for i, line in enumerate(after) if line.startswith(f"resumed from {saved} at step {step}/{step + 1}, "))
    assert after[at + 1] == f"resumed despite: num_steps=30 (this run: {step + 1})"
    assert any(line.startswith("final val_loss:") for line in after[at:])


SIGNAL_AT, BOUNDARIES = 2, 5  # a process signals itself just before boundary 2 of 0..4


def stop_answers(stop, signalled):
    """StopSignal's answers at up to BOUNDARIES step boundaries, as the training loop asks them (up to
    the first stop); SIGTERM to this process before SIGNAL_AT when `signalled`."""
    answers = []
    while len(answers) < BOUNDARIES and not any(answers):
        if signalled and len(answers) == SIGNAL_AT:
            signal.raise_signal(signal.SIGTERM)
        answers.append(stop.requested())
    stop.finish()
    stop.close()
    return answers


def test_a_signal_reaches_every_rank_at_the_same_boundary_one_after_a_single_process():
    """One process stops at the boundary after its signal; ranks learn it from the all-reduce
    started there, all of them at the next boundary (2 gloo ranks, rank 1 signalled). A closed
    StopSignal no longer holds the group: destroy_process_group ends gloo's threads although the
    object lives on (as in the traceback of a stopped run)."""
    term = int(signal.SIGTERM)
    handlers = {s: signal.getsignal(s) for s in tg.STOP_SIGNALS}
    alone = stop_answers(tg.StopSignal(tg.setup_backend(tg.parse_args(["--preset=cpu"]))), signalled=True)
    assert alone == [0, 0, term]
    assert {s: signal.getsignal(s) for s in tg.STOP_SIGNALS} == handlers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           os.path.abspath(__file__)]
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, failure(out)
    ranks = sorted(json.loads(line) for line in out.stdout.splitlines() if line.startswith("["))
    assert ranks == [[0, [0, 0, 0, term], []], [1, [0, 0, 0, term], []]]


def worker_with_rank(pid, rank):
    """The pid of the process under `pid` (torchrun) whose environment says RANK=`rank`."""
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
        found = worker_with_rank(child, rank)
        if found:
            return found
    return None


def test_ranks_agree_on_the_stop_step_when_one_rank_is_signalled(tmp_path, data):
    """SIGTERM to rank 1 only: rank 0, which got no signal, stops at the same step boundary, both
    save their part of one checkpoint (in one folder, the run id being rank 0's) and exit 143."""
    args = STEPS + data + ["--accum_world_size=2", "--num_steps=30", "--val_every=0", "--progress=true"]
    cmd = [a for a in command(args, 2, tmp_path, "unused") if not a.startswith("--run_id=")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith("step:1/"):
            break
    os.kill(worker_with_rank(proc.pid, 1), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "exitcode  : 143" in stderr, stderr
    logs = [f for f in os.listdir(tmp_path) if f.endswith(".txt")]
    folders = [f for f in os.listdir(tmp_path) if (tmp_path / f).is_dir()]
    assert len(logs) == 1 and folders == [logs[0][: -len(".txt")]]
    lines = (tmp_path / logs[0]).read_text().splitlines()
    step = int(lines[-1].split()[3])
    assert lines[-1] == f"interrupted at step {step} by SIGTERM" and 1 <= step < 30
    saved = tg.checkpoint_path(str(tmp_path / folders[0]), step)
    assert lines[-2].startswith(f"checkpoint: {saved} (")
    assert sorted(os.listdir(tmp_path / folders[0])) == sorted(
        os.path.basename(tg.checkpoint_path("", step, rank)) for rank in (None, 0, 1))


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_warmup_is_one_line(tmp_path, data, monkeypatch, capsys, sig, status):
    """Before the timed loop there is nothing to save: the run says so and exits, no traceback, and
    leaves no log (its run id stays free)."""
    monkeypatch.setattr(tg.Trainer, "warmup", lambda self: (os.kill(os.getpid(), sig), time.sleep(5)))
    handlers = {s: signal.getsignal(s) for s in tg.STOP_SIGNALS}
    with pytest.raises(SystemExit) as e:
        tg.main(STEPS + data + ["--accum_world_size=1", "--warmup_steps=1", f"--log_dir={tmp_path}", "--run_id=early"])
    assert e.value.code == status
    message = f"interrupted by {sig.name} before the first step or by a second signal: no checkpoint written"
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert os.listdir(tmp_path) == []
    assert {s: signal.getsignal(s) for s in tg.STOP_SIGNALS} == handlers  # main puts the handlers back


def test_a_log_is_never_overwritten(tmp_path):
    (tmp_path / "taken.txt").write_text("a finished run\n")
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset=cpu", f"--log_dir={tmp_path}", "--run_id=taken"])
    assert e.value.code == (f"error: --run_id=taken: {tmp_path / 'taken.txt'} already exists and a log is never "
                            "overwritten; choose another --run_id, or continue that run with --resume")
    assert (tmp_path / "taken.txt").read_text() == "a finished run\n"


def test_saving_is_outside_the_clock(tmp_path, data, monkeypatch):
    """Each save made to last 2 s: the 4 of them (steps 1-3 and the final one) and the train time
    together fit in the run's wall time only if the clock was stopped for them."""
    save = tg.Trainer.save

    def slow_save(self, step, train_ms):
        time.sleep(2.0)
        return save(self, step, train_ms)

    monkeypatch.setattr(tg.Trainer, "save", slow_save)
    args = STEPS + data + ["--accum_world_size=1", "--num_steps=4", "--save_every=1", "--val_every=0", "--keep_checkpoints=2"]
    start = time.perf_counter()
    _, train_ms = tg.main(args + [f"--log_dir={tmp_path}", "--run_id=timed"])
    assert train_ms / 1000 + 4 * 2.0 <= time.perf_counter() - start
    # the newest two are kept; each checkpoint line says how large its files are
    folder = tmp_path / "timed"
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(tg.checkpoint_path("", s, r)) for s in (3, 4) for r in (None, 0))
    mib = [os.path.getsize(tg.checkpoint_path(str(folder), 4, r)) / 2**20 for r in (None, 0)]
    assert f"checkpoint: {tg.checkpoint_path(str(folder), 4)} ({sum(mib):,.1f} MiB: model and run {mib[0]:,.1f}, " \
           f"optimizer state of 1 rank(s) {mib[1]:,.1f})" in (tmp_path / "timed.txt").read_text().split(tg.SEPARATOR)[-1].splitlines()


def test_a_shared_checkpoint_dir_is_never_overwritten(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "step_000150.pt").write_bytes(b"another run's checkpoint")
    with pytest.raises(SystemExit) as e:
        tg.main(["--preset=cpu", f"--log_dir={tmp_path}", "--run_id=second", f"--checkpoint_dir={tmp_path / 'shared'}"])
    assert e.value.code == (f"error: {tmp_path / 'shared' / 'step_000150.pt'} already exists and a checkpoint is never "
                            "overwritten; choose another --checkpoint_dir, or continue that run with --resume")
    assert (tmp_path / "shared" / "step_000150.pt").read_bytes() == b"another run's checkpoint"


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "step_000001.pt")
    tg.save_atomic({"good": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        tg.save_atomic({"good": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["good"], torch.ones(3))
    assert os.listdir(tmp_path) == ["step_000001.pt"]  # no temporary file left behind


def test_old_checkpoints_go_and_incomplete_ones_stay(tmp_path):
    """--keep_checkpoints: the newest N complete checkpoints (main file present) stay, with their rank
    files; 0 keeps all; a checkpoint still being written (rank files, no main file yet) is left alone."""
    folder = str(tmp_path)
    files = {step: [tg.checkpoint_path(folder, step, rank) for rank in (None, 0, 1)] for step in (1, 2, 3, 4)}
    for paths in files.values():
        for path in paths:
            open(path, "wb").close()
    being_written = tg.checkpoint_path(folder, 5, 0)
    open(being_written, "wb").close()
    tg.remove_old_checkpoints(folder, 0)
    assert len(os.listdir(folder)) == 13
    tg.remove_old_checkpoints(folder, 2)
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(p) for p in files[3] + files[4] + [being_written])
    assert tg.saved_steps(folder) == [4, 3]


def test_an_unwritable_checkpoint_dir_stops_the_run_at_start_without_a_trace(tmp_path, data):
    """Found before training, naming the flag (not at the end, losing the model); the log it began is gone."""
    (tmp_path / "file").write_text("")
    ck = tmp_path / "file" / "ck"
    with pytest.raises(SystemExit) as e:
        tg.main(STEPS + data + [f"--log_dir={tmp_path / 'logs'}", "--run_id=r", f"--checkpoint_dir={ck}"])
    assert e.value.code == f"error: --checkpoint_dir={ck}: cannot write checkpoints to {ck} (Not a directory)"
    assert not (tmp_path / "logs").exists() or os.listdir(tmp_path / "logs") == []


def test_a_run_refused_before_its_first_step_leaves_no_log_and_its_run_id_free(tmp_path, data):
    missing = tmp_path / "nothing.pt"
    args = STEPS + data + ["--accum_world_size=1", "--num_steps=1", f"--log_dir={tmp_path / 'logs'}", "--run_id=again"]
    with pytest.raises(SystemExit) as e:
        tg.main(args + [f"--resume={missing}"])
    assert str(e.value.code).startswith(f"error: --resume={missing}: no such file")
    assert os.listdir(tmp_path / "logs") == []  # no log, no metrics, no empty checkpoint folder
    tg.main(args)  # the same run id is free
    assert sorted(os.listdir(tmp_path / "logs")) == ["again", "again.jsonl", "again.txt"]


def test_resume_auto_passes_over_an_unreadable_checkpoint_and_refuses_a_finished_run(tmp_path, data, monkeypatch):
    """A run that crashed at step 2 (checkpoints at steps 1 and 2, the log kept) whose step-2 file is
    then damaged: --resume=auto says so and continues from step 1. Once finished (without a final
    checkpoint), --resume=auto refuses instead of training it again."""
    args = STEPS + data + ["--accum_world_size=1", "--save_every=1", "--keep_checkpoints=0", "--val_every=0",
                           f"--log_dir={tmp_path}", "--run_id=crashed"]
    train_step = tg.Trainer.train_step

    def crash_at_2(self, step):
        if step == 2:
            raise RuntimeError("a crash at step 2")
        return train_step(self, step)

    monkeypatch.setattr(tg.Trainer, "train_step", crash_at_2)
    with pytest.raises(RuntimeError):
        tg.main(args)
    monkeypatch.undo()
    assert tg.saved_steps(str(tmp_path / "crashed")) == [2, 1]
    damaged = tg.checkpoint_path(str(tmp_path / "crashed"), 2)
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    tg.main(args + ["--resume=auto"])
    lines = (tmp_path / "crashed.txt").read_text().split(tg.SEPARATOR)[-1].splitlines()  # after the embedded source
    passed = next(line for line in lines if line.startswith("resume: passing over"))
    assert passed.startswith(f"resume: passing over the checkpoint of step 2: {damaged}: not a checkpoint torch.load")
    assert any(line.startswith(f"resumed from {tg.checkpoint_path(str(tmp_path / 'crashed'), 1)} at step 1/") for line in lines)
    with pytest.raises(SystemExit) as e:
        tg.main(args + ["--resume=auto"])
    assert e.value.code == (f"error: --resume=auto: {tmp_path / 'crashed.txt'} says that run finished (its final line "
                            "is there); nothing to resume")


def worker_pid(torchrun, rank):
    """The pid of torchrun's worker of `rank` (its child whose environment holds RANK=rank), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                if parent == torchrun and f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(pid)
    return None


def test_each_torchrun_attempt_meets_on_keys_of_its_own(monkeypatch):
    """attempt_store on torchrun's store (here a server of the test's, as torchrun's agent holds it):
    what a rank of restart 1 sets lands under attempt_1, where no rank of attempt 0 wrote. With ranks
    on several nodes, whose agents count their restarts apart, the keys are left unscoped."""
    agent = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(agent.port), RANK="1", WORLD_SIZE="2",
                            TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="1").items():
        monkeypatch.setenv(name, value)
    for local_ranks, key in (("2", "attempt_1/rank_1"), ("1", "rank_1")):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
        tg.attempt_store(2).set("rank_1", f"address on {local_ranks} local rank(s)")
        assert agent.check([key]) and agent.get(key) == f"address on {local_ranks} local rank(s)".encode()
    assert sorted(agent.list_keys()) == ["attempt_1/rank_1", "rank_1"]


def test_a_killed_rank_restarts_under_torchrun_and_ends_where_an_uninterrupted_run_ends(tmp_path, data):
    """README's elastic command, torchrun --standalone --max-restarts=1 with a fixed run id and
    --resume=auto: rank 1 SIGKILLed once step 3's checkpoint is complete. torchrun stops rank 0 and
    starts both again; they meet on their own attempt's keys (see attempt_store), go on from the
    newest complete checkpoint and end at the uninterrupted run's val loss, bitwise."""
    args = STEPS + data + ["--accum_world_size=2"]
    run(args, 2, tmp_path, "whole")
    cmd = command(args + ["--save_every=3", "--resume=auto"], 2, tmp_path, "restarted",
                  torchrun=["--standalone", "--max-restarts=1"])
    with open(tmp_path / "torchrun.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=err)
        saved, deadline = tg.checkpoint_path(str(tmp_path / "restarted"), KILL_AT), time.time() + 300
        while not os.path.exists(saved) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        victim = worker_pid(proc.pid, 1)
        assert victim is not None, "no rank 1 worker found"
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=300)
    stderr = (tmp_path / "torchrun.err").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    lines = (tmp_path / "restarted.txt").read_text().split(tg.SEPARATOR)[-1].splitlines()  # after the embedded source
    assert any(line.startswith("continued by a resumed run: ") for line in lines)
    assert any(line.startswith(f"resumed from {tmp_path / 'restarted'}{os.sep}step_") for line in lines)
    assert final(tmp_path, "restarted")[0] == final(tmp_path, "whole")[0]


def start_ranks(args, nproc, log_dir, run_id):
    """Each rank as its own process, without torchrun (which stops the others as soon as one exits):
    [(exit status, stderr)] by rank."""
    port, procs = free_port(), []
    for rank in range(nproc):
        ranked = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command(args, 1, log_dir, run_id), cwd=ROOT, env=ranked, text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    return [(proc.returncode, stderr) for proc, stderr in zip(procs, errors)]


def test_a_check_that_fails_on_one_rank_ends_every_rank_with_its_error_line(tmp_path, data):
    """Rank 0 alone finds the log taken; rank 1 alone misses its checkpoint part. Each time every
    rank exits at start-up, status 1, with that one line (not running on to its first collective,
    to fail there or wait for a rank that has gone)."""
    args = STEPS + data + ["--accum_world_size=2", "--num_steps=3", "--save_every=2", "--save_final=false"]
    run(args, 2, tmp_path, "taken")
    saved = tg.checkpoint_path(str(tmp_path / "taken"), 2)
    os.remove(tg.checkpoint_path(str(tmp_path / "taken"), 2, rank=1))
    taken = (f"error: --run_id=taken: {tmp_path / 'taken.txt'} already exists and a log is never overwritten; "
             "choose another --run_id, or continue that run with --resume")
    missing = (f"error: --resume={tg.checkpoint_path(str(tmp_path / 'taken'), 2, rank=1)}: no such file "
               "(expected a checkpoint written by train_gpt.py)")
    for extra, line in (([], taken), ([f"--resume={saved}"], missing)):
        for status, stderr in start_ranks(args + extra, 2, tmp_path, "taken"):
            assert status == 1 and stderr.splitlines()[-1:] == [line], stderr
            assert "Traceback" not in stderr
    assert (tmp_path / "taken.txt").read_text().splitlines()[-1] == missing  # rank 0 logs rank 1's error


def test_latest_checkpoint_and_bad_files(tmp_path):
    assert tg.latest_checkpoint(str(tmp_path / "none")) is None
    for step in (9, 10, 2):
        (tmp_path / f"step_{step:06d}.pt").write_bytes(b"")
    (tmp_path / "step_000011.rank1.pt").write_bytes(b"")
    assert tg.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_000010.pt")
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        tg.load_checkpoint(str(bad))
    assert str(e.value.code).startswith(f"error: --resume={bad}: not a checkpoint torch.load(weights_only=True) can read (")
    with pytest.raises(SystemExit) as e:
        tg.load_checkpoint(str(tmp_path / "missing.pt"))
    assert e.value.code == f"error: --resume={tmp_path / 'missing.pt'}: no such file (expected a checkpoint written by train_gpt.py)"
    tg.save_atomic({"model": {}}, str(tmp_path / "partial.pt"))
    with pytest.raises(SystemExit) as e:
        tg.load_checkpoint(str(tmp_path / "partial.pt"))
    assert e.value.code == (f"error: --resume={tmp_path / 'partial.pt'}: not a train_gpt.py checkpoint "
                            "(expected a dict with 'config', 'model', 'tied'; missing 'config', 'tied')")


if __name__ == "__main__":  # under torchrun, for the test of StopSignal across ranks above
    backend = tg.setup_backend(tg.parse_args(["--preset=cpu"]))
    stop = tg.StopSignal(backend)
    answers = stop_answers(stop, signalled=backend.rank == 1)
    torch.distributed.destroy_process_group()
    # one write per line: print's separate write of the newline lets the two ranks' lines run together
    sys.stdout.write(json.dumps([backend.rank, answers, threads_alive()]) + "\n")
    sys.stdout.flush()
