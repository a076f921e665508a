"""The speedrun preset's schedule, step by step for all 1920 steps, against the record's formulas; the
head preset's, step by step, against HEAD's (head_schedule_ref.py).

The record computes its per-step quantities in get_lr, get_ws, get_bs, get_muon_momentum, its MTP
weight list, Yarn.apply and the transition counter of step_optimizers; record_ref.py transcribes
them in the record's own terms (thresholds on x = step / 1880, batch sizes as 8 ranks x 2048 x k).
"""
import math
import os

import head_schedule_ref as hr
import pytest
import torch
from record_ref import (SCHEDULED, TOTAL, WS_FINAL, WS_VALIDATE, record_bs, record_lr, record_momentum,
                        record_mtp, record_transitions, record_ws)

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def record_table():
    """Per training step: lr, momentum, mtp, batch, (long, short) blocks, attention scale, scalars frozen."""
    rows = []
    ws_long, scale = record_ws(0)[1], 0.1
    for step, frozen in enumerate(record_transitions()):
        short, new_long = record_ws(step)
        if new_long != ws_long:  # Yarn.apply
            scale *= 0.2 * math.log(new_long / ws_long) + 1
            ws_long = new_long
        rows.append((record_lr(step), record_momentum(step), record_mtp(step), record_bs(step), (ws_long, short), scale,
                     frozen))
    return rows


@pytest.fixture(scope="module")
def ours():
    cfg = tg.parse_args([])
    sched = tg.Schedule(cfg)
    rotary = tg.Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale)
    rows = []
    for step in range(sched.total):
        blocks = sched.window_blocks(step)
        rotary.set_window(blocks[0] * cfg.window_block, cfg.yarn)  # what train_step does
        rows.append((sched.lr_mult(step), sched.momentum(step), list(sched.mtp_weights(step)), sched.batch_tokens(step),
                     blocks, float(rotary.attn_scale), sched.scalars_frozen(step)))
    return cfg, sched, rows


def test_every_step_matches_the_record(ours):
    cfg, sched, rows = ours
    want = record_table()
    assert sched.total == len(want) == 1920 and cfg.window_block == 128
    names = ("lr", "momentum", "mtp", "batch", "windows", "attn_scale", "scalars_frozen")
    for step, (got, exp) in enumerate(zip(rows, want)):
        for name, a, b in zip(names, got, exp):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12), (step, name, a, b)  # attn_scale may be fp32


def test_table_landmarks(ours):
    """A few rows written out by hand, so a shared misreading of the record would still show."""
    _, _, rows = ours
    lr, mom, mtp, batch, windows, scale, frozen = zip(*rows)
    assert (lr[0], lr[626], lr[845], lr[846]) == (1.0, 1.0, 1.52, pytest.approx(1.52))  # cooldown from step 846 (x >= 0.45)
    w = (1 - 1000 / 1880) / 0.55
    assert lr[1000] == pytest.approx(1.52 * w + 0.1 * (1 - w))
    assert lr[1879] == pytest.approx(1.73 * (1 / 1880) / 0.55 + 0.1 * (1 - (1 / 1880) / 0.55))
    assert all(v == pytest.approx(0.1) for v in lr[1880:])  # the floor is absolute, not 0.1 * 1.73
    assert mom[0] == 0.85 and mom[300] == 0.95 and mom[1870] == 0.95 and mom[1919] == pytest.approx(0.852)
    assert batch[626] == 131072 and batch[627] == 262144 and batch[1254] == 393216 and batch[1919] == 393216
    assert windows[626] == (3, 1) and windows[627] == (7, 3) and windows[1254] == (11, 5) and windows[1880] == (13, 6)
    assert len(mtp[626]) == 3 and len(mtp[627]) == 2 and mtp[1254] == [1.0]
    assert scale[0] == pytest.approx(0.1) and scale[1919] == pytest.approx(
        0.1 * (0.2 * math.log(7 / 3) + 1) * (0.2 * math.log(11 / 7) + 1) * (0.2 * math.log(13 / 11) + 1))
    frozen_steps = [s for s, f in enumerate(frozen) if f]
    assert frozen_steps == list(range(627, 667)) + list(range(1254, 1294)) + list(range(1880, 1920))


def test_final_validation_windows(ours):
    """The record validates at the end with a 20-block long window (no further YaRN step) and keeps
    the extension's 6-block (768-token) short window."""
    cfg, sched, _ = ours
    assert sched.final_window_blocks() == (WS_VALIDATE, WS_FINAL // 2)
    assert sched.windows(sched.final_window_blocks()) == (2560, 768)


def test_untie_step():
    """The embedding starts reading its own table at ceil(2/3 * 1880) = 1254; the record copies the
    head into it right after the Adam step of 1253, which leaves the same weights at 1254."""
    assert tg.Schedule(tg.parse_args([])).untie_step == math.ceil(2 / 3 * SCHEDULED) == 1254


def test_freeze_off_and_cpu_preset():
    assert not any(tg.Schedule(tg.parse_args(["--scalar_freeze_steps=0"])).scalars_frozen(s) for s in range(TOTAL))
    cpu = tg.Schedule(tg.parse_args(["--preset=cpu"]))
    assert cpu.changes == [50, 100]  # batch and window change at the thirds of 150 steps
    assert [s for s in range(cpu.total) if cpu.scalars_frozen(s)] == list(range(50, 90)) + list(range(100, 140))


@pytest.mark.parametrize("steps, starts", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 2, 3]), (150, [0, 50, 100])])
def test_short_schedules_have_only_the_stages_they_reach(steps, starts):
    """ceil(k * steps / 3) for the thirds, less those at num_steps itself, which hold no step."""
    schedule = tg.Schedule(tg.parse_args(["--preset=cpu", f"--num_steps={steps}"]))
    assert schedule.stage_starts() == starts
    ranges = [line.split(":")[0] for line in schedule.describe()[:-1]]
    assert ranges == [f"steps {a}-{b - 1}" for a, b in zip(starts, starts[1:] + [steps])]


# ------------------------------------------------------------------------------------------------
# --preset=head: the public HEAD's schedule (head_schedule_ref.py transcribes it)
# ------------------------------------------------------------------------------------------------


def answers(sched, step):
    """Everything the schedule answers per step, in head_schedule_ref's order."""
    return (sched.lr_mult(step), sched.momentum(step), list(sched.mtp_weights(step)), sched.prefix_weight(step),
            sched.batch_tokens(step), sched.max_seq_len(step), sched.window_blocks(step))


def ref_answers(step, scheduled=hr.SCHEDULED, extension=hr.EXTENSION):
    return tuple(f(step, scheduled, extension) for f in (hr.lr_mult, hr.momentum, hr.mtp_weights, hr.prefix_weight,
                                                         hr.batch_tokens, hr.max_seq_len, hr.window_blocks))


ANSWER_NAMES = ("lr", "momentum", "mtp", "prefix", "batch", "max_seq_len", "windows")


def assert_same(got, want, step):
    for name, a, b in zip(ANSWER_NAMES, got, want):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12), (step, name, a, b)


def test_head_every_step_matches_head():
    cfg = tg.parse_args(["--preset=head"])
    sched = tg.Schedule(cfg)
    assert sched.total == hr.total_steps() == 1285 and cfg.window_block == hr.BLOCK_TOKENS
    for step in range(sched.total):
        assert_same(answers(sched, step), ref_answers(step), step)
    assert sched.untie_step == hr.untie_step()
    assert sched.final_window_blocks() == hr.final_window_blocks()


@pytest.mark.parametrize("steps, extension", [(1, 0), (2, 3), (4, 0), (100, 7), (151, 10), (1000, 15)])
def test_head_rules_at_other_lengths(steps, extension):
    """HEAD's rounding of stage boundaries, cooldown start and split step at schedule lengths whose
    thirds and 40% points fall between steps."""
    sched = tg.Schedule(tg.parse_args(["--preset=head", f"--num_steps={steps}", f"--extension_steps={extension}"]))
    assert sched.total == hr.total_steps(steps, extension)
    for step in range(sched.total):
        assert_same(answers(sched, step), ref_answers(step, steps, extension), step)
    assert sched.untie_step == hr.untie_step(steps, extension)
    assert sched.final_window_blocks() == hr.final_window_blocks(steps, extension)


def test_head_landmarks():
    """Rows written out by hand from HEAD's stage list, so a shared misreading would still show."""
    sched = tg.Schedule(tg.parse_args(["--preset=head"]))
    assert sched.stage_starts() == [0, 423, 847, 1270]  # round(1270 / 3) = 423, round(2540 / 3) = 847
    assert [sched.max_seq_len(s) for s in (0, 422, 423, 1284)] == [896, 896, 2048, 2048]
    assert [sched.batch_tokens(s) for s in (422, 423, 847, 1284)] == [131072, 262144, 393216, 393216]
    assert [sched.window_blocks(s) for s in (0, 423, 847, 1270)] == [(3, 1), (7, 3), (11, 5), (13, 6)]
    assert sched.untie_step == 848  # 847 is odd: Adam steps there, tied, and 848's forward is untied
    # the cooldown starts at int(0.4 * 1270) = 508 and reaches 0.15 at 1270, from the stage's peak
    assert sched.lr_mult(507) == sched.lr_mult(508) == 1.52
    assert sched.lr_mult(509) == pytest.approx(1.52 * (1 - 1 / 762) + 0.15 / 762)
    assert sched.lr_mult(847) == pytest.approx(1.73 * (1 - 339 / 762) + 0.15 * 339 / 762)
    assert all(sched.lr_mult(s) == 0.15 for s in range(1270, 1285))
    assert sched.mtp_weights(422) == pytest.approx((1.0, 0.5, 0.25 / 423))
    assert sched.mtp_weights(846) == pytest.approx((1.0, 0.5 / 424)) and sched.mtp_weights(847) == (1.0,)
    assert sched.prefix_weight(422) == sched.prefix_weight(423) == 0.25
    assert sched.prefix_weight(846) == pytest.approx(0.25 / 424) and sched.prefix_weight(847) == 0.0
    assert sched.momentum(1284) == pytest.approx(0.85 + 0.1 / 50)
    assert sched.windows(sched.final_window_blocks()) == (2560, 768)
    assert sched.changes == [423, 847, 1270] and not any(sched.scalars_frozen(s) for s in range(sched.total))


def test_head_describe():
    cfg = tg.parse_args(["--preset=head"])
    lines = tg.Schedule(cfg).describe()
    assert [line.split(":")[0] for line in lines[:-1]] == ["steps 0-422", "steps 423-846", "steps 847-1269",
                                                          "steps 1270-1284"]
    assert "batch 131072 tokens, max_seq_len 896, windows 384/128, lr x1.000->x1.000, momentum 0.850, " \
           "mtp [1.000, 0.500, 0.250], prefix 0.250->0.250" in lines[0]
    assert "max_seq_len 2048, windows 896/384, lr x1.520->x0.912" in lines[1] and "prefix 0.250->0.001" in lines[1]
    assert "windows 1408/640" in lines[2] and "mtp [1.000], prefix 0.000->0.000" in lines[2]
    assert "windows 1664/768, lr x0.150->x0.150" in lines[3]
    assert lines[-1] == ("untie embedding: step 848; scalars paused at steps [423, 847, 1270] for 0; "
                         "final validation windows 2560/768")


@pytest.mark.parametrize("preset", ["speedrun", "cpu"])
def test_record_presets_keep_one_seq_len_and_no_prefix_loss(preset):
    cfg = tg.parse_args([f"--preset={preset}"])
    sched = tg.Schedule(cfg)
    assert {sched.max_seq_len(s) for s in range(sched.total)} == {cfg.max_seq_len}
    assert {sched.prefix_weight(s) for s in range(sched.total)} == {0.0}
    assert "prefix" not in " ".join(sched.describe())


def test_cpu_lr_follows_the_record_formula():
    """#53's get_lr at the cpu preset's length, where 45% of 150 steps falls between steps (67.5):
    thresholds on x = step / num_steps, not a whole-step cooldown start."""
    cfg = tg.parse_args(["--preset=cpu"])
    sched = tg.Schedule(cfg)
    for step in range(sched.total):
        x = step / 150
        peak = (1.0, 1.52, 1.73)[min(2, int(3 * x))]
        w = (1 - x) / 0.55
        want = peak * w + 0.1 * (1 - w) if x >= 0.45 else peak
        assert sched.lr_mult(step) == pytest.approx(want, rel=1e-12), step


class SeqLenSpy:
    """Stands in for both loaders; records the max_seq_len each training batch is asked for."""

    available = 10**12
    asked = []

    def __init__(self, *args):
        self.gen = torch.Generator().manual_seed(0)

    def next_batch(self, tokens, max_seq_len):
        SeqLenSpy.asked.append(max_seq_len)
        buf = torch.randint(0, 256, (tokens + 1,), generator=self.gen)
        return buf[:-1], buf[1:], None


def test_trainer_takes_each_steps_max_seq_len(monkeypatch):
    """first_seq_len reaches the loader in the first third only (6 steps: thirds start at 0, 2, 4),
    and the throughput count caps its windows at it."""
    monkeypatch.setattr(tg, "TrainLoader", SeqLenSpy)
    monkeypatch.setattr(tg, "ValLoader", SeqLenSpy)
    monkeypatch.setattr(SeqLenSpy, "asked", [])
    cfg = tg.parse_args(["--preset=cpu", "--compile=false", "--vocab_size=256", "--n_layer=2", "--d_model=64",
                         "--n_head=2", "--head_dim=32", "--mlp_hidden=128", "--long_window_layers=1", "--value_embeds=0",
                         "--skip_from=0", "--skip_to=1", "--backout_layer=0", "--window_block=32",
                         "--long_windows=1,2,2", "--extension_window=2", "--final_window=2", "--batch_tokens=64,64,64",
                         "--num_steps=6", "--max_seq_len=64", "--first_seq_len=16",
                         f"--train_files={ROOT}/data/sample/sample_train_*.bin",
                         f"--val_files={ROOT}/data/sample/sample_val_*.bin"])
    backend = tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    trainer = tg.Trainer(cfg, backend, None)
    for step in range(6):
        trainer.train_step(step)
    assert SeqLenSpy.asked == [16, 16, 64, 64, 64, 64]
    # 2 layers, one long (window 32) and one short (16) at the first stage: capped at 16 keys each
    assert tg.attention_flops(cfg, (32, 16), 16) == 12 * 2 * 32 * (16 + 16)
