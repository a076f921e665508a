"""Config: typed overrides, presets, --baseline, --all_off, and clear errors for bad flags (the batch split over
ranks: tests/test_distributed.py)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from dataclasses import fields

import pytest

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    cfg = tg.parse_args(["--n_layer=12", "--muon_lr=0.5", "--smear=false", "--batch_tokens=(64,128,256)",
                         "--long_windows=1,2,2", "--adam_betas=0.8,0.9", "--log_dir=/tmp/x", "--yarn=ON"])
    assert cfg.n_layer == 12 and type(cfg.n_layer) is int
    assert cfg.muon_lr == 0.5 and type(cfg.muon_lr) is float
    assert cfg.smear is False and cfg.yarn is True
    assert cfg.batch_tokens == (64, 128, 256) and all(type(v) is int for v in cfg.batch_tokens)
    assert cfg.long_windows == (1, 2, 2)
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
    assert tg.parse_args(["--n_layer=8", "--preset=cpu"]).n_layer == 8
    assert tg.parse_args(["--preset=cpu", "--n_layer=8"]).n_layer == 8


def test_all_off_turns_every_technique_off():
    cfg = tg.parse_args(["--all_off"])
    for name, value in tg.ALL_OFF.items():
        assert getattr(cfg, name) == value, name
    # the ones SPEC lists, spelled out independently of the ALL_OFF dict
    assert cfg.muon is False and cfg.value_embeds == 0 and cfg.smear is False and cfg.x0_mixing is False
    assert cfg.skip_from < 0 and cfg.backout_layer < 0 and cfg.attn_gate is False and cfg.key_offset is False
    assert cfg.yarn is False and cfg.softcap == 0 and cfg.untie_frac >= 1 and cfg.mtp is False
    assert cfg.batch_schedule is False and cfg.window_schedule is False
    # and differs from the default on each of them
    d = defaults()
    assert all(d[name] != value for name, value in tg.ALL_OFF.items())
    # all_off combines with a preset; fields outside ALL_OFF keep the preset's values
    cfg = tg.parse_args(["--preset=cpu", "--all_off"])
    assert cfg.n_layer == tg.PRESETS["cpu"]["n_layer"] and cfg.muon is False and cfg.smear is False


def test_baseline_is_gpt2_over_every_technique_off():
    """--baseline: what --all_off turns off stays off (the fused Triton loss aside), plus GPT-2's pieces,
    spelled out here: rows of 1024, learned positions, LayerNorm with biases, GELU, no embedding or QK
    norm, GPT-2's init, AdamW (6e-4, 0.9, 0.95, decay 0.1, eps 1e-8) on llm.c's cosine schedule."""
    cfg = tg.parse_args(["--baseline"])
    assert all(getattr(cfg, name) == value for name, value in tg.ALL_OFF.items() if name != "triton")
    assert cfg.triton is True
    assert (cfg.context, cfg.position_embedding, cfg.norm, cfg.bias, cfg.mlp_activation) == (1024, True, "layernorm", True, "gelu")
    assert (cfg.embed_norm, cfg.qk_norm, cfg.init, cfg.attn_scale) == (False, False, "gpt2", 0.125)
    assert (cfg.adamw_lr, cfg.adamw_betas, cfg.adamw_wd, cfg.adam_eps) == (6e-4, (0.9, 0.95), 0.1, 1e-8)
    assert (cfg.lr_schedule, cfg.lr_floor, cfg.extension_steps, cfg.bf16_tables) == ("cosine", 0.0, 0, False)
    # over the cpu preset: its width and depth, heads of 64
    cfg = tg.parse_args(["--preset=cpu", "--baseline"])
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim, cfg.mlp_hidden) == (6, 256, 4, 64, 1024)


def test_explicit_override_beats_a_rung():
    cfg = tg.parse_args(["--all_off", "--smear=true", "--value_embeds=2"])
    assert cfg.smear is True and cfg.value_embeds == 2
    assert cfg.muon is False  # the rest stays off
    # also when the override comes first
    cfg = tg.parse_args(["--muon=true", "--all_off"])
    assert cfg.muon is True and cfg.x0_mixing is False
    cfg = tg.parse_args(["--norm=rmsnorm", "--baseline"])
    assert cfg.norm == "rmsnorm" and cfg.mlp_activation == "gelu"


def error_message(argv):
    with pytest.raises(tg.ConfigError) as e:
        tg.parse_args(argv)
    return str(e.value)


def test_unknown_flag_suggests():
    msg = error_message(["--n_layers=3"])
    assert "--n_layers" in msg and "did you mean --n_layer?" in msg
    msg = error_message(["--baselin"])
    assert "did you mean --baseline?" in msg
    msg = error_message(["--zzzzqqqq=1"])
    assert "unknown flag --zzzzqqqq" in msg and "did you mean" not in msg


@pytest.mark.parametrize("arg, flag", [
    ("--n_layer=abc", "--n_layer"),
    ("--n_layer=2.5", "--n_layer"),
    ("--muon=maybe", "--muon"),
    ("--muon_lr=fast", "--muon_lr"),
    ("--batch_tokens=1,x,3", "--batch_tokens"),
])
def test_bad_values_name_the_flag(arg, flag):
    msg = error_message([arg])
    assert msg.startswith(flag) and arg.split("=", 1)[1] in msg  # the offending text is shown


def test_other_argument_errors():
    assert "--preset=gpu" in error_message(["--preset=gpu"]) and "speedrun" in error_message(["--preset=gpu"])
    assert "needs a value" in error_message(["--n_layer"])
    assert "unexpected argument" in error_message(["n_layer=3"])


def test_baseline_takes_an_optional_bool():
    assert tg.parse_args(["--baseline=true"]).muon is False
    assert tg.parse_args(["--baseline=false"]).muon is True
    assert tg.parse_args(["--all_off=true"]).muon is False and tg.parse_args(["--all_off=false"]).muon is True
    assert "--baseline=maybe" in error_message(["--baseline=maybe"])


@pytest.mark.parametrize("arg, expected", [
    ("--num_steps=0", "--num_steps=0: expected at least 1"),
    ("--num_steps=-5", "--num_steps=-5: expected at least 1"),
    ("--num_steps=inf", "--num_steps=inf: cannot read as int (expected a finite number)"),
    ("--muon_lr=nan", "--muon_lr=nan: cannot read as float (expected a finite number)"),
    ("--warmup_steps=-1", "--warmup_steps=-1: expected 0 or more"),
    ("--adam_eps=0", "--adam_eps=0: expected above 0"),
    ("--batch_tokens=1024,2048", "--batch_tokens=1024,2048: cannot read as comma-separated ints (expected 3 values, got 2)"),
    ("--batch_tokens=8,8,8,8", "expected 3 values, got 4"),
    ("--adam_betas=0.9", "expected 2 values, got 1"),
    ("--batch_tokens=2048.9,4096,6144", "--batch_tokens=2048.9,4096,6144: cannot read as comma-separated ints (expected an integer)"),
    ("--batch_tokens=0,0,0", "--batch_tokens=0,0,0: expected each value at least 1"),
    ("--val_batch_tokens=0", "--val_batch_tokens=0: expected at least 1"),
    ("--adam_betas=0.9,1.5", "--adam_betas=0.9,1.5: expected each value between 0 and 1"),
    ("--cooldown_frac=2", "--cooldown_frac=2: expected between 0 and 1"),
    ("--batch_tokens=(0,8,8)", "--batch_tokens=(0,8,8): expected each value at least 1"),
    ("--run_id=a/b", "--run_id=a/b: expected a plain file name"),
    ("--run_id=..", "--run_id=..: expected a plain file name"),
    ("--device=gpu", "--device=gpu: expected one of auto, cuda, cpu"),
    ("--resume=auto", "--resume=auto: expected --run_id (or --checkpoint_dir) too"),
    ("--keep_checkpoints=-1", "--keep_checkpoints=-1: expected 0 or more"),
    ("--bigram_vocab=-3", "--bigram_vocab=-3: expected 0 or more"),
    ("--bigram_betas=0.9", "--bigram_betas=0.9: cannot read as comma-separated floats (expected 2 values, got 1)"),
    ("--lambda_betas=0.9,1.2", "--lambda_betas=0.9,1.2: expected each value between 0 and 1"),
    ("--resid_lambda_lr_mul=-1", "--resid_lambda_lr_mul=-1: expected 0 or more"),
])
def test_values_are_checked_at_start(arg, expected):
    assert expected in error_message([arg])


# layers and widths the model cannot be built with, or would silently ignore (the cpu preset: 6 layers)
@pytest.mark.parametrize("args, expected", [
    (["--no_attn_layers=6"], "--no_attn_layers=6: expected each value a layer index from 0 to 5 (--n_layer=6), each once"),
    (["--long_window_layers=2,2"], "--long_window_layers=2,2: expected each value a layer index from 0 to 5"),
    (["--n_layer=4"], "--long_window_layers=2,5: expected each value a layer index from 0 to 3 (--n_layer=4)"),
    (["--backout_layer=6"], "--backout_layer=6: expected a layer index from 0 to 5 (--n_layer=6), or -1 for off"),
    (["--skip_from=4", "--skip_to=2"], "--skip_to=2: expected a layer after --skip_from=4 and at most 5 (--n_layer=6)"),
    (["--skip_to=6"], "--skip_to=6: expected a layer after --skip_from=1 and at most 5"),
    (["--head_dim=30"], "--head_dim=30: expected a multiple of 4"),
    (["--gate_dims=300"], "--gate_dims=300: expected at most --d_model=256"),
    (["--value_embeds=7"], "--value_embeds=7: expected at most --n_layer=6"),
    (["--xsa_layers=6"], "--xsa_layers=6: expected each value a layer index from 0 to 5 (--n_layer=6), each once"),
    (["--no_attn_layers=2", "--xsa_layers=1,2"], "--xsa_layers=1,2: expected layers with attention (not --no_attn_layers=2)"),
    (["--xsa_layers=1.5"], "--xsa_layers=1.5: cannot read as comma-separated ints (expected an integer)"),
    (["--ve_layout=.0.1"], "--ve_layout=.0.1: expected 6 characters (--n_layer), each '.' or a table 0 to 2 (--value_embeds=3), every table used"),
    (["--ve_layout=.0.13."], "--ve_layout=.0.13.: expected 6 characters"),
    (["--ve_layout=.0.11."], "--ve_layout=.0.11.: expected 6 characters"),
    (["--ve_gate=x_ve", "--gate_dims=11"], "--gate_dims=11: expected an even number for --ve_gate=x_ve"),
    (["--ve_gate=x", "--attn_gate=false", "--gate_dims=300"], "--gate_dims=300: expected at most the width of x and of a value embedding for --ve_gate=x"),
    (["--qk_head_pairs=true", "--n_head=3"], "--n_head=3: expected an even number for --qk_head_pairs=true"),
    (["--bigram_vocab=1"], "--bigram_vocab=1: expected 0 (off) or at least 2"),
    (["--lane_layer=6"], "--lane_layer=6: expected a layer index from 0 to 5 (--n_layer=6), or -1 for off"),
    (["--lane_layer=-2"], "--lane_layer=-2: expected a layer index from 0 to 5 (--n_layer=6), or -1 for off"),
    (["--paired_head_layers=0,6"], "--paired_head_layers=0,6: expected each value a layer index from 0 to 5 (--n_layer=6), each once"),
    (["--paired_head_layers=1,1"], "--paired_head_layers=1,1: expected each value a layer index from 0 to 5"),
    (["--paired_head_layers=x"], "--paired_head_layers=x: cannot read as comma-separated ints"),
    (["--no_attn_layers=3", "--paired_head_layers=0,3"],
     "--paired_head_layers=0,3: expected layers with attention (not in --no_attn_layers=3)"),
    (["--paired_head_layers=0", "--n_head=3"], "--n_head=3: expected an even number for --paired_head_layers=0"),
    (["--paired_head_layers=0", "--sink_metric=true"], "--sink_metric=true: expected --paired_head_layers empty"),
])
def test_the_model_shape_is_checked_at_start(args, expected):
    assert expected in error_message(["--preset=cpu", *args])
    # what stays allowed: a switched-off skip ignores skip_to, the per-head gate reads all channels
    tg.parse_args(["--preset=cpu", "--skip_from=-1", "--skip_to=-7", "--head_gate=true", "--gate_dims=300"])
    # a layout is ignored while the value embeddings are off (--baseline turns them off)
    tg.parse_args(["--preset=cpu", "--value_embeds=0", "--ve_layout=.0"])
    # paired heads on a long-window layer (which then shifts no keys, as HEAD), and none at all
    assert tg.parse_args(["--preset=cpu", "--paired_head_layers=0,2"]).paired_head_layers == (0, 2)
    assert tg.parse_args(["--preset=head", "--paired_head_layers="]).paired_head_layers == ()


def test_main_prints_one_error_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        tg.main(["--num_steps=0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --num_steps=0: expected at least 1\n"


def help_lines(argv, capsys):
    with pytest.raises(SystemExit) as e:
        tg.parse_args(argv + ["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_help_lists_every_flag_in_config_order_with_value_and_description(capsys):
    lines = help_lines([], capsys)
    flags_at = lines.index("flags, with their values under --preset=speedrun:")
    presets, body = lines[:flags_at], lines[flags_at + 1:]
    assert "presets:" in presets and "  --preset=cpu" in presets
    assert any(line.startswith("  --baseline: the llm.c / nanoGPT GPT-2 recipe") for line in presets)
    assert any(line.startswith("  --all_off: every technique off") for line in presets)
    assert [re.match(r"  --(\w+)=", line)[1] for line in body if line.startswith("  --")] == [f.name for f in fields(tg.Config)]
    groups = [line for line in body if line and not line.startswith(" ")]
    assert groups[:3] == ["run:", "model shape:", "attention windows, in blocks of `window_block` tokens, by thirds of training:"]
    assert len(groups) == 7
    # each flag: its value, then a description on the same line (or on the next one after a long value)
    for i, line in enumerate(body):
        if line.startswith("  --"):
            parts = line.split(maxsplit=1)
            assert (parts[1] if len(parts) == 2 else body[i + 1].strip()), f"{line}: no description"
    assert any(re.fullmatch(r"  --num_steps=1880 +scheduled steps.*", line) for line in body)
    assert any(re.fullmatch(r"  --adam_betas=0.65,0.95 +Adam \(beta1, beta2\) of the head, embedding and x0 lambdas", line) for line in body)
    at = body.index("  --train_files=data/fineweb10B/fineweb_train_*.bin")
    assert body[at + 1] == " " * tg.HELP_WIDTH + "glob of the training shards"


def test_help_into_a_closed_pipe_is_quiet():
    """`--help | head -1`: the reader may leave before the help is written; no traceback then."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_gpt.py"), "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child writes: its write meets a closed pipe
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_help_shows_the_values_of_the_chosen_preset(capsys):
    lines = help_lines(["--preset=cpu", "--baseline", "--n_layer=3"], capsys)
    assert "flags, with their values under --preset=cpu --baseline:" in lines
    assert any(re.fullmatch(r"  --num_steps=150 +scheduled steps.*", line) for line in lines)
    assert any(re.fullmatch(r"  --n_layer=3 +transformer blocks", line) for line in lines)
    assert any(re.fullmatch(r"  --muon=false +.*", line) for line in lines)


def readme_head_table():
    """The rows of the README's HEAD table: (switch name, speedrun cell, head cell)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## The HEAD recipe")[1].split("\n## ")[0]
    rows = re.findall(r"^\| [^|]+ \| [^|]+ \| `--(\w+)` \| ([^|]+) \| ([^|]+) \|$", section, re.M)
    return [(name, speedrun.strip(), head.strip()) for name, speedrun, head in rows]


def test_the_readmes_head_table_is_the_presets():
    """Every row's values are the presets' (an empty string is shown as #53's, no layers as none), and every value
    `head` sets apart from `speedrun` has its row (rows of switches HEAD replaced stay off in both),
    so the table can neither drift nor miss a switch."""
    speedrun, head = tg.parse_args([]), tg.parse_args(["--preset=head"])
    shown = lambda value: {"": "(#53's)", (): "(none)"}.get(value, tg.show_value(value))  # noqa: E731
    rows = readme_head_table()
    assert len(rows) > 20
    for name, speedrun_cell, head_cell in rows:
        assert (speedrun_cell, head_cell) == (shown(getattr(speedrun, name)), shown(getattr(head, name))), name
    differ = {f.name for f in fields(tg.Config) if getattr(speedrun, f.name) != getattr(head, f.name)} - {"preset"}
    assert differ <= {name for name, _, _ in rows}, differ - {name for name, _, _ in rows}


def test_head_dry_run_lists_the_paired_layers_and_no_parameter_for_them(capsys):
    """#58 pairs heads without a parameter of its own: `--preset=head --dry_run=true` shows HEAD's
    paired layers in its config, and its parameter table is the one without them, row for row."""
    def dry(*flags):
        tg.main(["--preset=head", "--dry_run=true", *flags])
        return capsys.readouterr().out.splitlines()

    paired, plain = dry(), dry("--paired_head_layers=")
    assert json.loads(paired[1].removeprefix("config: "))["paired_head_layers"] == [0, 2, 5, 9]
    assert paired[0] == "config: --preset=head --dry_run=true" and "--paired_head_layers= " in plain[0] + " "
    table = lambda lines: lines[next(i for i, line in enumerate(lines) if line.startswith("parameter ")):]  # noqa: E731
    assert table(paired) == table(plain) and re.fullmatch(r"parameters: \d+", paired[-1])


def test_cpu_head_is_heads_techniques_at_the_cpu_presets_shape(capsys):
    """--preset=cpu_head: the cpu preset's shape, data and length with every switch of the head preset,
    those that name HEAD's layers or lengths mapped to 6 layers and 512 tokens (as listed here)."""
    cpu, head, both = (dataclasses.asdict(tg.parse_args([f"--preset={p}"])) for p in ("cpu", "head", "cpu_head"))
    mapped = {"ve_layout": ".01234", "lane_layer": 3, "first_seq_len": 224, "fp8_mlp": False, "paired_head_layers": (0, 3),
              "xsa_layers": (1, 2, 4), "dc_layers": (5,), "mudd_gate_layer": 2, "mudd_gate_attn": (2, 5)}
    assert {k: both[k] for k in mapped} == mapped
    switches = set(tg.PRESETS["head"]) - set(mapped) - {"num_steps", "extension_steps"}
    assert {k: both[k] for k in switches} == {k: head[k] for k in switches}
    rest = set(cpu) - switches - set(mapped) - {"preset"}
    assert {k: both[k] for k in rest} == {k: cpu[k] for k in rest}  # shape, batches, length, data: the cpu preset's
    assert tg.main(["--preset=cpu_head", "--dry_run=true"]) in (None, 0)
    assert capsys.readouterr().out.splitlines()[-1].startswith("parameters: ")
