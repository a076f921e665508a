"""Training throughput per schedule stage: ms per step, tokens/s, model FLOPs per token and the share
of this device's measured matmul peak they reach (MFU). Prints a table and writes it as JSON.

    python bench/step.py                                # --preset=cpu on a CPU, the speedrun on CUDA
    torchrun --nproc_per_node=8 bench/step.py           # several GPUs
    python bench/step.py --cpu_dtype=fp32 --steps=3     # any other --name=value is a train_gpt flag
    python bench/step.py --profile=15                   # and where each stage's step spends its time

`--help` lists this script's own options. Without the preset's training shards the model runs on
random tokens (the same work).

The peak is what a large square matmul reaches here in bf16 and, on a CPU (where bf16 is not always
the faster), in fp32; MFU is given against each. Model FLOPs are counted from the config
(flops_per_token), not measured; the optimizer's work is not model FLOPs.
"""
import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check as G  # noqa: E402
import sample  # noqa: E402  (gpu_check put the repo root on the path)

T = G.T
SMOKE_PEAK_SIZE = 128
PEAK_DTYPES = dict(cuda=("bf16",), cpu=("bf16", "fp32"))
DTYPES = dict(bf16=torch.bfloat16, fp32=torch.float32)
DEFAULT_PRESET = dict(cuda="speedrun", cpu="cpu")


def parse_options(argv):
    """This script's options, and the rest of argv (train_gpt flags). A bad option: one `error:`
    line and exit 2, as the trainer does with a bad flag."""
    parser = argparse.ArgumentParser(
        prog="bench/step.py", description=__doc__.split("\n\n")[0], allow_abbrev=False, exit_on_error=False,
        epilog="Every other --name=value is a train_gpt.py flag for the model run (--preset, --cpu_dtype, "
               "--batch_tokens, ...): `python train_gpt.py --help` lists them.")
    parser.add_argument("--steps", type=sample.bounded(int, 1), help="timed steps per stage, rounded up to whole Adam periods (default 6; 2 with --smoke)")
    parser.add_argument("--untimed", type=sample.bounded(int, 0),
                        help="steps run before the timed ones: compile, caches (default 2; 1 with --smoke)")
    parser.add_argument("--out", default=os.path.join("logs", "step.json"), help="the table as JSON (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and matmul: checks this script on a CPU in seconds")
    parser.add_argument("--profile", type=sample.bounded(int, 0), default=0, metavar="N",
                        help="after each stage's timed steps, profile the last one again and list its N costliest "
                             "operators by self time (torch.profiler); default 0: no profile")
    try:
        options, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    options.steps = options.steps or (1 if options.smoke else 6)
    options.untimed = (1 if options.smoke else 2) if options.untimed is None else options.untimed
    return options, rest


def profile_step(trainer, step, top):
    """The `top` operators of one training step by self time (on the GPU its kernels' time, on a CPU
    the host's), with their share of the step's total and their call counts."""
    cuda = trainer.backend.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        trainer.train_step(step)
        trainer.backend.synchronize()
    events = prof.key_averages()
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events)
    return [dict(op=e.key, self_ms=self_us(e) / 1000, share=self_us(e) / total, calls=e.count)
            for e in sorted(events, key=self_us, reverse=True)[:top]]


def main(argv):
    options, rest = parse_options(argv)
    smoke, steps, untimed, out = options.smoke, options.steps, options.untimed, options.out
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    report = G.Report(out, int(os.environ.get("RANK", 0)) == 0, peaks={}, stages=[], profiles=[])
    size = SMOKE_PEAK_SIZE if smoke else T.PEAK_SIZE[device.type]
    for name in PEAK_DTYPES[device.type]:
        peak = T.matmul_peak(device, DTYPES[name], size)
        report.add("peaks", {**report.data["peaks"], name: peak}, f"peak {name} matmul ({size}^3): {peak / 1e9:10.1f} GFLOP/s")
    preset = [] if any(a.startswith("--preset=") for a in rest) else [f"--preset={DEFAULT_PRESET[device.type]}"]
    model_argv = preset + (["--device=cpu"] + G.SMOKE_FLAGS if smoke else []) + rest
    peaks = report.data["peaks"]
    with tempfile.TemporaryDirectory() as workdir:
        trainer = G.build_trainer(model_argv, workdir, "step")
        cfg, schedule, backend = trainer.cfg, trainer.schedule, trainer.backend
        # whole Adam periods, averaged: Adam steps every adam_every steps (the 50k-row tables' update
        # costs the same at every batch size), so a median of a few steps was the cheaper kind alone
        steps = -(-steps // cfg.adam_every) * cfg.adam_every
        dtype = str(backend.compute_dtype).removeprefix("torch.")
        report.add("config", dict(argv=model_argv, compute_dtype=dtype, world_size=backend.world_size, untimed=untimed),
                   f"{' '.join(model_argv)}\ncompute dtype {dtype}, {backend.world_size} device(s), "
                   f"{untimed} untimed + {steps} timed steps per stage")
        mfu_names = " ".join(f"{'MFU ' + name:>9s}" for name in peaks)
        report.note(f"{'stage':>5s} {'step':>6s} {'batch':>7s} {'windows':>9s} {'ms/step':>9s} {'tok/s/dev':>10s} "
                    f"{'FLOP/tok':>10s} {'GFLOP/s':>9s} {mfu_names}")
        for start, times, _, _ in G.stage_runs(trainer, untimed, steps):
            ms = 1000 * statistics.mean(times[untimed:]) if len(times) > untimed else float("nan")  # a short stage
            windows = schedule.windows(schedule.window_blocks(start))
            flops = T.flops_per_token(cfg, windows, schedule.max_seq_len(start))
            tokens_per_s = schedule.batch_tokens(start) / backend.world_size / (ms / 1000)
            row = dict(stage=schedule.stage(start), first_step=start, batch_tokens=schedule.batch_tokens(start),
                       windows=windows, steps_timed=len(times) - untimed, ms_per_step=ms,
                       tokens_per_s_per_device=tokens_per_s, flops_per_token=flops, flop_per_s=flops * tokens_per_s,
                       mfu={name: flops * tokens_per_s / peak for name, peak in peaks.items()})
            mfu = " ".join(f"{100 * share:8.2f}%" for share in row["mfu"].values())
            report.add("stages", row, f"{row['stage']:5d} {start:6d} {row['batch_tokens']:7d} {'/'.join(map(str, windows)):>9s} "
                                      f"{ms:9.1f} {tokens_per_s:10.0f} {flops:10.3g} {flops * tokens_per_s / 1e9:9.2f} {mfu}")
            if options.profile:
                step = start + len(times) - 1  # the last timed step again: same shapes
                ops = profile_step(trainer, step, options.profile)
                report.add("profiles", dict(stage=row["stage"], step=step, ops=ops),
                           "\n".join([f"  profile of step {step}: the {len(ops)} costliest operators by self time"]
                                     + [f"  {o['self_ms']:9.1f} ms {100 * o['share']:5.1f}% {o['calls']:6d}x  {o['op']}" for o in ops]))
    return report.data


if __name__ == "__main__":
    main(sys.argv[1:])
