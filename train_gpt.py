"""Speedrun GPT trainer: train a GPT-2-small-class model to 3.28 FineWeb val loss, fast.

One file, read top to bottom: configuration and presets, backend, kernels, model, optimizers,
data, schedules, training loop, logging. Every technique is a named constant in `Config`,
overridable as `--name=value`; `--preset=cpu` selects the small CPU track and `--baseline`
switches every technique off at once.
"""
import dataclasses
import difflib
import glob
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: TritonOps is then unusable, TorchOps still works
    triton = None

# ------------------------------------------------------------------------------------------------
# Configuration and presets
# ------------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Every constant of a run. Defaults are the `speedrun` preset (the record recipe)."""

    # run
    preset: str = "speedrun"
    seed: int = 0
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = True
    run_id: str = ""  # empty: a fresh uuid
    log_dir: str = "logs"
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    warmup_steps: int = 3  # untimed steps per schedule stage before the clock starts (then reset)
    progress: bool = True  # console progress line with ETA
    # model shape
    vocab_size: int = 50257
    vocab_multiple: int = 128  # the embedding and head are padded to a multiple of this
    n_layer: int = 11
    d_model: int = 768
    n_head: int = 6
    head_dim: int = 128
    mlp_hidden: int = 3072
    no_attn_layers: tuple = (6,)
    long_window_layers: tuple = (3, 10)
    # attention windows, in blocks of `window_block` tokens, by thirds of training
    window_block: int = 128
    long_windows: tuple = (3, 7, 11)
    extension_window: int = 13
    final_window: int = 20
    rope_base: float = 1024.0
    attn_scale: float = 0.1
    # schedule
    num_steps: int = 1880
    extension_steps: int = 40
    batch_tokens: tuple = (131072, 262144, 393216)  # global tokens per step, by thirds
    max_seq_len: int = 2048
    accum_world_size: int = 8  # the batch is split for this many ranks; fewer ranks accumulate
    lr_mults: tuple = (1.0, 1.52, 1.73)
    cooldown_frac: float = 0.55
    lr_floor: float = 0.1
    val_every: int = 250
    val_tokens: int = 10485760
    val_batch_tokens: int = 262144  # global validation tokens per forward pass
    # optimizers
    muon: bool = True  # False: plain AdamW on every parameter (the baseline end of the ladder)
    muon_lr: float = 0.023
    muon_wd: float = 1.2
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    momentum_warmup_steps: int = 300
    momentum_cooldown_steps: int = 50
    muon_beta2: float = 0.95
    polar_steps: int = 5
    mlp_down_lr_mul: float = 2.0
    adam_lr: float = 0.008
    adam_betas: tuple = (0.65, 0.95)
    adam_eps: float = 1e-8
    adam_wd: float = 0.005
    value_embed_lr_mul: float = 75.0
    scalar_lr_mul: float = 5.0
    scalar_betas: tuple = (0.9, 0.99)
    adam_every: int = 2  # Adam steps every this many steps; its gradients accumulate in between
    adamw_lr: float = 0.0036  # the plain AdamW baseline
    adamw_betas: tuple = (0.9, 0.95)
    adamw_wd: float = 0.0
    # techniques of the record recipe (each one switch)
    value_embeds: int = 3  # number of value-embedding tables, 0 = off
    smear: bool = True
    x0_mixing: bool = True
    skip_from: int = 3  # output of this layer is added at the input of `skip_to`; -1 = off
    skip_to: int = 6
    backout_layer: int = 7  # subtract b * (x after this layer) at the end; -1 = off
    attn_gate: bool = True  # sparse per-head output gate from the first `gate_dims` channels
    gate_dims: int = 12
    key_offset: bool = True  # partial key offset on the long-window layers
    yarn: bool = True  # rescale RoPE and attention scale when the window grows
    softcap: float = 30.0  # logits = softcap * sigmoid(z / softcap_temp); 0 = plain logits
    softcap_temp: float = 7.5
    untie_frac: float = 2 / 3  # embedding reads the head's weight until this fraction; 1 = always tied
    mtp: bool = True  # multi-token-prediction loss schedule
    batch_schedule: bool = True  # False: the last third's batch size throughout
    window_schedule: bool = True  # False: the last third's window throughout
    fp8_head: bool = True  # FP8 lm_head matmul (CUDA)
    triton: bool = True  # fused Triton kernels on CUDA; False forces the torch twins


PRESETS = {
    "speedrun": {},
    "cpu": dict(
        device="cpu",
        compile=False,
        train_files="data/sample/sample_train_*.bin",
        val_files="data/sample/sample_val_*.bin",
        warmup_steps=0,
        n_layer=6,
        d_model=256,
        n_head=4,
        head_dim=64,
        mlp_hidden=1024,
        no_attn_layers=(),
        long_window_layers=(2, 5),
        window_block=64,
        long_windows=(2, 3, 4),
        extension_window=4,
        final_window=4,
        num_steps=300,
        extension_steps=0,
        batch_tokens=(2048, 4096, 4096),
        max_seq_len=512,
        accum_world_size=1,
        val_every=100,
        val_tokens=65536,
        val_batch_tokens=8192,
        skip_from=1,
        skip_to=4,
        backout_layer=3,
        momentum_warmup_steps=50,
        momentum_cooldown_steps=10,
        fp8_head=False,
        triton=False,
    ),
}

# `--baseline`: every technique off at once (plain GPT with AdamW); one by one back on is the
# ablation ladder from baseline to record.
BASELINE = dict(
    muon=False,
    value_embeds=0,
    smear=False,
    x0_mixing=False,
    skip_from=-1,
    backout_layer=-1,
    attn_gate=False,
    key_offset=False,
    yarn=False,
    softcap=0.0,
    untie_frac=1.0,
    mtp=False,
    batch_schedule=False,
    window_schedule=False,
    fp8_head=False,
    triton=False,
)


def parse_value(name, text, default):
    """Parse `text` to the type of the field's default; errors name the flag."""
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected true/false")
            return low in ("1", "true", "yes", "on")
        if isinstance(default, tuple):
            parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
            kind = type(default[0]) if default else float
            return tuple(kind(p) if kind is not int else int(float(p)) for p in parts)
        if isinstance(default, int):
            value = float(text)
            if value != int(value):
                raise ValueError("expected an integer")
            return int(value)
        return type(default)(text)
    except ValueError as e:
        kind = type(default).__name__
        raise SystemExit(f"error: --{name}={text}: cannot read as {kind} ({e})") from None


def parse_args(argv):
    """Build the Config from `--preset=`, `--baseline` and `--name=value` overrides (in that order)."""
    defaults = {f.name: f.default for f in fields(Config)}
    preset, baseline, overrides = "speedrun", False, {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}: overrides look like --name=value")
        name, eq, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name == "baseline" and not eq:
            baseline = True
            continue
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults) + ["baseline"], n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise SystemExit(f"error: unknown flag --{name}{hint}")
        if not eq:
            raise SystemExit(f"error: --{name} needs a value: --{name}=VALUE")
        if name == "preset":
            if text not in PRESETS:
                raise SystemExit(f"error: --preset={text}: expected one of {', '.join(PRESETS)}")
            preset = text
        else:
            overrides[name] = parse_value(name, text, defaults[name])
    values = {**PRESETS[preset], **(BASELINE if baseline else {}), **overrides, "preset": preset}
    return Config(**values)

# ------------------------------------------------------------------------------------------------
# Kernels: fused Triton kernels for CUDA and their plain torch twins (the CPU path and reference)
# ------------------------------------------------------------------------------------------------


class TorchOps:
    """Plain torch versions of every fused op; the reference the Triton kernels are tested against."""

    name = "torch"

    @staticmethod
    def sym_mm(a):
        """a @ a^T for a batch of matrices [..., m, n] -> [..., m, m]."""
        return a @ a.mT

    @staticmethod
    def sym_axpby(a, b, c):
        """b * a + c * (a @ a^T) for symmetric square a [..., m, m]."""
        return b * a + c * (a @ a.mT)

    @staticmethod
    def linear_relu2(x, w):
        """relu(x @ w^T)^2, the MLP up projection and its activation."""
        return F.relu(F.linear(x, w)).square()

    @staticmethod
    def softcap_mtp_ce(logits, targets, weights, cap, temp):
        """Per-token multi-token cross-entropy of softcapped logits.

        logits [N, V] (raw z), targets [N] (next tokens); loss_i = sum_k w_k (lse_i - l_i[t_{i+k}])
        over the k with i + k < N, where l = cap * sigmoid(z / temp) (l = z when cap is 0).
        """
        z = logits.float()
        l = cap * torch.sigmoid(z / temp) if cap > 0 else z
        lse = torch.logsumexp(l, dim=-1)
        n = targets.numel()
        loss = torch.zeros(n, dtype=torch.float32, device=logits.device)
        for k, w in enumerate(weights):
            if w == 0 or k >= n:
                continue
            picked = l[: n - k].gather(1, targets[k:, None]).squeeze(1)
            loss = loss + F.pad(w * (lse[: n - k] - picked), (0, k))
        return loss


# Launch shapes, chosen so every kernel assembles for sm_90a without register spills
# (tests/aot_sm90.py checks registers, spills, shared memory and wgmma at the record's shapes).
SYM_BLOCK = 128  # output tile of the symmetric products (square, so it can be mirrored)
SYM_BLOCK_K = 64
SYM_WARPS = 8
SYM_STAGES = 3
MM_BLOCK_M = 128
MM_BLOCK_N = 256
MM_BLOCK_K = 64
MM_GROUP_M = 8  # row tiles swept together so their weight tiles stay in L2
MM_WARPS = 8
MM_STAGES = 3
CE_BLOCK_V = 2048  # vocabulary columns per step of the per-row pass
CE_WARPS = 8
CE_MAX_WEIGHTS = 3  # multi-token-prediction weights the CE kernels take

# FP8 lm_head scales: a tensor is divided by its scale before the cast, so scale = the largest
# magnitude expected / the largest finite value of the format (448 for e4m3, 57344 for e5m2).
FP8_X_SCALE = 768**0.5 / 448  # an RMS-normed row of width 768 has no entry above sqrt(768)
FP8_W_SCALE = 1.0 / 448  # |w| up to 1 (200 init stds of 0.005) is representable; beyond saturates
# |dloss/dz| <= sum(w_k) / tokens <= 1.75 / 16384 for a loss averaged over a rank's smallest record
# batch; 2^-28 maps that to about 2^14.8 (e5m2 max 2^15.8) and keeps typical entries ~1/(tokens*vocab)
# far above e5m2's smallest normal.
FP8_GRAD_SCALE = 2.0**-28


def _to_fp8(t, scale, dtype):
    """t / scale as `dtype`, saturating: out-of-range values would otherwise become NaN or inf."""
    limit = torch.finfo(dtype).max
    return (t / scale).clamp(-limit, limit).to(dtype)


class _FP8Linear(torch.autograd.Function):
    """x @ w^T with both operands cast to e4m3 and the output gradient to e5m2 (torch._scaled_mm)."""

    @staticmethod
    def forward(ctx, x, w, x_scale, w_scale, grad_scale):
        shape = x.shape
        x_f8 = _to_fp8(x.reshape(-1, shape[-1]), x_scale, torch.float8_e4m3fn)
        w_f8 = _to_fp8(w, w_scale, torch.float8_e4m3fn)
        xs, ws = (torch.tensor(s, dtype=torch.float32, device=x.device) for s in (x_scale, w_scale))
        # _scaled_mm wants its first operand row-major and its second column-major: w_f8.T is.
        out = torch._scaled_mm(x_f8, w_f8.T, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True)
        ctx.save_for_backward(x_f8, w_f8, xs, ws)
        ctx.grad_scale, ctx.shape, ctx.dtypes = grad_scale, shape, (x.dtype, w.dtype)
        return out.reshape(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x_f8, w_f8, xs, ws = ctx.saved_tensors
        gs = torch.tensor(ctx.grad_scale, dtype=torch.float32, device=grad.device)
        g_f8 = _to_fp8(grad.reshape(-1, grad.shape[-1]), ctx.grad_scale, torch.float8_e5m2)
        grad_x = torch._scaled_mm(g_f8, w_f8.T.contiguous().T, scale_a=gs, scale_b=ws, out_dtype=torch.bfloat16)
        grad_w = torch._scaled_mm(g_f8.T.contiguous(), x_f8.T.contiguous().T, scale_a=gs, scale_b=xs, out_dtype=torch.float32)
        return grad_x.reshape(ctx.shape).to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None


def fp8_linear(x, w, x_scale=FP8_X_SCALE, w_scale=FP8_W_SCALE, grad_scale=FP8_GRAD_SCALE):
    """The lm_head matmul in FP8 (bf16 output): half the bytes and twice the tensor-core rate of bf16."""
    return _FP8Linear.apply(x, w, x_scale, w_scale, grad_scale)


if triton is not None:

    @triton.jit
    def _sym_mm_kernel(a_ptr, out_ptr, m, n, s_ab, s_am, s_an, s_ob, s_om, s_on, alpha, beta,
                       AXPBY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile (i, j), j <= i, of a @ a^T (or alpha * a + beta * a @ a^T), stored at (i, j) and (j, i).

        The product is symmetric, so tiles above the diagonal are never computed: about half the FLOPs.
        """
        pid_i, pid_j = tl.program_id(0), tl.program_id(1)
        if pid_j > pid_i:
            return
        a_ptr += tl.program_id(2).to(tl.int64) * s_ab
        out_ptr += tl.program_id(2).to(tl.int64) * s_ob
        rows = pid_i * BLOCK + tl.arange(0, BLOCK)
        cols = pid_j * BLOCK + tl.arange(0, BLOCK)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            k = k0 + ks
            a_i = tl.load(a_ptr + rows[:, None] * s_am + k[None, :] * s_an, mask=(rows[:, None] < m) & (k[None, :] < n), other=0.0)
            a_jt = tl.load(a_ptr + k[:, None] * s_an + cols[None, :] * s_am, mask=(k[:, None] < n) & (cols[None, :] < m), other=0.0)
            acc = tl.dot(a_i, a_jt, acc)
        if AXPBY:  # a is square and symmetric here, so the (j, i) tile of a is the transpose of this one
            a_ij = tl.load(a_ptr + rows[:, None] * s_am + cols[None, :] * s_an, mask=(rows[:, None] < m) & (cols[None, :] < m), other=0.0)
            acc = alpha * a_ij.to(tl.float32) + beta * acc
        tile = acc.to(out_ptr.dtype.element_ty)
        if pid_i == pid_j:  # rounding can differ across the diagonal; keep the lower half so a stays exactly symmetric
            tile = tl.where(rows[:, None] >= cols[None, :], tile, tl.trans(tile))
        tl.store(out_ptr + rows[:, None] * s_om + cols[None, :] * s_on, tile, mask=(rows[:, None] < m) & (cols[None, :] < m))
        if pid_i != pid_j:
            tl.store(out_ptr + cols[:, None] * s_om + rows[None, :] * s_on, tl.trans(tile), mask=(cols[:, None] < m) & (rows[None, :] < m))

    @triton.jit
    def _linear_relu2_kernel(x_ptr, w_ptr, out_ptr, M, N, K, s_xm, s_xk, s_wn, s_wk, s_om, s_on,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of relu(x @ w^T)^2: the activation is applied before the store."""
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
        pid_n = (pid % (GROUP_M * tiles_n)) // group_rows
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            x = tl.load(x_ptr + rows[:, None] * s_xm + k[None, :] * s_xk, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            wt = tl.load(w_ptr + k[:, None] * s_wk + cols[None, :] * s_wn, mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
            acc = tl.dot(x, wt, acc)
        acc = tl.maximum(acc, 0.0)
        out = (acc * acc).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * s_om + cols[None, :] * s_on, out, mask=(rows[:, None] < M) & (cols[None, :] < N))

    @triton.jit
    def _softcap(z, cap, inv_temp, SOFTCAP: tl.constexpr):
        """cap * sigmoid(z / temp) in fp32, or z itself when the softcap is off."""
        if SOFTCAP:
            return cap * tl.sigmoid(z * inv_temp)
        return z

    @triton.jit
    def _mtp_target(t_ptr, row, k: tl.constexpr, n_rows, weight):
        """Target t_{row+k} and its weight; weight 0 (and target 0) past the end of the batch."""
        valid = row + k < n_rows
        target = tl.load(t_ptr + row + k, mask=valid, other=0)
        return target, tl.where(valid, weight, 0.0)

    @triton.jit
    def _softcap_ce_fwd_kernel(z_ptr, t_ptr, loss_ptr, lse_ptr, n_rows, vocab, s_z, w0, w1, w2, cap, inv_temp,
                               SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """Loss of one row: an online logsumexp over vocabulary blocks, then the weighted target logits."""
        row = tl.program_id(0)
        z_row = z_ptr + row.to(tl.int64) * s_z
        run_max = -float("inf")
        run_sum = 0.0
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < vocab, other=0.0).to(tl.float32)
            l = tl.where(cols < vocab, _softcap(z, cap, inv_temp, SOFTCAP), -float("inf"))
            new_max = tl.maximum(run_max, tl.max(l, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(l - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        weights = (w0, w1, w2)
        loss = 0.0
        for k in tl.static_range(len(weights)):
            target, weight = _mtp_target(t_ptr, row, k, n_rows, weights[k])
            picked = _softcap(tl.load(z_row + target).to(tl.float32), cap, inv_temp, SOFTCAP)
            loss += weight * (lse - picked)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, loss)

    @triton.jit
    def _softcap_ce_bwd_kernel(z_ptr, t_ptr, lse_ptr, grad_ptr, dz_ptr, n_rows, vocab, s_z, s_dz, w0, w1, w2, cap, inv_temp,
                               SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """dloss/dz of one row in one pass: sum_k w_k (softmax - onehot(t_{i+k})) * grad, through the softcap."""
        row = tl.program_id(0)
        z_row = z_ptr + row.to(tl.int64) * s_z
        dz_row = dz_ptr + row.to(tl.int64) * s_dz
        lse = tl.load(lse_ptr + row)
        grad = tl.load(grad_ptr + row)
        weights = (w0, w1, w2)
        total = 0.0
        for k in tl.static_range(len(weights)):
            total += _mtp_target(t_ptr, row, k, n_rows, weights[k])[1]
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < vocab, other=0.0).to(tl.float32)
            l = _softcap(z, cap, inv_temp, SOFTCAP)
            dl = total * tl.exp(l - lse)
            for k in tl.static_range(len(weights)):
                target, weight = _mtp_target(t_ptr, row, k, n_rows, weights[k])
                dl -= tl.where(cols == target, weight, 0.0)
            if SOFTCAP:  # dl/dz = cap / temp * s (1 - s) with s = l / cap
                s = l / cap
                dl *= cap * inv_temp * s * (1.0 - s)
            tl.store(dz_row + cols, (dl * grad).to(dz_ptr.dtype.element_ty), mask=cols < vocab)


def _sym_product(a, alpha, beta, axpby):
    """a @ a^T (or alpha * a + beta * a @ a^T) for a [..., m, n] with the one-triangle kernel."""
    m, n = a.shape[-2:]
    stack = a.reshape(-1, m, n)
    out = torch.empty(stack.shape[0], m, m, dtype=a.dtype, device=a.device)
    tiles = triton.cdiv(m, SYM_BLOCK)
    _sym_mm_kernel[(tiles, tiles, stack.shape[0])](
        stack, out, m, n, *stack.stride(), *out.stride(), float(alpha), float(beta),
        AXPBY=axpby, BLOCK=SYM_BLOCK, BLOCK_K=SYM_BLOCK_K, num_warps=SYM_WARPS, num_stages=SYM_STAGES)
    return out.reshape(*a.shape[:-2], m, m)


class _LinearReLU2(torch.autograd.Function):
    """relu(x @ w^T)^2 from one Triton matmul; backward uses two torch (cuBLAS) matmuls.

    Only the output is saved: it is the next layer's input, so autograd keeps it anyway, and
    relu(pre) = sqrt(out) gives back what the derivative 2 * relu(pre) needs.
    """

    @staticmethod
    def forward(ctx, x, w):
        rows = x.reshape(-1, x.shape[-1])
        wx = w.to(x.dtype)
        out = torch.empty(rows.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        M, K = rows.shape
        N = w.shape[0]
        grid = (triton.cdiv(M, MM_BLOCK_M) * triton.cdiv(N, MM_BLOCK_N),)
        _linear_relu2_kernel[grid](
            rows, wx, out, M, N, K, *rows.stride(), *wx.stride(), *out.stride(),
            BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K, GROUP_M=MM_GROUP_M,
            num_warps=MM_WARPS, num_stages=MM_STAGES)
        out = out.reshape(*x.shape[:-1], N)
        ctx.save_for_backward(x, w, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, out = ctx.saved_tensors
        dpre = 2 * grad * out.sqrt()
        grad_x = dpre @ w.to(dpre.dtype)
        grad_w = dpre.reshape(-1, w.shape[0]).mT @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w.to(w.dtype)


class _SoftcapMTPCrossEntropy(torch.autograd.Function):
    """Per-token softcapped multi-token CE; each direction is one pass over the vocabulary per row.

    Saves the logits (as given, bf16 on GPU) and the fp32 logsumexp per row, never fp32 logits.
    """

    @staticmethod
    def forward(ctx, logits, targets, weights, cap, temp):
        if len(weights) > CE_MAX_WEIGHTS:
            raise ValueError(f"softcap_mtp_ce takes at most {CE_MAX_WEIGHTS} weights, got {len(weights)}")
        z, targets = logits.contiguous(), targets.contiguous()
        n, vocab = z.shape
        scalars = (*(float(w) for w in weights), *(0.0,) * (CE_MAX_WEIGHTS - len(weights)), float(cap), 1.0 / temp if cap > 0 else 1.0)
        loss = torch.empty(n, dtype=torch.float32, device=z.device)
        lse = torch.empty(n, dtype=torch.float32, device=z.device)
        _softcap_ce_fwd_kernel[(n,)](z, targets, loss, lse, n, vocab, z.stride(0), *scalars,
                                     SOFTCAP=cap > 0, BLOCK_V=CE_BLOCK_V, num_warps=CE_WARPS)
        ctx.save_for_backward(z, targets, lse)
        ctx.scalars, ctx.softcap = scalars, cap > 0
        return loss

    @staticmethod
    def backward(ctx, grad):
        z, targets, lse = ctx.saved_tensors
        n, vocab = z.shape
        dz = torch.empty_like(z)
        _softcap_ce_bwd_kernel[(n,)](z, targets, lse, grad.contiguous(), dz, n, vocab, z.stride(0), dz.stride(0),
                                     *ctx.scalars, SOFTCAP=ctx.softcap, BLOCK_V=CE_BLOCK_V, num_warps=CE_WARPS)
        return dz, None, None, None, None


class TritonOps(TorchOps):
    """The fused Triton kernels behind TorchOps' signatures (CUDA; CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    @staticmethod
    def sym_mm(a):
        return _sym_product(a, 0.0, 1.0, axpby=False)

    @staticmethod
    def sym_axpby(a, b, c):
        return _sym_product(a, b, c, axpby=True)

    @staticmethod
    def linear_relu2(x, w):
        return _LinearReLU2.apply(x, w)

    @staticmethod
    def softcap_mtp_ce(logits, targets, weights, cap, temp):
        return _SoftcapMTPCrossEntropy.apply(logits, targets, tuple(weights), cap, temp)


# ------------------------------------------------------------------------------------------------
# Data: shards, the BOS-aligned training loader, the validation loader
# ------------------------------------------------------------------------------------------------

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 50256  # <|endoftext|> precedes every document


class ShardError(ValueError):
    """A shard file that is not what the format says it should be."""


def write_shard(path, tokens):
    """Write uint16 tokens with the 256-int32 header, via a temporary file and a rename."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ShardError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_shard_header(path):
    """Check a shard's header and size; return its token count."""
    size = os.path.getsize(path)
    if size == 0:
        raise ShardError(f"{path}: empty file (expected a {HEADER_BYTES}-byte header and tokens)")
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated header ({size} bytes, expected at least {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: bad magic number {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(f"{path}: {what}: {size} bytes, header promises {count} tokens = {expected} bytes")
    return count


def read_shard(path, vocab_size=None):
    """Read a shard's tokens as a uint16 numpy array, checking header, size and token range."""
    count = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
    if vocab_size is not None and count and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"{path}: token id {int(tokens[bad])} at position {bad} is out of range (vocab size {vocab_size})")
    return tokens


def list_shards(pattern, what):
    """Files matching `pattern`, sorted; a clear error when there are none."""
    files = sorted(glob.glob(pattern))
    if not files:
        folder = os.path.dirname(pattern) or "."
        hint = "" if os.path.isdir(folder) else f" (the directory {folder} does not exist)"
        raise SystemExit(
            f"error: no {what} shards match {pattern}{hint}. "
            "Download FineWeb with `python data/cached_fineweb10B.py 9`, or point --train_files/--val_files at your shards."
        )
    return files
