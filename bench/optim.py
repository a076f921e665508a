"""Milliseconds per optimizer step on this CPU (world size 1) for the cpu preset's model: NorMuon
alone (the steps between Adam's) and NorMuon + Adam, for this train_gpt.py and, with --before=REV,
for train_gpt.py at git revision REV (e.g. the commit before the optimizers changed).

    python bench/optim.py --before=39bfdfb [--compile] [--steps=5]

Gradients are fixed random tensors, set again before every step; the figure is the median over
the steps after the first (which allocates the optimizer state, and with --compile compiles).
Polar Express runs in float32 here (COMPUTE_DTYPE): a CPU without AVX512-BF16 multiplies bf16 so
slowly that its matmuls would hide everything else the step does.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402


def git_source(rev):
    """train_gpt.py's text at git revision `rev`; a revision git cannot show is one `error:` line."""
    try:
        run = subprocess.run(["git", "show", f"{rev}:train_gpt.py"], cwd=ROOT, capture_output=True)
    except OSError as e:
        raise SystemExit(f"error: --before={rev}: cannot run git ({e.strerror or e})") from None
    if run.returncode != 0:
        why = run.stderr.decode(errors="replace").strip().splitlines()
        raise SystemExit(f"error: --before={rev}: git cannot show train_gpt.py there ({why[-1] if why else run.returncode})")
    return run.stdout


def load(rev):
    """train_gpt as a module: the working tree's, or git revision `rev`'s."""
    path = os.path.join(ROOT, "train_gpt.py")
    if rev:
        source = git_source(rev)
        handle, path = tempfile.mkstemp(suffix=".py")
        with os.fdopen(handle, "wb") as f:
            f.write(source)
    spec = importlib.util.spec_from_file_location(f"train_gpt_{rev or 'now'}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.COMPUTE_DTYPE = torch.float32
    return module


def ms_per_step(T, steps, adam, compile):
    cfg = T.parse_args(["--preset=cpu", f"--compile={compile}"])
    backend = T.Backend(torch.device("cpu"), 0, 1, T.TorchOps, T.BlockedAttention(cfg.window_block))
    torch.manual_seed(0)
    model = T.GPT(cfg, T.TorchOps, backend.attention)
    optimizers = T.Optimizers(model, cfg, backend)
    grads = [(p, torch.randn_like(p) * 1e-3) for p in model.parameters()]
    times = []
    for step in range(steps + 1):
        for p, g in grads:
            p.grad = g.clone()
        start = time.perf_counter()
        # step 0 with last=False: NorMuon only (adam_every=2); last=True: Adam steps as well
        optimizers.step(0, 1.0, cfg.muon_momentum, last=adam)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="git revision to compare with")
    parser.add_argument("--compile", action="store_true", help="torch.compile the updates (this tree only)")
    parser.add_argument("--steps", type=sample.bounded(int, 1), default=5, help="timed steps per figure (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    versions = ([(f"{args.before}", load(args.before), False)] if args.before else []) + [("this tree", load(None), False)]
    if args.compile:
        versions.append(("this tree, compiled", versions[-1][1], True))
    print(f"ms per optimizer step, cpu preset model, {torch.get_num_threads()} threads, median of {args.steps}")
    print(f"{'version':<22}{'NorMuon':>10}{'NorMuon+Adam':>14}")
    for name, T, compile in versions:
        muon = ms_per_step(T, args.steps, False, compile)
        both = ms_per_step(T, args.steps, True, compile)
        print(f"{name:<22}{muon:>10.1f}{both:>14.1f}")


if __name__ == "__main__":
    sys.exit(main())
