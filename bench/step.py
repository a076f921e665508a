"""Training throughput per schedule stage: ms per step, tokens/s, model FLOPs per token and the share
of this device's measured matmul peak they reach (MFU). Prints a table and writes it as JSON.

    python bench/step.py                                # --preset=cpu on a CPU, the speedrun on CUDA
    torchrun --nproc_per_node=8 bench/step.py           # several GPUs
    python bench/step.py --cpu_dtype=fp32 --steps=3     # any other --name=value is a train_gpt flag

Options: --steps=N (timed steps per stage, default 5), --untimed=N (steps run before them: compile,
caches; default 2), --out=PATH (JSON, default logs/step.json; the lines also go to PATH with .txt),
--smoke (a tiny model and matmul: checks this script on a CPU in seconds). Without the preset's
training shards the model runs on random tokens (the same work).

The peak is what a large square matmul reaches here in bf16 and, on a CPU (where bf16 is not always
the faster), in fp32; MFU is given against each. Model FLOPs are counted from the config
(flops_per_token), not measured; the optimizer's work is not model FLOPs.
"""
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check as G  # noqa: E402

T = G.T
PEAK_SIZE = dict(cuda=8192, cpu=1024)  # side of the square matmul timed for the peak
SMOKE_PEAK_SIZE = 128
PEAK_REPEATS = 3
PEAK_DTYPES = dict(cuda=("bf16",), cpu=("bf16", "fp32"))
DTYPES = dict(bf16=torch.bfloat16, fp32=torch.float32)
DEFAULT_PRESET = dict(cuda="speedrun", cpu="cpu")


def matmul_params(cfg):
    """Weights each token is multiplied by in one forward pass: every attention layer's Q, K, V, O
    and per-head gate, every MLP's up and down, the optional output gates, the smear gate and the
    head (padded vocabulary). Embedding lookups and scalars do no matmul."""
    d, inner = cfg.d_model, cfg.n_head * cfg.head_dim
    attn_layers = sum(layer not in cfg.no_attn_layers for layer in range(cfg.n_layer))
    gate_dims = d if cfg.head_gate else cfg.gate_dims
    head_gate = cfg.n_head * gate_dims if cfg.attn_gate or cfg.head_gate else 0
    attn = 4 * d * inner + head_gate + (d * d if cfg.gate_attn != "none" else 0)
    mlp = 2 * d * cfg.mlp_hidden + (d * d if cfg.gate_mlp != "none" else 0)
    vocab = -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    smear = cfg.gate_dims if cfg.smear else 0
    return attn_layers * attn + cfg.n_layer * mlp + vocab * d + smear


def attention_flops(cfg, windows):
    """Forward + backward FLOPs per token of q.k and p.v at (long, short) windows in tokens.

    Each query is counted against a full window of keys, capped at max_seq_len (no piece of a
    document is longer): the causal mask's skipped pairs count, as in the usual 6N + 12 L d T
    estimate. Forward: 2 FLOPs per multiply-add, for q.k and p.v; backward twice the forward."""
    long_keys, short_keys = (min(w, cfg.max_seq_len) for w in windows)
    keys = sum(long_keys if layer in cfg.long_window_layers else short_keys
               for layer in range(cfg.n_layer) if layer not in cfg.no_attn_layers)
    return 3 * 2 * 2 * cfg.n_head * cfg.head_dim * keys


def flops_per_token(cfg, windows):
    """Model FLOPs per trained token: 6 per matmul weight (2 forward, 4 backward) plus attention."""
    return 6 * matmul_params(cfg) + attention_flops(cfg, windows)


def matmul_peak(device, dtype, size):
    """FLOP/s of a size^3 matmul in `dtype` here: the median of a few after one untimed."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    ms = G.timed(lambda: a @ b, device, PEAK_REPEATS)
    return 2 * size**3 / (ms / 1000)


def main(argv):
    own, rest = G.split_options(argv, ("--smoke", "--steps", "--untimed", "--out"))
    smoke = "--smoke" in own
    steps = int(own.get("--steps") or (1 if smoke else 5))
    untimed = int(own.get("--untimed") or (1 if smoke else 2))
    out = own.get("--out") or os.path.join("logs", "step.json")
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    report = G.Report(out, int(os.environ.get("RANK", 0)) == 0, peaks={}, stages=[])
    size = SMOKE_PEAK_SIZE if smoke else PEAK_SIZE[device.type]
    for name in PEAK_DTYPES[device.type]:
        peak = matmul_peak(device, DTYPES[name], size)
        report.add("peaks", {**report.data["peaks"], name: peak}, f"peak {name} matmul ({size}^3): {peak / 1e9:10.1f} GFLOP/s")
    preset = [] if any(a.startswith("--preset=") for a in rest) else [f"--preset={DEFAULT_PRESET[device.type]}"]
    model_argv = preset + (["--device=cpu"] + G.SMOKE_FLAGS if smoke else []) + rest
    peaks = report.data["peaks"]
    with tempfile.TemporaryDirectory() as workdir:
        trainer = G.build_trainer(model_argv, workdir, "step")
        cfg, schedule, backend = trainer.cfg, trainer.schedule, trainer.backend
        dtype = str(backend.compute_dtype).removeprefix("torch.")
        report.add("config", dict(argv=model_argv, compute_dtype=dtype, world_size=backend.world_size, untimed=untimed),
                   f"{' '.join(model_argv)}\ncompute dtype {dtype}, {backend.world_size} device(s), "
                   f"{untimed} untimed + {steps} timed steps per stage")
        mfu_names = " ".join(f"{'MFU ' + name:>9s}" for name in peaks)
        report.note(f"{'stage':>5s} {'step':>6s} {'batch':>7s} {'windows':>9s} {'ms/step':>9s} {'tok/s/dev':>10s} "
                    f"{'FLOP/tok':>10s} {'GFLOP/s':>9s} {mfu_names}")
        for start, times, _, _ in G.stage_runs(trainer, untimed, steps):
            ms = 1000 * statistics.median(times[untimed:]) if len(times) > untimed else float("nan")  # a short stage
            windows = schedule.windows(schedule.window_blocks(start))
            flops = flops_per_token(cfg, windows)
            tokens_per_s = schedule.batch_tokens(start) / backend.world_size / (ms / 1000)
            row = dict(stage=schedule.stage(start), first_step=start, batch_tokens=schedule.batch_tokens(start),
                       windows=windows, steps_timed=len(times) - untimed, ms_per_step=ms,
                       tokens_per_s_per_device=tokens_per_s, flops_per_token=flops, flop_per_s=flops * tokens_per_s,
                       mfu={name: flops * tokens_per_s / peak for name, peak in peaks.items()})
            mfu = " ".join(f"{100 * share:8.2f}%" for share in row["mfu"].values())
            report.add("stages", row, f"{row['stage']:5d} {start:6d} {row['batch_tokens']:7d} {'/'.join(map(str, windows)):>9s} "
                                      f"{ms:9.1f} {tokens_per_s:10.0f} {flops:10.3g} {flops * tokens_per_s / 1e9:9.2f} {mfu}")
    return report.data


if __name__ == "__main__":
    main(sys.argv[1:])
