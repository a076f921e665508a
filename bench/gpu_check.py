"""One-command GPU check: the fused kernels against their torch twins, then the speedrun preset for a
few steps of every schedule stage on the GPUs present. Prints a table and writes it as JSON, each
figure as soon as it is measured (a run cut short keeps what it measured).

    python bench/gpu_check.py                          # one GPU: each step accumulates 8 micro-batches
    torchrun --nproc_per_node=8 bench/gpu_check.py     # the record's 8 GPUs
    python bench/gpu_check.py --quick                  # 3 steps per stage (meant to fit 8 minutes with
                                                       # compile; not yet timed on a GPU)

Options: --steps=N (timed steps per stage, default 6), --out=PATH (JSON, default
logs/gpu_check.json), --smoke (tiny shapes and model: checks this script itself on a CPU, with
TRITON_INTERPRET=1 for the kernels). Any other --name=value is a train_gpt flag for the model run.
Without FineWeb shards in data/fineweb10B the model runs on random tokens (timing and memory are the
same; the losses then only show that training runs).
"""
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402

# the record on 8 H100s, to print beside what this run measures
RECORD = dict(train_time_s=119.7, ms_per_step_8gpu=62.3, peak_allocated_gib=29.9, steps=1920)
KERNEL_SHAPES = dict(tokens=16384, width=768, hidden=3072, vocab=50304, ce_rows=4096, stack=4, repeats=5)
SMOKE_SHAPES = dict(tokens=256, width=64, hidden=256, vocab=1000, ce_rows=64, stack=2, repeats=1)
SMOKE_FLAGS = ["--n_layer=3", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=256", "--no_attn_layers=1",
               "--long_window_layers=2", "--skip_from=0", "--skip_to=2", "--backout_layer=1", "--value_embeds=1",
               "--num_steps=6", "--extension_steps=2", "--batch_tokens=256,384,512", "--accum_world_size=1",
               "--long_windows=1,2,3", "--extension_window=4", "--final_window=5", "--max_seq_len=256",
               "--val_batch_tokens=512", "--compile=false", "--momentum_warmup_steps=2", "--momentum_cooldown_steps=2"]
TOLERANCE = dict(bf16=2e-2, loss=1e-4, fp8_out=0.06, fp8_grad=0.1)  # as in tests/test_kernels.py
SYNTHETIC_SHARD_TOKENS = 2**25  # one random shard, linked as often as the schedule needs
MEAN_DOC_TOKENS = 1000


class Report:
    """The check's rows, printed and written to JSON (temporary file + rename) as each arrives."""

    def __init__(self, path, enabled, **sections):
        self.path, self.enabled = path, enabled
        self.data = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=device_name(), torch=torch.__version__, **sections)

    def add(self, section, row, line):
        """Append `row` to a list section (kernels, stages) or set a single one (final)."""
        if not self.enabled:
            return
        if isinstance(self.data.get(section), list):
            self.data[section].append(row)
        else:
            self.data[section] = row
        print(line, flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def device_name():
    """The GPU's name, or the CPU's model, cores and torch threads."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else T.versions_and_hardware().splitlines()[-1]


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


def stage_runs(trainer, untimed, steps):
    """For the start of every stage (the untie included): run `untimed` steps, then time up to
    `steps` more. Yields (first step, seconds of each step, losses of each step), untimed ones first."""
    schedule, backend = trainer.schedule, trainer.backend
    starts = sorted(set(schedule.stage_starts()) | ({schedule.untie_step} - {None}))
    for start in starts:
        if backend.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for step in range(start, min(start + untimed + steps, schedule.total)):
            backend.synchronize()
            t0 = time.perf_counter()
            out = trainer.train_step(step)
            backend.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(out["train_loss"]))
        yield start, times, losses


def stage_table(report, argv, steps, workdir):
    """A few steps at the start of every stage (the untie included): compile time, ms per step,
    tokens/s per GPU, peak memory, losses; then the final validation."""
    trainer = build_trainer(argv, workdir, "gpu_check")
    schedule, backend = trainer.schedule, trainer.backend
    for start, times, losses in stage_runs(trainer, 1, steps):
        ms = 1000 * statistics.median(times[1:]) if len(times) > 1 else float("nan")
        tokens = schedule.batch_tokens(start) / backend.world_size
        row = dict(stage=schedule.stage(start), first_step=start, batch_tokens=schedule.batch_tokens(start),
                   windows=schedule.windows(schedule.window_blocks(start)), steps_timed=len(times) - 1,
                   first_step_s=times[0], compile_s=times[0] - ms / 1000, ms_per_step=ms,
                   tokens_per_s_per_gpu=1000 * tokens / ms, peak_memory_mib=backend.peak_memory_mib(),
                   loss_first=losses[0], loss_last=losses[-1])
        report.add("stages", row, f"stage {row['stage']} from step {start:5d}: batch {row['batch_tokens']:7d}, "
                                  f"first step {times[0]:7.1f} s, {ms:8.1f} ms/step, {row['tokens_per_s_per_gpu']:9.0f} "
                                  f"tok/s/GPU, peak {row['peak_memory_mib'] / 1024:.1f} GiB, "
                                  f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    stage_steps = collections.Counter(schedule.stage(step) for step in range(schedule.total))
    per_stage = {row["stage"]: row["ms_per_step"] for row in report.data["stages"]}
    projected = sum(n * per_stage.get(stage, float("nan")) for stage, n in stage_steps.items()) / 1000
    t0 = time.perf_counter()
    val_loss = trainer.validate(schedule.final_window_blocks(), yarn=False)
    first_val_s = time.perf_counter() - t0
    report.add("final", dict(projected_train_time_s=projected, world_size=backend.world_size, val_loss_one_batch=val_loss,
                             final_validation_first_call_s=first_val_s),
               f"projected train time for {schedule.total} steps on {backend.world_size} GPU(s): {projected:.1f} s "
               f"(record on 8: {RECORD['train_time_s']} s, {RECORD['ms_per_step_8gpu']} ms/step, "
               f"peak {RECORD['peak_allocated_gib']} GiB); final validation first call {first_val_s:.1f} s")


def print_table(data):
    """The stages as one table, the record's figures under it (what the README asks to report)."""
    print(f"\n{data['date']}, {data['device']}, torch {data['torch']}")
    print("| stage | first step | batch | compile (s) | ms/step | tokens/s/GPU | peak (GiB) | loss first -> last |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in data["stages"]:
        print(f"| {r['stage']} | {r['first_step']} | {r['batch_tokens']} | {r['compile_s']:.1f} | {r['ms_per_step']:.1f} | "
              f"{r['tokens_per_s_per_gpu']:.0f} | {r['peak_memory_mib'] / 1024:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    final, record = data.get("final", {}), data["record"]
    print(f"projected train time on {final.get('world_size')} GPU(s): {final.get('projected_train_time_s', float('nan')):.1f} s; "
          f"record on 8 H100s: {record['train_time_s']} s, {record['ms_per_step_8gpu']} ms/step, "
          f"peak {record['peak_allocated_gib']} GiB")
    bad = [row["op"] for row in data["kernels"] if not row["ok"]]
    print(f"kernels: {'all within tolerance' if not bad else 'OUT OF TOLERANCE: ' + ', '.join(bad)}", flush=True)


def split_options(argv, names):
    """The script's own options among `argv` ({name: text after '=', or '' for a bare flag}) and
    the rest, which are train_gpt flags."""
    own = {a.split("=")[0]: a.partition("=")[2] for a in argv if a.split("=")[0] in names}
    return own, [a for a in argv if a.split("=")[0] not in names]


def main(argv):
    own, rest = split_options(argv, ("--quick", "--smoke", "--steps", "--out"))
    smoke = "--smoke" in own
    steps = int(own["--steps"]) if "--steps" in own else (1 if smoke else 3 if "--quick" in own else 6)
    out = own.get("--out") or os.path.join("logs", "gpu_check.json")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: this check times the GPU path; on a CPU, --smoke (with "
                         "TRITON_INTERPRET=1) checks the script itself")
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("error: --smoke runs the Triton kernels on the CPU, which needs TRITON_INTERPRET=1 in "
                         "the environment (set before Python starts)")
    device = torch.device("cuda" if not smoke else "cpu")
    report = Report(out, int(os.environ.get("RANK", 0)) == 0, record=RECORD, kernels=[], stages=[])
    if report.enabled:
        check_kernels(report, device, SMOKE_SHAPES if smoke else KERNEL_SHAPES)
    model_argv = (["--device=cpu", "--fp8_head=true"] + SMOKE_FLAGS if smoke else []) + rest
    with tempfile.TemporaryDirectory() as workdir:
        stage_table(report, model_argv, steps, workdir)
    if report.enabled:
        print_table(report.data)
    return report.data


if __name__ == "__main__":
    main(sys.argv[1:])
