"""Config: typed overrides, presets, --baseline, and clear errors for bad flags and batch splits."""
import re
from dataclasses import fields
from types import SimpleNamespace

import pytest

import train_gpt as tg


def defaults():
    return {f.name: f.default for f in fields(tg.Config)}


def test_defaults_are_the_speedrun_record():
    cfg = tg.parse_args([])
    assert cfg.preset == "speedrun"
    # SPEC section 3 numbers, written out here rather than read from the code
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim, cfg.mlp_hidden) == (11, 768, 6, 128, 3072)
    assert cfg.num_steps == 1880 and cfg.extension_steps == 40
    assert cfg.batch_tokens == (131072, 262144, 393216)
    assert cfg.adam_betas == (0.65, 0.95) and cfg.muon_lr == 0.023 and cfg.muon_wd == 1.2
    # record #53: 262,144 validation tokens per rank and slice, smear gate lr x0.01, 40 paused steps
    assert cfg.val_batch_tokens // cfg.accum_world_size == 262144 and cfg.val_tokens == 10485760
    assert cfg.smear_gate_lr_mul == 0.01 and cfg.scalar_freeze_steps == 40 and cfg.attn_lambdas


def test_typed_overrides():
    cfg = tg.parse_args(["--n_layer=3", "--muon_lr=0.5", "--smear=false", "--batch_tokens=(64,128,256)",
                         "--long_windows=1,2", "--adam_betas=0.8,0.9", "--log_dir=/tmp/x", "--yarn=ON"])
    assert cfg.n_layer == 3 and type(cfg.n_layer) is int
    assert cfg.muon_lr == 0.5 and type(cfg.muon_lr) is float
    assert cfg.smear is False and cfg.yarn is True
    assert cfg.batch_tokens == (64, 128, 256) and all(type(v) is int for v in cfg.batch_tokens)
    assert cfg.long_windows == (1, 2)
    assert cfg.adam_betas == (0.8, 0.9) and all(type(v) is float for v in cfg.adam_betas)
    assert cfg.log_dir == "/tmp/x"
    # dashes are accepted for underscores; integers may be written as 1e3
    cfg = tg.parse_args(["--val-every=1e3", "--muon=0"])
    assert cfg.val_every == 1000 and type(cfg.val_every) is int and cfg.muon is False
    # bool spellings
    for text, want in [("1", True), ("0", False), ("true", True), ("False", False), ("yes", True), ("no", False),
                       ("on", True), ("off", False)]:
        assert tg.parse_args([f"--compile={text}"]).compile is want


def test_cpu_preset():
    cfg = tg.parse_args(["--preset=cpu"])
    assert cfg.preset == "cpu"
    for name, value in tg.PRESETS["cpu"].items():
        assert getattr(cfg, name) == value, name
    # a field the preset does not touch keeps the Config default
    assert cfg.muon_lr == defaults()["muon_lr"]
    assert cfg.device == "cpu" and cfg.compile is False and cfg.train_files.startswith("data/sample/")
    # overrides win over the preset, whatever their position on the command line
    assert tg.parse_args(["--n_layer=2", "--preset=cpu"]).n_layer == 2
    assert tg.parse_args(["--preset=cpu", "--n_layer=2"]).n_layer == 2


def test_baseline_turns_every_technique_off():
    cfg = tg.parse_args(["--baseline"])
    for name, value in tg.BASELINE.items():
        assert getattr(cfg, name) == value, name
    # the ones SPEC lists, spelled out independently of the BASELINE dict
    assert cfg.muon is False and cfg.value_embeds == 0 and cfg.smear is False and cfg.x0_mixing is False
    assert cfg.skip_from < 0 and cfg.backout_layer < 0 and cfg.attn_gate is False and cfg.key_offset is False
    assert cfg.yarn is False and cfg.softcap == 0 and cfg.untie_frac >= 1 and cfg.mtp is False
    assert cfg.batch_schedule is False and cfg.window_schedule is False
    # and differs from the default on each of them
    d = defaults()
    assert all(d[name] != value for name, value in tg.BASELINE.items())
    # baseline combines with a preset; fields outside BASELINE keep the preset's values
    cfg = tg.parse_args(["--preset=cpu", "--baseline"])
    assert cfg.n_layer == tg.PRESETS["cpu"]["n_layer"] and cfg.muon is False and cfg.smear is False


def test_explicit_override_beats_baseline():
    cfg = tg.parse_args(["--baseline", "--smear=true", "--value_embeds=2"])
    assert cfg.smear is True and cfg.value_embeds == 2
    assert cfg.muon is False  # the rest stays off
    # also when the override comes first
    cfg = tg.parse_args(["--muon=true", "--baseline"])
    assert cfg.muon is True and cfg.x0_mixing is False


def exit_message(argv):
    with pytest.raises(SystemExit) as e:
        tg.parse_args(argv)
    return str(e.value.code)


def test_unknown_flag_suggests():
    msg = exit_message(["--n_layers=3"])
    assert "--n_layers" in msg and "did you mean --n_layer?" in msg
    msg = exit_message(["--baselin"])
    assert "did you mean --baseline?" in msg
    msg = exit_message(["--zzzzqqqq=1"])
    assert "unknown flag --zzzzqqqq" in msg and "did you mean" not in msg


@pytest.mark.parametrize("arg, flag", [
    ("--n_layer=abc", "--n_layer"),
    ("--n_layer=2.5", "--n_layer"),
    ("--muon=maybe", "--muon"),
    ("--muon_lr=fast", "--muon_lr"),
    ("--batch_tokens=1,x,3", "--batch_tokens"),
])
def test_bad_values_name_the_flag(arg, flag):
    msg = exit_message([arg])
    assert msg.startswith("error:") and flag in msg
    assert arg.split("=", 1)[1] in msg  # the offending text is shown


def test_other_argument_errors():
    assert "--preset=gpu" in exit_message(["--preset=gpu"]) and "speedrun" in exit_message(["--preset=gpu"])
    assert "needs a value" in exit_message(["--n_layer"])
    assert "unexpected argument" in exit_message(["n_layer=3"])


def check(cfg, world):
    tg.Trainer.check_batches(SimpleNamespace(cfg=cfg, backend=SimpleNamespace(world_size=world)))


def test_batch_split_checks():
    cfg = tg.parse_args([])  # speedrun: accum_world_size 8
    for world in (1, 2, 4, 8):
        check(cfg, world)
    with pytest.raises(SystemExit) as e:
        check(cfg, 3)
    msg = str(e.value.code)
    assert "world size 3" in msg and "accum_world_size=8" in msg
    # a preset whose batch does not divide over accum_world_size
    cfg = tg.parse_args(["--preset=cpu", "--accum_world_size=3"])
    with pytest.raises(SystemExit) as e:
        check(cfg, 1)
    msg = str(e.value.code)
    assert "accum_world_size=3" in msg and "does not split" in msg
    assert re.search(r"batch of (2048|4096|8192) tokens", msg)
    # the validation batch is checked too
    cfg = tg.parse_args(["--preset=cpu", "--accum_world_size=2", "--val_batch_tokens=8193"])
    with pytest.raises(SystemExit) as e:
        check(cfg, 2)
    assert "8193" in str(e.value.code)
