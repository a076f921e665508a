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
