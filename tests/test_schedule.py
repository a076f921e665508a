"""The speedrun preset's schedule, step by step for all 1920 steps, against the record's formulas.

The record computes its per-step quantities in get_lr, get_ws, get_bs, get_muon_momentum, its MTP
weight list, Yarn.apply and the transition counter of step_optimizers; record_ref.py transcribes
them in the record's own terms (thresholds on x = step / 1880, batch sizes as 8 ranks x 2048 x k).
"""
import math

import pytest
from record_ref import (SCHEDULED, TOTAL, WS_FINAL, WS_VALIDATE, record_bs, record_lr, record_momentum,
                        record_mtp, record_transitions, record_ws)

import train_gpt as tg

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
