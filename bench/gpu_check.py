"""One-command GPU check: the fused kernels against their torch twins, then, for each preset (the
speedrun preset, record #53, and the head preset, the public HEAD), a few steps of every schedule stage
on the GPUs present and the final validation, beside that preset's record. Each row is printed and
written as soon as it is measured, to a JSON file and, line by line, to a text file beside it (a run
cut short keeps what it measured).

    python bench/gpu_check.py --quick                  # one GPU in a short lease: fits --budget (300 s)
    python bench/gpu_check.py                          # one GPU: each step accumulates 8 micro-batches
    torchrun --nproc_per_node=8 bench/gpu_check.py     # the record's 8 GPUs

--quick: the kernels, then per preset only the first stage and the untie's (the largest batch,
untied; the last stage without an untie), 3 timed steps each, then the final validation; it says
what it skips, and skips any later part it expects to end past the budget (estimated from the parts
measured so far). Compilation is reported apart from step time: a step that compiled a graph is not
timed.

Options: --quick, --presets=A,B (default speedrun,head; in that order), --steps=N (timed steps per
stage, default 6, 4 with --quick), --budget=S (seconds from the start; default none, 300 with
--quick), --out=PATH (JSON, default logs/gpu_check.json; the text goes to PATH with .txt), --smoke
(tiny shapes and model: checks this script itself on a CPU, with TRITON_INTERPRET=1 for the kernels),
-h/--help. Any other --name=value is a train_gpt flag for the model runs. Without FineWeb shards in
data/fineweb10B the models run on random tokens (timing and memory are the same; the losses then
only show that training runs).
"""
import glob
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402



def record(name, train_time_s, steps, peak_allocated_gib):
    """A preset's record on 8 H100s, to print beside what this check measures (peak None: not published)."""
    return dict(name=name, train_time_s=train_time_s, steps=steps, ms_per_step_8gpu=round(1000 * train_time_s / steps, 1),
                peak_allocated_gib=peak_allocated_gib)


# the records the presets reproduce: #53's log (1920 steps in 119.7 s, 29.9 GiB allocated); HEAD's time
# is record #89's in the public README's table (1.23 minutes), its 1270 + 15 steps its repo-root code's
RECORDS = dict(speedrun=record("record #53", 119.7, 1920, 29.9), head=record("HEAD (record #89)", 73.8, 1285, None))
KERNEL_SHAPES = dict(tokens=16384, width=768, hidden=3072, vocab=50304, ce_rows=4096, stack=4, repeats=5)
SMOKE_SHAPES = dict(tokens=256, width=64, hidden=256, vocab=1000, ce_rows=64, stack=2, repeats=1)
SMOKE_FLAGS = ["--n_layer=3", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=256", "--no_attn_layers=1",
               "--long_window_layers=2", "--skip_from=0", "--skip_to=2", "--backout_layer=1", "--value_embeds=1",
               "--num_steps=6", "--extension_steps=2", "--batch_tokens=256,384,512", "--accum_world_size=1",
               "--long_windows=1,2,3", "--extension_window=4", "--final_window=5", "--max_seq_len=256",
               "--val_batch_tokens=512", "--compile=false", "--momentum_warmup_steps=2", "--momentum_cooldown_steps=2"]
# the head preset on the smoke shape: its layer-indexed switches on the 3 layers (paired heads on the
# short-window layer 0, XSA and DC on the long-window layer 2, the MUDD gate's second half at layer 1)
# and its tables small
HEAD_SMOKE_FLAGS = ["--ve_layout=0.0", "--bigram_vocab=512", "--bigram_signs=64", "--first_seq_len=128", "--lane_layer=0",
                    "--paired_head_layers=0", "--mudd_gate_layer=1", "--mudd_gate_attn=0,2", "--xsa_layers=2",
                    "--dc_layers=2"]
TOLERANCE = dict(bf16=2e-2, loss=1e-4, fp8_out=0.06, fp8_grad=0.1)  # as in tests/test_kernels.py
SYNTHETIC_SHARD_TOKENS = 2**25  # one random shard, linked as often as the schedule needs
MEAN_DOC_TOKENS = 1000
QUICK_STEPS = 4  # whole Adam periods (adam_every = 2), as the mean of a stage's steps needs
# a device lease gives about 8 minutes of command time: --quick starts no part it expects to end later
QUICK_BUDGET_S = 300


class Report:
    """The check's rows, printed and written as each arrives: to JSON (temporary file + rename) and,
    appended line by line, to a text file of the same name ending .txt."""

    def __init__(self, path, enabled, **sections):
        self.path, self.enabled = path, enabled
        self.text_path = os.path.splitext(path)[0] + ".txt"
        self.data = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=device_name(), torch=torch.__version__, **sections)
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(self.text_path, "w").close()
            self.note(f"{self.data['date']}, {self.data['device']}, torch {self.data['torch']}")

    def note(self, line):
        """Print `line` and append it to the text file, at once."""
        if not self.enabled:
            return
        print(line, flush=True)
        with open(self.text_path, "a") as f:
            f.write(line + "\n")

    def add(self, section, row, line):
        """Append `row` to a list section (kernels, stages, skipped, final, ...) or set a single one; every
        rank keeps the rows, only the one enabled prints and writes them."""
        if isinstance(self.data.get(section), list):
            self.data[section].append(row)
        else:
            self.data[section] = row
        if not self.enabled:
            return
        self.note(line)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def device_name():
    """The GPU's name and compute capability, or the CPU's model, cores and torch threads."""
    if not torch.cuda.is_available():
        return T.versions_and_hardware().splitlines()[-1]
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=5):
    """Median milliseconds of fn() after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def max_error(actual, expected):
    """max |error| / max |reference|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def frobenius_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def with_grads(fn, inputs, grad, dtype=None):
    """fn's output and its inputs' gradients; the inputs are first cast to `dtype` (fp32 for references)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad if dtype is None else grad.to(dtype))
    return [out] + [t.grad for t in leaves]


def kernel_cases(device, s):
    """name -> (kernel fn, reference fn on fp32 inputs, inputs, output grad or None, tolerances per output)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, device=device)).to(torch.bfloat16)

    wide = randn(s["stack"], s["width"], s["hidden"], scale=s["hidden"] ** -0.5)
    sym = randn(s["stack"], s["width"], s["width"], scale=s["width"] ** -0.5)
    sym = (sym + sym.mT) / 2
    x, w = randn(s["tokens"], s["width"]), randn(s["hidden"], s["width"], scale=s["width"] ** -0.5)
    logits = randn(s["ce_rows"], s["vocab"], scale=4.0)
    targets = torch.randint(0, s["vocab"], (s["ce_rows"],), generator=gen, device=device)
    mtp = torch.tensor([1.0, 0.5, 0.25], device=device)
    # #88's prefix targets (a quarter of the rows without one) at HEAD's softcap, offset and weight
    prefix = torch.randint(0, s["vocab"], (s["ce_rows"],), generator=gen, device=device)
    prefix[torch.rand(s["ce_rows"], generator=gen, device=device) < 0.25] = T.NO_PREFIX
    prefix_weight = torch.tensor([0.25], device=device)
    head_x = T.norm(randn(s["tokens"], s["width"]).float()).to(torch.bfloat16)
    head_w = randn(s["vocab"], s["width"], scale=0.005)
    bc = T.POLAR_EXPRESS_COEFFS[0][1:]
    tol = TOLERANCE["bf16"]
    return {
        "sym_mm": (T.TritonOps.sym_mm, T.TorchOps.sym_mm, [wide], None, [tol]),
        "sym_axpby": (lambda a: T.TritonOps.sym_axpby(a, *bc), lambda a: T.TorchOps.sym_axpby(a, *bc), [sym], None, [tol]),
        "linear_relu2": (T.TritonOps.linear_relu2, T.TorchOps.linear_relu2, [x, w],
                         randn(s["tokens"], s["hidden"]), [tol, 2 * tol, 2 * tol]),
        "softcap_mtp_ce": (lambda z: T.TritonOps.softcap_mtp_ce(z, targets, mtp, 30.0, 7.5),
                           lambda z: T.TorchOps.softcap_mtp_ce(z, targets, mtp, 30.0, 7.5), [logits],
                           torch.randn(s["ce_rows"], generator=gen, device=device), [TOLERANCE["loss"], tol]),
        "softcap_mtp_ce_prefix": (lambda z: T.TritonOps.softcap_mtp_ce(z, targets, mtp, 23.0, 7.5, 5.0, prefix, prefix_weight),
                                  lambda z: T.TorchOps.softcap_mtp_ce(z, targets, mtp, 23.0, 7.5, 5.0, prefix, prefix_weight),
                                  [logits], torch.randn(s["ce_rows"], generator=gen, device=device), [TOLERANCE["loss"], tol]),
        "fp8_linear": (T.fp8_linear, lambda a, b: a @ b.T, [head_x, head_w],
                       randn(s["tokens"], s["vocab"], scale=1 / s["vocab"]),  # dloss/dz of the summed loss: ~ 1 / vocab
                       [TOLERANCE["fp8_out"], TOLERANCE["fp8_grad"], TOLERANCE["fp8_grad"]]),
    }


def check_kernels(report, device, shapes):
    """Each fused op (values and gradients) against its fp32 torch twin, and both timed."""
    for name, (kernel, twin, inputs, grad, tolerances) in kernel_cases(device, shapes).items():
        if grad is None:
            got, want = [kernel(*inputs)], [twin(*(t.float() for t in inputs))]
            run_kernel, run_twin = (lambda: kernel(*inputs)), (lambda: twin(*inputs))
        else:
            got, want = with_grads(kernel, inputs, grad), with_grads(twin, inputs, grad, torch.float32)
            run_kernel = lambda: with_grads(kernel, inputs, grad)  # noqa: E731
            run_twin = lambda: with_grads(twin, inputs, grad, torch.bfloat16)  # noqa: E731
        measure = frobenius_error if name == "fp8_linear" else max_error
        errors = [measure(a, b) for a, b in zip(got, want)]
        ok = all(e <= t for e, t in zip(errors, tolerances))
        kernel_ms, twin_ms = timed(run_kernel, device, shapes["repeats"]), timed(run_twin, device, shapes["repeats"])
        row = dict(op=name, ok=ok, errors=errors, tolerances=tolerances, kernel_ms=kernel_ms, twin_bf16_ms=twin_ms)
        shown = ", ".join(f"{e:.2e}" for e in errors)
        report.add("kernels", row, f"{name:16s} {'ok  ' if ok else 'FAIL'} errors [{shown}]  "
                                   f"{kernel_ms:8.3f} ms (torch bf16 {twin_ms:8.3f} ms)")


def synthetic_data(folder, cfg, val_tokens):
    """Random documents as shards: one train shard linked as often as the schedule needs, one val shard."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size - 1, SYNTHETIC_SHARD_TOKENS, dtype=np.int64)
    tokens[rng.random(SYNTHETIC_SHARD_TOKENS) < 1 / MEAN_DOC_TOKENS] = T.BOS_ID
    tokens[0] = T.BOS_ID
    T.write_shard(os.path.join(folder, "val_000000.bin"), tokens[: val_tokens + 1])
    first = os.path.join(folder, "train_000000.bin")
    T.write_shard(first, tokens)
    need = T.Schedule(cfg).total * max(cfg.batch_tokens) * 2  # documents cut at max_seq_len lose tails
    for i in range(1, -(-need // SYNTHETIC_SHARD_TOKENS)):
        os.symlink(first, os.path.join(folder, f"train_{i:06d}.bin"))
    return [f"--train_files={folder}/train_*.bin", f"--val_files={folder}/val_*.bin"]


def build_trainer(argv, workdir, run_name):
    """A Trainer for train_gpt flags `argv`, logging into `workdir`; on random tokens there
    (synthetic_data) when the config's training shards are missing. Validation scores one batch."""
    cfg = T.parse_args(argv)
    val_tokens = cfg.val_batch_tokens  # one validation batch
    extra = [f"--val_tokens={val_tokens}", f"--log_dir={workdir}", f"--run_id={run_name}_{os.getpid()}", "--progress=false"]
    if not glob.glob(cfg.train_files):
        extra += synthetic_data(workdir, cfg, val_tokens)
    cfg = T.parse_args(argv + extra)
    backend = T.setup_backend(cfg)
    return T.Trainer(cfg, backend, T.RunLog(cfg, backend))


def stage_starts(schedule):
    """The first step of every stage, and the untie step."""
    return sorted(set(schedule.stage_starts()) | ({schedule.untie_step} - {None}))


def run_stage(trainer, start, untimed, steps):
    """Run `untimed` steps from `start`, then up to `steps` more of its stage. Returns, per step: seconds, loss,
    and the graphs torch.compile made during it (then the step's time is mostly compilation)."""
    from torch._dynamo.utils import counters

    schedule, backend = trainer.schedule, trainer.backend
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses, graphs = [], [], []
    stage_end = min([s for s in stage_starts(schedule) if s > start] + [schedule.total])  # this stage's steps only
    for step in range(start, min(start + untimed + steps, stage_end)):
        before = counters["stats"]["unique_graphs"]
        backend.synchronize()
        t0 = time.perf_counter()
        out = trainer.train_step(step)
        backend.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(out["train_loss"]))
        graphs.append(counters["stats"]["unique_graphs"] - before)
    return times, losses, graphs


def stage_runs(trainer, untimed, steps):
    """run_stage at every stage start (the untie included): yields (start, seconds, losses, graphs)."""
    for start in stage_starts(trainer.schedule):
        yield (start, *run_stage(trainer, start, untimed, steps))


def stage_row(trainer, start, times, losses, graphs):
    """A stage's figures. ms/step: the mean of the steps after the first that compiled nothing (not
    the median: Adam runs every adam_every steps, and a median of alternating fast and slow steps
    is one of them, not what the run spends); compile: what the first step and the compiling ones
    took beyond that."""
    schedule, backend = trainer.schedule, trainer.backend
    clean = [t for i, (t, n) in enumerate(zip(times, graphs)) if i and not n]
    ms = 1000 * statistics.mean(clean) if clean else float("nan")
    compile_s = sum(max(0.0, t - ms / 1000) for i, (t, n) in enumerate(zip(times, graphs)) if not i or n)
    tokens = schedule.batch_tokens(start) / backend.world_size
    return dict(stage=schedule.stage(start), first_step=start, batch_tokens=schedule.batch_tokens(start),
                windows=schedule.windows(schedule.window_blocks(start)), steps_timed=len(clean),
                first_step_s=times[0], graphs=sum(graphs), compile_s=compile_s, ms_per_step=ms,
                tokens_per_s_per_gpu=1000 * tokens / ms, peak_memory_mib=backend.peak_memory_mib(),
                loss_first=losses[0], loss_last=losses[-1])


def estimate_s(first, batch_tokens, steps):
    """Rough seconds of a later part from the first stage's row: its compilation again, and `steps`
    steps of `batch_tokens` at its speed per token (forward only is cheaper: an upper bound)."""
    return first["compile_s"] + steps * first["ms_per_step"] / 1000 * batch_tokens / first["batch_tokens"]


def stage_plan(schedule, quick):
    """(starts to run, starts left out): all of them, or with --quick the first stage's and the
    untie's (the largest batch, untied) or, without an untie, the last stage's."""
    starts = stage_starts(schedule)
    if not quick:
        return starts, []
    keep = sorted({starts[0], starts[-1] if schedule.untie_step is None else schedule.untie_step})
    return keep, [s for s in starts if s not in keep]


def stage_table(report, preset, argv, steps, workdir, quick=False, budget=float("inf"), started=None, basis=None):
    """For `preset`: a few steps at the start of the planned stages (stage_plan): compile time, ms per
    step, tokens/s per GPU, peak memory, losses; then the final validation. A part expected to end more
    than `budget` seconds after `started` is skipped, and said so; parts are estimated from this
    preset's first stage, or before it has run from `basis` (an earlier preset's first stage row; None:
    the first part always runs). Returns this preset's first stage row, or None if it was skipped."""
    started = time.perf_counter() if started is None else started
    trainer = build_trainer([f"--preset={preset}"] + argv, workdir, f"gpu_check_{preset}")
    schedule, backend = trainer.schedule, trainer.backend
    for note in backend.notes:  # what this device cannot run (train_gpt.fall_back)
        report.add("fallbacks", dict(preset=preset, note=note), f"fallback ({preset}): {note}")
    plan, left_out = stage_plan(schedule, quick)
    # (name, tokens, steps) per part, for the estimates; a validation runs twice: compiling, then timed
    parts = [(f"{preset} stage {schedule.stage(s)} from step {s}", schedule.batch_tokens(s), 1 + steps) for s in plan]
    parts.append((f"{preset} final validation", trainer.cfg.val_tokens, 2))
    report.note("plan: " + ", ".join(name for name, _, _ in parts))
    for start in left_out:
        part = f"{preset} stage {schedule.stage(start)} from step {start}"
        report.add("skipped", dict(preset=preset, part=part, reason="--quick"), f"skipped: {part} (--quick)")
    rows = []

    def elapsed():
        return time.perf_counter() - started

    def estimate(i):
        """Seconds part i is expected to take, from this preset's first stage or else the basis."""
        _, tokens, n = parts[i]
        return estimate_s(rows[0] if rows else basis, tokens, n)

    def fits(i):
        """Whether part i is expected to end within the budget (with nothing to estimate from, it runs); if not, say so."""
        if not rows and basis is None:
            return True
        need, left = estimate(i), budget - elapsed()
        go = [need <= left]
        if dist.is_initialized():  # rank 0's decision, so that all ranks run the same parts
            dist.broadcast_object_list(go, src=0)
        if go[0]:
            return True
        report.add("skipped", dict(preset=preset, part=parts[i][0], reason="budget", estimate_s=need, budget_left_s=left),
                   f"skipped: {parts[i][0]}: about {need:.0f} s, {max(left, 0):.0f} s of the {budget:.0f} s budget left")
        return False

    def forecast(i):
        """The expected duration: the time so far and estimates for this preset's parts after part i."""
        rest = range(i + 1, len(parts))
        more = sum(map(estimate, rest))
        of_budget = f" of the {budget:.0f} s budget" if budget < float("inf") else ""
        report.note(f"time: {elapsed():.0f} s so far; about {more:.0f} s more for "
                    f"{', '.join(parts[j][0] for j in rest)}: done at about {elapsed() + more:.0f} s{of_budget}")

    for i, start in enumerate(plan):
        if not fits(i):
            continue
        report.note(f"at {elapsed():.0f} s: running {parts[i][0]}")
        row = dict(preset=preset, **stage_row(trainer, start, *run_stage(trainer, start, 1, steps)))
        rows.append(row)
        report.add("stages", row, f"{preset} stage {row['stage']} from step {start:5d}: batch {row['batch_tokens']:7d}, "
                                  f"compile {row['compile_s']:7.1f} s ({row['graphs']} graphs), {row['ms_per_step']:8.1f} "
                                  f"ms/step, {row['tokens_per_s_per_gpu']:9.0f} tok/s/GPU, peak "
                                  f"{row['peak_memory_mib'] / 1024:.1f} GiB, loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}")
        forecast(i)
    measured = {row["stage"]: row for row in rows}

    def step_ms(step):
        """A step's ms: its stage's as measured or else, scaled by batch size, that of the measured
        stage with the nearest batch (of two as near, the earlier)."""
        batch = schedule.batch_tokens(step)
        row = measured.get(schedule.stage(step)) or min(rows, key=lambda r: abs(r["batch_tokens"] - batch))
        return row["ms_per_step"] * batch / row["batch_tokens"]

    projected = sum(map(step_ms, range(schedule.total))) / 1000 if rows else float("nan")
    scaled = sorted({schedule.stage(step) for step in range(schedule.total)} - set(measured)) if rows else []
    final = dict(preset=preset, steps=schedule.total, projected_train_time_s=projected, scaled_stages=scaled,
                 world_size=backend.world_size)
    shown = "final validation skipped"
    if fits(len(parts) - 1):
        report.note(f"at {elapsed():.0f} s: running the {preset} final validation")
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            val_loss = trainer.validate(schedule.final_window_blocks(), yarn=False)
            seconds.append(time.perf_counter() - t0)
        compile_s = max(0.0, seconds[0] - seconds[1])
        final.update(val_loss_one_batch=val_loss, final_validation_s=seconds[1], final_validation_compile_s=compile_s)
        shown = f"final validation {seconds[1]:.1f} s, compile {compile_s:.1f} s"
    report.add("final", final,
               f"projected {preset} train time for {schedule.total} steps on {backend.world_size} GPU(s): {projected:.1f} s"
               + (f" (stages {', '.join(map(str, scaled))} scaled from the measured ones by batch size)" if scaled else "")
               + f" ({record_text(RECORDS[preset])}); {shown}; {elapsed():.0f} s in all")
    return rows[0] if rows else None


def record_text(rec):
    """A record's figures in words."""
    peak = "not published" if rec["peak_allocated_gib"] is None else f"{rec['peak_allocated_gib']} GiB"
    return (f"{rec['name']} on 8 H100s: {rec['train_time_s']} s for {rec['steps']} steps, {rec['ms_per_step_8gpu']} ms/step, "
            f"peak {peak}")


def print_table(report):
    """Per preset, the stages as one table and its record's figures; then what was skipped and the
    kernels' verdict (what the README asks to report)."""
    data, note = report.data, report.note
    finals = {row["preset"]: row for row in data["final"]}
    for preset in data["presets"]:
        note("")
        note(f"{preset}:")
        note("| stage | first step | batch | graphs | compile (s) | ms/step | tokens/s/GPU | peak (GiB) | loss first -> last |")
        note("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in (r for r in data["stages"] if r["preset"] == preset):
            note(f"| {r['stage']} | {r['first_step']} | {r['batch_tokens']} | {r['graphs']} | {r['compile_s']:.1f} | "
                 f"{r['ms_per_step']:.1f} | {r['tokens_per_s_per_gpu']:.0f} | {r['peak_memory_mib'] / 1024:.1f} | "
                 f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
        final = finals.get(preset, {})
        note(f"projected {preset} train time on {final.get('world_size')} GPU(s): "
             f"{final.get('projected_train_time_s', float('nan')):.1f} s; {record_text(data['records'][preset])}")
    if data["skipped"]:
        note(f"skipped: {', '.join(row['part'] for row in data['skipped'])}")
    bad = [row["op"] for row in data["kernels"] if not row["ok"]]
    note(f"kernels: {'all within tolerance' if not bad else 'OUT OF TOLERANCE: ' + ', '.join(bad)}")


def split_options(argv, names):
    """The script's own options among `argv` ({name: text after '=', or '' for a bare flag}) and
    the rest, which are train_gpt flags."""
    own = {a.split("=")[0]: a.partition("=")[2] for a in argv if a.split("=")[0] in names}
    return own, [a for a in argv if a.split("=")[0] not in names]


def number(own, name, default, kind):
    """The script's option `name` as a positive `kind` (int or float), or `default` if absent."""
    if name not in own:
        return default
    try:
        value = kind(own[name])
    except ValueError:
        value = 0
    if value <= 0:
        raise SystemExit(f"error: {name}={own[name]}: expected a positive {'whole ' if kind is int else ''}number")
    return value


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return None
    started = time.perf_counter()
    own, rest = split_options(argv, ("--quick", "--smoke", "--presets", "--steps", "--budget", "--out"))
    smoke, quick = "--smoke" in own, "--quick" in own
    steps = number(own, "--steps", 1 if smoke else QUICK_STEPS if quick else 6, int)
    budget = number(own, "--budget", QUICK_BUDGET_S if quick else float("inf"), float)
    out = own.get("--out") or os.path.join("logs", "gpu_check.json")
    presets = own.get("--presets", ",".join(RECORDS)).split(",")
    if not presets or any(p not in RECORDS for p in presets) or len(set(presets)) < len(presets):
        raise SystemExit(f"error: --presets={own['--presets']}: expected presets among {', '.join(RECORDS)}, "
                         "comma-separated, each once")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: this check times the GPU path; on a CPU, --smoke (with "
                         "TRITON_INTERPRET=1) checks the script itself")
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("error: --smoke runs the Triton kernels on the CPU, which needs TRITON_INTERPRET=1 in "
                         "the environment (set before Python starts)")
    device = torch.device("cuda" if not smoke else "cpu")
    report = Report(out, int(os.environ.get("RANK", 0)) == 0, presets=presets, records={p: RECORDS[p] for p in presets},
                    kernels=[], stages=[], skipped=[], fallbacks=[], final=[])
    if report.enabled:
        check_kernels(report, device, SMOKE_SHAPES if smoke else KERNEL_SHAPES)
    basis = None
    for preset in presets:
        shape = SMOKE_FLAGS + (HEAD_SMOKE_FLAGS if preset == "head" else []) if smoke else []
        model_argv = (["--device=cpu", "--fp8_head=true"] + shape if smoke else []) + rest
        with tempfile.TemporaryDirectory() as workdir:
            basis = stage_table(report, preset, model_argv, steps, workdir, quick, budget, started, basis) or basis
    print_table(report)
    return report.data


if __name__ == "__main__":
    main(sys.argv[1:])
