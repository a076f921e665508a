"""Memory: the peak a configuration needs, estimated before training (train_gpt's Memory section),
against the tensors' peak measured on the CPU, the optimizer state a real step makes and the public
record's logged peak; the refusal line and the flags it names."""
import dataclasses
import os
import re
import sys

import pytest
import torch

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory as bench  # noqa: E402

MIB = 2**20
# the record #53 log's last line (records/track_1_short/2025-12-22_MultiTokenPrediction, 17aaf854...):
# "peak memory allocated: 29863 MiB", torch.cuda.max_memory_allocated on each of its 8 H100s
RECORD_PEAK_MIB = 29863
# HEAD's (#89, records/track_1_short/2026-07-17_FP8DownProjection/this_pr, 13 logs): 30,220 to 30,935 MiB
HEAD_PEAK_MIB = (30220, 30935)
RECORD_VAL_TOKENS_PER_RANK = 262144  # its validation: 2,097,152 tokens a pass over 8 ranks
ESTIMATE_TOLERANCE = 0.1  # measured / estimated peak of the tensors within 1 +- this


def cpu_backend(cfg, world_size=1):
    return tg.Backend(torch.device("cpu"), 0, world_size, *tg.device_ops(cfg, cuda=False))


@pytest.mark.parametrize("shape", ["2 x 64, 1,024-token batches", "2 x 64, 8,192-token validation passes"])
def test_the_estimate_is_close_to_the_measured_peak_on_the_cpu(shape):
    """Small CPU runs (four steps and a validation; training's peak in one, validation's in the other):
    the most bytes of tensors alive at once, from torch.profiler's memory timeline, are within
    ESTIMATE_TOLERANCE of the estimate (measured 0.99 and 0.98 of it; bench/memory.py's table also has
    the process's resident peak, which glibc's heap raises 1.2-1.4x above the tensors)."""
    flags = bench.flags(shape)
    estimate, measured = bench.estimate(flags), bench.tensor_peak(flags)
    assert estimate.phase == ("validation" if "validation" in shape else "training")
    assert abs(measured / estimate.peak - 1) <= ESTIMATE_TOLERANCE, (measured / MIB, estimate.peak / MIB)


def test_optimizer_state_is_what_a_real_step_makes():
    """The estimate's optimizer state (NorMuon's momentum, second moment and #57 mantissas, Adam's two
    moments) against the state tensors a real CPU step creates, byte for byte; and over 8 ranks, AdamW's
    moments of every tensor with at least 8 rows are one rank's share of its rows."""
    for extra in ([], ["--bf16_weights=true"], ["--muon=false"]):
        cfg = tg.parse_args(bench.RUN + bench.TWO_LAYERS + extra)
        torch.manual_seed(0)
        model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
        optimizers = tg.Optimizers(model, cfg, cpu_backend(cfg))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizers.step(1, 1.0, 0.95, last=True)
        made = sum(t.numel() * t.element_size() for opt in (optimizers.muon, optimizers.adam) if opt is not None
                   for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
        assert tg.state_bytes(cfg, cpu_backend(cfg))["optimizer"] == made, extra
    shares = sum(2 * p.element_size() * (-(-p.size(0) // 8) * p[0].numel() if p.dim() >= 2 and p.size(0) >= 8 else p.numel())
                 for p in model.parameters())
    assert tg.state_bytes(cfg, cpu_backend(cfg, world_size=8))["optimizer"] == shares


@pytest.mark.parametrize("preset, logged", [("speedrun", (RECORD_PEAK_MIB,)), ("head", HEAD_PEAK_MIB)])
def test_the_estimate_is_near_the_records_logged_peak(preset, logged):
    """A preset as its record ran it (8 ranks, CUDA's ops and dtypes, built on the meta device): its
    peak is the validation pass, whose bf16 logits alone are 262,144 x 50,304 x 2 bytes = 24.6 GiB,
    and the estimate is within 5% of every peak the record's logs say were allocated at most (#53's
    one, HEAD's lowest and highest)."""
    cfg = tg.parse_args([f"--preset={preset}"])
    estimate = tg.memory_estimate(cfg, tg.meta_backend(cfg, world_size=8))
    assert estimate.phase == "validation" and estimate.val_tokens == RECORD_VAL_TOKENS_PER_RANK
    for peak in logged:
        assert abs(estimate.peak / MIB / peak - 1) <= 0.05, (estimate.peak / MIB, peak)


def refusal(cfg, monkeypatch, available):
    """check_memory's error line on a CPU said to have `available` bytes."""
    monkeypatch.setattr(tg, "device_memory", lambda device: available)
    with pytest.raises(SystemExit) as stop:
        tg.check_memory(cfg, cpu_backend(cfg))
    return stop.value.code


@pytest.mark.parametrize("shape, flag, value", [("4 x 256, 4,096-token batches", "activation_checkpointing", "true"),
                                                ("2 x 64, 8,192-token validation passes", "val_batch_tokens", "4096")])
def test_a_run_that_cannot_fit_stops_with_the_flags_that_would(monkeypatch, shape, flag, value):
    """With less memory than the estimate, but more than `--flag=value` needs: one `error:` line with
    the estimate, what there is and the flags; those flags, given, really bring the estimate under it
    (and the first of the flags it tries is the one this shape needs: checkpointing for the
    activations, a smaller validation pass for validation's logits). --memory_check=false trains anyway."""
    argv = bench.flags(shape)
    cfg = tg.parse_args(argv)
    peak = bench.estimate(argv).peak
    available = (peak + bench.estimate(argv + [f"--{flag}={value}"]).peak) // 2
    line = refusal(cfg, monkeypatch, available)
    assert "\n" not in line and line.startswith("error: out of memory ahead: the estimated peak is ")
    assert f"{peak / 2**30:.2f} GiB" in line and f"has {available / 2**30:.2f} GiB" in line
    named = re.findall(r"--(\w+)=(\S+) ", line.split("; ")[-1])
    assert named and named[0][0] == flag and "--memory_check=false" in line
    fixed = bench.estimate(argv + [f"--{k}={v}" for k, v in named if k != "memory_check"])
    assert fixed.peak <= available < peak
    assert tg.check_memory(dataclasses.replace(cfg, memory_check=False), cpu_backend(cfg)).startswith("memory: estimated peak")


def test_nothing_fits_says_so(monkeypatch):
    """Less memory than the parameters alone: no flag can help, and the line says what would."""
    line = refusal(tg.parse_args(bench.flags("2 x 64, 1,024-token batches")), monkeypatch, 2**20)
    assert line.startswith("error: out of memory ahead") and "no setting of --val_batch_tokens" in line


def test_main_refuses_before_training_and_logs_the_estimate(tmp_path, monkeypatch, capsys):
    """Through main: the refusal is one line on stderr, exit with it, no log left behind; a run that
    fits logs its `memory:` line; --dry_run prints it too."""
    argv = bench.flags("2 x 64, 1,024-token batches") + [f"--log_dir={tmp_path}", "--run_id=big"]
    monkeypatch.setattr(tg, "device_memory", lambda device: 2**26)
    with pytest.raises(SystemExit) as stop:
        tg.main(argv)
    assert stop.value.code.startswith("error: out of memory ahead") and os.listdir(tmp_path) == []
    monkeypatch.undo()
    tg.main(argv[:-1] + ["--run_id=fits"])
    with open(tmp_path / "fits.txt") as f:
        lines = [line for line in f.read().split(tg.SEPARATOR)[-1].splitlines() if line.startswith("memory: ")]
    assert len(lines) == 1 and " GiB here at the training: " in lines[0]
    capsys.readouterr()
    tg.main(bench.flags("2 x 64, 1,024-token batches") + ["--dry_run=true"])
    dry = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory: ")]
    assert len(dry) == 1 and "as one process on cpu with torch ops" in dry[0]
