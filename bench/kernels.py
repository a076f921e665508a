"""Roofline of each fused op at the record's shapes on an H100, next to its torch twin's time on this CPU.

FLOPs count multiply-adds as 2 (elementwise work as the ops per element listed in the notes); bytes
are the compulsory HBM traffic: every input read once, every output written once. The roofline time
is max(FLOPs / peak, bytes / 3.35 TB/s). CPU times are medians of a few runs of the torch twin
(TorchOps, or fp8_linear itself) with as many rows as fit a quick run; the `cpu @record` column scales
them linearly to the record's rows.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as T  # noqa: E402

BF16_PEAK = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s
FP8_PEAK = 1979e12  # H100 SXM dense fp8 tensor-core FLOP/s
HBM = 3.35e12  # H100 SXM HBM3 bytes/s
TOKENS, WIDTH, HIDDEN, VOCAB = 49152, 768, 3072, 50304  # one rank's record batch, model widths
MTP_WEIGHTS = torch.tensor([1.0, 0.5, 0.25])  # a tensor, as the model passes them
POLAR_BC = (-22.48329292557795, 15.878769915207462)  # (b, c) of the first Polar Express step
CE_OPS_FWD, CE_OPS_BWD = 8, 12  # elementwise ops per logit: softcap, exp, sums / softcap, exp, grad chain
MLP_MATRICES, ATTN_MATRICES = 22, 40  # Muon groups of the whole model: MLP up+down, attention Q/K/V/O


def median_seconds(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sym_case(label, batch, m, n, axpby):
    """Symmetric product on [batch, m, n] (rows = matrices): only tiles on and below the diagonal are multiplied."""
    tiles = math.ceil(m / T.SYM_BLOCK)
    flops = batch * 2 * m * m * n * (tiles + 1) / (2 * tiles)
    bytes_ = batch * 2 * (m * n + m * m * (2 if axpby else 1))
    a = torch.randn(batch, m, n, dtype=torch.bfloat16)
    if axpby:
        a = a + a.mT
        run = lambda: T.TorchOps.sym_axpby(a, *POLAR_BC)  # noqa: E731
    else:
        run = lambda: T.TorchOps.sym_mm(a)  # noqa: E731
    return label, flops, bytes_, BF16_PEAK, batch, batch, run


def mlp_cases(cpu_rows):
    """linear_relu2 at 49152 tokens x 768 -> 3072: forward, and forward + backward (two more matmuls)."""
    fwd_flops = 2 * TOKENS * WIDTH * HIDDEN
    fwd_bytes = 2 * (TOKENS * WIDTH + HIDDEN * WIDTH + TOKENS * HIDDEN)
    # backward reads grad and the output, x and w; writes grad_x and grad_w
    bwd_bytes = 2 * (2 * TOKENS * HIDDEN + 2 * TOKENS * WIDTH + 2 * HIDDEN * WIDTH)
    x = torch.randn(cpu_rows, WIDTH, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(HIDDEN, WIDTH) / WIDTH**0.5).bfloat16().requires_grad_()
    g = torch.randn(cpu_rows, HIDDEN, dtype=torch.bfloat16)
    fwd = lambda: T.TorchOps.linear_relu2(x.detach(), w.detach())  # noqa: E731
    train = lambda: T.TorchOps.linear_relu2(x, w).backward(g)  # noqa: E731
    return [("linear_relu2 fwd", fwd_flops, fwd_bytes, BF16_PEAK, TOKENS, cpu_rows, fwd),
            ("linear_relu2 fwd+bwd", 3 * fwd_flops, fwd_bytes + bwd_bytes, BF16_PEAK, TOKENS, cpu_rows, train)]


def ce_cases(cpu_rows):
    """softcap_mtp_ce on 49152 x 50304 bf16 logits with 3 MTP weights: forward, and forward + backward."""
    logits_bytes = 2 * TOKENS * VOCAB
    fwd_bytes = logits_bytes + TOKENS * (8 + 4 + 4)  # logits, targets in; loss and lse out
    bwd_bytes = 2 * logits_bytes + TOKENS * (8 + 4 + 4)  # logits in, dlogits out; targets, lse, grad in
    z = (4 * torch.randn(cpu_rows, VOCAB)).bfloat16().requires_grad_()
    t = torch.randint(0, VOCAB, (cpu_rows,))
    fwd = lambda: T.TorchOps.softcap_mtp_ce(z.detach(), t, MTP_WEIGHTS, 30.0, 7.5)  # noqa: E731
    train = lambda: T.TorchOps.softcap_mtp_ce(z, t, MTP_WEIGHTS, 30.0, 7.5).sum().backward()  # noqa: E731
    return [("softcap_mtp_ce fwd", CE_OPS_FWD * TOKENS * VOCAB, fwd_bytes, BF16_PEAK, TOKENS, cpu_rows, fwd),
            ("softcap_mtp_ce fwd+bwd", (CE_OPS_FWD + CE_OPS_BWD) * TOKENS * VOCAB, fwd_bytes + bwd_bytes, BF16_PEAK,
             TOKENS, cpu_rows, train)]


def fp8_cases(cpu_rows):
    """fp8_linear lm_head 49152 x 768 -> 50304: e4m3 forward (bf16 out); backward grad_x (bf16), grad_w (fp32)."""
    flops = 2 * TOKENS * WIDTH * VOCAB
    fwd_bytes = 2 * (TOKENS * WIDTH + VOCAB * WIDTH) + 1 * (TOKENS * WIDTH + VOCAB * WIDTH) + 2 * TOKENS * VOCAB
    # casts: grad bf16 -> e5m2; matmuls read the fp8 grad twice, fp8 x and w; write grad_x bf16, grad_w fp32
    bwd_bytes = 3 * TOKENS * VOCAB + 2 * TOKENS * VOCAB + TOKENS * WIDTH + VOCAB * WIDTH + 2 * TOKENS * WIDTH + 4 * VOCAB * WIDTH
    x = torch.randn(cpu_rows, WIDTH).bfloat16().requires_grad_()
    w = (0.005 * torch.randn(VOCAB, WIDTH)).requires_grad_()
    g = (torch.randn(cpu_rows, VOCAB) / 16384).bfloat16()
    fwd = lambda: T.fp8_linear(x.detach(), w.detach())  # noqa: E731
    train = lambda: T.fp8_linear(x, w).backward(g)  # noqa: E731
    return [("fp8 lm_head fwd", flops, fwd_bytes, FP8_PEAK, TOKENS, cpu_rows, fwd),
            ("fp8 lm_head fwd+bwd", 3 * flops, fwd_bytes + bwd_bytes, FP8_PEAK, TOKENS, cpu_rows, train)]


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.manual_seed(0)
    cases = [
        sym_case("sym_mm 768x3072", 1, WIDTH, HIDDEN, False),
        sym_case(f"sym_mm {MLP_MATRICES}x768x3072 (MLP group)", MLP_MATRICES, WIDTH, HIDDEN, False),
        sym_case(f"sym_mm {ATTN_MATRICES}x768x768 (attn group)", ATTN_MATRICES, WIDTH, WIDTH, False),
        sym_case("sym_axpby 768x768", 1, WIDTH, WIDTH, True),
        sym_case(f"sym_axpby {MLP_MATRICES}x768x768 (MLP group)", MLP_MATRICES, WIDTH, WIDTH, True),
        sym_case(f"sym_axpby {ATTN_MATRICES}x768x768 (attn group)", ATTN_MATRICES, WIDTH, WIDTH, True),
        *mlp_cases(cpu_rows=2048),
        *ce_cases(cpu_rows=512),
        *fp8_cases(cpu_rows=512),
    ]
    header = f"{'op (record shape)':42} {'GFLOP':>9} {'MB':>9} {'H100 us':>9} {'bound':>7} {'cpu/record':>12} {'cpu ms':>9} {'cpu @record ms':>15}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(header)
    print("-" * len(header))
    for label, flops, bytes_, peak, rows, cpu_rows, run in cases:
        compute, memory = flops / peak, bytes_ / HBM
        seconds = median_seconds(run)
        print(f"{label:42} {flops / 1e9:9.1f} {bytes_ / 1e6:9.1f} {max(compute, memory) * 1e6:9.1f} "
              f"{'compute' if compute > memory else 'memory':>7} {f'{cpu_rows}/{rows}':>12} {seconds * 1e3:9.1f} {seconds * rows / cpu_rows * 1e3:15.1f}")
    print("notes: sym_* FLOPs count only the tiles the one-triangle kernel multiplies, (T+1)/(2T) of the full product "
          f"with T = {math.ceil(WIDTH / T.SYM_BLOCK)} tiles per side; Muon groups are the whole model's "
          "(each of 8 ranks takes about 1/8). softcap_mtp_ce FLOPs are elementwise "
          f"({CE_OPS_FWD} fwd / {CE_OPS_BWD} bwd ops per logit, not tensor-core work): it is memory-bound, though its "
          "2-3 exponentials per logit also load the SFUs near the memory time. fp8 rows use the fp8 peak "
          f"({FP8_PEAK / 1e12:.0f} TFLOP/s). CPU times are of the torch twins in bf16 (fp8 as fp32 products of the fp8 operands).")


if __name__ == "__main__":
    main()
