"""Speedrun GPT trainer: train a GPT-2-small-class model to 3.28 FineWeb val loss, fast.

One file, read top to bottom: configuration and presets, backend, kernels, model, optimizers,
data, schedules, training loop, logging. Every technique is a named constant in `Config`,
overridable as `--name=value`; `--preset=cpu` selects the small CPU track, `--preset=head` the
public speedrun's latest recipe as far as its techniques are switches here, `--baseline` the
llm.c / nanoGPT GPT-2 recipe and `--all_off` every technique off at once.
"""
import base64
import dataclasses
import difflib
import functools
import glob
import importlib
import inspect
import itertools
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

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
    preset: str = "speedrun"  # speedrun (8xH100 record recipe) | cpu (small model on the bundled sample) | head (public HEAD)
    seed: int = 0  # seed of the model's initialization
    device: str = "auto"  # auto | cuda | cpu
    cpu_dtype: str = "auto"  # matmul dtype on a CPU: auto (bf16 if it has AVX512-BF16 or AMX, else fp32) | bf16 | fp32; CUDA: bf16
    compile: bool = True  # torch.compile the model (warmup then compiles, untimed)
    compile_elementwise: bool = False  # torch.compile the elementwise passes outside the model, seconds to compile: the optimizers' updates and the CPU loss's blocks of rows (--compile does these too)
    activation_checkpointing: bool = False  # recompute each block in the backward instead of keeping its activations: the same numbers, less memory, about a third more compute
    run_id: str = ""  # empty: <preset>_ and 8 random hex digits (e.g. cpu_0cbbbc63)
    log_dir: str = "logs"  # where <run_id>.txt (the record log) and <run_id>.jsonl go
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of the training shards
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of the validation shards
    warmup_steps: int = 3  # untimed steps per schedule stage before the clock starts (then reset)
    progress: bool = True  # echo log lines to the console
    log_every: int = 50  # train-loss line (with ETA) every this many steps; 0 = none
    save_every: int = 0  # checkpoint every this many steps, clock stopped; 0 = never inside the run
    save_final: bool = True  # checkpoint at the end of the run
    checkpoint_dir: str = ""  # where checkpoints go; empty: <log_dir>/<run_id>/
    keep_checkpoints: int = 2  # the newest this many complete checkpoints stay, older ones are deleted (2: one to fall back on); 0 = keep all
    resume: str = ""  # continue from a checkpoint file, or `auto`: the latest in checkpoint_dir if any
    resume_any: bool = False  # resume even from a checkpoint of another config or source
    wandb: str = ""  # also send the metrics to this Weights & Biases project (WANDB_MODE=offline keeps them local); empty = off
    tensorboard: bool = False  # also write the metrics as TensorBoard events to <log_dir>/tensorboard/<run_id>/
    dry_run: bool = False  # print the config, the schedule and the parameter table (model on the meta device), then exit
    memory_check: bool = True  # stop before training, with the flags that would fit, when the estimated peak memory exceeds the device's; false: train anyway
    # model shape
    vocab_size: int = 50257  # GPT-2's 50,257 tokens
    vocab_multiple: int = 128  # the embedding and head are padded to a multiple of this
    n_layer: int = 11  # transformer blocks
    d_model: int = 768  # width of the residual stream
    n_head: int = 6  # attention heads per layer
    head_dim: int = 128  # width of each head
    mlp_hidden: int = 3072  # hidden width of the ReLU^2 MLP
    no_attn_layers: tuple = (6,)  # layers without attention (MLP only)
    long_window_layers: tuple = (3, 10)  # layers with the long window; the others get half of it
    context: int = 0  # llm.c: the batch is read as rows of this many tokens (GPT-2: 1024), each attending causally within itself across document ends; 0 = documents, by the windows
    position_embedding: bool = False  # GPT-2: learned absolute positions (a table of --context rows, counted from each row's start) added to the token embedding, in place of RoPE
    norm: str = "rmsnorm"  # the blocks' and the final norm: rmsnorm (no weights) | layernorm (GPT-2's, with a gain, and a bias with --bias)
    embed_norm: bool = True  # normalize the token embedding before the first block (GPT-2: false)
    qk_norm: bool = True  # RMS-normalize each head's q and k (GPT-2: false)
    mlp_activation: str = "relu2"  # relu2 | gelu (GPT-2's, tanh approximation)
    bias: bool = False  # GPT-2's biases: on Q, K, V, the attention output, the MLP's up and down, and the LayerNorms
    init: str = "record"  # record | gpt2 (llm.c: matrices and tables N(0, 0.02), the projections into the stream 0.02 / sqrt(2 n_layer), the padding rows 0)
    # attention windows, in blocks of `window_block` tokens, by thirds of training
    window_block: int = 128  # tokens per attention-window block
    long_windows: tuple = (3, 7, 11)  # long window in blocks, by thirds of training
    extension_window: int = 13  # long window in blocks during the extension steps
    final_window: int = 20  # long window in blocks for the final validation, set without a YaRN step; the short window stays
    rope_base: float = 1024.0  # RoPE base of the rotating half of each head
    attn_scale: float = 0.1  # attention scale (softmax temperature) before YaRN rescaling
    # schedule
    num_steps: int = 1880  # scheduled steps (the thirds, the cooldown and the untie step are fractions of these)
    extension_steps: int = 40  # extra steps after the schedule at the last batch size and the extension window
    batch_tokens: tuple = (131072, 262144, 393216)  # global tokens per step, by thirds
    max_seq_len: int = 2048  # longest piece of a document in a batch; a longer document's tail is dropped
    accum_world_size: int = 8  # the batch is split for this many ranks; fewer ranks accumulate, a multiple take smaller slices
    lr_mults: tuple = (1.0, 1.52, 1.73)  # learning-rate multiplier by thirds of training
    cooldown_frac: float = 0.55  # linear learning-rate cooldown over this last fraction of the scheduled steps
    lr_floor: float = 0.1  # the cooldown ends at this multiplier, whatever the stage's peak
    val_every: int = 250  # validate every this many steps (and always at the end); 0 = only at the end
    val_tokens: int = 10485760  # tokens of the val shards scored (the record: the first 10,485,760)
    val_batch_tokens: int = 2097152  # global validation tokens per forward pass (262,144 per rank of 8)
    rounded_stages: bool = False  # #65: thirds start at round(k/3 * num_steps), weights fade over whole steps, so does the cooldown
    first_seq_len: int = 0  # #72: max_seq_len during the first third (HEAD: 896); 0 = max_seq_len throughout
    lr_schedule: str = "stages"  # stages (the record's: lr_mults by thirds, linear cooldown to lr_floor) | cosine (llm.c: linear warmup, then cosine to lr_floor at num_steps)
    lr_warmup_steps: int = 0  # cosine: the lr rises linearly over this many steps (llm.c: 700 of its 18,865)
    # optimizers
    muon: bool = True  # False: AdamW on every parameter (--baseline, --all_off)
    muon_lr: float = 0.023  # NorMuon learning rate of the hidden matrices
    muon_wd: float = 1.2  # NorMuon cautious weight decay (scaled by lr times the effective lr)
    muon_momentum: float = 0.95  # NorMuon Nesterov momentum
    muon_momentum_start: float = 0.85  # momentum at step 0, warmed up to muon_momentum
    momentum_warmup_steps: int = 300  # steps of the momentum warmup
    momentum_cooldown_steps: int = 50  # last steps over which momentum cools back to the start value
    muon_beta2: float = 0.95  # EMA factor of NorMuon's per-row second moment
    polar_steps: int = 5  # Polar Express iterations per orthogonalization
    mlp_down_lr_mul: float = 2.0  # extra learning-rate factor of the MLP down projection
    adam_lr: float = 0.008  # Adam learning rate of embeddings, head, gates and scalars
    adam_betas: tuple = (0.65, 0.95)  # Adam (beta1, beta2) of the head, embedding and x0 lambdas
    adam_eps: float = 1e-8  # Adam epsilon
    adam_wd: float = 0.005  # Adam cautious weight decay (scaled by the effective lr squared)
    value_embed_lr_mul: float = 75.0  # learning-rate factor of the value embeddings
    smear_gate_lr_mul: float = 0.01  # learning-rate factor of the smear gate (no decay)
    scalar_lr_mul: float = 5.0  # learning-rate factor of the scalars and the x0 lambdas (these with adam_betas)
    scalar_betas: tuple = (0.9, 0.99)  # Adam (beta1, beta2) of the scalars and of the #55 gates
    scalar_freeze_steps: int = 40  # the scalars' Adam pauses this long after a batch or window change
    adam_every: int = 2  # Adam steps every this many steps; its gradients accumulate in between
    adamw_lr: float = 0.0036  # the plain AdamW of --muon=false (llm.c's GPT-2 small: 0.0006)
    adamw_betas: tuple = (0.9, 0.95)  # AdamW (beta1, beta2) (llm.c: 0.9, 0.95)
    adamw_wd: float = 0.0  # AdamW weight decay lr * wd of the matrices and tables (llm.c, nanoGPT: 0.1); biases, gains and scalars take none
    grad_clip: float = 0.0  # AdamW: clip the global norm of the mean token loss's gradient to this (llm.c, nanoGPT: 1.0); 0 = off
    attn_lr_mul: float = 2.0  # #61 NorMuon lr factor of Q, K, V and O: 2 is the shape factor of #53's stacked (4d x d) matrix; HEAD 1
    head_wd_mul: float = 1.0  # #55 Adam weight-decay factor of the head and embedding (HEAD 150)
    value_embed_wd_mul: float = 1.0  # #55 Adam weight-decay factor of the value embeddings (HEAD 5)
    value_embed_betas: tuple = (0.65, 0.95)  # #57 Adam (beta1, beta2) of the value embeddings (HEAD 0.75, 0.95)
    smear_gate_betas: tuple = (0.65, 0.95)  # #57 Adam (beta1, beta2) of the smear gate (HEAD 0.9, 0.99)
    qk_head_pairs: bool = False  # #80 NorMuon orthogonalizes Q and K per pair of heads, not as whole matrices
    bf16_tables: bool = True  # CUDA stores the head, embedding tables and gates in bf16, as the record does; false: float32 (llm.c keeps float32 master weights)
    bf16_weights: bool = False  # #57 NorMuon's matrices stored in bf16, the upper half of an fp32 master whose lower half (a uint16 mantissa) NorMuon keeps: fp32 updates, half the weight memory and gathers
    # techniques of the record recipe (each one switch)
    value_embeds: int = 3  # number of value-embedding tables, 0 = off
    smear: bool = True  # mix a gated share of the previous token's embedding into each token
    x0_mixing: bool = True  # learnable mix of the residual stream and the first embedding before each block
    skip_from: int = 3  # output of this layer is added at the input of `skip_to`; -1 = off
    skip_to: int = 6  # the layer that receives the skip from `skip_from`
    backout_layer: int = 7  # subtract b * (x after this layer) at the end; -1 = off
    attn_gate: bool = True  # sparse per-head output gate from the first `gate_dims` channels
    attn_lambdas: bool = True  # learned per-layer scalars on the QKV and output weights
    gate_dims: int = 12  # input channels of the sparse attention gate
    key_offset: bool = True  # partial key offset on the long-window layers
    yarn: bool = True  # rescale RoPE and attention scale when the window grows
    softcap: float = 30.0  # logits = softcap * sigmoid(z / softcap_temp); 0 = plain logits
    softcap_temp: float = 7.5  # temperature of the softcap's sigmoid
    softcap_offset: float = 0.0  # #54 logits = softcap * sigmoid((z + offset) / softcap_temp) (HEAD: 23 * sigmoid((z + 5) / 7.5))
    untie_frac: float = 2 / 3  # embedding reads the head's weight until this fraction; 1 = always tied
    mtp: bool = True  # multi-token-prediction loss schedule
    batch_schedule: bool = True  # False: the last third's batch size throughout
    window_schedule: bool = True  # False: the last third's window throughout
    fp8_head: bool = True  # FP8 lm_head matmul (CUDA)
    triton: bool = True  # fused Triton kernels on CUDA; False forces the torch twins
    untie_after_adam: bool = False  # #54: untie after the first Adam step at or past the untie point (not at the point)
    prefix_loss: float = 0.0  # #88: weight of a CE toward the next token's longest proper prefix token (first third, fading over the second); 0 = off
    ve_layout: str = ""  # #70 value-embedding table of each layer, one character per layer: '.' none or the table's index (HEAD .01.....234); empty: value_embeds' layout
    ve_init_std: float = 0.0  # #70 value embeddings start N(0, std^2); 0: zeros (HEAD 0.01)
    ve_gate: str = "none"  # #55/#70 each head takes 2 sigmoid(w . g) of its value embedding: none | x (#55: g = x[:gate_dims]) | x_ve (#70: halves of x and ve)
    skip_x0_gate: bool = False  # #55 the skip is also scaled by 2 sigmoid(w . x0[:gate_dims]), per token
    attn_gate_adam: bool = False  # #56 the attention gates step with Adam (as the value-embedding gates), not NorMuon
    bigram_vocab: int = 0  # #62: rows of the hashed (previous token, token) embedding added before each block; 0 = off
    bigram_signs: int = 0  # #83: rows of the fixed random +-1 table multiplied into each bigram's row; 0 = no signs
    bigram_lambda_init: float = 0.05  # #62: start of the per-layer bigram lambdas (#62 0.1, 0.05 from #73 on)
    bigram_lr_mul: float = 75.0  # #62: Adam learning-rate factor of the bigram table
    bigram_betas: tuple = (0.75, 0.95)  # #62: Adam (beta1, beta2) of the bigram table
    bigram_wd_mul: float = 5.0  # #62: Adam weight-decay factor of the bigram table
    fp8_mlp: bool = False  # #84/#89: MLP up and down projections in FP8 while training, the down projection's scales delayed
    sublayer_resid: bool = False  # #73: residual lambdas per sublayer (attention, MLP); the x0 and bigram lambdas' terms join the attention output
    post_lambdas: bool = False  # #73/#77: a learned scale on each sublayer's output (attention, MLP), start 1
    lane_layer: int = -1  # #77: the attention of every later layer reads this layer's output, not the stream (HEAD 7); -1 = off
    resid_lambda_lr_mul: float = 5.0  # #73: Adam learning-rate factor of the per-sublayer residual lambdas
    lambda_betas: tuple = (0.9, 0.95)  # #73: Adam (beta1, beta2) of the sublayer lambdas, and of the x0 and bigram lambdas under sublayer_resid
    mudd: bool = False  # #81: per-token dense connections (MUDD) into the last layer and after it, in place of backout and of the last layer's lambdas
    mudd_gate: bool = False  # #85: per-token MUDD gates in place of the x0 and bigram lambdas and the skip's x0 gate, and as mudd_gate_attn's attention gates, XSA strengths and DC weights
    mudd_gate_layer: int = 4  # #85: the MUDD gate's second half reads this layer's input (the first half reads x0)
    mudd_gate_attn: tuple = (3, 10)  # #85: layers whose heads the MUDD gate scales
    mudd_lr_mul: float = 0.25  # #81: Adam learning-rate factor of the MUDD weights
    mudd_gate_lr_mul: float = 0.1  # #85: Adam learning-rate factor of the MUDD gate
    paired_head_layers: tuple = ()  # #58: layers whose heads attend in pairs, each query scoring its partner head's keys too, over a 2T sequence (HEAD 0,2,5,9)
    xsa_layers: tuple = ()  # #82/#85: layers whose heads drop tanh(a_h) of their output's component along the token's own value (HEAD 1,3,4,7; a_h learned per head, per token by the MUDD gate)
    dc_layers: tuple = ()  # #85: layers whose heads also read the values through a per-token mix of every head's attention over its last 112 keys (HEAD 10; mix weights from a small MLP, or the MUDD gate)
    uniform_attn_init: bool = False  # #64/#67: Q, K, V and O all start uniform with std 0.5/sqrt(d_model) (HEAD); off: #53's std 1/sqrt(d_model) for Q, K, V and O zeros
    # the seeds' techniques (SPEC section 4), each one switch, all off by default
    shell_lambda: float = 0.0  # shell-centering penalty on the token embeddings (0 = off; seed 0.008)
    gate_attn: str = "none"  # attention output gate act(W_g x), W_g d x d: none | relu | sigmoid
    gate_mlp: str = "none"  # the same gate on the MLP output
    head_gate: bool = False  # the per-head attention gate reads all d channels (Qwen gated attention)
    sink_metric: bool = False  # log the share of heads that sink on their document's first token
    sink_logit: bool = False  # a learnable per-head extra softmax slot with zero value
    kv_bias: bool = False  # a learnable per-head key and value bias forming an extra attention slot
    stablemax: bool = False  # StableMax in place of softmax: trained and validated on its cross-entropy
    perp_grad: str = "none"  # project gradients orthogonal to their weights: none | matrices | all
    perp_grad_rescale: bool = False  # ... then restore each gradient's norm


PRESETS = {
    "speedrun": {},
    "cpu": dict(
        device="cpu",
        compile=False,
        compile_elementwise=True,
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
        num_steps=150,
        extension_steps=0,
        batch_tokens=(2048, 4096, 6144),
        max_seq_len=512,
        accum_world_size=1,
        val_every=50,
        log_every=10,
        val_tokens=65536,
        val_batch_tokens=8192,
        skip_from=1,
        skip_to=4,
        backout_layer=3,
        momentum_warmup_steps=50,
        momentum_cooldown_steps=10,
        fp8_head=False,
        triton=False,
        mudd_gate_layer=2,  # #85 HEAD's 4 (the layer after the skip's source)
        mudd_gate_attn=(2, 5),  # #85 HEAD's 3, 10 (the long-window layers)
    ),
    # the public HEAD (repo-root train_gpt.py, records up to #89 merged), number for number where a
    # switch exists; its shape, windows, batch sizes, lr peaks, momentum and lrs equal #53's. NOT yet
    # HEAD: only how some ops run (see the README): DC's read and the FP8 MLP's kernels are torch twins
    # of HEAD's Triton kernels, the bigram table's gradient is reduce-scattered whole. Every validation
    # runs without FP8, as HEAD's.
    # #73/#77's sublayer form is HEAD's on layers 0-9: x <- r x + p attn(norm(in)) + x0 and bigram terms,
    # x <- r x + p mlp(norm(x)), in = layer 7's output after layer 7 (the lane), layer 3's output added
    # in place of layer 6's attention (skip_from/skip_to, #53's). #81/#85 as HEAD: on layer 10 the four
    # lambdas, the x0-like and bigram terms and the value-embedding gates are per-token MUDD coefficients
    # (its [11, 2] rows and its ve gate stay, unused), and MUDD mixes layer 0's input, layer 7's
    # output and its own input into its values and stream; the x0 and bigram terms' lambdas (layers
    # 0-9), the skip's factor, the only attention gates (layers 3 and 10), the XSA strengths (layers 1,
    # 3, 4, 7) and DC's weights (layer 10) are MUDD-gate outputs (its [2, 41, 64] output weights); backout is
    # MUDD's mix after the last layer.
    "head": dict(
        num_steps=1270,
        extension_steps=15,
        rounded_stages=True,
        first_seq_len=896,
        cooldown_frac=0.6,  # #73
        lr_floor=0.15,  # #72
        untie_after_adam=True,
        prefix_loss=0.25,
        scalar_freeze_steps=0,  # #57 dropped the pause
        muon_beta2=0.9,  # #78
        adam_eps=1e-10,  # #57
        bf16_weights=True,  # #57
        softcap=23.0,  # #54
        softcap_offset=5.0,  # #54
        value_embeds=5,  # #63/#65
        ve_layout=".01.....234",  # #70
        ve_init_std=0.01,  # #70
        ve_gate="x_ve",  # #70
        adam_betas=(0.5, 0.95),  # #57
        value_embed_betas=(0.75, 0.95),  # #57
        smear_gate_betas=(0.9, 0.99),  # #57
        head_wd_mul=150.0,  # #55
        value_embed_wd_mul=5.0,  # #55
        attn_lr_mul=1.0,  # #61 (HEAD banks Q, K, V, O as separate matrices)
        qk_head_pairs=True,  # #80
        bigram_vocab=377280,  # #62/#83: 50304 * 15 / 2 rows
        bigram_signs=8192,  # #83
        fp8_mlp=True,  # #84/#89
        sublayer_resid=True,  # #73
        post_lambdas=True,  # #77
        lane_layer=7,  # #77
        mudd=True,  # #81
        mudd_gate=True,  # #85
        attn_gate=False,  # #85: the MUDD gate's on layers 3 and 10 are HEAD's only attention gates
        paired_head_layers=(0, 2, 5, 9),  # #58
        xsa_layers=(1, 3, 4, 7),  # #82/#85
        dc_layers=(10,),  # #85
        uniform_attn_init=True,  # #64/#67
    ),
}
HEAD_LENGTH = ("num_steps", "extension_steps")  # HEAD's run length, which a scaled-down head keeps its preset's
# `--preset=cpu_head`: the head preset's techniques on the cpu preset's 6 layers, 512 tokens and 150 steps.
# HEAD's values that name layers or lengths of its 11-layer, 2048-token model are mapped as the cpu preset
# maps #53's; the others are HEAD's as they are
PRESETS["cpu_head"] = {
    **PRESETS["cpu"],
    **{name: value for name, value in PRESETS["head"].items() if name not in HEAD_LENGTH},
    **dict(
        ve_layout=".01234",  # HEAD .01.....234: none on the first layer, two after it, three on the last three
        lane_layer=3,  # HEAD 7: the backout layer, as in HEAD
        first_seq_len=224,  # HEAD 896 of 2048: the same share of 512
        fp8_mlp=False,  # FP8 only pays on a GPU: off, as the cpu preset's fp8_head
        paired_head_layers=(0, 3),  # HEAD 0,2,5,9: half its short-window attention layers; the cpu's are 0, 1, 3, 4
        xsa_layers=(1, 2, 4),  # HEAD 1,3,4,7: early and middle layers, none of them paired
        dc_layers=(5,),  # HEAD 10: the last layer
    ),  # mudd_gate_layer and mudd_gate_attn: the cpu preset's (HEAD's 4 and 3,10 mapped)
}

# `--all_off`: every technique off at once (plain GPT with AdamW), what `--baseline` meant before issue 24:
# the cpu and cpu-fp32 records named "baseline" (2026-11-22, 2026-12-02) ran it.
ALL_OFF = dict(
    muon=False,
    value_embeds=0,
    smear=False,
    x0_mixing=False,
    skip_from=-1,
    backout_layer=-1,
    attn_gate=False,
    attn_lambdas=False,
    scalar_freeze_steps=0,
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

# `--baseline`: the GPT-2 recipe as llm.c trains GPT-2 small (scripts/run_gpt2_124M.sh, train_gpt2.cu) and
# nanoGPT's model.py builds it, on top of every technique off (the fused Triton loss stays: llm.c fuses its own)
GPT2_HEAD_DIM = 64
GPT2_CONTEXT = 1024
GPT2_SMALL_WIDTH, GPT2_SMALL_LAYERS = 768, 12  # GPT-2 small: 12 layers of width 768 (the speedrun's 11 become 12)
GPT2_MLP_RATIO = 4
LLMC_WARMUP_STEPS, LLMC_STEPS = 700, 18865  # llm.c's GPT-2 small run warms up over 700 of its 18,865 steps
GPT2_RECIPE = {
    **{name: value for name, value in ALL_OFF.items() if name != "triton"},
    **dict(
        context=GPT2_CONTEXT,
        position_embedding=True,
        norm="layernorm",
        embed_norm=False,
        qk_norm=False,
        mlp_activation="gelu",
        bias=True,
        init="gpt2",
        head_dim=GPT2_HEAD_DIM,
        no_attn_layers=(),
        long_window_layers=(),  # every layer sees its whole row: no long and short windows
        attn_scale=GPT2_HEAD_DIM**-0.5,
        extension_steps=0,
        lr_schedule="cosine",
        lr_floor=0.0,  # llm.c -q 0.0: the cosine ends at 0
        adamw_lr=6e-4,
        adamw_betas=(0.9, 0.95),
        adamw_wd=0.1,
        grad_clip=1.0,
        adam_eps=1e-8,
        bf16_tables=False,
    ),
}


def gpt2_baseline(preset):
    """`--baseline` over `preset`: GPT2_RECIPE, with every switch the head preset sets back at its default
    (head's num_steps stays), at the preset's width and token budget: GPT-2's heads of 64 and 4x MLP (GPT-2
    small's 12 layers at its width), one batch size throughout, the mean of the preset's thirds, so its
    num_steps train the preset's tokens, and documents kept whole (max_seq_len = the batch) so the rows
    read the token stream as llm.c's do; the warmup is the same share of the run as llm.c's."""
    defaults = {f.name: f.default for f in fields(Config)}
    values = {**defaults, **PRESETS[preset]}
    d, batch = values["d_model"], sum(values["batch_tokens"]) // len(values["batch_tokens"])
    return {
        **head_switches_off(),
        **GPT2_RECIPE,
        "n_layer": GPT2_SMALL_LAYERS if d == GPT2_SMALL_WIDTH else values["n_layer"],
        "n_head": max(1, d // GPT2_HEAD_DIM),
        "mlp_hidden": GPT2_MLP_RATIO * d,
        "batch_tokens": (batch,) * len(values["batch_tokens"]),
        "max_seq_len": batch,
        "lr_warmup_steps": round(values["num_steps"] * LLMC_WARMUP_STEPS / LLMC_STEPS),
    }


def head_switches_off():
    """Every value the head preset sets, back at its default (its num_steps stays): under --baseline and
    --all_off, HEAD's techniques are off too."""
    return {f.name: f.default for f in fields(Config) if f.name in PRESETS["head"] and f.name != "num_steps"}


RUNGS = {"baseline": gpt2_baseline,  # the flags that set a whole recipe
         "all_off": lambda preset: {**head_switches_off(), **ALL_OFF} if preset == "head" else ALL_OFF}


class ConfigError(ValueError):
    """A bad command line: main prints it as one `error:` line and exits 2, as argparse does."""


# flags that take one of a few words
CHOICES = {
    "device": ("auto", "cuda", "cpu"),
    "cpu_dtype": ("auto", "bf16", "fp32"),
    "gate_attn": ("none", "relu", "sigmoid"),
    "gate_mlp": ("none", "relu", "sigmoid"),
    "perp_grad": ("none", "matrices", "all"),
    "ve_gate": ("none", "x", "x_ve"),
    "norm": ("rmsnorm", "layernorm"),
    "mlp_activation": ("relu2", "gelu"),
    "init": ("record", "gpt2"),
    "lr_schedule": ("stages", "cosine"),
}
# tuples of a fixed length: one value per third of training, or (beta1, beta2); the others list layers
TUPLE_LENGTHS = dict(batch_tokens=3, long_windows=3, lr_mults=3, adam_betas=2, scalar_betas=2, adamw_betas=2,
                     value_embed_betas=2, smear_gate_betas=2, bigram_betas=2, lambda_betas=2)
# what every other number must satisfy (every element, for tuples), as (test, what it expects)
AT_LEAST_ONE = (lambda v: v >= 1, "at least 1")
NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
POSITIVE = (lambda v: v > 0, "above 0")
FRACTION = (lambda v: 0 <= v <= 1, "between 0 and 1")
BOUNDS = {
    **dict.fromkeys(("vocab_size", "vocab_multiple", "n_layer", "d_model", "n_head", "head_dim", "mlp_hidden",
                     "window_block", "long_windows", "extension_window", "final_window", "num_steps",
                     "batch_tokens", "max_seq_len", "accum_world_size", "val_tokens", "val_batch_tokens",
                     "polar_steps", "adam_every", "gate_dims"), AT_LEAST_ONE),
    **dict.fromkeys(("seed", "warmup_steps", "log_every", "extension_steps", "val_every", "momentum_warmup_steps",
                     "momentum_cooldown_steps", "value_embeds", "lr_mults", "muon_lr", "muon_wd", "mlp_down_lr_mul",
                     "adam_lr", "adam_wd", "value_embed_lr_mul", "scalar_lr_mul", "adamw_lr", "adamw_wd",
                     "softcap", "shell_lambda", "save_every", "keep_checkpoints", "first_seq_len", "prefix_loss",
                     "ve_init_std", "attn_lr_mul", "head_wd_mul", "value_embed_wd_mul", "bigram_vocab", "bigram_signs",
                     "bigram_lr_mul", "bigram_wd_mul", "resid_lambda_lr_mul", "context", "lr_warmup_steps", "grad_clip",
                     "mudd_lr_mul", "mudd_gate_lr_mul"), NOT_NEGATIVE),
    **dict.fromkeys(("rope_base", "attn_scale", "adam_eps", "softcap_temp"), POSITIVE),
    **dict.fromkeys(("cooldown_frac", "lr_floor", "muon_momentum", "muon_momentum_start", "muon_beta2",
                     "adam_betas", "scalar_betas", "adamw_betas", "untie_frac", "value_embed_betas",
                     "smear_gate_betas", "bigram_betas", "lambda_betas"), FRACTION),
}
HELP_WIDTH = 36  # column where a flag's description starts in --help


def parse_scalar(kind, text):
    """One value of type `kind`; integers may be written 1e3 but not 2.5, and numbers must be finite."""
    if kind is bool:
        low = text.lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError("expected true/false")
        return low in ("1", "true", "yes", "on")
    if kind is str:
        return text
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    if kind is int:
        if value != int(value):
            raise ValueError("expected an integer")
        return int(value)
    return value


def element_type(default):
    """The type of a tuple field's values: its default's, or int for an empty default (a list of layers)."""
    return type(default[0]) if default else int


def parse_value(name, text, default):
    """Parse `text` to the type of the field's default (a tuple: of its elements); errors name the flag."""
    try:
        if not isinstance(default, tuple):
            return parse_scalar(type(default), text)
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        if name in TUPLE_LENGTHS and len(parts) != TUPLE_LENGTHS[name]:
            raise ValueError(f"expected {TUPLE_LENGTHS[name]} values, got {len(parts)}")
        return tuple(parse_scalar(element_type(default), p) for p in parts)
    except ValueError as e:
        kind = f"comma-separated {element_type(default).__name__}s" if isinstance(default, tuple) else type(default).__name__
        raise ConfigError(f"--{name}={text}: cannot read as {kind} ({e})") from None


def show_value(value):
    """A value as it is written on the command line."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(show_value, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_config(cfg, typed=None):
    """Refuse values that would fail later with a traceback (or silently train nothing). `typed`:
    the flags' text as given on the command line, which an error quotes."""
    typed = typed or {}
    for name, (test, expected) in BOUNDS.items():
        value = getattr(cfg, name)
        if not all(test(v) for v in (value if isinstance(value, tuple) else (value,))):
            shown = typed.get(name, show_value(value))
            raise ConfigError(f"--{name}={shown}: expected {'each value ' if isinstance(value, tuple) else ''}{expected}")
    if cfg.run_id in (".", "..") or os.path.basename(cfg.run_id) != cfg.run_id:
        raise ConfigError(f"--run_id={cfg.run_id}: expected a plain file name (it names the log files in --log_dir)")
    if cfg.resume == "auto" and not (cfg.run_id or cfg.checkpoint_dir):
        raise ConfigError("--resume=auto: expected --run_id (or --checkpoint_dir) too: it looks for the run's checkpoints "
                          "there, and without one every run gets a fresh id and so finds none")
    if cfg.bf16_weights and not cfg.muon:
        raise ConfigError("--bf16_weights=true: expected --muon=true too (the lower halves of the fp32 masters are "
                          "NorMuon's state; AdamW would step the bf16 weights themselves), or --bf16_weights=false")
    check_model_shape(cfg)


def check_model_shape(cfg):
    """Refuse layer indices and widths the model cannot be built with (or would silently ignore)."""
    layers = f"a layer index from 0 to {cfg.n_layer - 1} (--n_layer={cfg.n_layer})"
    for name in ("no_attn_layers", "long_window_layers", "paired_head_layers", "xsa_layers", "dc_layers"):
        value = getattr(cfg, name)
        if not all(0 <= v < cfg.n_layer for v in value) or len(set(value)) != len(value):
            raise ConfigError(f"--{name}={show_value(value)}: expected each value {layers}, each once")
    for name in ("xsa_layers", "dc_layers"):
        if set(getattr(cfg, name)) & set(cfg.no_attn_layers):
            raise ConfigError(f"--{name}={show_value(getattr(cfg, name))}: expected layers with attention "
                              f"(not --no_attn_layers={show_value(cfg.no_attn_layers)})")
    for name in ("skip_from", "backout_layer", "lane_layer"):
        value = getattr(cfg, name)
        if not -1 <= value < cfg.n_layer:
            raise ConfigError(f"--{name}={value}: expected {layers}, or -1 for off")
    if cfg.skip_from >= 0 and not cfg.skip_from < cfg.skip_to < cfg.n_layer:  # skip_to is unused while skip is off
        raise ConfigError(f"--skip_to={cfg.skip_to}: expected a layer after --skip_from={cfg.skip_from} "
                          f"and at most {cfg.n_layer - 1} (--n_layer={cfg.n_layer})")
    if cfg.head_dim % 4:
        raise ConfigError(f"--head_dim={cfg.head_dim}: expected a multiple of 4 (RoPE rotates half of each head in pairs)")
    if cfg.attn_gate and not cfg.head_gate and cfg.gate_dims > cfg.d_model:
        raise ConfigError(f"--gate_dims={cfg.gate_dims}: expected at most --d_model={cfg.d_model} (the gate reads that many channels)")
    if cfg.bigram_vocab == 1:
        raise ConfigError("--bigram_vocab=1: expected 0 (off) or at least 2 (the last row is the first token's, "
                          "the others the hashed pairs')")
    if cfg.value_embeds > cfg.n_layer:
        raise ConfigError(f"--value_embeds={cfg.value_embeds}: expected at most --n_layer={cfg.n_layer} (one table per layer at most)")
    tables = [str(i) for i in range(cfg.value_embeds)]
    if cfg.value_embeds and cfg.ve_layout and (len(cfg.ve_layout) != cfg.n_layer or set(cfg.ve_layout) - {".", *tables}
                                               or not set(tables) <= set(cfg.ve_layout)):
        raise ConfigError(f"--ve_layout={cfg.ve_layout}: expected {cfg.n_layer} characters (--n_layer), each '.' or a table "
                          f"0 to {cfg.value_embeds - 1} (--value_embeds={cfg.value_embeds}), every table used")
    if cfg.ve_gate != "none" and cfg.gate_dims > min(cfg.d_model, cfg.n_head * cfg.head_dim):
        raise ConfigError(f"--gate_dims={cfg.gate_dims}: expected at most the width of x and of a value embedding for --ve_gate={cfg.ve_gate}")
    if cfg.qk_head_pairs and cfg.n_head % 2:
        raise ConfigError(f"--n_head={cfg.n_head}: expected an even number for --qk_head_pairs=true")
    if cfg.position_embedding and not cfg.context:
        raise ConfigError("--position_embedding=true: expected --context above 0 too (the table has a row per position in a row of the batch)")
    if cfg.grad_clip and cfg.muon:
        raise ConfigError(f"--grad_clip={cfg.grad_clip}: expected --muon=false too (the clip is AdamW's), or 0")
    if cfg.fp8_mlp and cfg.mlp_activation != "relu2":
        raise ConfigError(f"--fp8_mlp=true: expected --mlp_activation=relu2 (the FP8 MLP is ReLU^2's), not {cfg.mlp_activation}")
    paired = show_value(cfg.paired_head_layers)
    if set(cfg.paired_head_layers) & set(cfg.no_attn_layers):
        raise ConfigError(f"--paired_head_layers={paired}: expected layers with attention (not in --no_attn_layers="
                          f"{show_value(cfg.no_attn_layers)})")
    if cfg.paired_head_layers and cfg.n_head % 2:
        raise ConfigError(f"--n_head={cfg.n_head}: expected an even number for --paired_head_layers={paired}")
    if cfg.paired_head_layers and cfg.sink_metric:
        raise ConfigError(f"--sink_metric=true: expected --paired_head_layers empty (the metric reads one head's keys "
                          f"per query, a paired layer's queries read two heads'), not {paired}")
    shared = sorted(set(cfg.paired_head_layers) & (set(cfg.xsa_layers) | set(cfg.dc_layers)))
    if shared:
        raise ConfigError(f"--paired_head_layers={paired}: expected no layer that is also in --xsa_layers or --dc_layers "
                          f"(HEAD runs XSA and DC on unpaired layers only), but {show_value(tuple(shared))} is")
    if cfg.paired_head_layers and (cfg.context or cfg.position_embedding):
        raise ConfigError(f"--paired_head_layers={paired}: expected --context=0 and rotary positions (paired heads "
                          "take positions 2t and 2t + 1 within documents)")
    if cfg.ve_gate == "x_ve" and cfg.gate_dims % 2:
        raise ConfigError(f"--gate_dims={cfg.gate_dims}: expected an even number for --ve_gate=x_ve (half from x, half from ve)")
    check_mudd(cfg, layers)


def check_mudd(cfg, layers):
    """#81/#85: what MUDD and its gate read and replace must exist."""
    for name in ("mudd", "mudd_gate"):
        if getattr(cfg, name) and not cfg.sublayer_resid:
            raise ConfigError(f"--{name}=true: expected --sublayer_resid=true (its coefficients join the sublayer form's terms)")
    if cfg.mudd:
        for name in ("skip_from", "backout_layer"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"--{name}=-1: expected {layers} with --mudd=true (its output is a MUDD source)")
        if cfg.n_layer - 1 in cfg.no_attn_layers:
            raise ConfigError(f"--no_attn_layers={show_value(cfg.no_attn_layers)}: expected the last layer to have attention "
                              "with --mudd=true (MUDD adds to its values)")
        if cfg.n_head % 2 or cfg.n_head * cfg.head_dim != cfg.d_model:
            raise ConfigError(f"--n_head={cfg.n_head}: expected an even number of heads of --head_dim={cfg.head_dim} "
                              f"filling --d_model={cfg.d_model} with --mudd=true (streams are mixed into the values, "
                              "a gate per half of the heads)")
    if cfg.mudd_gate:
        if not 0 <= cfg.mudd_gate_layer < cfg.n_layer:
            raise ConfigError(f"--mudd_gate_layer={cfg.mudd_gate_layer}: expected {layers}")
        attn = [i for i in range(cfg.n_layer) if i not in cfg.no_attn_layers]
        if not set(cfg.mudd_gate_attn) <= set(attn) or len(set(cfg.mudd_gate_attn)) != len(cfg.mudd_gate_attn):
            raise ConfigError(f"--mudd_gate_attn={show_value(cfg.mudd_gate_attn)}: expected each value a layer with "
                              f"attention ({show_value(attn)}), each once")
        if cfg.skip_x0_gate:
            raise ConfigError("--skip_x0_gate=true: expected false with --mudd_gate=true (the MUDD gate scales the skip)")


def config_docs():
    """[(group, [(field, description)])] in Config's order, read from its comments: one source of truth."""
    groups = []
    for line in inspect.getsource(Config).splitlines():
        group = re.fullmatch(r"    # (.*)", line)
        field = re.fullmatch(r"    (\w+): \w+ = .*?  # (.*)", line)
        if group:
            groups.append((group[1], []))
        elif field:
            groups[-1][1].append((field[1], field[2]))
    return groups


def help_text(cfg, rung):
    """--help: usage, the presets, --baseline and --all_off, then every flag with its value in `cfg` (`rung`:
    the name of the one of those two given, or empty)."""
    def changes(values):
        return textwrap.fill(" ".join(f"{k}={show_value(v)}" for k, v in values.items()) or "(the defaults)",
                             width=100, initial_indent="    ", subsequent_indent="    ")

    lines = [
        "usage: python train_gpt.py [--preset=NAME] [--baseline | --all_off] [--name=value ...]",
        "       torchrun --standalone --nproc_per_node=N train_gpt.py [...]",
        "",
        __doc__.split("\n")[0],
        "Later flags win; --preset, then --baseline or --all_off apply first, whatever their position.",
        "",
        "presets:",
        *[f"  --preset={name}\n{changes(values)}" for name, values in PRESETS.items()],
        f"  --baseline: the llm.c / nanoGPT GPT-2 recipe at the preset's width and token budget (here over --preset={cfg.preset})\n"
        + changes(gpt2_baseline(cfg.preset)),
        "  --all_off: every technique off (plain GPT with AdamW; --baseline before issue 24), on top of the preset\n" + changes(ALL_OFF),
        "",
        f"flags, with their values under --preset={cfg.preset}{' --' + rung if rung else ''}:",
    ]
    for group, docs in config_docs():
        lines += ["", f"{group}:"]
        for name, description in docs:
            flag = f"  --{name}={show_value(getattr(cfg, name))}"
            lines.append(f"{flag:<{HELP_WIDTH}}{description}" if len(flag) < HELP_WIDTH else f"{flag}\n{'':<{HELP_WIDTH}}{description}")
    return "\n".join(lines)


def parse_args(argv):
    """Build the Config from `--preset=`, `--baseline` or `--all_off`, and `--name=value` overrides (in that order).

    Bad flags and values raise ConfigError; `--help` prints the help and exits 0."""
    defaults = {f.name: f.default for f in fields(Config)}
    preset, rungs, overrides, typed, wants_help = "speedrun", {}, {}, {}, False
    for arg in argv:
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --name=value (see --help)")
        name, eq, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name in RUNGS:
            rungs[name] = parse_value(name, text, True) if eq else True
            continue
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults) + list(RUNGS), n=1)
            hint = f"; did you mean --{close[0]}?" if close else "; see --help"
            raise ConfigError(f"unknown flag --{name}{hint}")
        if not eq:
            raise ConfigError(f"--{name} needs a value: --{name}=VALUE")
        if name == "preset":
            if text not in PRESETS:
                raise ConfigError(f"--preset={text}: expected one of {', '.join(PRESETS)}")
            preset = text
        else:
            overrides[name] = parse_value(name, text, defaults[name])
            typed[name] = text
            if name in CHOICES and overrides[name] not in CHOICES[name]:
                raise ConfigError(f"--{name}={text}: expected one of {', '.join(CHOICES[name])}")
    chosen = [name for name, on in rungs.items() if on]
    if len(chosen) > 1:
        raise ConfigError("--baseline and --all_off: expected one of them (each sets a whole recipe)")
    rung = chosen[0] if chosen else ""
    cfg = Config(**{**PRESETS[preset], **(RUNGS[rung](preset) if rung else {}), **overrides, "preset": preset})
    if wants_help:
        try:
            print(help_text(cfg, rung), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader took what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    check_config(cfg, typed)
    return cfg

# ------------------------------------------------------------------------------------------------
# Backend: the one place where CUDA and CPU differ (device, distributed, attention, kernels)
# ------------------------------------------------------------------------------------------------


FLEX_BLOCK = 128  # flex_attention's sparse block: the mask is built per 128 x 128 tile of (query, key)
CPU_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class FlexAttention:
    """Document-causal sliding-window attention with flex_attention and a block mask (CUDA).

    A window of `window` tokens means FlashAttention 3's window_size=(window, 0), as the record
    runs it: a query sees itself and the `window` keys before it in its document, window + 1 keys
    at most. Key k is visible from query q iff both lie in one document and 0 <= q - k <= window.
    `row` > 0 says the documents are rows of that many tokens (--context), as BlockedAttention takes it.
    """

    def __init__(self, row=0):
        self.row = row

    def mask(self, docs, window):
        """The BlockMask for documents `docs` [T] (non-decreasing ids) and a window of `window` tokens.

        Built from each block's first and last document id, O((T / 128)^2), instead of evaluating
        the mask at all T^2 (query, key) pairs as create_block_mask does. Tiles where every pair
        attends skip the mask; partial tiles evaluate the exact per-token test in `allowed`.
        """
        from torch.nn.attention.flex_attention import BlockMask

        row = self.row

        def allowed(b, h, q_idx, kv_idx):
            # rows are told apart by position, reading no tensor: inductor's CPU flex template cannot
            # take one made in the graph (docs = position // row) that no other op has stored
            same = (q_idx // row == kv_idx // row) if row else (docs[q_idx] == docs[kv_idx])
            return same & (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

        n, b = docs.numel(), FLEX_BLOCK
        starts = torch.arange(0, n, b, device=docs.device)
        first_doc = docs[starts]
        last_doc = docs[(starts + b - 1).clamp(max=n - 1)]
        whole = starts + b <= n  # a tile with padding is never full
        ids = torch.arange(starts.numel(), device=docs.device)
        qb, kb = ids[:, None], ids  # query block, key block
        # key block kb < qb: its closest pair (last key, first query) is (qb - kb - 1) * b + 1 apart
        # and shares a document only if that key's and that query's documents are the same one
        near = ((qb - kb - 1) * b + 1 <= window) & (last_doc[kb] == first_doc[qb])
        some = (kb == qb) | ((kb < qb) & near)
        # ... and every pair attends when one document spans both tiles and the farthest pair fits
        far = (qb - kb + 1) * b - 1 <= window
        full = (kb < qb) & far & (first_doc[kb] == last_doc[qb]) & whole[qb] & whole[kb]
        partial = some & ~full

        def sparse(dense):  # counts and indices (those present first, ascending) per query block
            counts = dense.sum(-1, dtype=torch.int32)
            order = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
            return counts[None, None], order.to(torch.int32)[None, None]

        return BlockMask.from_kv_blocks(*sparse(partial), *sparse(full), BLOCK_SIZE=b, mask_mod=allowed, seq_lengths=(n, n))

    def __call__(self, q, k, v, mask, scale, need_lse):
        """q, k, v [T, H, D] -> y [T, H, D] and, when asked, the log-sum-exp [T, H] of the scores."""
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention

        # [1, H, T, D] laid out as such: under compile the copy fuses into the op that makes each
        # tensor, and inductor's CPU flex template cannot take a permuted view
        q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
        if not need_lse:
            return flex_attention(q, k, v, block_mask=mask, scale=scale)[0].transpose(0, 1), None
        y, aux = flex_attention(q, k, v, block_mask=mask, scale=scale, return_aux=AuxRequest(lse=True))
        return y[0].transpose(0, 1), aux.lse[0].transpose(0, 1)


class KeyBlocks(NamedTuple):
    """BlockedAttention's mask: the keys each block of queries sees, and whether that is plain causal rows."""

    allowed: torch.Tensor  # [blocks, block, span + block]: query i of a block sees key j of the block's keys
    span: int  # keys kept before each query block
    row: int  # > 0: the mask is exactly causal attention within rows of this many tokens (llm.c's); else 0


class BlockedAttention:
    """The same attention (and window) on CPU without a dense T x T mask: each block of `block`
    queries sees only its own block and the `window` tokens before it, so memory grows with T * window.

    Without the log-sum-exp it runs the CPU's fused attention kernel (SDPA): one causal call over
    whole rows where the mask is just that, else one call per query block with its boolean mask. The
    log-sum-exp (a slot, the sink metric) comes from explicit fp32 scores, which a slot's gradient
    flows through. `row` > 0 says the documents are rows of that many tokens (the model's --context:
    document id = position // row), which the mask takes on trust: checking the ids would read them
    on the host in every step."""

    def __init__(self, block, row=0):
        self.block, self.row = block, row

    def mask(self, docs, window):
        n, b = docs.numel(), self.block
        blocks = -(-n // b)
        span = -(-window // b) * b  # keys kept before each query block: a block's first query reaches `window` back
        pad_q = blocks * b - n
        # padding before the sequence belongs to no document; padding after it only sees itself
        key_docs = torch.cat([docs.new_full((span,), -1), docs, docs.new_full((pad_q,), -2)])
        key_pos = torch.arange(-span, blocks * b, device=docs.device)
        q_docs = key_docs[span:].view(blocks, b)
        q_pos = key_pos[span:].view(blocks, b)
        k_docs = key_docs.unfold(0, span + b, b)
        k_pos = key_pos.unfold(0, span + b, b)
        delta = q_pos[:, :, None] - k_pos[:, None, :]
        allowed = (q_docs[:, :, None] == k_docs[:, None, :]) & (delta >= 0) & (delta <= window)
        rows = self.row and n % self.row == 0 and window >= self.row - 1  # every key of a query's row is in its window
        return KeyBlocks(allowed, span, self.row if rows else 0)

    @staticmethod
    def key_blocks(t, span, blocks, b):
        """Keys or values t [n, H, D] as the overlapping blocks [blocks, span + b, H, D] each query block
        sees. Gathered by index, not by unfold: inductor's CPU backward of an overlapping unfold gives
        wrong gradients (torch 2.13: off by more than the gradient itself; tests/test_model.py)."""
        rows = torch.arange(blocks, device=t.device)[:, None] * b + torch.arange(span + b, device=t.device)
        return F.pad(t, (0, 0, 0, 0, span, blocks * b - t.size(0)))[rows]

    @staticmethod
    def query_blocks(q, blocks, b):
        """Queries q [n, H, D] as blocks [blocks, H, b, D], padded at the end."""
        return F.pad(q, (0, 0, 0, 0, 0, blocks * b - q.size(0))).view(blocks, b, *q.shape[1:]).transpose(1, 2)

    @staticmethod
    def scores(q, k, mask, scale):
        """Masked attention logits per block [blocks, H, block, span + block], fp32."""
        blocks, b, _ = mask.allowed.shape
        k_blocks = BlockedAttention.key_blocks(k, mask.span, blocks, b).permute(0, 2, 3, 1)
        s = (BlockedAttention.query_blocks(q, blocks, b) @ k_blocks).float() * scale
        return s.masked_fill(~mask.allowed[:, None], float("-inf"))

    def __call__(self, q, k, v, mask, scale, need_lse):
        n = q.size(0)
        if not need_lse and mask.row:  # [rows, H, L, D] views, no copy of the keys
            rows = [t.reshape(n // mask.row, mask.row, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]
            y = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scale)
            return y.transpose(1, 2).reshape(q.shape), None
        blocks, b, _ = mask.allowed.shape
        v_blocks = self.key_blocks(v, mask.span, blocks, b).transpose(1, 2)
        if not need_lse:
            k_blocks = self.key_blocks(k, mask.span, blocks, b).transpose(1, 2)
            y = F.scaled_dot_product_attention(self.query_blocks(q, blocks, b), k_blocks, v_blocks,
                                               attn_mask=mask.allowed[:, None], scale=scale)
            return y.transpose(1, 2).reshape(blocks * b, *v.shape[1:])[:n], None
        s = self.scores(q, k, mask, scale)
        lse = s.logsumexp(-1)
        p = (s - lse[..., None]).exp().to(v.dtype)
        y = (p @ v_blocks).transpose(1, 2).reshape(blocks * b, *v.shape[1:])[:n]
        return y, lse.transpose(1, 2).reshape(blocks * b, -1)[:n]


@dataclass
class Backend:
    """Device, ranks, attention implementation and fused-op table, chosen once at start."""

    device: torch.device
    rank: int
    world_size: int
    ops: type
    attention: object
    # the model's matmul dtype; the default is read when a Backend is made (tests may patch it)
    compute_dtype: torch.dtype = dataclasses.field(default_factory=lambda: COMPUTE_DTYPE)
    # the dtype the head, the embedding tables and the gates are stored in (and so their optimizer
    # state): bf16 on CUDA, as the record keeps them; None keeps them as made (float32, the CPU's)
    table_dtype: torch.dtype | None = None
    notes: tuple = ()  # what fall_back turned off on this device, as log lines

    @property
    def is_master(self):
        return self.rank == 0

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def loss_on_host(self):
        """Whether reading a loss costs nothing (the CPU); on a GPU it would stall the stream."""
        return self.device.type == "cpu"

    def records_track(self, preset):
        """The records track a run of `preset` belongs to: the preset's own, or on a CPU that computes
        in float32 (no native bf16) `<preset>-fp32`, whose times do not compare with bf16 hosts'."""
        return preset if self.compute_dtype == torch.bfloat16 else f"{preset}-fp32"

    def peak_memory_mib(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() // 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def scaled_mm_fp32(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
    """torch._scaled_mm's result from an fp32 matmul of the fp8 operands: fp8 values and their pairwise
    products are exact in fp32, so only the order of the sums differs. For the CPU, whose _scaled_mm
    is a scalar loop (~0.1 GFLOP/s in torch 2.13, some 1000x below its fp32 matmul)."""
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


# the FP8 matmul by device type: torch._scaled_mm where the hardware multiplies fp8 (CUDA), else a twin
SCALED_MM = dict(cpu=scaled_mm_fp32)


def scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
    return SCALED_MM.get(a.device.type, torch._scaled_mm)(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                                          use_fast_accum=use_fast_accum)


FP8_CAPABILITY = (8, 9)  # torch._scaled_mm's FP8 needs sm_89 (Ada) or newer: Hopper, Blackwell
FP8_SWITCHES = ("fp8_head", "fp8_mlp")  # the switches that run matmuls in FP8


def fp8_unsupported(device):
    """Why `device` cannot run the FP8 matmuls, as a phrase, or None (the CPU runs their exact twin)."""
    if device.type != "cuda":
        return None
    if torch.version.hip:
        return "ROCm's FP8 types (e4m3fnuz, e5m2fnuz) are not the e4m3fn and e5m2 this path casts to"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_CAPABILITY:
        return f"sm_{major}{minor} has no FP8 matmul (sm_{FP8_CAPABILITY[0]}{FP8_CAPABILITY[1]} or newer has)"
    return None


ROCM_LDS_BYTES = 65536  # an MI300X's (CDNA3) local data share per workgroup, where Triton keeps its tiles


def fall_back(cfg, device):
    """Turn off the switches `device` cannot run; a line for each, for the log."""
    reason, notes = fp8_unsupported(device), []
    for name in FP8_SWITCHES:
        if getattr(cfg, name) and reason:
            setattr(cfg, name, False)
            notes.append(f"--{name}=false here: {reason}; that matmul runs in the compute dtype (the numbers differ slightly)")
    if device.type == "cuda" and torch.version.hip and cfg.triton:
        cfg.triton = False
        tiles = 2 * (MM_BLOCK_M + MM_BLOCK_N) * MM_BLOCK_K  # bytes of one pipeline stage of linear_relu2's bf16 tiles
        notes.append(f"--triton=false here: ROCm; the Triton kernels' launch configs are sized for NVIDIA shared memory "
                     f"(linear_relu2 keeps {MM_STAGES} stages of {tiles:,} bytes of tiles, an MI300X has "
                     f"{ROCM_LDS_BYTES:,} per workgroup) and untested on AMD GPUs; their torch twins run instead (the same math, "
                     "rounded as torch rounds)")
    return notes


def cpu_compute_dtype(choice):
    """The CPU's matmul dtype for --cpu_dtype: with `auto`, bf16 only where the CPU multiplies it
    natively (AVX512-BF16 or AMX: ~4x fp32); AVX2-only CPUs emulate bf16, 5x or more slower than fp32.
    Read from the CPU's features, not timed, so every rank and every run on a host agrees."""
    if choice == "auto":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        choice = "bf16" if native else "fp32"
    return CPU_DTYPES[choice]


@functools.cache
def compiled_torch_ops():
    """TorchOps with the loss's blocks of rows compiled by inductor (a CPU with --compile_elementwise):
    fused, a block takes two passes over the vocabulary instead of a dozen, ~3x faster on a CPU."""

    class CompiledTorchOps(TorchOps):
        name = "torch, compiled loss"
        loss_rows = staticmethod(torch.compile(loss_rows, dynamic=False, fullgraph=True))

    return CompiledTorchOps


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() parameters (malloc.h)
KEEP_FREED_BYTES = 2**31 - 1  # the heap keeps up to this much freed memory (the most mallopt takes)


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the OS. A CPU step
    allocates and frees the same large tensors (logits, gradients: GBs per step); by default each
    one above 32 MB is a fresh mmap whose every 4 KiB page faults on first touch, a fifth of a `cpu`
    step's time. Returns whether it took (False where the C library is not glibc)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def attempt_store(world_size):
    """The store the ranks meet on (MASTER_ADDR:MASTER_PORT), its keys scoped to this torchrun attempt.
    torchrun keeps one store through all the attempts of --max-restarts (torch 2.13, static and c10d
    rendezvous alike) and no longer scopes the workers' keys by attempt: a restarted rank could read
    the gloo address a rank of the killed attempt left there and fail to connect (connection refused).
    The local ranks restart together and share TORCHELASTIC_RESTART_COUNT (0 outside torchrun); on
    several nodes each node's agent counts its own restarts (torch issue 108158), so there the keys
    stay as torchrun leaves them."""
    store, _, _ = next(dist.rendezvous("env://"))
    if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size:
        return store
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def device_ops(cfg, cuda):
    """(ops, attention, compute dtype, tables' storage dtype) of a run on CUDA, or on the CPU."""
    if cuda:
        ops = TritonOps if cfg.triton and triton is not None else TorchOps
    else:
        ops = compiled_torch_ops() if cfg.compile_elementwise else TorchOps
    attention = FlexAttention(cfg.context) if cuda else BlockedAttention(cfg.window_block, cfg.context)
    compute_dtype = COMPUTE_DTYPE if cuda else cpu_compute_dtype(cfg.cpu_dtype)
    table_dtype = COMPUTE_DTYPE if cuda and cfg.bf16_tables else None
    return ops, attention, compute_dtype, table_dtype


def setup_backend(cfg):
    """Pick the device, turn off what it cannot run, start the process group (NCCL on CUDA, gloo on
    CPU), the attention, the ops, the matmul dtype and the tables' storage dtype."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    notes = tuple(fall_back(cfg, device))  # before the ops are chosen: it may turn --triton off
    if world_size > 1:
        # torch._dynamo (which the optimizers and torch.compile import) imports torch.distributed
        # modules whose functions default to group=WORLD, a value taken at import: imported after
        # the group exists, they would keep it alive past destroy_process_group, and gloo's worker
        # threads, still running at interpreter exit, abort the process ("terminate called without
        # an active exception") when they drop the last work's tensors then
        from torch import _dynamo  # noqa: F401

        dist.init_process_group("nccl" if use_cuda else "gloo", store=attempt_store(world_size), rank=rank,
                                world_size=world_size, device_id=device if use_cuda else None)
    return Backend(device, rank, world_size, *device_ops(cfg, use_cuda), notes)


def meta_backend(cfg, world_size=1):
    """The backend of --dry_run and of the memory estimate: the meta device (shapes, no memory), rank 0
    of `world_size` and no process group; the ops, attention and dtypes of a run on CUDA, or on the CPU
    with --device=cpu. The model and its optimizer groups build as on any device."""
    return Backend(torch.device("meta"), 0, world_size, *device_ops(cfg, cfg.device != "cpu"))


# ------------------------------------------------------------------------------------------------
# Kernels: fused Triton kernels for CUDA and their plain torch twins (the CPU path and reference)
# ------------------------------------------------------------------------------------------------


def softcap(z, cap, temp, offset=0.0):
    """cap * sigmoid((z + offset) / temp): logits squashed into (0, cap); cap 0 leaves them as they are.
    A positive offset (#54) starts the logits above cap / 2, where the cap is asymmetric."""
    return cap * torch.sigmoid((z + offset) / temp) if cap > 0 else z


def predicted_logits(z, cfg):
    """fp32 logits whose softmax is the model's next-token distribution: the head outputs z through
    the softcap, and under StableMax their log s (StableMax(l) = softmax(log s(l)))."""
    l = softcap(z.float(), cfg.softcap, cfg.softcap_temp, cfg.softcap_offset)
    return log_stable(l) if cfg.stablemax else l


def log_stable(x):
    """log s(x) for StableMax, s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0): sign(x) * log1p(|x|),
    one branch-free expression (no where() whose unused side could be inf), finite for any x."""
    return torch.sign(x) * torch.log1p(x.abs())


CE_ROWS = 32  # rows of logits the CPU loss handles at once: a few MB of fp32, cache-sized
NO_PREFIX = -1  # #88 prefix target of a row whose next token has no proper prefix token: no term (the ops test >= 0)


def loss_rows(z, coef, picks, cap, temp, offset, stablemax, grad_out):
    """The loss of a block of rows of logits z [rows, V] and the rows' plain next-token loss, with the
    gradient of the loss written into grad_out (None: no gradient): loss_i = sum_k coef_ik (lse_i -
    a_i[picks_ik]) and next_i = lse_i - a_i[picks_i0], a the softcapped logits (log s of them with
    StableMax)."""
    l = softcap(z.float(), cap, temp, offset)
    a = log_stable(l) if stablemax else l
    lse = torch.logsumexp(a, dim=-1, keepdim=True)
    ce = lse - a.gather(1, picks)
    loss = (ce * coef).sum(dim=1)
    if grad_out is not None:
        g = (a - lse).exp_().mul_(coef.sum(dim=1, keepdim=True)).scatter_add_(1, picks, -coef)
        if stablemax:
            g.div_(1 + l.abs())
        if cap > 0:
            s = l / cap
            g.mul_(s * (1 - s)).mul_(cap / temp)
        grad_out.copy_(g)
    return loss, ce[:, 0]


class _SoftcapMTPLoss(torch.autograd.Function):
    """The torch twin of the fused loss kernel: a block of rows at a time (`rows_fn`, loss_rows or
    its compiled form), it computes the loss and its gradient together, so no fp32 copy of all the
    logits is ever held. Returns (loss, next): next, the rows' plain next-token loss for the log, is
    a by-product of the same pass and has no gradient.

    With `stablemax`, StableMax replaces softmax. StableMax_i = s(l_i) / sum_j s(l_j) is the softmax
    of a = log s(l), so the same loss runs on a, and the chain rule adds da/dl = 1 / (1 + |l|).
    s grows linearly, not exponentially, so a is at most log(1 + |l|) and nothing can overflow.
    """

    @staticmethod
    def forward(ctx, logits, targets, weights, cap, temp, offset, stablemax, prefix_targets, prefix_weight, rows_fn):
        n, k = targets.numel(), weights.numel()
        # the k-th target of row i is targets[i + k]; rows past the end get weight 0
        ahead = torch.arange(n, device=logits.device)[:, None] + torch.arange(k, device=logits.device)
        coef = (weights * (ahead < n)).float()
        picks = targets[ahead.clamp(max=n - 1)]
        if prefix_targets is not None:  # #88: one more target per row, weight 0 where it is NO_PREFIX
            has = prefix_targets >= 0
            picks = torch.cat([picks, torch.where(has, prefix_targets, 0)[:, None]], dim=1)
            coef = torch.cat([coef, (prefix_weight * has).float()[:, None]], dim=1)
        loss, next_token = torch.empty(n, device=logits.device), torch.empty(n, device=logits.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if want_grad else None
        # a compiled graph would unroll the loop; inductor fuses the whole pass anyway
        block = n if torch.compiler.is_compiling() else CE_ROWS
        for lo in range(0, n, block):
            rows = slice(lo, lo + block)
            loss[rows], next_token[rows] = rows_fn(logits[rows], coef[rows], picks[rows], cap, temp, offset, stablemax,
                                                   grad[rows] if want_grad else None)
        if want_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(next_token)
        return loss, next_token

    @staticmethod
    def backward(ctx, grad_loss, _):
        (grad,) = ctx.saved_tensors
        # in place: a new [N, V] tensor would cost half as much again (a second backward through the
        # same graph then fails autograd's check that saved tensors are unchanged, as it should)
        return grad.mul_(grad_loss[:, None].to(grad.dtype)), *[None] * 9


def loss_outputs(losses, next_token):
    """A loss op's answer: its (loss, plain next-token loss) pair where the caller asked for both
    (the train line shows the second), else the loss alone."""
    return losses if next_token else losses[0]


def relu2(h):
    """relu(h)^2 in h's dtype (under CUDA autocast square() becomes pow(), which runs in fp32)."""
    return F.relu(h).square().to(h.dtype)


class TorchOps:
    """Plain torch versions of every fused op; the reference the Triton kernels are tested against."""

    name = "torch"
    loss_rows = staticmethod(loss_rows)  # the loss's block of rows, eager (see compiled_torch_ops)

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
        """relu(x @ w^T)^2, the MLP up projection and its activation, in x's dtype as the kernel's."""
        return relu2(F.linear(x, w))

    @classmethod
    def softcap_mtp_ce(cls, logits, targets, weights, cap, temp, offset=0.0, prefix_targets=None, prefix_weight=None,
                       next_token=False):
        """Per-token multi-token cross-entropy of softcapped logits.

        logits [N, V] (raw z), targets [N] (next tokens), weights [K] (a tensor, so changing
        values never recompile); loss_i = sum_k w_k (lse_i - l_i[t_{i+k}]) over the k with
        i + k < N, where l = cap * sigmoid((z + offset) / temp) (l = z when cap is 0).
        With prefix_targets [N] (#88), each row adds prefix_weight (a [1] tensor) * (lse_i - l_i[p_i])
        on the same softcapped logits and logsumexp, except where p_i is NO_PREFIX.
        With next_token, returns (loss, next) where next_i = lse_i - l_i[t_i], the plain next-token
        loss whatever the weights, from the same pass and without a gradient.
        """
        return loss_outputs(_SoftcapMTPLoss.apply(logits, targets, weights, cap, temp, offset, False, prefix_targets,
                                                  prefix_weight, cls.loss_rows), next_token)

    @staticmethod
    def composed_attention(q, k, v, w1, mask, scale):
        """#85 DC's read: out_h[t] = sum_g w1[t, g] sum_j P_g[t, j] v_h[j] for q, k, v [T, H, D] and
        w1 [T, H], P_g head g's softmax over the keys `mask` allows (a BlockedAttention mask), from
        fp32 scores as HEAD's kernel has them; [T, H, D] in v's dtype. HEAD fuses it in a Triton
        kernel (dc_triton_kernels.py); this torch form runs on every device (compiled on the GPU)."""
        blocks, b, _ = mask.allowed.shape
        n, h, dh = v.shape
        with torch.autocast(q.device.type, enabled=False):
            p = BlockedAttention.scores(q.float(), k.float(), mask, scale).softmax(-1)  # [blocks, H, b, keys]
            w = F.pad(w1.float(), (0, 0, 0, blocks * b - n)).view(blocks, b, h).transpose(1, 2)
            mixed = (p * w[..., None]).sum(1)  # [blocks, b, keys]: the heads' attention, mixed per query
        values = BlockedAttention.key_blocks(v, mask.span, blocks, b).flatten(2)  # [blocks, keys, H * D]
        return (mixed.to(v.dtype) @ values).view(blocks * b, h, dh)[:n]

    @classmethod
    def stablemax_mtp_ce(cls, logits, targets, weights, cap, temp, offset=0.0, prefix_targets=None, prefix_weight=None,
                         next_token=False):
        """softcap_mtp_ce with LogStableMax in place of log-softmax: loss_i = sum_k w_k
        (log sum_j s(l_ij) - log s(l_i[t_{i+k}])), next_i its k = 0 term unweighted. No Triton
        kernel: torch on every device."""
        return loss_outputs(_SoftcapMTPLoss.apply(logits, targets, weights, cap, temp, offset, True, prefix_targets,
                                                  prefix_weight, cls.loss_rows), next_token)


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

# FP8 lm_head scales (the record's): a tensor is divided by its scale before the cast, so the
# largest magnitude that survives is scale * 448 for e4m3 and scale * 57344 for e5m2.
FP8_X_SCALE = 100 / 448  # entries up to 100: an RMS-normed row of width 768 has none above sqrt(768)
FP8_W_SCALE = 1.5 / 448  # |w| up to 1.5, 300 init stds of 0.005
# the loss is summed over tokens, so |dloss/dz| <= sum(w_k) * (softcap slope <= 1) <= 1.75 per entry,
# far below the 96 that fits; typical entries ~1/vocab stay well above e5m2's smallest normal
FP8_GRAD_SCALE = 0.75 / 448


E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_MIN_AMAX = 1e-12  # an all-zero tensor (the down projection at init) still gets a finite scale
# #84/#89 FP8 MLP: the down projection's scales are delayed (set once per step from the step before)
FP8_MLP_ACT_HEADROOM = 1.8  # the ReLU^2 output's scale covers 1.8x the previous step's largest value
FP8_MLP_DOWN_HEADROOM = 1.12  # the down weight's scale covers 1.12x the previous step's largest |w|
FP8_MLP_EXACT_STEPS = 16  # through this step the down weight is scaled by its own amax, not the previous step's


def _to_fp8(t, scale, dtype):
    """t / scale as `dtype`, saturating: out-of-range values would otherwise become NaN or inf."""
    limit = torch.finfo(dtype).max
    return (t / scale).clamp(-limit, limit).to(dtype)


def fp8_amax(t):
    """t's largest magnitude as a float32 scalar, at least FP8_MIN_AMAX."""
    return t.detach().abs().amax().float().clamp(min=FP8_MIN_AMAX)


def amax_scale(t):
    """The scale that maps t's largest magnitude onto e4m3's largest (scaling by the tensor as it is now)."""
    return fp8_amax(t) / E4M3_MAX


def scale_tensor(scale, device):
    """A scale as the float32 tensor _scaled_mm takes; torch.full fills on the device, where
    torch.tensor would copy from the host and wait for it."""
    return scale.float() if torch.is_tensor(scale) else torch.full((), scale, dtype=torch.float32, device=device)


class _FP8Linear(torch.autograd.Function):
    """x @ w^T with both operands cast to e4m3 (torch._scaled_mm on CUDA). The backward casts the
    output gradient to e5m2 (the head's), or with grad_scale None runs in the inputs' dtype on the
    unquantized inputs, the FP8 forward's rounding passed straight through (the MLP's, #84)."""

    @staticmethod
    def forward(ctx, x, w, x_scale, w_scale, grad_scale):
        shape = x.shape
        x_f8 = _to_fp8(x.reshape(-1, shape[-1]), x_scale, torch.float8_e4m3fn)
        w_f8 = _to_fp8(w, w_scale, torch.float8_e4m3fn)
        xs, ws = scale_tensor(x_scale, x.device), scale_tensor(w_scale, x.device)
        # _scaled_mm wants its first operand row-major and its second column-major: w_f8.T is.
        out = scaled_mm(x_f8, w_f8.T, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True)
        ctx.save_for_backward(*((x_f8, w_f8, xs, ws) if grad_scale is not None else (x, w)))
        ctx.grad_scale, ctx.shape, ctx.dtypes = grad_scale, shape, (x.dtype, w.dtype)
        return out.reshape(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        grad_x, grad_w = (_FP8Linear.fp8_grads if ctx.grad_scale is not None else _FP8Linear.plain_grads)(ctx, grad)
        return grad_x.reshape(ctx.shape).to(ctx.dtypes[0]), grad_w.to(ctx.dtypes[1]), None, None, None

    @staticmethod
    def fp8_grads(ctx, grad):
        x_f8, w_f8, xs, ws = ctx.saved_tensors
        gs = scale_tensor(ctx.grad_scale, grad.device)
        g_f8 = _to_fp8(grad.reshape(-1, grad.shape[-1]), ctx.grad_scale, torch.float8_e5m2)
        # .T.contiguous().T gives the same matrix stored column-major, as the second operand must be
        grad_x = scaled_mm(g_f8, w_f8.T.contiguous().T, scale_a=gs, scale_b=ws, out_dtype=torch.bfloat16)
        # x^T @ g, then transposed: for the head's [vocab x d] weight the product [d x vocab] is the
        # faster shape on the GPU (the record's choice). fp32, so an fp32 weight gets an unrounded gradient
        grad_w = scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, scale_a=xs, scale_b=gs, out_dtype=torch.float32).T
        return grad_x, grad_w

    @staticmethod
    def plain_grads(ctx, grad):
        x, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        return g @ w.to(g.dtype), g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)


def fp8_linear(x, w, x_scale=FP8_X_SCALE, w_scale=FP8_W_SCALE, grad_scale=FP8_GRAD_SCALE):
    """x @ w^T in FP8 (bf16 output): half the bytes and twice the tensor-core rate of bf16. The
    defaults are the lm_head's; scales may be float32 tensors (computed on the device)."""
    return _FP8Linear.apply(x, w, x_scale, w_scale, grad_scale)


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, FP32: tl.constexpr):
        """acc + a @ b; FP32 upcasts the operands first, for the interpreter (its bf16 dot is wrong)."""
        if FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _tile_product(a_ptr, s_ar, s_ak, b_ptr, s_bc, s_bk, rows, cols, n_rows, n_cols, K,
                      BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
        """fp32 tile sum_k a[rows, k] * b[cols, k]: a [.., K] and b [.., K] are both read row-major."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            a = tl.load(a_ptr + rows[:, None] * s_ar + k[None, :] * s_ak, mask=(rows[:, None] < n_rows) & (k[None, :] < K), other=0.0)
            bt = tl.load(b_ptr + k[:, None] * s_bk + cols[None, :] * s_bc, mask=(k[:, None] < K) & (cols[None, :] < n_cols), other=0.0)
            acc = _dot(a, bt, acc, DOT_FP32)
        return acc

    @triton.jit
    def _sym_mm_kernel(a_ptr, out_ptr, m, n, s_ab, s_am, s_an, s_ob, s_om, s_on, alpha, beta,
                       AXPBY: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
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
        acc = _tile_product(a_ptr, s_am, s_an, a_ptr, s_am, s_an, rows, cols, m, m, n, BLOCK_K, DOT_FP32)
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
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                             DOT_FP32: tl.constexpr):
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
        acc = _tile_product(x_ptr, s_xm, s_xk, w_ptr, s_wn, s_wk, rows, cols, M, N, K, BLOCK_K, DOT_FP32)
        acc = tl.maximum(acc, 0.0)
        out = (acc * acc).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * s_om + cols[None, :] * s_on, out, mask=(rows[:, None] < M) & (cols[None, :] < N))

    @triton.jit
    def _softcap(z, cap, inv_temp, offset, SOFTCAP: tl.constexpr):
        """cap * sigmoid((z + offset) / temp) in fp32, or z itself when the softcap is off."""
        if SOFTCAP:
            return cap * tl.sigmoid((z + offset) * inv_temp)
        return z

    @triton.jit
    def _mtp_target(t_ptr, w_ptr, row, k: tl.constexpr, n_rows):
        """Target t_{row+k} and its weight w_k; weight 0 (and target 0) past the end of the batch."""
        valid = row + k < n_rows
        target = tl.load(t_ptr + row + k, mask=valid, other=0)
        return target, tl.where(valid, tl.load(w_ptr + k), 0.0)

    @triton.jit
    def _prefix_target(p_ptr, pw_ptr, row):
        """#88: the row's prefix target and its weight; weight 0 (and target 0) where it is NO_PREFIX."""
        target = tl.load(p_ptr + row)
        valid = target >= 0
        return tl.where(valid, target, 0), tl.where(valid, tl.load(pw_ptr), 0.0)

    @triton.jit
    def _softcap_ce_fwd_kernel(z_ptr, t_ptr, w_ptr, p_ptr, pw_ptr, loss_ptr, next_ptr, lse_ptr, n_rows, vocab, s_z, cap,
                               inv_temp, offset, NUM_WEIGHTS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """Loss of one row: an online logsumexp over vocabulary blocks, then the weighted target logits
        (with the prefix target's, #88, unless p_ptr is None); the unweighted next-token term goes to
        next_ptr for the log."""
        row = tl.program_id(0)
        z_row = z_ptr + row.to(tl.int64) * s_z
        run_max = -float("inf")
        run_sum = 0.0
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < vocab, other=0.0).to(tl.float32)
            l = tl.where(cols < vocab, _softcap(z, cap, inv_temp, offset, SOFTCAP), -float("inf"))
            new_max = tl.maximum(run_max, tl.max(l, axis=0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(l - new_max), axis=0)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        loss = 0.0
        for k in tl.static_range(NUM_WEIGHTS):
            target, weight = _mtp_target(t_ptr, w_ptr, row, k, n_rows)
            picked = _softcap(tl.load(z_row + target).to(tl.float32), cap, inv_temp, offset, SOFTCAP)
            if k == 0:  # the next token's own term, unweighted
                tl.store(next_ptr + row, lse - picked)
            loss += weight * (lse - picked)
        if p_ptr is not None:
            target, weight = _prefix_target(p_ptr, pw_ptr, row)
            picked = _softcap(tl.load(z_row + target).to(tl.float32), cap, inv_temp, offset, SOFTCAP)
            loss += weight * (lse - picked)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, loss)

    @triton.jit
    def _softcap_ce_bwd_kernel(z_ptr, t_ptr, w_ptr, p_ptr, pw_ptr, lse_ptr, grad_ptr, dz_ptr, n_rows, vocab, s_z, s_dz, cap,
                               inv_temp, offset, NUM_WEIGHTS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        """dloss/dz of one row in one pass: sum_k w_k (softmax - onehot(t_{i+k})) * grad, through the softcap
        (the prefix target, #88, is one more such term unless p_ptr is None)."""
        row = tl.program_id(0)
        z_row = z_ptr + row.to(tl.int64) * s_z
        dz_row = dz_ptr + row.to(tl.int64) * s_dz
        lse = tl.load(lse_ptr + row)
        grad = tl.load(grad_ptr + row)
        total = 0.0
        for k in tl.static_range(NUM_WEIGHTS):
            total += _mtp_target(t_ptr, w_ptr, row, k, n_rows)[1]
        if p_ptr is not None:
            prefix, prefix_weight = _prefix_target(p_ptr, pw_ptr, row)
            total += prefix_weight
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < vocab, other=0.0).to(tl.float32)
            l = _softcap(z, cap, inv_temp, offset, SOFTCAP)
            dl = total * tl.exp(l - lse)
            for k in tl.static_range(NUM_WEIGHTS):
                target, weight = _mtp_target(t_ptr, w_ptr, row, k, n_rows)
                dl -= tl.where(cols == target, weight, 0.0)
            if p_ptr is not None:
                dl -= tl.where(cols == prefix, prefix_weight, 0.0)
            if SOFTCAP:  # dl/dz = cap / temp * s (1 - s) with s = l / cap
                s = l / cap
                dl *= cap * inv_temp * s * (1.0 - s)
            tl.store(dz_row + cols, (dl * grad).to(dz_ptr.dtype.element_ty), mask=cols < vocab)

    # Under TRITON_INTERPRET=1 (read when the kernels above were decorated) they run on CPU tensors.
    INTERPRETED = not isinstance(_sym_mm_kernel, triton.runtime.JITFunction)

    def _require_16bit(op, *tensors):
        """The kernels' tiles are sized for 2-byte operands: fp32 would need twice the shared memory
        (more than an H100 has for linear_relu2) and run at a fraction of the tensor-core rate."""
        for t in tensors:
            if t.dtype not in (torch.bfloat16, torch.float16):
                raise TypeError(f"{op}: the Triton kernel takes bf16 or fp16 operands, got {t.dtype}")

    def _sym_product(a, alpha, beta, axpby):
        """a @ a^T (or alpha * a + beta * a @ a^T) for a [..., m, n] with the one-triangle kernel."""
        _require_16bit("sym_axpby" if axpby else "sym_mm", a)
        m, n = a.shape[-2:]
        stack = a.reshape(-1, m, n)
        out = torch.empty(stack.shape[0], m, m, dtype=a.dtype, device=a.device)
        tiles = triton.cdiv(m, SYM_BLOCK)
        _sym_mm_kernel[(tiles, tiles, stack.shape[0])](
            stack, out, m, n, *stack.stride(), *out.stride(), float(alpha), float(beta),
            AXPBY=axpby, BLOCK=SYM_BLOCK, BLOCK_K=SYM_BLOCK_K, DOT_FP32=INTERPRETED, num_warps=SYM_WARPS, num_stages=SYM_STAGES)
        return out.reshape(*a.shape[:-2], m, m)

    class _LinearReLU2(torch.autograd.Function):
        """relu(x @ w^T)^2 from one Triton matmul; backward uses two torch (cuBLAS) matmuls.

        Only the output is saved: it is the next layer's input, so autograd keeps it anyway, and
        relu(pre) = sqrt(out) gives back what the derivative 2 * relu(pre) needs.
        """

        @staticmethod
        def forward(ctx, x, w):
            _require_16bit("linear_relu2", x, w)
            if x.dtype != w.dtype:
                raise TypeError(f"linear_relu2: x is {x.dtype} but w is {w.dtype}; the kernel takes one dtype")
            rows = x.reshape(-1, x.shape[-1])
            out = torch.empty(rows.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
            M, K = rows.shape
            N = w.shape[0]
            grid = (triton.cdiv(M, MM_BLOCK_M) * triton.cdiv(N, MM_BLOCK_N),)
            _linear_relu2_kernel[grid](
                rows, w, out, M, N, K, *rows.stride(), *w.stride(), *out.stride(),
                BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K, GROUP_M=MM_GROUP_M, DOT_FP32=INTERPRETED,
                num_warps=MM_WARPS, num_stages=MM_STAGES)
            out = out.reshape(*x.shape[:-1], N)
            ctx.save_for_backward(x, w, out)
            return out

        @staticmethod
        def backward(ctx, grad):
            x, w, out = ctx.saved_tensors
            dpre = 2 * grad * out.sqrt()
            grad_x = dpre @ w
            grad_w = dpre.reshape(-1, w.shape[0]).mT @ x.reshape(-1, x.shape[-1])
            return grad_x, grad_w

    class _SoftcapMTPCrossEntropy(torch.autograd.Function):
        """Per-token softcapped multi-token CE; each direction is one pass over the vocabulary per row.

        Saves the logits (as given, bf16 on GPU) and the fp32 logsumexp per row, never fp32 logits.
        Returns (loss, next) as _SoftcapMTPLoss does: next, the plain next-token loss, has no gradient.
        """

        @staticmethod
        def forward(ctx, logits, targets, weights, cap, temp, offset, prefix_targets, prefix_weight):
            _require_16bit("softcap_mtp_ce", logits)
            z, targets = logits.contiguous(), targets.contiguous()
            weights = torch.as_tensor(weights, dtype=torch.float32, device=z.device)  # a tensor: no recompiles
            # #88: None compiles the kernels without the prefix target
            prefix = (None, None) if prefix_targets is None else (prefix_targets.contiguous(), prefix_weight.float())
            n, vocab = z.shape
            loss = torch.empty(n, dtype=torch.float32, device=z.device)
            next_token, lse = torch.empty_like(loss), torch.empty_like(loss)
            ctx.launch = dict(cap=float(cap), inv_temp=1.0 / temp if cap > 0 else 1.0, offset=float(offset), NUM_WEIGHTS=weights.numel(),
                              SOFTCAP=cap > 0, BLOCK_V=CE_BLOCK_V, num_warps=CE_WARPS)
            _softcap_ce_fwd_kernel[(n,)](z, targets, weights, *prefix, loss, next_token, lse, n, vocab, z.stride(0), **ctx.launch)
            ctx.save_for_backward(z, targets, weights, lse, *prefix)
            ctx.mark_non_differentiable(next_token)
            return loss, next_token

        @staticmethod
        def backward(ctx, grad, _):
            z, targets, weights, lse, *prefix = ctx.saved_tensors
            n, vocab = z.shape
            dz = torch.empty_like(z)
            _softcap_ce_bwd_kernel[(n,)](z, targets, weights, *prefix, lse, grad.contiguous(), dz, n, vocab, z.stride(0),
                                         dz.stride(0), **ctx.launch)
            return dz, None, None, None, None, None, None, None

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
        def softcap_mtp_ce(logits, targets, weights, cap, temp, offset=0.0, prefix_targets=None, prefix_weight=None,
                           next_token=False):
            return loss_outputs(_SoftcapMTPCrossEntropy.apply(logits, targets, weights, cap, temp, offset, prefix_targets,
                                                              prefix_weight), next_token)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

COMPUTE_DTYPE = torch.bfloat16  # matmuls run in bf16 on CUDA (on a CPU: the backend's choice, --cpu_dtype)
YARN_ALPHA, YARN_BETA = 1.0, 32.0  # wavelengths per window below/above which YaRN fully/never rescales
YARN_SCALE_SLOPE = 0.2  # attention scale grows by (slope * ln(new/old) + 1) per window change
GATE_ACTS = {"relu": F.relu, "sigmoid": torch.sigmoid}  # the activations an output gate may use
TABLE_KINDS = ("head", "embed", "value_embed", "gate", "smear_gate", "adam_gate", "bigram",
               "mudd", "mudd_bias", "mudd_gate", "mudd_gate_bias", "dc")  # stored in Backend.table_dtype
MANTISSA_KINDS = ("matrix",)  # #57: stored in bf16 with bf16_weights, NorMuon keeping the lower halves
QKV_LAMBDA_INIT, OUT_LAMBDA_INIT = 0.5, 1.0  # the per-layer attention lambdas start here
GATE_RANGE = 2.0  # #55's value-embedding and skip gates are GATE_RANGE * sigmoid(.): 1 at their zero init
SKIP_X0_GATE_LR_MUL = 0.05  # #55 learning-rate factor of the skip's x0 gate
SUBLAYER_RESID_INIT = 1.1**0.5  # #73: a layer's two residual lambdas start at #53's one per-layer 1.1 together
POST_LAMBDA_INIT = 1.0  # #73/#77: the sublayer output scales start neutral
UNIFORM_ATTN_STD = 0.5  # #64/#67: Q, K, V and O start with std this / sqrt(d_model)
ATTN_SUBLAYER, MLP_SUBLAYER = 0, 1  # the columns of the [n_layer, 2] sublayer lambdas
GPT2_STD = 0.02  # GPT-2's init: N(0, 0.02) for every matrix and table
RESIDUAL_PROJECTIONS = ("attn.o", "mlp.down")  # GPT-2's init scales these (which write into the stream) by 1 / sqrt(2 n_layer)
ACTIVATIONS = {"relu2": relu2, "gelu": functools.partial(F.gelu, approximate="tanh")}
BACKOUT_INIT = 0.5  # backout subtracts this share of its layer's output at the start
XSA_EPS = 1e-8  # #82: a value's squared norm is floored here before dividing by it
DC_WINDOW = 112  # #85: DC's attention spans a query's last 112 keys in its document, itself included
DC_BLOCK = 64  # queries per block of DC's scores (each block scores DC_BLOCK + 128 keys)
DC_NORM_EPS = 1e-6  # #85: eps of w1's RMS norm across heads
DC_LR_MUL = 0.25  # #85: Adam learning-rate factor of DC's weight MLP (betas: scalar_betas, no decay)
DC_W1_INIT_SCALE = 0.01  # #85: the mixer's w1 rows start at this fraction of a 2 / (H + 2)-scaled Xavier std
SHELL_RADIUS_SQ = 2.0  # the shell penalty's hinge is zero for ||x||^2 >= this * d - SHELL_EPS
SHELL_EPS = 0.1


def norm(x):
    """RMSNorm without weights, in x's dtype on every device: CUDA autocast (torch >= 2.12) runs
    rms_norm in fp32 and CPU autocast does not, and the stream's dtype must not depend on that."""
    return F.rms_norm(x, (x.size(-1),)).type_as(x)


def tag(param, kind, lr_mul=1.0, muon_blocks=1):
    """Label a parameter for the optimizer builder. NorMuon: matrix | gate (normalized per row),
    orthogonalized as `muon_blocks` blocks of rows; Adam: head | embed | value_embed | smear_gate |
    x0 | scalar | adam_gate | skip_x0_gate | bigram | resid_lambda | lambda | mudd | mudd_bias |
    mudd_gate | mudd_gate_bias | mudd_gate_scale | dc (see Optimizers for each one's lr, betas and decay)."""
    param.kind = kind
    param.lr_mul = lr_mul
    param.muon_blocks = muon_blocks
    return param


def shape_lr_mul(rows, cols):
    """Muon's learning-rate multiplier for a rows x cols matrix: more for more outputs than inputs."""
    return math.sqrt(max(1.0, rows / cols))


def param(data, init):
    """A parameter that keeps `init`, a short phrase saying how it was initialized, for the parameter
    table: written where the values are made, so the table says what the code does."""
    p = nn.Parameter(data)
    p.init = init
    return p


def zeros(*shape):
    return param(torch.zeros(shape), "zeros")


def constant(value, shape=()):
    return param(torch.full(shape, float(value)), f"{value:g}")


def constants(*values):
    return param(torch.tensor(values), ", ".join(f"{v:g}" for v in values))


def normal(rows, cols, std):
    return param(torch.randn(rows, cols) * std, f"normal(0, {std:g})")


def uniform_matrix(rows, cols, bound):
    return param(torch.empty(rows, cols).uniform_(-bound, bound), f"uniform(+-{bound:.4g})")


class Norm(nn.Module):
    """A block's or the final norm: the record's RMSNorm without weights, or GPT-2's LayerNorm with a
    learned gain (starting at 1) and, with --bias, a learned bias (starting at 0)."""

    def __init__(self, cfg):
        super().__init__()
        layer = cfg.norm == "layernorm"
        self.weight = tag(constant(1.0, (cfg.d_model,)), "scalar") if layer else None
        self.bias = tag(zeros(cfg.d_model), "scalar") if layer and cfg.bias else None

    def forward(self, x):
        if self.weight is None:
            return norm(x)
        bias = None if self.bias is None else self.bias.type_as(x)
        return F.layer_norm(x, (x.size(-1),), self.weight.type_as(x), bias).type_as(x)


class Rotary(nn.Module):
    """RoPE on half of each head: a quarter of the frequency pairs rotate, the rest have frequency 0.

    When the attention window grows, YaRN rescales the low frequencies (those that turn less than
    once or so within the old window) so positions beyond it look familiar, and raises the attention
    scale. The frequencies are a buffer; the window and the scale are Python numbers, so changing
    them never reads the device and the compiled attention gets its scale as a constant (inductor
    bakes it into the kernel: a tensor there fails to compile). They travel in the state dict as
    extra state.
    """

    def __init__(self, head_dim, base, attn_scale):
        super().__init__()
        quarter = head_dim // 4
        freqs = torch.cat([(1 / base) ** torch.linspace(0, 1, quarter), torch.zeros(quarter)])
        self.register_buffer("freqs", freqs)
        self.attn_scale = float(attn_scale)
        self.window = 0  # tokens; 0 until the first set_window

    @torch.no_grad()
    def set_window(self, window, yarn):
        """Adapt to a new long-window size in tokens (the first call only records it)."""
        old = self.window
        if yarn and old and window != old:
            factor = window / old
            turns = old * self.freqs / (2 * math.pi)
            keep = ((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0, 1)
            self.freqs.mul_(keep + (1 - keep) / factor)
            self.attn_scale *= YARN_SCALE_SLOPE * math.log(factor) + 1
        self.window = window

    def get_extra_state(self):
        return dict(window=self.window, attn_scale=self.attn_scale)

    def set_extra_state(self, state):
        self.window, self.attn_scale = state["window"], state["attn_scale"]

    def forward(self, x, start=0, paired=False):
        """x [T, H, D] at positions start, ..., start + T - 1: rotate dims i and i + D/2 together
        by angle t * freqs[i] at position t. Paired heads (#58) turn as in their 2T sequence, at
        position 2t for even heads and 2t + 1 for odd ones, HEAD's stagger."""
        t = torch.arange(start, start + x.size(0), device=x.device, dtype=torch.float32)[:, None]
        if paired:
            t = 2 * t + torch.arange(x.size(1), device=x.device) % 2
        angle = t[..., None] * self.freqs
        cos, sin = angle.cos(), angle.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


def paired_heads(attend, q, k, v, mask, scale, need_lse):
    """#58: `attend` over q, k, v [T, H, D] read as [2T, H/2, D], so each query scores two keys per
    position in one softmax: its own head's and its partner's. The reading is HEAD's (a view of the
    same memory): position 2t holds heads 0 .. H/2 - 1 of token t, position 2t + 1 the others, so head j
    pairs with head j + H/2, and sees its partner's key of token t only from position 2t + 1. `mask` is
    over the 2T positions (GPT.paired_masks). Returns y [T, H, D] and the log-sum-exp [T, H] if asked."""
    n, h, d = q.shape
    y, lse = attend(*(t.reshape(2 * n, h // 2, d) for t in (q, k, v)), mask, scale, need_lse)
    return y.reshape(n, h, d), (None if lse is None else lse.reshape(n, h))


def add_slot(y, lse, e, value):
    """Attention output y [T, H, D] with one extra softmax slot of logit e ([T, H] or [H]) and value
    [H, D] (None: zero), given the log-sum-exp lse [T, H] of the real scores.

    The real keys keep sigmoid(lse - e) of the softmax and the slot takes sigmoid(e - lse), so any
    attention that returns its lse gains the slot without a change to its kernel.
    """
    out = y.float() * torch.sigmoid(lse - e)[..., None]
    if value is not None:
        out = out + value * torch.sigmoid(e - lse)[..., None]
    return out.type_as(y)


def exclude_self_value(y, v, alpha):
    """#82 gated exclusive self attention (arXiv:2603.09078): y_h - tanh(alpha_h) (y_h . v_h / |v_h|^2) v_h
    for y, v [T, H, D] and alpha [H] (or [T, H]). Attention copies much of a token's own value back
    into its output, which the residual stream already carries; each head learns how much of that
    component to drop (none at alpha = 0)."""
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(XSA_EPS)
    return y - torch.tanh(alpha).type_as(y)[..., None] * along * v


class OutputGate(nn.Module):
    """y * act(W_g x): the sublayer input x decides, per channel, how much of its output y passes."""

    def __init__(self, d, act):
        super().__init__()
        # not zero: relu(0) = 0 would pass no output and no gradient, freezing gate and sublayer
        # for good; the QKV init gives pre-activations of about unit size for RMS-normed x
        self.weight = tag(uniform_matrix(d, d, math.sqrt(3) / math.sqrt(d)), "matrix")
        self.act = GATE_ACTS[act]

    def forward(self, x, y):
        return y * self.act(F.linear(x, self.weight.type_as(x)))  # type_as: bf16 with bf16_weights (#57)


def has_slot(cfg):
    """Whether attention gets an extra softmax slot (--sink_logit, --kv_bias): it needs the log-sum-exp."""
    return cfg.sink_logit or cfg.kv_bias


def output_gate(cfg, act):
    return OutputGate(cfg.d_model, act) if act != "none" else None


class HeadInputs(NamedTuple):
    """Per-token inputs a layer's attention takes from outside the layer (#81/#85's MUDD and its gate):
    `v` [T, H, D] added to the values, `gate` [T, H] scaling each head's output, `xsa` [T, H] XSA's
    strengths and `dc` DC's (w1, w2), each [T, H], in place of the layer's own; None: not given."""
    v: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    xsa: torch.Tensor | None = None
    dc: tuple | None = None


class HeadComposition(nn.Module):
    """#85 lightweight dynamically composable attention (DCFormer, arXiv:2405.08553), post-only and
    rank 1: every head h also reads its values through a per-token mix of all heads' attention over
    the last DC_WINDOW keys, y_h += w2_h sum_g w1_g P_g v_h, so a head can borrow where the others
    look. (w1, w2) [T, H] come per token from the MUDD gate (HEAD's) or, without it, from the
    attention's input by a small MLP of the layer's own (#85's first form); w1 RMS-normed across
    heads; w2 starts at zero: plain attention at first."""

    def __init__(self, cfg, ops):
        super().__init__()
        h, d = cfg.n_head, cfg.d_model
        hidden = 2 * h
        self.ops = ops
        if cfg.mudd_gate:  # the gate's columns make (w1, w2): no MLP of its own
            self.in_proj = self.out_proj = None
        else:
            self.in_proj = tag(normal(hidden, d, math.sqrt(2 / (d + hidden))), "dc")
            std = math.sqrt(1 / hidden) * 2 / (h + 2) * DC_W1_INIT_SCALE
            self.out_proj = tag(param(torch.cat([torch.randn(h, hidden) * std, torch.zeros(h, hidden)]),
                                  f"rows 0-{h - 1} (w1) normal(0, {std:.4g}), rows {h}-{2 * h - 1} (w2) zeros"), "dc")

    @staticmethod
    def mask(docs):
        """The keys DC's attention sees, for documents `docs` [T]: DC_WINDOW, itself included."""
        return BlockedAttention(DC_BLOCK).mask(docs, DC_WINDOW - 1)

    def weights(self, x):
        """(w1, w2) [T, H] from the attention input x [T, d] by the layer's own MLP (#85's first form)."""
        hidden = F.gelu(F.linear(x, self.in_proj.type_as(x)), approximate="tanh")
        return F.linear(hidden, self.out_proj.type_as(x)).chunk(2, -1)

    def forward(self, y, x, q, k, v, mask, scale, weights=None):
        """y [T, H, D] plus each head's composed read, from q, k, v and `weights` (w1, w2) [T, H], the MUDD
        gate's, or, None, those of the layer's MLP from the attention input x [T, d]."""
        w1, w2 = self.weights(x) if weights is None else weights
        w1 = F.rms_norm(w1.float(), (w1.size(-1),), eps=DC_NORM_EPS).type_as(y)  # normed in fp32, used in y's dtype as HEAD's
        return y + (w2[..., None] * self.ops.composed_attention(q, k, v, w1, mask, scale)).type_as(y)


def at_least_fp32(w):
    """w as fp32 if it is stored narrower (#57's bf16 weights), so the attention lambdas scale it in
    fp32 as they scale fp32 (or fp64) weights; the matmul then casts to the compute dtype as always."""
    return w.to(torch.promote_types(w.dtype, torch.float32))


def attention_init(inner, d, uniform):
    """Q, K, V [inner, d] and O [d, inner], drawn in that order. #53: Q, K and V uniform with std
    1/sqrt(d), O zeros, so each attention adds nothing at first. #64/#67 (`uniform`, HEAD's): all four
    uniform with std UNIFORM_ATTN_STD/sqrt(d), the attention contributing from the first step."""
    bound = math.sqrt(3) * (UNIFORM_ATTN_STD if uniform else 1.0) / math.sqrt(d)  # uniform(-b, b): std b/sqrt(3)
    q, k, v = (uniform_matrix(inner, d, bound) for _ in range(3))
    return q, k, v, uniform_matrix(d, inner, bound) if uniform else zeros(d, inner)


class Attention(nn.Module):
    """Multi-head attention with QK-norm, half-RoPE, optional value embedding, partial key offset,
    a per-head output gate, an optional extra softmax slot (sink logit and/or key-value bias),
    optionally paired heads (#58), DC's composed read (#85) and the gated exclusion of each token's own
    value (#82)."""

    def __init__(self, cfg, layer, dtype=COMPUTE_DTYPE, ops=TorchOps):
        super().__init__()
        d, inner = cfg.d_model, cfg.n_head * cfg.head_dim
        self.n_head, self.head_dim, self.dtype = cfg.n_head, cfg.head_dim, dtype
        lr_mul = cfg.attn_lr_mul
        pairs = cfg.n_head // 2 if cfg.qk_head_pairs else 1  # #80: one orthogonalization per pair of heads
        q, k, v, o = attention_init(inner, d, cfg.uniform_attn_init)
        self.q = tag(q, "matrix", lr_mul, pairs)
        self.k = tag(k, "matrix", lr_mul, pairs)
        self.v = tag(v, "matrix", lr_mul)
        self.o = tag(o, "matrix", lr_mul)
        # GPT-2's biases of Q, K, V (one vector, as its c_attn has) and of the output
        self.qkv_bias = tag(zeros(3 * inner), "scalar") if cfg.bias else None
        self.o_bias = tag(zeros(d), "scalar") if cfg.bias else None
        self.qk_norm, self.rope = cfg.qk_norm, not cfg.position_embedding
        # learned scales of the QKV and the output weights
        self.lambdas = tag(constants(QKV_LAMBDA_INIT, OUT_LAMBDA_INIT), "scalar") if cfg.attn_lambdas else None
        self.paired = layer in cfg.paired_head_layers  # #58
        # HEAD shifts no keys on a paired layer
        self.key_offset = cfg.key_offset and layer in cfg.long_window_layers and not self.paired
        # the per-head gate reads the first gate_dims channels, or all of them with head_gate
        self.gate_dims = d if cfg.head_gate else cfg.gate_dims
        has_gate = cfg.attn_gate or cfg.head_gate
        gate_lr_mul = shape_lr_mul(cfg.n_head, self.gate_dims)
        gate_kind = "adam_gate" if cfg.attn_gate_adam else "gate"
        self.gate = tag(zeros(cfg.n_head, self.gate_dims), gate_kind, gate_lr_mul) if has_gate else None
        # the extra slot starts at logit 0 with value 0; its logit is the sink logit plus the key bias's score
        self.has_slot = has_slot(cfg)
        self.sink = tag(zeros(cfg.n_head), "scalar") if cfg.sink_logit else None
        self.key_bias = tag(zeros(cfg.n_head, cfg.head_dim), "scalar") if cfg.kv_bias else None
        self.value_bias = tag(zeros(cfg.n_head, cfg.head_dim), "scalar") if cfg.kv_bias else None
        self.ve_gate_input = cfg.ve_gate
        has_ve_gate = value_embed_tables(cfg)[layer] is not None and cfg.ve_gate != "none"
        self.ve_gate = tag(zeros(cfg.n_head, cfg.gate_dims), "adam_gate") if has_ve_gate else None
        self.xsa_layer = layer in cfg.xsa_layers  # #82
        # #82's strength per head, tanh(0): off at the start; under the MUDD gate its columns give them per token (#85)
        self.xsa = tag(zeros(cfg.n_head), "lambda") if self.xsa_layer and not cfg.mudd_gate else None
        self.composition = HeadComposition(cfg, ops) if layer in cfg.dc_layers else None

    def gated_ve(self, x, ve):
        """The value embedding ve [T, inner] as [T, H, D], each head scaled by its gate (#55/#70):
        2 sigmoid(w_h . g), g the first gate_dims channels of x, or half of them from x, half from ve."""
        ve = ve.view(x.size(0), self.n_head, self.head_dim)
        if self.ve_gate is None:
            return ve
        dims = self.ve_gate.size(1)
        if self.ve_gate_input == "x":
            g = x[:, :dims]
        else:
            g = torch.cat([x[:, : dims // 2], ve.flatten(1)[:, : dims // 2].type_as(x)], dim=-1)
        return GATE_RANGE * torch.sigmoid(F.linear(g, self.ve_gate.type_as(g)))[..., None] * ve

    def slot_logit(self, q, scale):
        """Logit of the extra slot for queries q [T, H, D]: [H] (sink logit only) or [T, H]."""
        e = self.sink if self.sink is not None else 0.0
        if self.key_bias is not None:
            e = e + scale * (q.float() * self.key_bias).sum(-1)
        return e

    def forward(self, x, ve, rotary, attend, mask, start=0, heads=HeadInputs(), dc_mask=None):
        n, h, dh = x.size(0), self.n_head, self.head_dim
        qkv_scale, out_scale = (1.0, 1.0) if self.lambdas is None else self.lambdas
        bq, bk, bv = (None,) * 3 if self.qkv_bias is None else self.qkv_bias.chunk(3)
        q = F.linear(x, qkv_scale * at_least_fp32(self.q), bq).view(n, h, dh)
        k = F.linear(x, qkv_scale * at_least_fp32(self.k), bk).view(n, h, dh)
        v = F.linear(x, qkv_scale * at_least_fp32(self.v), bv).view(n, h, dh)
        if self.qk_norm:
            q, k = norm(q), norm(k)
        if self.rope:
            q, k = rotary(q, start, self.paired), rotary(k, start, self.paired)
        if self.key_offset:
            # the still (non-rotating) dims of each key take the previous token's values, so one
            # layer can match "the token after the one like me": an induction head in one step;
            # the first token, with no previous one, keeps its own (as the record does)
            still = torch.zeros(dh, dtype=torch.bool, device=x.device)
            still[dh // 4 : dh // 2] = still[3 * dh // 4 :] = True
            k = torch.where(still, torch.cat([k[:1], k[:-1]]), k)
        if ve is not None:
            v = v + self.gated_ve(x, ve)
        if heads.v is not None:
            v = v + heads.v
        # one dtype into attention, the compute dtype, whatever autocast and the tables' dtype made
        # of q, k (rms_norm) and v (+ a float32 value embedding)
        q, k, v = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)
        attend = functools.partial(paired_heads, attend) if self.paired else attend
        y, lse = attend(q, k, v, mask, rotary.attn_scale, self.has_slot)
        if self.has_slot:
            y = add_slot(y, lse, self.slot_logit(q, rotary.attn_scale), self.value_bias)
        if self.composition is not None:
            y = self.composition(y, x, q, k, v, dc_mask, rotary.attn_scale, heads.dc)
        if self.xsa_layer:
            y = exclude_self_value(y, v, self.xsa if heads.xsa is None else heads.xsa)
        if self.gate is not None:
            y = y * torch.sigmoid(F.linear(x[:, : self.gate_dims], self.gate))[..., None]
        if heads.gate is not None:
            y = y * heads.gate.type_as(y)[..., None]
        return F.linear(y.reshape(n, h * dh), out_scale * at_least_fp32(self.o), self.o_bias)


class MLP(nn.Module):
    """ReLU^2 (or GPT-2's GELU) MLP; ReLU^2's up projection and activation run as one fused op without
    biases (in FP8 while training with fp8_mlp, as torch ops: the fused kernel takes 16-bit operands)."""

    def __init__(self, cfg, ops, dtype=COMPUTE_DTYPE):
        super().__init__()
        d, hidden = cfg.d_model, cfg.mlp_hidden
        self.ops, self.dtype, self.fp8 = ops, dtype, cfg.fp8_mlp
        # both count as hidden x d for Muon's shape multiplier: the record stores down transposed
        self.up = tag(uniform_matrix(hidden, d, math.sqrt(3) * 0.5 / math.sqrt(d)), "matrix", shape_lr_mul(hidden, d))
        self.down = tag(zeros(d, hidden), "matrix", shape_lr_mul(hidden, d) * cfg.mlp_down_lr_mul)
        self.activation = cfg.mlp_activation
        self.up_bias = tag(zeros(hidden), "scalar") if cfg.bias else None
        self.down_bias = tag(zeros(d), "scalar") if cfg.bias else None
        if self.fp8:
            # the down projection's delayed scales, state of the run (checkpointed, equal on every rank):
            # this step's ReLU^2 amax so far, the scales this step uses, the down weight's last amax
            for name, value in (("act_amax", 0.0), ("act_scale", 1.0), ("down_scale", 1.0), ("down_amax", 0.0)):
                self.register_buffer(name, torch.tensor(value))
            self.rescale(0, self.act_amax)

    def forward(self, x):
        # the compute dtype whatever autocast left x as (the residual stream and rms_norm are fp32
        # under it): the fused kernel's tiles are sized for 2-byte operands
        x, up, down = x.to(self.dtype), self.up.to(self.dtype), self.down.to(self.dtype)
        if self.fp8 and self.training:
            return self.fp8_forward(x, up, down)
        if self.activation == "relu2" and self.up_bias is None:
            return F.linear(self.ops.linear_relu2(x, up), down)
        up_bias, down_bias = (None if b is None else b.to(self.dtype) for b in (self.up_bias, self.down_bias))
        h = ACTIVATIONS[self.activation](F.linear(x, up, up_bias))
        return F.linear(h, down, down_bias)

    def fp8_forward(self, x, up, down):
        """#84/#89: both projections in e4m3 with backward passes in the compute dtype. The up
        projection scales x and w by their amax now; the down projection takes the delayed scales
        rescale() set, and records the ReLU^2 output's amax for the next step's."""
        h = relu2(fp8_linear(x, up, amax_scale(x), amax_scale(up), grad_scale=None))
        self.act_amax.copy_(torch.maximum(self.act_amax, h.detach().amax().float()))
        return fp8_linear(h, down, self.act_scale, self.down_scale, grad_scale=None)

    @torch.no_grad()
    def rescale(self, step, act_amax):
        """Set the down projection's scales for `step` (#89): the ReLU^2 output's from `act_amax`,
        the largest output of the step before (step 0 keeps 1); the weight's from its amax of the
        step before, or through FP8_MLP_EXACT_STEPS from its own amax."""
        if step > 0:
            self.act_scale.copy_(act_amax.clamp(min=FP8_MIN_AMAX) * FP8_MLP_ACT_HEADROOM / E4M3_MAX)
        self.act_amax.zero_()
        now = fp8_amax(self.down.to(self.dtype))  # of the weight as the forward casts it
        before = self.down_amax * FP8_MLP_DOWN_HEADROOM
        self.down_scale.copy_((now if step <= FP8_MLP_EXACT_STEPS else before) / E4M3_MAX)
        self.down_amax.copy_(now)


def residual(x, y, resid, post, sublayer):
    """x + y, the sublayer's output y added to the stream x; with #73's residual lambdas the stream is
    scaled first (resid[sublayer] x), with #73/#77's post lambdas the output (post[sublayer] y)."""
    y = y if post is None else post[sublayer] * y
    return x + y if resid is None else resid[sublayer] * x + y


class Block(nn.Module):
    def __init__(self, cfg, layer, ops, dtype=COMPUTE_DTYPE):
        super().__init__()
        self.attn = None if layer in cfg.no_attn_layers else Attention(cfg, layer, dtype, ops)
        self.mlp = MLP(cfg, ops, dtype)
        self.long = layer in cfg.long_window_layers
        self.attn_out_gate = output_gate(cfg, cfg.gate_attn) if self.attn is not None else None
        self.mlp_out_gate = output_gate(cfg, cfg.gate_mlp)
        self.attn_norm = Norm(cfg) if self.attn is not None else None
        self.mlp_norm = Norm(cfg)

    def forward(self, x, ve, rotary, attend, masks, start=0, resid=None, post=None, inject=None, lane=None,
                heads=HeadInputs()):
        """resid, post: this layer's [2] sublayer lambdas (attention, MLP) or None; inject: added with
        the attention output (#73), dropped by a layer without attention; lane: what the attention
        reads instead of x (#77); heads: the attention's per-token inputs from MUDD (#81/#85)."""
        if self.attn is not None:
            h = self.attn_norm(x if lane is None else lane)
            y = self.attn(h, ve, rotary, attend, masks[0] if self.long else masks[1], start, heads,
                          masks[2] if self.attn.composition is not None else None)
            x = residual(x, y if self.attn_out_gate is None else self.attn_out_gate(h, y), resid, post, ATTN_SUBLAYER)
            x = x if inject is None else x + inject
        h = self.mlp_norm(x)
        y = self.mlp(h)
        return residual(x, y if self.mlp_out_gate is None else self.mlp_out_gate(h, y), resid, post, MLP_SUBLAYER)


def value_embed_tables(cfg):
    """Which value-embedding table each layer adds to v (None: none). With n tables the last n
    layers get tables 0..n-1 and the first n-1 layers get tables 1..n-1, unless ve_layout says."""
    n, layers = cfg.value_embeds, cfg.n_layer
    if n and cfg.ve_layout:
        return [None if c == "." else int(c) for c in cfg.ve_layout]
    tables = [None] * layers
    for i in range(max(0, n - 1)):
        tables[i] = i + 1
    for i in range(n):
        tables[layers - n + i] = i
    return tables


BIGRAM_MULS = (36313, 27191)  # #62: the hash's multipliers of the token and of the one before it


def bigram_hash(idx, rows):
    """The bigram table's row for each position of a packed sequence idx [T] (#62):
    (36313 * token) xor (27191 * previous token) mod (rows - 1), in int32 as the record hashes; the
    first position has no previous token and takes the last row. A document's BOS pairs with the
    previous document's last token, as in the record (masking it there was slower and no better)."""
    t = idx.to(torch.int32)
    pairs = torch.bitwise_xor(BIGRAM_MULS[0] * t[1:], BIGRAM_MULS[1] * t[:-1]) % (rows - 1)
    return torch.cat([t.new_full((1,), rows - 1), pairs])


def bigram_sign_rows(idx, rows):
    """The sign table's row for each position (#83): token xor previous token mod rows; row 0 first."""
    return torch.cat([idx.new_zeros(1), torch.bitwise_xor(idx[:-1], idx[1:]) % rows])


class BigramEmbed(nn.Module):
    """A hashed embedding of each (previous token, token) pair, mixed into the residual stream
    before every block with a learned per-layer lambda (#62): what tends to follow a pair is learned
    in a row of its own instead of being composed by the layers. Pairs that hash to one row share
    it; with the sign trick (#83) each pair reads the row times its own fixed random +-1 per channel,
    so colliding pairs pull the shared row in independent directions rather than the same one."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.weight = tag(zeros(cfg.bigram_vocab, d), "bigram", cfg.bigram_lr_mul)
        # #85: under the MUDD gate its per-token coefficients take the lambdas' place
        self.lambdas = (None if cfg.mudd_gate else
                        tag(constant(cfg.bigram_lambda_init, (cfg.n_layer,)), "lambda" if cfg.sublayer_resid else "scalar"))
        self.register_buffer("signs", torch.randn(cfg.bigram_signs, d).sign() if cfg.bigram_signs else None)

    def forward(self, idx):
        x = F.embedding(bigram_hash(idx, self.weight.size(0)), self.weight)
        if self.signs is None:
            return x
        return x * self.signs[bigram_sign_rows(idx, self.signs.size(0))].to(x.dtype)


MUDD_DIM = 64  # #81/#85: hidden width of the MUDD and MUDD-gate MLPs
MUDD_SCALE = 0.1  # #81: MUDD's coefficients are this times its MLP's output (whose bias is stored divided by it)
MUDD_GATE_SCALE_INIT = 0.1  # #85: the MUDD gate's are a learned scale times its MLP's; the scale starts here
MUDD_GATE_ATTN_INIT, MUDD_GATE_SKIP_INIT = 0.25, 0.5  # #85: the gate's attention gates and skip factor start here
MUDD_GATE_DC_W1_INIT = 1.0  # #85: DC's w1 columns start equal (every head's attention mixed alike); XSA's and w2's at 0
# #81, in HEAD's order: the last layer's coefficients (the sources mixed into its values, then into its
# stream: the first layer's input, backout_layer's output, its own input; its value embedding's gate for
# the first and the second half of the heads; its sublayer lambdas and the x0-like and bigram terms'),
# and those of the mix after it (the sources, table 0's value embedding and skip_from's output)
MUDD_INTO_LAST = ("v_first", "v_backout", "v_self", "first", "backout", "self", "ve_lo", "ve_hi",
                  "resid_attn", "post_attn", "inject_first", "inject_bigram", "resid_mlp", "post_mlp")
MUDD_AFTER_LAST = ("first", "backout", "last_input", "ve", "skip")


class MuddMLP(nn.Module):
    """Two small MLPs (d -> MUDD_DIM -> gelu -> outputs) that turn a token's state into per-token
    coefficients (MUDD, Xiao et al. 2025): how much of an earlier stream, or of a term, each token
    takes is computed from the token itself. The output weights start at zero, so the coefficients
    start at their biases: `starts`, a row per MLP, as the lambdas and gates they replace start."""

    def __init__(self, d, starts, scale, kind):
        super().__init__()
        bound = 1 / math.sqrt(d)  # nn.Linear's default (kaiming_uniform, a = sqrt(5)), as HEAD's
        self.w1 = tag(param(torch.empty(2, MUDD_DIM, d).uniform_(-bound, bound), f"uniform(+-{bound:.4g})"), kind)
        self.w2 = tag(zeros(2, len(starts[0]), MUDD_DIM), kind)
        # stored divided by the scale, as HEAD's: Adam's steps on them are the scale's size
        self.b2 = tag(param(torch.tensor(starts) / scale, f"the replaced terms' starts / {scale:g}"), kind + "_bias")

    def coefs(self, x, which, n, scale):
        """[T, n]: the first n coefficients of MLP `which` for the tokens x [T, d]."""
        h = F.gelu(F.linear(x, self.w1[which]))
        return (F.linear(h, self.w2[which, :n]) + self.b2[which, :n]) * scale


def mudd_starts(cfg):
    """#81: each coefficient's start, as what it replaces starts (the value-embedding gates at their
    2 sigmoid's most); the connections start at 0, but backout's, which starts as backout does."""
    into = dict(ve_lo=GATE_RANGE, ve_hi=GATE_RANGE, resid_attn=SUBLAYER_RESID_INIT, post_attn=POST_LAMBDA_INIT,
                inject_bigram=cfg.bigram_lambda_init, resid_mlp=SUBLAYER_RESID_INIT, post_mlp=POST_LAMBDA_INIT)
    after = dict(backout=-BACKOUT_INIT)
    return [[into.get(name, 0.0) for name in MUDD_INTO_LAST],
            [after.get(name, 0.0) for name in MUDD_AFTER_LAST] + [0.0] * (len(MUDD_INTO_LAST) - len(MUDD_AFTER_LAST))]


class Mudd(MuddMLP):
    """#81 MUDD connections as HEAD trims them to the end of the model: per-token coefficients from
    the stream mix earlier layers' streams into the last layer (its values and its stream), set that
    layer's sublayer lambdas, x0-like and bigram terms and value-embedding gates, and after it mix the
    sources into the final stream. The mix after the last layer takes backout's place: the backout
    layer's coefficient starts at -BACKOUT_INIT."""

    def __init__(self, cfg):
        super().__init__(cfg.d_model, mudd_starts(cfg), MUDD_SCALE, "mudd")
        self.n_head = cfg.n_head

    def into_last(self, x, first, backout, ve, bigram, lane, heads):
        """The last layer's stream and Block keywords from its input x [T, d] (first: the first
        layer's input; backout: backout_layer's output): the stream recombined with them, the
        sublayer lambdas and the terms joining the attention output per token, the value embedding
        ve gated per half of the heads and a mix of the sources added to the values (to `heads`, the
        layer's inputs from the MUDD gate). The attention reads the lane, or else x before the
        recombination."""
        mu = dict(zip(MUDD_INTO_LAST, self.coefs(x, 0, len(MUDD_INTO_LAST), MUDD_SCALE).split(1, dim=-1)))
        v = (mu["v_first"] * first + mu["v_backout"] * backout + mu["v_self"] * x).view(x.size(0), self.n_head, -1)
        if ve is not None:
            gate = torch.cat([mu["ve_lo"], mu["ve_hi"]], dim=-1).repeat_interleave(self.n_head // 2, dim=-1)
            v = gate[..., None] * ve.view(v.shape) + v
        inject = mu["inject_first"] * first
        inject = inject if bigram is None else inject + mu["inject_bigram"] * bigram
        stream = (1 + mu["self"]) * x + mu["first"] * first + mu["backout"] * backout
        return stream, dict(ve=None, resid=(mu["resid_attn"], mu["resid_mlp"]), post=(mu["post_attn"], mu["post_mlp"]),
                            inject=inject, lane=x if lane is None else lane, heads=heads._replace(v=v))

    def after_last(self, x, first, backout, last_input, ve, skip):
        """The final stream: the last layer's output x plus per-token shares of the sources, of
        value-embedding table 0 (ve; None without tables) and of skip_from's output."""
        mu = dict(zip(MUDD_AFTER_LAST, self.coefs(x, 1, len(MUDD_AFTER_LAST), MUDD_SCALE).split(1, dim=-1)))
        x = x + mu["first"] * first + mu["backout"] * backout + mu["last_input"] * last_input
        return (x if ve is None else x + mu["ve"] * ve) + mu["skip"] * skip


def mudd_gate_slots(cfg):
    """#85: the MUDD gate's outputs as (kind, layer, width) in HEAD's order: the XSA strengths of
    xsa_layers and the attention gates of mudd_gate_attn (one per head), each layer's x0 and bigram
    coefficients (the last layer's are MUDD's when it is on), the skip's factor, DC's w1 and w2 of
    dc_layers (one per head each). A pair of lists: those for the layers before mudd_gate_layer, read
    from x0, then the rest, read from that layer's input."""
    h = cfg.n_head
    slots = [("xsa", i, h) for i in sorted(cfg.xsa_layers)] + [("attn", i, h) for i in sorted(cfg.mudd_gate_attn)]
    for i in range(cfg.n_layer - 1 if cfg.mudd else cfg.n_layer):
        attn = i not in cfg.no_attn_layers  # a layer without attention takes no x0 or bigram term, but layer 0's bigram
        slots += [("x0", i, 1)] * (cfg.x0_mixing and attn) + [("bigram", i, 1)] * (cfg.bigram_vocab > 0 and (attn or i == 0))
    slots += [("skip", cfg.skip_to, 1)] * (cfg.skip_from >= 0)
    slots += [(kind, i, h) for i in sorted(cfg.dc_layers) for kind in ("dc_w1", "dc_w2")]
    return [s for s in slots if s[1] < cfg.mudd_gate_layer], [s for s in slots if s[1] >= cfg.mudd_gate_layer]


class MuddGate(MuddMLP):
    """#85 the MUDD gate: per-token coefficients in place of the x0 and bigram lambdas and the skip's
    gate, per-head attention gates on a few layers, and the XSA strengths and DC weights in place of
    those layers' own, from x0 for the early layers and from the stream at mudd_gate_layer for the
    later ones; all scaled by one learned scale."""

    def __init__(self, cfg):
        halves = mudd_gate_slots(cfg)
        start = dict(xsa=0.0, attn=MUDD_GATE_ATTN_INIT, x0=0.0, bigram=cfg.bigram_lambda_init, skip=MUDD_GATE_SKIP_INIT,
                     dc_w1=MUDD_GATE_DC_W1_INIT, dc_w2=0.0)
        rows = [[start[kind] for kind, _, width in half for _ in range(width)] for half in halves]
        width = max(map(len, rows))
        super().__init__(cfg.d_model, [row + [0.0] * (width - len(row)) for row in rows], MUDD_GATE_SCALE_INIT, "mudd_gate")
        self.halves = halves
        self.scale = tag(constant(MUDD_GATE_SCALE_INIT), "mudd_gate_scale")

    def forward(self, x, half):
        """{(kind, layer): [T, width]} of half 0 (x: x0) or 1 (x: mudd_gate_layer's input)."""
        slots = self.halves[half]
        if not slots:
            return {}
        widths = [width for _, _, width in slots]
        out = self.coefs(x, half, sum(widths), self.scale).split(widths, dim=-1)
        return {(kind, layer): c for (kind, layer, _), c in zip(slots, out)}


def gate_heads(gate, layer):
    """A layer's attention inputs among the MUDD gate's outputs `gate` (#85): its heads' output gates,
    XSA strengths and DC's (w1, w2); all None without the gate (gate = {})."""
    dc = (gate[("dc_w1", layer)], gate[("dc_w2", layer)]) if ("dc_w1", layer) in gate else None
    return HeadInputs(gate=gate.get(("attn", layer)), xsa=gate.get(("xsa", layer)), dc=dc)


GPT2_RANKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gpt2.tiktoken")  # GPT-2's tokens as bytes


def prefix_tokens(rows, vocab_size, path=GPT2_RANKS):
    """#88: a [rows] table whose entry t is the token whose bytes are the longest proper prefix of
    token t's that is itself a token below vocab_size; NO_PREFIX where there is none (single bytes,
    <|endoftext|>, the padding rows). Read from the bundled ranks file: no tokenizer, no network."""
    ids = {}
    with open(path, "rb") as f:
        for line in f:
            token, rank = line.split()
            ids[base64.b64decode(token)] = int(rank)
    table = [NO_PREFIX] * rows
    for token, t in ids.items():
        if t >= vocab_size:
            continue
        for n in range(len(token) - 1, 0, -1):
            prefix = ids.get(token[:n], vocab_size)
            if prefix < vocab_size:
                table[t] = prefix
                break
    return torch.tensor(table)


class GPT(nn.Module):
    """The record model. forward(idx, targets, windows, mtp_weights, prefix_weight=None) returns the
    token losses' sum: the record trains on the sum, which sets the gradient scale Adam's eps is
    measured against; with next_token=True, (that sum, the sum of the plain next-token losses, no
    gradient). With prefix_loss on, load_prefix_table() must run before a prefix weight is passed."""

    def __init__(self, cfg, ops, attention, dtype=COMPUTE_DTYPE, table_dtype=None):
        super().__init__()
        self.cfg, self.ops, self.attention, self.dtype = cfg, ops, attention, dtype
        d = cfg.d_model
        self.vocab = -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
        self.lm_head = tag(normal(self.vocab, d, 0.005), "head")
        # tied until untie(): the embedding reads lm_head; a separate table exists only if it unties
        self.tied = True
        self.embed = (tag(param(torch.zeros(self.vocab, d), "copy of lm_head at untie (zeros before)"), "embed")
                      if cfg.untie_frac < 1 else None)
        self.ve_tables = value_embed_tables(cfg)
        inner = cfg.n_head * cfg.head_dim
        self.value_embeds = nn.ParameterList(
            tag(normal(self.vocab, inner, cfg.ve_init_std) if cfg.ve_init_std else zeros(self.vocab, inner),
                "value_embed", cfg.value_embed_lr_mul)
            for _ in range(cfg.value_embeds)
        )
        self.blocks = nn.ModuleList(Block(cfg, i, ops, dtype) for i in range(cfg.n_layer))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale)
        self.final_norm = Norm(cfg)
        self.position_embed = tag(normal(cfg.context, d, GPT2_STD), "embed") if cfg.position_embedding else None
        if cfg.smear:
            self.smear_lambda = tag(zeros(), "scalar")
            self.smear_gate = tag(zeros(1, cfg.gate_dims), "smear_gate", cfg.smear_gate_lr_mul)
        if cfg.x0_mixing:
            if not cfg.sublayer_resid:
                self.resid_lambdas = tag(constant(1.1, (cfg.n_layer,)), "scalar")
            if not cfg.mudd_gate:  # #85: the MUDD gate's per-token coefficients take their place
                self.x0_lambdas = tag(zeros(cfg.n_layer), "lambda" if cfg.sublayer_resid else "x0")
        if cfg.sublayer_resid:
            self.resid_lambdas = tag(constant(SUBLAYER_RESID_INIT, (cfg.n_layer, 2)), "resid_lambda")
        if cfg.post_lambdas:
            self.post_lambdas = tag(constant(POST_LAMBDA_INIT, (cfg.n_layer, 2)), "lambda")
        if cfg.skip_from >= 0:
            self.skip_gate = tag(constant(-1.5), "scalar")
            if cfg.skip_x0_gate:
                self.skip_x0_gate = tag(zeros(1, cfg.gate_dims), "skip_x0_gate", SKIP_X0_GATE_LR_MUL)
        if cfg.backout_layer >= 0 and not cfg.mudd:  # #81: MUDD's mix after the last layer takes its place
            self.backout_lambda = tag(constant(BACKOUT_INIT), "scalar")
        # made last, so switching it on leaves every other parameter's random init as it was
        self.bigram_embed = BigramEmbed(cfg) if cfg.bigram_vocab else None
        self.mudd = Mudd(cfg) if cfg.mudd else None  # #81
        self.mudd_gate = MuddGate(cfg) if cfg.mudd_gate else None  # #85
        if cfg.prefix_loss:  # #88: all NO_PREFIX until load_prefix_table(), a buffer the compiled graphs read
            self.register_buffer("prefix_table", torch.full((self.vocab,), NO_PREFIX), persistent=False)
        if cfg.init == "gpt2":
            self.gpt2_init()
        if table_dtype is not None:  # after init, so the random draws are the same in any dtype
            for p in self.parameters():
                if p.kind in TABLE_KINDS:
                    p.data = p.data.to(table_dtype)
        if cfg.bf16_weights:  # #57: rounded to nearest, the fp32 masters start there (their mantissas 0)
            for p in self.parameters():
                if p.kind in MANTISSA_KINDS:
                    p.data = p.data.to(torch.bfloat16)

    @torch.no_grad()
    def gpt2_init(self):
        """GPT-2's init as llm.c draws it: every matrix and the tied table (Q, K, V, O, the MLP's, the head)
        N(0, 0.02), the projections into the stream N(0, 0.02 / sqrt(2 n_layer)), and the tied
        table's padding rows 0; biases stay 0, LayerNorm gains 1."""
        for name, p in self.named_parameters():
            if p.kind not in ("matrix", "head"):  # the position table is made N(0, 0.02) already
                continue
            std = GPT2_STD / math.sqrt(2 * self.cfg.n_layer) if name.endswith(RESIDUAL_PROJECTIONS) else GPT2_STD
            fresh = normal(p.size(0), p.size(1), std)
            p.copy_(fresh)
            p.init = fresh.init
        self.lm_head[self.cfg.vocab_size :] = 0
        self.lm_head.init += f", rows from {self.cfg.vocab_size} (padding) 0"

    @torch.no_grad()
    def load_prefix_table(self):
        """Fill the #88 table in place, so the graphs compiled on the empty one read the filled one."""
        self.prefix_table.copy_(prefix_tokens(self.vocab, self.cfg.vocab_size))

    @torch.no_grad()
    def untie(self):
        """Give the embedding its own table, starting from the head's weight."""
        self.embed.copy_(self.lm_head)
        self.tied = False

    def embed_tokens(self, idx):
        """Token embeddings [T, d] before the norm (and the positions): what the shell penalty shapes."""
        x = F.embedding(idx, self.lm_head if self.tied else self.embed)
        if self.cfg.smear:
            # x[t] += lambda * sigmoid(w . x[t, :gate_dims]) * x[t-1]: a learned bigram shortcut
            gate = torch.sigmoid(F.linear(x[1:, : self.cfg.gate_dims], self.smear_gate))
            x = torch.cat([x[:1], x[1:] + self.smear_lambda * gate * x[:-1]])
        return x

    def hidden(self, idx, windows, attention=None, start=0):
        """Final normed hidden states [T, d] for a packed sequence of documents (`attention`
        replaces the backend's, e.g. by a SinkProbe around it; sample.py's KV cache runs only the
        newest tokens, `start` is the position of the first, for RoPE)."""
        # autocast for 16-bit dtypes only: fp32 needs none (and CPU autocast takes no other)
        with torch.autocast(idx.device.type, dtype=self.dtype, enabled=self.dtype.itemsize == 2):
            return self._hidden(idx, windows, attention or self.attention, start)

    def _hidden(self, idx, windows, attention, start):
        cfg = self.cfg
        x = self.embed_tokens(idx)
        if cfg.context:  # llm.c's rows: each one a causal span of its own, positions from its start
            pos = torch.arange(start, start + idx.numel(), device=idx.device)
            docs = pos // cfg.context
            if self.position_embed is not None:
                x = x + F.embedding(pos % cfg.context, self.position_embed).type_as(x)
        else:
            docs = (idx == BOS_ID).cumsum(0)
        masks = [attention.mask(docs, w) for w in windows] + ([HeadComposition.mask(docs)] if cfg.dc_layers else [])
        paired_masks = self.paired_masks(attention, idx, windows) if cfg.paired_head_layers else None
        x = x0 = norm(x) if cfg.embed_norm else x
        bigram = self.bigram_embed(idx) if self.bigram_embed is not None else None
        gate = self.mudd_gate(x0, 0) if self.mudd_gate is not None else {}  # #85: {(kind, layer): coefficients}
        skip = backout = lane = None
        for i, block in enumerate(self.blocks):
            if i == cfg.mudd_gate_layer and self.mudd_gate is not None:
                gate = {**gate, **self.mudd_gate(x, 1)}
            if i == cfg.skip_to and skip is not None:
                x = x + self.skip_scale(x0, gate) * skip
            if cfg.x0_mixing and not cfg.sublayer_resid:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if bigram is not None and not (cfg.sublayer_resid and i):  # #73: layer 0's goes in first, as before
                x = x + self.mix_lambda("bigram", i, gate) * bigram
            if i == 0:
                first = x  # the first layer's input, a MUDD source (#81)
            table = self.ve_tables[i]
            ve = None if table is None else F.embedding(idx, self.value_embeds[table])
            if i == cfg.n_layer - 1 and self.mudd is not None:  # #81
                last_input = x
                x, inputs = self.mudd.into_last(x, first, backout, ve, bigram, lane, gate_heads(gate, i))
            else:
                inputs = self.block_inputs(i, block, ve, x0, bigram, lane, gate)
            x = self.run_block(block, x, rotary=self.rotary, attend=attention, start=start,
                               masks=paired_masks if i in cfg.paired_head_layers else masks, **inputs)
            if i == cfg.skip_from:
                skip = x
            if i == cfg.backout_layer:
                backout = x
            if i == cfg.lane_layer:
                lane = x
        if self.mudd is not None:  # #81
            ve = F.embedding(idx, self.value_embeds[0]) if cfg.value_embeds else None
            x = self.mudd.after_last(x, first, backout, last_input, ve, skip)
        elif backout is not None:
            x = x - self.backout_lambda * backout
        return self.final_norm(x)

    def block_inputs(self, i, block, ve, x0, bigram, lane, gate):
        """Block i's keywords besides the stream and the attention's (see Block.forward); no terms to
        join an attention output where there is none."""
        cfg = self.cfg
        return dict(ve=ve, resid=self.resid_lambdas[i] if cfg.sublayer_resid else None,
                    post=self.post_lambdas[i] if cfg.post_lambdas else None,
                    inject=self.injection(i, x0, bigram, gate) if cfg.sublayer_resid and block.attn is not None else None,
                    lane=lane if i > cfg.lane_layer >= 0 else None, heads=gate_heads(gate, i))

    def paired_masks(self, attention, idx, windows):
        """#58: the (long, short) masks over the paired layers' 2T sequence, each token's document
        twice; None for a window no paired layer uses. HEAD keeps the window's count of positions, so a
        paired layer reaches half as many tokens back. The document ids are a running sum, as for the
        T sequence: inductor's CPU flex attention reads no ids made by indexing (repeat_interleave)."""
        used = {layer in self.cfg.long_window_layers for layer in self.cfg.paired_head_layers}
        starts = idx == BOS_ID
        docs = torch.stack([starts, torch.zeros_like(starts)], dim=1).flatten().cumsum(0)
        return [attention.mask(docs, w) if long in used else None for long, w in zip((True, False), windows)]

    def run_block(self, block, *args, **kwargs):
        """block(*args, **kwargs); with activation checkpointing only its input is kept for the backward,
        which runs the block again to get the rest (for GPUs that cannot hold a whole step's activations)."""
        if self.cfg.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def mix_lambda(self, kind, i, gate):
        """Layer i's x0 or bigram coefficient: the MUDD gate's, per token (#85), or the learned lambda."""
        if self.mudd_gate is not None:
            return gate[(kind, i)]
        return self.x0_lambdas[i] if kind == "x0" else self.bigram_embed.lambdas[i]

    def injection(self, i, x0, bigram, gate):
        """What layer i adds with its attention output under sublayer_resid (#73): a_i x0, plus b_i
        times the bigram embedding from layer 1 on (layer 0's comes in before the first block)."""
        inject = self.mix_lambda("x0", i, gate) * x0 if self.cfg.x0_mixing else None
        if bigram is None or i == 0:
            return inject
        term = self.mix_lambda("bigram", i, gate) * bigram
        return term if inject is None else inject + term

    def skip_scale(self, x0, gate):
        """sigmoid(skip_gate), times the MUDD gate's factor (#85) or 2 sigmoid(w . x0[:gate_dims])
        (#55, skip_x0_gate) per token."""
        scale = torch.sigmoid(self.skip_gate)
        if self.mudd_gate is not None:
            return scale * gate[("skip", self.cfg.skip_to)]
        if not self.cfg.skip_x0_gate:
            return scale
        return scale * GATE_RANGE * torch.sigmoid(F.linear(x0[:, : self.cfg.gate_dims], self.skip_x0_gate.type_as(x0)))

    def logits(self, x):
        """Raw head outputs z [T, vocab] in the compute dtype (the softcap is applied inside the loss);
        FP8 only while training, validation runs the head in the compute dtype."""
        x = x.to(self.dtype)
        if self.cfg.fp8_head and self.training:
            # the weight as stored: FP8 casts it anyway, and its gradient reaches it unrounded
            return fp8_linear(x, self.lm_head)
        return F.linear(x, self.lm_head.to(self.dtype))

    def forward(self, idx, targets, windows, mtp_weights, prefix_weight=None, next_token=False):
        z = self.logits(self.hidden(idx, windows))
        cfg = self.cfg
        # a StableMax model predicts StableMax(l): its validation is the cross-entropy of that distribution,
        # -log p(target) as every other model's, where softmax of logits trained for StableMax means nothing
        loss_fn = self.ops.stablemax_mtp_ce if cfg.stablemax else self.ops.softcap_mtp_ce
        prefix = None if prefix_weight is None else self.prefix_table[targets]  # #88 (training passes the weight)
        losses = loss_fn(z, targets, mtp_weights, cfg.softcap, cfg.softcap_temp, cfg.softcap_offset, prefix, prefix_weight,
                         next_token=next_token)
        return (losses[0].sum(), losses[1].sum()) if next_token else losses.sum()

    @torch.no_grad()
    def first_token_attention(self, idx, windows):
        """alpha [attention layers, heads]: the mean attention a query gives its document's first
        token (Gu et al.'s sink metric), with the extra slot, if any, in the softmax.

        Runs the blocked attention on every device: plain torch, memory T * window, where flex
        attention outside torch.compile would materialize all T x T scores."""
        probe = SinkProbe(BlockedAttention(self.cfg.window_block))
        self.hidden(idx, windows, probe)
        layers = [block.attn for block in self.blocks if block.attn is not None]
        scale = self.rotary.attn_scale
        slots = [functools.partial(attn.slot_logit, scale=scale) if attn.has_slot else None for attn in layers]
        return torch.stack([probe.alpha(i, slot) for i, slot in enumerate(slots)])


def shell_penalty(x):
    """mean_t max(0, sqrt(2d / (||x_t||^2 + 0.1)) - 1) + ||mean_t x_t||^2 / sqrt(d) for x [T, d]:
    pushes the embeddings out onto a shell of radius about sqrt(2d) and centres them on 0."""
    x = x.float()
    d = x.size(-1)
    hinge = F.relu(torch.sqrt(SHELL_RADIUS_SQ * d / (x.square().sum(-1) + SHELL_EPS)) - 1).mean()
    return hinge + x.mean(0).square().sum() / math.sqrt(d)


SINK_THRESHOLD = 0.3  # a head sinks when it gives its document's first token more than this (Gu et al.)


class SinkProbe:
    """Wraps an attention backend and records, per call, what the sink metric needs.

    For every query it keeps the log-probability of its document's first token among the real
    keys. Counted are the queries that have a choice: a document's first token (which can only see
    itself) and queries whose window no longer reaches the document start are left out.
    """

    def __init__(self, attention):
        self.attention = attention
        self.calls = []  # per attention call: q [T, H, D], log p [T, H], lse [T, H], counted [T]

    def mask(self, docs, window):
        pos = torch.arange(docs.numel(), device=docs.device)
        first = torch.searchsorted(docs, docs)  # docs is sorted: the first position of each document
        return self.attention.mask(docs, window), first, (pos > first) & (pos - first <= window)

    def __call__(self, q, k, v, mask, scale, need_lse):
        inner, first, counted = mask
        y, lse = self.attention(q, k, v, inner, scale, True)
        score = scale * (q.float() * k[first].float()).sum(-1)
        self.calls.append((q, score - lse, lse, counted))
        return y, (lse if need_lse else None)

    def alpha(self, call, slot_logit=None):
        """[H]: the mean over counted queries of one call's attention on the document's first token.
        `slot_logit(q)` puts an extra slot into the softmax: log p -= log(1 + exp(e - lse))."""
        q, log_p, lse, counted = self.calls[call]
        if slot_logit is not None:
            log_p = log_p - F.softplus(slot_logit(q) - lse)
        return log_p.exp()[counted].mean(0)


def sink_share(alphas):
    """Share of (layer, head) pairs whose first-token attention exceeds SINK_THRESHOLD."""
    return (alphas > SINK_THRESHOLD).float().mean().item()


# ------------------------------------------------------------------------------------------------
# Optimizers: NorMuon (Polar Express) for hidden matrices, Adam for the rest, plain AdamW baseline
# ------------------------------------------------------------------------------------------------

# Polar Express coefficients (a, b, c) per iteration: X <- a X + (b A + c A^2) X with A = X X^T
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_NORM_MARGIN = 1.02  # divide by a bit more than the Frobenius norm so no singular value exceeds 1
NORMUON_EPS = 1e-10
HALF_BITS = 16  # #57: a bf16 is the upper half of an fp32's 32 bits, the mantissa buffer the lower
LOW_HALF = (1 << HALF_BITS) - 1


def polar_express(g, ops, steps=len(POLAR_EXPRESS_COEFFS), dtype=COMPUTE_DTYPE):
    """Approximately orthogonalize a batch of matrices [..., m, n] in `dtype` (singular values -> ~1)."""
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # work in the wide orientation so X X^T is the small Gram matrix
        x = x.mT
    x = x / (POLAR_NORM_MARGIN * x.norm(dim=(-2, -1), keepdim=True) + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        gram = ops.sym_mm(x)
        x = a * x + ops.sym_axpby(gram, b, c) @ x
    return x.mT if tall else x


def normuon_reduce_dim(shape, kind):
    """NorMuon normalizes each row, or each column of a wide matrix; a gate always per row (head)."""
    return -1 if kind == "gate" or shape[-2] >= shape[-1] else -2


def normuon_normalize(u, second_moment, beta2, reduce_dim):
    """NorMuon: divide each row (reduce_dim -1) or column (-2) by the root of an EMA of its mean
    square, then restore the update's Frobenius norm. Updates `second_moment` in place."""
    second_moment.lerp_(u.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    before = u.norm(dim=(-2, -1), keepdim=True)
    u = u * second_moment.clamp_min(NORMUON_EPS).rsqrt()
    return u * (before / u.norm(dim=(-2, -1), keepdim=True).clamp_min(NORMUON_EPS))


def cautious_mask(update, param, strict=True):
    """Where update and weight share a sign: decaying there never fights the update. The record's
    NorMuon also decays where either is zero (strict=False), its Adam does not."""
    same = update * param > 0 if strict else update * param >= 0
    return same.to(param.dtype)


def muon_transposed(p):
    """NorMuon handles a tall matrix (block) as its (wide) transpose: Polar Express and the
    normalization of its rows treat the transpose's columns identically. A gate keeps its per-head rows."""
    return p.kind == "matrix" and p.size(-2) // p.muon_blocks > p.size(-1)


def muon_view(p, t):
    """`t` (p itself or its gradient) as NorMuon's matrices [p.muon_blocks, rows, cols]: p's row
    blocks (one block unless split, as #80 splits Q and K by head pairs), in NorMuon's orientation."""
    blocks = t.unflatten(0, (p.muon_blocks, -1))
    return blocks.mT if muon_transposed(p) else blocks


def join_fp32(high, low):
    """The fp32 numbers whose upper 16 bits are bf16 `high`'s and lower 16 bits uint16 `low`'s."""
    return ((high.view(torch.int16).to(torch.int32) << HALF_BITS) | low.to(torch.int32)).view(torch.float32)


def split_fp32(x, high, low):
    """Write fp32 `x`'s upper 16 bits into bf16 `high` (x rounded toward zero) and its lower 16 into uint16 `low`."""
    bits = x.view(torch.int32)
    high.copy_((bits >> HALF_BITS).to(torch.int16).view(torch.bfloat16))
    low.copy_((bits & LOW_HALF).to(torch.uint16))


def normuon_update(grad, weights, momentum_buf, second_moment, lr_mul, hyper, beta2, reduce_dim, ops, polar_steps, dtype,
                   mantissa=None):
    """One NorMuon step on a stack of matrices, in place on `weights` and the state.
    `hyper` is a tensor [1 - momentum, momentum, lr, weight_decay * lr], so new values never recompile.
    With a `mantissa` (#57), `weights` are bf16 and the step runs on the fp32 masters they and the
    mantissa are the two halves of, then writes both halves back."""
    master = weights if mantissa is None else join_fp32(weights, mantissa)
    grad = grad.to(master.dtype)
    momentum_buf.lerp_(grad, hyper[0])
    nesterov = grad.lerp(momentum_buf, hyper[1])  # not in place: inductor's CPU codegen fails on that
    u = polar_express(nesterov, ops, polar_steps, dtype).to(grad.dtype)  # normalize in full precision
    u = normuon_normalize(u, second_moment, beta2, reduce_dim)
    step_lr, decay = normuon_rates(hyper[2], hyper[3], lr_mul)
    master.sub_(cautious_mask(u, master, strict=False) * master * decay + u * step_lr)
    if mantissa is not None:
        split_fp32(master, weights, mantissa)


def normuon_rates(lr, lr_decay, lr_mul):
    """A matrix's step size lr * lr_mul and decay coefficient lr_decay (weight_decay * lr) times
    that, as in the record: on the step's device tensors, or on numbers for Optimizers.hyperparams."""
    step_lr = lr * lr_mul
    return step_lr, lr_decay * step_lr


def hyper_dtype(grad):
    """Learning rates and decay coefficients stay in float32 (or wider) for a bf16 table's step:
    bf16 would round the lr by up to 0.4%."""
    return torch.promote_types(grad.dtype, torch.float32)


def fill(t, values):
    """Write python numbers into a device tensor without a host-to-device copy (one fill each)."""
    for i, v in enumerate(values):
        t[i].fill_(v)


def unshard_rows(shares, rows):
    """A tensor whole again from its ranks' consecutive row shares (the last ones zero-padded)."""
    return torch.cat(shares)[:rows]


def rows_of_rank(full, rank, world):
    """Rank `rank`'s share when `full`'s rows are cut into `world` equal shares, zero-padded at the
    end as the optimizers pad a tensor whose rows world does not divide."""
    per_rank = -(-full.size(0) // world)
    padded = torch.cat([full, full.new_zeros(per_rank * world - full.size(0), *full.shape[1:])])
    return padded[rank * per_rank : (rank + 1) * per_rank].clone()


class NorMuon(torch.optim.Optimizer):
    """Muon with NorMuon normalization and cautious weight decay, sharded across ranks.

    Layout: each matrix in its wide orientation (a tall one transposed, see muon_transposed), so
    that the MLP's up and down projections form one group; a group is every matrix of one shape and
    kind, stacked. A group of G matrices is cut into world_size shares of ceil(G / world_size)
    consecutive matrices, the last shares zero-padded only where world_size does not divide G
    (speedrun on 8 ranks: 40 attention matrices, no padding; 22 MLP matrices, 2; 10 gates, 6).
    The gradients are reduce-scattered, each rank updates its share, and the new weights are
    all-gathered. Every group's reduce-scatter is launched before any work starts and each
    all-gather runs while the next group is computed, so communication overlaps the math.
    Each matrix steps lr * lr_mul and decays weight_decay * lr * (lr * lr_mul), as in the record.
    With `mantissa` (#57), the groups of MANTISSA_KINDS hold bf16 weights: each rank keeps the lower
    16 bits of its share's fp32 masters (state "mantissa", uint16), steps the masters in fp32 exactly
    as fp32 weights would step (momentum and second moment in fp32), and gathers bf16.
    """

    def __init__(self, params, lr, weight_decay, momentum, beta2, ops, rank=0, world_size=1, polar_steps=5,
                 dtype=COMPUTE_DTYPE, compile=False, mantissa=False):
        by_shape = {}
        for p in params:
            by_shape.setdefault((p.kind, tuple(muon_view(p, p).shape[1:])), []).append(p)
        groups = [dict(params=ps) for _, ps in sorted(by_shape.items())]
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2))
        self.ops, self.rank, self.world_size, self.polar_steps = ops, rank, world_size, polar_steps
        self.mantissa = mantissa
        self.dtype = dtype  # of the orthogonalization: the backend's compute dtype
        self.update = torch.compile(normuon_update, dynamic=False, fullgraph=True) if compile else normuon_update
        self.hyper = {}  # group index -> its hyperparameters on the device

    @torch.no_grad()
    def step(self):
        self.update_and_gather(self.reduce_grads())

    @torch.no_grad()
    def reduce_grads(self):
        """Stack each group's gradients and start their reduce-scatters: [(this rank's share, work)]."""
        pending = []
        for group in self.param_groups:
            params = group["params"]
            count = sum(p.muon_blocks for p in params)
            per_rank = -(-count // self.world_size)
            shape = muon_view(params[0], params[0].grad).shape[1:]
            stack = params[0].grad.new_empty(per_rank * self.world_size, *shape)
            torch.cat([muon_view(p, p.grad) for p in params], out=stack[:count])
            stack[count:].zero_()
            if self.world_size == 1:
                pending.append((stack, None))
                continue
            own = stack.new_empty(per_rank, *shape)
            pending.append((own, dist.reduce_scatter_tensor(own, stack, op=dist.ReduceOp.AVG, async_op=True)))
        return pending

    @torch.no_grad()
    def update_and_gather(self, pending):
        """Update this rank's share of every group, all-gather the shares and write them back."""
        gathers = []
        for index, (group, (grad, work)) in enumerate(zip(self.param_groups, pending)):
            if work is not None:
                work.wait()
            params, per_rank = group["params"], grad.size(0)
            matrices = [m for p in params for m in muon_view(p, p).unbind(0)]  # views into the parameters
            lr_muls = [p.lr_mul for p in params for _ in range(p.muon_blocks)]
            first = self.rank * per_rank
            mine = matrices[first : first + per_rank]
            weights = torch.empty_like(grad)
            if mine:
                torch.stack(mine, out=weights[: len(mine)])
            weights[len(mine):].zero_()
            state = self._state(group, grad, lr_muls[first : first + per_rank])
            if index not in self.hyper:
                self.hyper[index] = grad.new_empty(4, dtype=hyper_dtype(grad))
            hyper = self.hyper[index]
            fill(hyper, self.group_hyper(group))
            reduce_dim = normuon_reduce_dim(grad.shape, params[0].kind)
            self.update(grad, weights, state["momentum"], state["second_moment"], state["lr_mul"], hyper,
                        group["beta2"], reduce_dim, self.ops, self.polar_steps, self.dtype, state.get("mantissa"))
            if self.world_size == 1:
                gathers.append((matrices, weights, None))
                continue
            full = weights.new_empty(per_rank * self.world_size, *weights.shape[1:])
            gathers.append((matrices, full, dist.all_gather_into_tensor(full, weights, async_op=True)))
        for matrices, full, work in gathers:
            if work is not None:
                work.wait()
            torch._foreach_copy_(matrices, list(full[: len(matrices)].unbind(0)))

    @staticmethod
    def group_hyper(group):
        """The group's [1 - momentum, momentum, lr, weight_decay * lr], as normuon_update reads them."""
        return 1 - group["momentum"], group["momentum"], group["lr"], group["weight_decay"] * group["lr"]

    def hyperparams(self):
        """Per matrix: (step size, decay coefficient, (momentum, beta2)) at the groups' settings."""
        table = {}
        for group in self.param_groups:
            _, momentum, lr, lr_decay = self.group_hyper(group)
            for p in group["params"]:
                table[p] = (*normuon_rates(lr, lr_decay, p.lr_mul), (momentum, group["beta2"]))
        return table

    def load_state_dict(self, state_dict):
        """torch's, but every state tensor keeps the dtype it was saved in: torch casts floating state
        to its parameter's dtype, which would round the fp32 momentum beside #57's bf16 weights."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            self.state[params[index]].update({key: value.to(params[index].device) for key, value in saved.items()})

    def _state(self, group, grad, lr_muls):
        """The group's momentum, second moment, per-matrix lr multipliers (`lr_muls`: this rank's
        share's) and, with #57's bf16 weights, the mantissas of this rank's share (0: the fp32 masters
        start at the bf16 weights)."""
        state = self.state[group["params"][0]]
        if not state:
            reduce_dim = normuon_reduce_dim(grad.shape, group["params"][0].kind)
            mantissa = self.mantissa and group["params"][0].kind in MANTISSA_KINDS
            dtype = torch.float32 if mantissa else grad.dtype
            state["momentum"] = torch.zeros_like(grad, dtype=dtype)
            shape = list(grad.shape)
            shape[reduce_dim] = 1
            state["second_moment"] = torch.zeros(shape, device=grad.device, dtype=dtype)
            if mantissa:
                state["mantissa"] = torch.zeros_like(grad, dtype=torch.uint16)
            # per-matrix lr multipliers, made once: a host-to-device copy every step would stall it
            lr_muls = lr_muls + [0.0] * (len(grad) - len(lr_muls))  # padding stays 0
            state["lr_mul"] = torch.tensor(lr_muls, device=grad.device, dtype=hyper_dtype(grad))[:, None, None]
        return state

    def reshard(self, states):
        """This rank's state_dict from the state_dicts of all ranks of a run with len(states) ranks:
        every tensor of a group's state holds that run's share of the group's stacked matrices, so
        the shares are joined and cut anew for this run's ranks."""
        mine, index = dict(state={}, param_groups=states[0]["param_groups"]), 0
        for group in self.param_groups:
            count = sum(p.muon_blocks for p in group["params"])
            if index in states[0]["state"]:
                mine["state"][index] = {key: rows_of_rank(unshard_rows([s["state"][index][key] for s in states], count),
                                                          self.rank, self.world_size)
                                        for key in states[0]["state"][index]}
            index += len(group["params"])
        return mine


def adam_update(param, grad, exp_avg, exp_avg_sq, hyper, beta1, beta2, eps, decay, cautious):
    """One Adam step on a tensor (or this rank's rows of it), in place on it and its moments: every
    elementwise pass in one function, which torch.compile fuses. `hyper` is a tensor [step size,
    lr^2 * weight_decay], so new values never recompile; `decay` says whether to decay at all."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    # eps is added to the root of the uncorrected second moment, as in the record
    update = exp_avg / (exp_avg_sq.sqrt() + eps)
    if decay:  # addcmul_ with the 0-d hyperparameter: one pass, like sub_'s alpha
        param.addcmul_(cautious_mask(update, param) * param if cautious else param, hyper[1], value=-1)
    param.addcmul_(update, hyper[0], value=-1)


class Adam(torch.optim.Optimizer):
    """Adam with decoupled weight decay lr^2 * weight_decay (the record's, so decay falls with the
    lr schedule twice; with lr_squared_decay=False AdamW's lr * weight_decay), optionally cautious (only
    where update and weight share a sign).

    Across ranks a tensor with at least one row per rank (the head, embedding and value-embedding
    tables) is split by rows: its gradient is reduce-scattered (zero-padded to whole shares only
    where world_size does not divide its rows), each rank updates its rows and keeps only their
    moments, and the new rows are all-gathered (straight into the tensor when the shares tile it).
    While `armed` (the last backward before an Adam step), a hook starts each such reduce-scatter
    as soon as the backward has accumulated the gradient. Smaller tensors (scalars, the smear gate)
    are all-reduced in step() and updated whole on every rank. Gradients travel in float32, the
    parameters' dtype: the record's bf16 tables send bf16 gradients, but rounding ours to bf16 on
    the wire would change the update, which is not this optimizer's to do.
    perpGrad, for the parameters in `perp`, is applied to each rank-local gradient before it travels.
    """

    def __init__(self, groups, lr, betas, eps, weight_decay, cautious, rank=0, world_size=1, compile=False,
                 perp=(), perp_rescale=False, lr_squared_decay=True):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.cautious, self.rank, self.world_size = cautious, rank, world_size
        self.lr_squared_decay = lr_squared_decay  # False: AdamW's lr * weight_decay (torch, llm.c)
        self.perp, self.perp_rescale = {id(p) for p in perp}, perp_rescale
        self.update = torch.compile(adam_update, dynamic=False, fullgraph=True) if compile else adam_update
        self.reducing = {}  # param -> (the gradient (rows) this rank steps with, work in flight or None)
        self.gathers = []  # (param, padded buffer or None, work) of the all-gathers in flight
        self.hyper = {}  # param -> its step size and decay on the device
        self.armed = False
        if world_size > 1:
            for group in self.param_groups:
                for p in group["params"]:
                    if self.split(p):
                        p.register_post_accumulate_grad_hook(self._grad_ready)

    def split(self, p, world_size=None):
        """Whether p is split by rows across ranks (else all-reduced and updated whole everywhere), on
        this run's ranks or on `world_size` ranks."""
        world_size = world_size or self.world_size
        return world_size > 1 and p.dim() >= 2 and p.size(0) >= world_size

    def reshard(self, states):
        """This rank's state_dict from the state_dicts of all ranks of a run with len(states) ranks:
        the moments of a tensor split by rows there are joined, then split anew for this run (those
        of an unsplit one are the same on every rank)."""
        params = [p for group in self.param_groups for p in group["params"]]
        mine = dict(state={}, param_groups=states[0]["param_groups"])
        for index, state in states[0]["state"].items():
            p, joined = params[index], {}
            was_split, is_split = self.split(p, len(states)), self.split(p)
            for key, value in state.items():
                if torch.is_tensor(value):
                    full = unshard_rows([s["state"][index][key] for s in states], p.size(0)) if was_split else value
                    value = rows_of_rank(full, self.rank, self.world_size) if is_split else full
                joined[key] = value
            mine["state"][index] = joined
        return mine

    def _grad_ready(self, p):
        if self.armed:
            self._reduce(p)

    def _reduce(self, p):
        """perpGrad if chosen for p, then start averaging p's gradient across ranks."""
        if id(p) in self.perp:
            orthogonalize_grads([p], self.perp_rescale)
        grad, work = p.grad, None
        if self.split(p):
            per_rank = -(-p.size(0) // self.world_size)
            if per_rank * self.world_size != p.size(0):
                grad = torch.cat([grad, grad.new_zeros(per_rank * self.world_size - p.size(0), *grad.shape[1:])])
            own = grad.new_empty(per_rank, *grad.shape[1:])
            work = dist.reduce_scatter_tensor(own, grad, op=dist.ReduceOp.AVG, async_op=True)
            grad = own
        elif self.world_size > 1:
            work = dist.all_reduce(grad, op=dist.ReduceOp.AVG, async_op=True)
        self.reducing[p] = (grad, work)

    @torch.no_grad()
    def step(self, wait=True, clip=0.0):
        """Step every parameter with a gradient; wait=False leaves the all-gathers in flight until wait().
        `clip`: first scale the averaged gradients to a global norm of at most this (0: as they are)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p not in self.reducing:
                    self._reduce(p)
        self.armed = False
        if clip:
            self.clip_grads(clip)
        for group in self.param_groups:
            lr, decay, (beta1, beta2) = self.rates(group)
            for p in group["params"]:
                if p not in self.reducing:
                    continue
                grad, work = self.reducing.pop(p)
                if work is not None:
                    work.wait()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                t = state["step"]
                if p not in self.hyper:
                    self.hyper[p] = grad.new_empty(2, dtype=hyper_dtype(grad))
                fill(self.hyper[p], (lr * math.sqrt(1 - beta2**t) / (1 - beta1**t), decay))
                rows, padded = self._rows(p, grad)
                self.update(rows, grad, state["exp_avg"], state["exp_avg_sq"], self.hyper[p], beta1, beta2,
                            group["eps"], bool(group["weight_decay"]), self.cautious)
                if self.split(p):
                    full = p.detach() if padded is None else padded
                    self.gathers.append((p, padded, dist.all_gather_into_tensor(full, rows, async_op=True)))
        if wait:
            self.wait()

    def clip_grads(self, clip):
        """Scale every averaged gradient by min(1, clip / their global norm), as llm.c and nanoGPT clip:
        waits for the averages, counts each rank's rows of a split tensor once, and never reads the device."""
        for grad, work in self.reducing.values():
            if work is not None:
                work.wait()
        self.reducing = {p: (grad, None) for p, (grad, _) in self.reducing.items()}
        squares = torch.stack([at_least_fp32(grad).square().sum() / (1 if self.split(p) else self.world_size)
                               for p, (grad, _) in self.reducing.items()]).sum()
        if self.world_size > 1:
            dist.all_reduce(squares)
        scale = (clip / squares.sqrt()).clamp(max=1.0)
        for grad, _ in self.reducing.values():
            grad.mul_(scale.to(grad.dtype))

    def rates(self, group):
        """A group's lr (before the bias correction), decay coefficient lr^2 * weight_decay (or AdamW's
        lr * weight_decay) and betas."""
        lr = group["lr"]
        return lr, (lr * lr if self.lr_squared_decay else lr) * group["weight_decay"], group["betas"]

    def hyperparams(self):
        """Per parameter: (lr, decay coefficient, betas) at the groups' settings."""
        return {p: self.rates(group) for group in self.param_groups for p in group["params"]}

    def _rows(self, p, grad):
        """The rows of p this rank updates with `grad` (its averaged rows), in place in p where the
        shares tile it exactly (else in a zero-padded copy), and the buffer to all-gather them into
        (None: into p itself)."""
        if not self.split(p):
            return p.detach(), None
        per_rank = grad.size(0)
        start = self.rank * per_rank
        if per_rank * self.world_size == p.size(0):
            return p.detach()[start : start + per_rank], None
        rows = p.new_zeros(per_rank, *p.shape[1:])
        n = max(0, min(per_rank, p.size(0) - start))
        rows[:n] = p.detach()[start : start + n]
        return rows, p.new_empty(per_rank * self.world_size, *p.shape[1:])

    @torch.no_grad()
    def wait(self):
        """Wait for the all-gathers of the last step and write any padded ones back."""
        for p, padded, work in self.gathers:
            work.wait()
            if padded is not None:
                p.copy_(padded[: p.size(0)])
        self.gathers = []

    def copy_state(self, src, dst):
        """Start `dst` from `src`'s moments (used when the embedding unties from the head); both are
        split alike, so each rank copies its own rows."""
        if src in self.state:
            self.state[dst] = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.state[src].items()}


def orthogonalize_grads(params, rescale):
    """perpGrad: g <- g - (<w,g> / <w,w>) w per tensor, dropping the part of the gradient that only
    scales the weight; with `rescale`, then back to ||g||. A zero tensor (zero-init weights) has
    <w,g> = 0 and keeps its gradient; a gradient with nothing orthogonal left (below float32
    rounding of ||g||, as for every scalar) becomes 0 rather than rounding noise blown up to ||g||."""
    tiny, eps = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).eps
    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach().float(), p.grad.float()
        perp = g - ((w * g).sum() / w.square().sum().clamp_min(tiny)) * w
        if rescale:
            left, full = perp.norm(), g.norm()
            perp = torch.where(left > eps * full, perp * (full / left.clamp_min(tiny)), 0.0)
        p.grad.copy_(perp)


class Optimizers:
    """The run's optimizers with their schedules: NorMuon + Adam (stepping every `adam_every`
    steps, its gradients accumulating in between), or plain AdamW on everything (`--muon=false`)."""

    def __init__(self, model, cfg, backend):
        self.cfg = cfg
        params = list(model.parameters())
        rank, world = backend.rank, backend.world_size
        matrices = [p for p in params if p.kind in ("matrix", "gate")] if cfg.muon else []
        # perpGrad acts on the gradients each optimizer is about to use, right before it steps: Adam's
        # accumulate over adam_every steps and the rescale is not linear, so they are projected once,
        # summed. Gradients are still rank-local then (the optimizers average them): the projection
        # commutes with the average (all ranks hold the same w), the rescale uses the local norm.
        perp = [p for p in params if cfg.perp_grad == "all" or (cfg.perp_grad == "matrices" and p.kind == "matrix")]
        own = {id(p) for p in matrices}
        self.perp_muon = [p for p in perp if id(p) in own]
        self.perp_adam = [p for p in perp if id(p) not in own]
        compile = cfg.compile or cfg.compile_elementwise
        adam = dict(rank=rank, world_size=world, compile=compile, perp=self.perp_adam,
                    perp_rescale=cfg.perp_grad_rescale)
        if cfg.muon:
            self.muon = NorMuon(matrices, cfg.muon_lr, cfg.muon_wd, cfg.muon_momentum, cfg.muon_beta2,
                                backend.ops, rank, world, cfg.polar_steps, backend.compute_dtype, compile,
                                cfg.bf16_weights)
            adam_betas, wd = cfg.adam_betas, cfg.adam_wd
            kinds = {  # kind: (lr, betas, weight decay)
                "head": (cfg.adam_lr, adam_betas, wd * cfg.head_wd_mul),
                "embed": (cfg.adam_lr, adam_betas, wd * cfg.head_wd_mul),
                "value_embed": (cfg.adam_lr * cfg.value_embed_lr_mul, cfg.value_embed_betas, wd * cfg.value_embed_wd_mul),
                "smear_gate": (cfg.adam_lr * cfg.smear_gate_lr_mul, cfg.smear_gate_betas, 0.0),
                "x0": (cfg.adam_lr * cfg.scalar_lr_mul, adam_betas, 0.0),
                "scalar": (cfg.adam_lr * cfg.scalar_lr_mul, cfg.scalar_betas, 0.0),
                "adam_gate": (cfg.adam_lr, cfg.scalar_betas, wd),
                "skip_x0_gate": (cfg.adam_lr * SKIP_X0_GATE_LR_MUL, cfg.scalar_betas, 0.0),
                "bigram": (cfg.adam_lr * cfg.bigram_lr_mul, cfg.bigram_betas, wd * cfg.bigram_wd_mul),
                "resid_lambda": (cfg.adam_lr * cfg.resid_lambda_lr_mul, cfg.lambda_betas, 0.0),
                "lambda": (cfg.adam_lr, cfg.lambda_betas, 0.0),
                "mudd": (cfg.adam_lr * cfg.mudd_lr_mul, cfg.scalar_betas, wd),
                "mudd_bias": (cfg.adam_lr * cfg.mudd_lr_mul, cfg.scalar_betas, 0.0),
                "mudd_gate": (cfg.adam_lr * cfg.mudd_gate_lr_mul, cfg.scalar_betas, wd),
                "mudd_gate_bias": (cfg.adam_lr * cfg.mudd_gate_lr_mul, cfg.scalar_betas, 0.0),
                "mudd_gate_scale": (cfg.adam_lr * cfg.mudd_gate_lr_mul, cfg.scalar_betas, 0.0),
                "dc": (cfg.adam_lr * DC_LR_MUL, cfg.scalar_betas, 0.0),
            }
            groups = []
            for kind, (lr, betas, decay) in kinds.items():
                members = [p for p in params if p.kind == kind]
                if members:
                    groups.append(dict(params=members, lr=lr, base_lr=lr, betas=betas, weight_decay=decay))
            self.adam = Adam(groups, cfg.adam_lr, adam_betas, cfg.adam_eps, wd, cautious=True, **adam)
            self.adam_name, self.adam_every = "Adam", cfg.adam_every
        else:
            # llm.c and nanoGPT decay every 2-d tensor (matrices, the head, the embedding tables), not the rest
            self.muon = None
            decayed = [p for p in params if p.dim() >= 2]
            others = [p for p in params if p.dim() < 2]
            groups = [dict(params=members, base_lr=cfg.adamw_lr, betas=cfg.adamw_betas, weight_decay=wd)
                      for members, wd in ((decayed, cfg.adamw_wd), (others, 0.0)) if members]
            self.adam = Adam(groups, cfg.adamw_lr, cfg.adamw_betas, cfg.adam_eps, cfg.adamw_wd, cautious=False,
                             lr_squared_decay=False, **adam)
            self.adam_name, self.adam_every = "AdamW", 1
        for group in (self.muon.param_groups if self.muon else []):
            group["base_lr"] = cfg.muon_lr
        self.scalars = [p for p in params if p.kind == "scalar"]

    def adam_steps(self, step, last):
        """Adam steps every `adam_every` steps and on the last."""
        return (step + 1) % self.adam_every == 0 or last

    def arm(self, step, last):
        """Call before the last backward of `step`: when Adam steps after it, its gradient hooks
        start averaging the big tables' gradients while that backward still runs."""
        self.adam.armed = self.adam_steps(step, last)

    def step(self, step, lr_mult, momentum, last, freeze_scalars=False, clip=0.0):
        """Apply the step's schedule and step; Adam only every `adam_every` steps (and the last), its
        averaged gradients clipped to a global norm of `clip` if not 0.
        `freeze_scalars` drops the scalars' gradients, so Adam neither steps nor accumulates them.
        Order: NorMuon's reduce-scatters, Adam's update and all-gathers, then NorMuon's math while
        those travel; Adam's all-gathers are waited for last."""
        if freeze_scalars:
            for p in self.scalars:
                p.grad = None
        adam_steps = self.adam_steps(step, last)
        self.set_schedule(lr_mult, momentum)
        if self.muon is not None:
            orthogonalize_grads(self.perp_muon, self.cfg.perp_grad_rescale)
            pending = self.muon.reduce_grads()
        if adam_steps:
            self.adam.step(wait=False, clip=clip)  # perpGrad included
        if self.muon is not None:
            self.muon.update_and_gather(pending)
            self.muon.zero_grad(set_to_none=True)
        if adam_steps:
            self.adam.wait()
            self.adam.zero_grad(set_to_none=True)

    def set_schedule(self, lr_mult, momentum):
        """Every group's lr (its base lr * lr_mult) and NorMuon's momentum for the coming step."""
        for group in (self.muon.param_groups if self.muon else []):
            group["lr"] = group["base_lr"] * lr_mult
            group["momentum"] = momentum
        for group in self.adam.param_groups:
            group["lr"] = group["base_lr"] * lr_mult

    def hyperparams(self, lr_mult, momentum):
        """Per parameter: the (lr, decay coefficient, betas) that a step at this lr_mult and momentum
        takes (NorMuon's betas: momentum, beta2), from the formulas the steps use; sets the schedule
        as step() does, so a table can be checked without stepping."""
        self.set_schedule(lr_mult, momentum)
        return {**(self.muon.hyperparams() if self.muon else {}), **self.adam.hyperparams()}

    def settings(self):
        """Per parameter, as its group holds it when built (before a step's schedule sets lr and momentum):
        (optimizer, lr, betas, weight decay). NorMuon's lr includes the matrix's lr_mul; its betas
        are (momentum, beta2)."""
        table = {}
        for group in (self.muon.param_groups if self.muon else []):
            for p in group["params"]:
                table[p] = ("NorMuon", group["base_lr"] * p.lr_mul, (group["momentum"], group["beta2"]), group["weight_decay"])
        for group in self.adam.param_groups:
            for p in group["params"]:
                table[p] = (self.adam_name, group["base_lr"], group["betas"], group["weight_decay"])
        return table

    def state_dict(self):
        return [opt.state_dict() for opt in (self.muon, self.adam) if opt is not None]

    def load_state_dict(self, states):
        for opt, state in zip([opt for opt in (self.muon, self.adam) if opt is not None], states):
            opt.load_state_dict(state)

    def reshard(self, states_by_rank):
        """This rank's state, for load_state_dict, from every rank's state_dict() of a run on another
        number of ranks."""
        return [opt.reshard([states[i] for states in states_by_rank])
                for i, opt in enumerate(opt for opt in (self.muon, self.adam) if opt is not None)]


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


def require_disjoint(train_pattern, val_pattern):
    """Refuse training and validation shards that overlap: the val loss would score tokens the
    model has trained on, and look better than it is."""
    train = {os.path.realpath(f): f for f in list_shards(train_pattern, "training")}
    shared = [f for f in list_shards(val_pattern, "validation") if os.path.realpath(f) in train]
    if shared:
        raise SystemExit(f"error: --train_files={train_pattern} and --val_files={val_pattern} both take {shared[0]}"
                         f"{f' (and {len(shared) - 1} more)' if len(shared) > 1 else ''}: the val loss would score "
                         "tokens the model trained on; point them at different shards")


class TrainLoader:
    """BOS-aligned training batches, one pass over the shards, the next shard read in the background.

    Every micro-batch, each rank receives `tokens + 1` tokens (inputs and shifted targets) made of
    pieces that each start at a BOS and hold at most `max_seq_len` tokens; a longer document's tail
    is dropped. A step's world_size * accum micro-batches (its parts) take consecutive runs of
    documents, part c * world_size + r being rank r's micro-batch c, so the global batch does not
    depend on the world size; every rank walks the same documents and keeps its own parts, with no
    communication. Batch size and max_seq_len may change between steps. A step comes from one
    shard: when the shard's remaining documents cannot fill all its parts, the rest of the shard is
    dropped and the step starts at the next shard's first document, as the record's loader does on
    its 8 GPUs (one micro-batch per GPU).
    """

    def __init__(self, pattern, rank, world_size, vocab_size, device="cpu", accum=1):
        self.files = list_shards(pattern, "training")
        self.rank, self.world_size, self.vocab_size, self.device = rank, world_size, vocab_size, device
        self.accum = accum  # micro-batches per rank per step
        self.available = sum(read_shard_header(f) for f in self.files)
        self.consumed = 0  # tokens handed to all ranks so far
        self.queue = []  # this rank's micro-batches of the current step not handed out yet
        self.shard_index = -1
        self.next_shard = None
        self._advance()

    def _load(self, index, out):
        """Read a shard and find its documents (in the prefetch thread: both take a while). An error
        is kept and raised in the main thread when it reaches this shard: the run stops at once."""
        try:
            tokens = read_shard(self.files[index], self.vocab_size)
            out["bos"] = np.flatnonzero(tokens == BOS_ID)
            if tokens.size and not out["bos"].size:  # nothing in it could start a batch piece
                raise ShardError(f"{self.files[index]}: no <|endoftext|> (token {BOS_ID}) among its {tokens.size:,} "
                                 "tokens, and every document must start with one (data/tokenize_corpus.py writes them)")
            out["tokens"] = tokens
        except Exception as e:
            out["error"] = e

    def _prefetch(self, index):
        box = {}
        thread = threading.Thread(target=self._load, args=(index, box), daemon=True)
        thread.start()
        return thread, box

    def _advance(self):
        """Move to the next shard (already loading in the background) and start loading the one after."""
        self.shard_index += 1
        if self.shard_index >= len(self.files):
            raise EOFError
        if self.next_shard is None:
            self.next_shard = self._prefetch(self.shard_index)
        thread, box = self.next_shard
        thread.join()
        if "error" in box:
            raise box["error"]
        self.tokens, self.bos = box["tokens"], box["bos"]
        self.doc = 0  # index into self.bos of the next unread document
        more = self.shard_index + 1 < len(self.files)
        self.next_shard = self._prefetch(self.shard_index + 1) if more else None

    def position(self):
        """Where the next step starts (the same on every rank), asked between steps: a checkpoint keeps it."""
        return dict(shard=self.shard_index, doc=self.doc, consumed=self.consumed)

    def seek(self, position):
        """Continue from `position()` of a run over the same shards."""
        self.shard_index, self.next_shard = position["shard"] - 1, None
        self._advance()
        self.doc, self.consumed = position["doc"], position["consumed"]

    def _parts(self, count, tokens, max_seq_len):
        """`count` parts, each a list of pieces (numpy views) totalling exactly `tokens`, from this
        shard's documents on from self.doc; None, and nothing taken, when the shard ends first."""
        doc, parts = self.doc, []
        for _ in range(count):
            pieces, need = [], tokens
            while need:
                if doc >= len(self.bos):
                    return None
                start = self.bos[doc]
                end = self.bos[doc + 1] if doc + 1 < len(self.bos) else len(self.tokens)
                length = min(end - start, max_seq_len, need)
                pieces.append(self.tokens[start : start + length])
                doc += 1
                need -= length
            parts.append(pieces)
        self.doc = doc
        return parts

    def next_batch(self, tokens, max_seq_len):
        """(inputs [tokens], targets [tokens], cu_seqlens) for this rank: inputs and targets are
        int64 on the device; cu_seqlens (int32, CPU) holds the piece boundaries of the tokens+1."""
        if self.next_shard and "error" in self.next_shard[1]:
            raise self.next_shard[1]["error"]
        try:
            while not self.queue:
                parts = self._parts(self.world_size * self.accum, tokens + 1, max_seq_len)
                if parts is None:
                    self._advance()
                else:
                    self.queue = parts[self.rank :: self.world_size]
        except EOFError:
            raise SystemExit(
                f"error: the training data ran out after {self.consumed:,} tokens handed out; the schedule "
                f"needs more (the shards {self.files[0]} ... hold {self.available:,} tokens; documents longer "
                f"than max_seq_len lose their tails, and so does each shard whose rest cannot fill a step). "
                f"Download more shards or shorten the schedule."
            ) from None
        mine = self.queue.pop(0)
        self.consumed += (tokens + 1) * self.world_size
        buf = torch.from_numpy(np.concatenate(mine).astype(np.int64))
        if torch.device(self.device).type == "cuda":
            buf = buf.pin_memory()  # from pinned memory the copy below does not block the host
        buf = buf.to(self.device, non_blocking=True)
        cu_seqlens = torch.tensor(np.cumsum([0] + [p.size for p in mine]), dtype=torch.int32)
        return buf[:-1], buf[1:], cu_seqlens


class ValLoader:
    """The first `val_tokens` tokens of the val shards in fixed slices, split over ranks.

    Slices are contiguous; their document boundaries come from the BOS tokens inside them."""

    def __init__(self, pattern, val_tokens, slice_tokens, rank, world_size, vocab_size, device="cpu"):
        files = list_shards(pattern, "validation")
        parts, have = [], 0
        for f in files:
            if have > val_tokens:
                break
            parts.append(read_shard(f, vocab_size))
            have += parts[-1].size
        if have < val_tokens + 1:
            raise SystemExit(f"error: validation shards {pattern} hold {have:,} tokens; val_tokens={val_tokens:,} needs {val_tokens + 1:,}")
        if val_tokens % (slice_tokens * world_size):
            raise SystemExit(f"error: --val_tokens={val_tokens}: expected a multiple of {slice_tokens * world_size} "
                             "(the validation slice x the world size)")
        self.tokens = torch.from_numpy(np.concatenate(parts)[: val_tokens + 1].astype(np.int64))
        self.slice_tokens, self.rank, self.world_size, self.device = slice_tokens, rank, world_size, device

    def __iter__(self):
        n = self.slice_tokens
        for start in range(self.rank * n, self.tokens.numel() - 1, n * self.world_size):
            chunk = self.tokens[start : start + n + 1].to(self.device)
            yield chunk[:-1], chunk[1:]


# ------------------------------------------------------------------------------------------------
# Schedules: every per-step quantity is a function of the step number
# ------------------------------------------------------------------------------------------------


# per stage (the three thirds, then the extension): the weights of the next 1, 2, 3 tokens' losses at
# its start and at its end (#53), and the share of prefix_loss at its start and at its end (#88)
MTP_FADES = (((1.0, 0.5, 0.25), (1.0, 0.5, 0.0)), ((1.0, 0.5), (1.0, 0.0)), ((1.0,), (1.0,)), ((1.0,), (1.0,)))
PREFIX_FADES = (((1.0,), (1.0,)), ((1.0,), (0.0,)), ((0.0,), (0.0,)), ((0.0,), (0.0,)))
EXTENSION = 3  # the stage of the extension steps


class Schedule:
    """Batch size, longest document piece, windows, learning-rate multiplier, momentum, MTP and
    prefix-loss weights, the untie step and the steps on which the scalars' optimizer pauses."""

    def __init__(self, cfg):
        self.cfg = cfg
        n = cfg.num_steps
        self.total = n + cfg.extension_steps
        # where each third's weights start and end their fade: the exact thirds (#53) or whole steps (#65)
        self.edges = [round(k * n / 3) if cfg.rounded_stages else k * n / 3 for k in range(4)]
        self.starts = [math.ceil(e) for e in self.edges]  # first step of each third, then of the extension
        self.cooldown_start = (1 - cfg.cooldown_frac) * n
        if cfg.rounded_stages:
            self.cooldown_start = int(self.cooldown_start)
        self.untie_step = self.first_untied_step() if cfg.untie_frac < 1 else None
        shape = [(self.batch_tokens(s), self.long_window_blocks(s)) for s in range(self.total)]
        self.changes = [s for s in range(1, self.total) if shape[s] != shape[s - 1]]

    def first_untied_step(self):
        """The untie point untie_frac * num_steps, rounded as the thirds are; with untie_after_adam,
        the step after the first Adam step from the point on (Adam steps where step + 1 is a
        multiple of adam_every), so no tied gradient is left waiting for Adam when the tables part."""
        point = self.cfg.untie_frac * self.cfg.num_steps
        point = round(point) if self.cfg.rounded_stages else math.ceil(point)
        every = self.cfg.adam_every
        return -(-(point + 1) // every) * every if self.cfg.untie_after_adam else point

    def stage(self, step):
        """0, 1, 2: the thirds of the scheduled steps; 3: the extension steps."""
        if step >= self.cfg.num_steps:
            return EXTENSION
        return max(k for k in range(EXTENSION) if self.starts[k] <= step)

    def progress(self, step):
        """(stage, fraction of its fade that `step` has passed); the extension does not fade."""
        stage = self.stage(step)
        if stage == EXTENSION:
            return stage, 0.0
        return stage, (step - self.edges[stage]) / (self.edges[stage + 1] - self.edges[stage])

    def batch_tokens(self, step):
        return self.cfg.batch_tokens[min(self.stage(step), 2) if self.cfg.batch_schedule else 2]

    def max_seq_len(self, step):
        """Longest piece of a document in the step's batch: first_seq_len in the first third, when set."""
        first = self.cfg.first_seq_len
        return first if first and self.stage(step) == 0 else self.cfg.max_seq_len

    def long_window_blocks(self, step):
        cfg = self.cfg
        if not cfg.window_schedule:
            return cfg.long_windows[-1]
        stage = self.stage(step)
        return cfg.extension_window if stage == EXTENSION else cfg.long_windows[stage]

    def window_blocks(self, step):
        """(long, short) windows in blocks while training at `step`; short windows are half as long."""
        long_blocks = self.long_window_blocks(step)
        return long_blocks, max(1, long_blocks // 2)

    def final_window_blocks(self):
        """The final validation's windows: only the long one widens (the record's choice)."""
        last_long, short = self.window_blocks(self.total - 1)
        return (self.cfg.final_window if self.cfg.window_schedule else last_long), short

    def windows(self, blocks):
        """(long, short) windows in blocks -> in tokens; with --context, every query sees its whole row
        before it, whatever the blocks."""
        if self.cfg.context:
            return (self.cfg.context - 1,) * len(blocks)
        return tuple(b * self.cfg.window_block for b in blocks)

    def lr_mult(self, step):
        """The stage's peak, then a linear cooldown from cooldown_start to the absolute floor
        lr_floor at num_steps, which the extension keeps; or llm.c's cosine schedule."""
        cfg = self.cfg
        if step >= cfg.num_steps:
            return cfg.lr_floor
        if cfg.lr_schedule == "cosine":
            return self.cosine_lr_mult(step)
        peak = cfg.lr_mults[self.stage(step)]
        if step < self.cooldown_start:
            return peak
        t = (step - self.cooldown_start) / (cfg.num_steps - self.cooldown_start)
        return peak * (1 - t) + cfg.lr_floor * t

    def cosine_lr_mult(self, step):
        """llm.c's: (step + 1) / lr_warmup_steps while warming up, then from 1 down a half cosine that
        would reach lr_floor at num_steps (llm.c's final_learning_rate_frac)."""
        cfg, warmup = self.cfg, self.cfg.lr_warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / (cfg.num_steps - warmup)
        return cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * t))

    def scalars_frozen(self, step):
        """True within scalar_freeze_steps of a batch-size or window change: the scalars, tuned
        to the old shape, would otherwise chase the jump in their gradients."""
        return any(0 <= step - s < self.cfg.scalar_freeze_steps for s in self.changes)

    def momentum(self, step):
        """Warmed up from muon_momentum_start, cooled back over the last steps; where a short run's
        warmup and cooldown overlap, the warmup wins (as in #53 and HEAD)."""
        cfg = self.cfg
        lo, hi = cfg.muon_momentum_start, cfg.muon_momentum
        left = self.total - step
        if step < cfg.momentum_warmup_steps:
            return lo + (hi - lo) * step / cfg.momentum_warmup_steps
        if left < cfg.momentum_cooldown_steps:
            return lo + (hi - lo) * left / cfg.momentum_cooldown_steps
        return hi

    def fade(self, fades, step):
        """The stage's (start, end) values in `fades`, moved linearly by the step's progress."""
        stage, t = self.progress(step)
        start, end = fades[stage]
        return tuple(a + (b - a) * t for a, b in zip(start, end))

    def mtp_weights(self, step):
        """Weights of the next 3, 2, then 1 tokens' losses, fading as training goes on."""
        return self.fade(MTP_FADES, step) if self.cfg.mtp else (1.0,)

    def prefix_weight(self, step):
        """Weight of the prefix-token loss: prefix_loss through the first third, fading over the second."""
        return self.cfg.prefix_loss * self.fade(PREFIX_FADES, step)[0]

    def stage_ranges(self):
        """(stage, first step, end) of every stage the run has (a short schedule lacks some thirds)."""
        bounds = self.starts + [self.total]
        return [(k, a, b) for k, (a, b) in enumerate(zip(bounds, bounds[1:])) if a < b]

    def stage_starts(self):
        return [start for _, start, _ in self.stage_ranges()]

    def describe(self):
        """The schedule as printable lines, one per stage."""
        lines = []
        for _, start, end in self.stage_ranges():
            long_w, short_w = self.windows(self.window_blocks(start))
            mtp = ", ".join(f"{w:.3f}" for w in self.mtp_weights(start))
            prefix = (f", prefix {self.prefix_weight(start):.3f}->{self.prefix_weight(end - 1):.3f}"
                      if self.cfg.prefix_loss else "")
            lines.append(
                f"steps {start}-{end - 1}: batch {self.batch_tokens(start)} tokens, max_seq_len {self.max_seq_len(start)}, "
                f"windows {long_w}/{short_w}, lr x{self.lr_mult(start):.3f}->x{self.lr_mult(end - 1):.3f}, "
                f"momentum {self.momentum(start):.3f}, mtp [{mtp}]{prefix}"
            )
        untie = "never" if self.untie_step is None else f"step {self.untie_step}"
        final = "/".join(str(w) for w in self.windows(self.final_window_blocks()))
        lines.append(f"untie embedding: {untie}; scalars paused at steps {self.changes} for {self.cfg.scalar_freeze_steps}; "
                     f"final validation windows {final}")
        return lines


# ------------------------------------------------------------------------------------------------
# Logging: the record log (source, versions, config, step lines) and a JSON-lines twin
# ------------------------------------------------------------------------------------------------

SEPARATOR = "=" * 100
RECORDS_INDEX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "records", "index.json")
# a run is timed against its track's record only if it did the same work: the same task and length
COMPARABLE_KEYS = ("preset", "train_files", "val_files", "vocab_size", "num_steps", "extension_steps", "batch_tokens",
                   "max_seq_len", "val_tokens")


def versions_and_hardware():
    """Python/torch/triton/CUDA versions and the hardware, as the record log wants them."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"python {platform.python_version()} | torch {torch.__version__} | triton {triton_version} | cuda {torch.version.cuda or 'none'}"
    ]
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
        except OSError:
            pass
        lines.append(f"cpu: {cpu} | {os.cpu_count()} cores | torch threads {torch.get_num_threads()}")
    return "\n".join(lines)


def matmul_params(cfg):
    """Weights each token is multiplied by in one forward pass: every attention layer's Q, K, V, O
    and per-head gate, every MLP's up and down, the optional output gates, the smear gate, the
    head (padded vocabulary), the MUDD MLPs and DC's weight MLPs (#85), each used once. Embedding
    lookups and scalars do no matmul."""
    d, inner = cfg.d_model, cfg.n_head * cfg.head_dim
    attn_layers = sum(layer not in cfg.no_attn_layers for layer in range(cfg.n_layer))
    gate_dims = d if cfg.head_gate else cfg.gate_dims
    head_gate = cfg.n_head * gate_dims if cfg.attn_gate or cfg.head_gate else 0
    attn = 4 * d * inner + head_gate + (d * d if cfg.gate_attn != "none" else 0)
    mlp = 2 * d * cfg.mlp_hidden + (d * d if cfg.gate_mlp != "none" else 0)
    vocab = -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    smear = cfg.gate_dims if cfg.smear else 0
    ve_gates = sum(t is not None and layer not in cfg.no_attn_layers for layer, t in enumerate(value_embed_tables(cfg)))
    ve_gate = cfg.n_head * cfg.gate_dims if cfg.ve_gate != "none" else 0
    skip_gate = cfg.gate_dims if cfg.skip_x0_gate and cfg.skip_from >= 0 else 0
    mudd = MUDD_DIM * (2 * d + len(MUDD_INTO_LAST) + len(MUDD_AFTER_LAST)) if cfg.mudd else 0
    mudd_gate = MUDD_DIM * (2 * d + sum(w for half in mudd_gate_slots(cfg) for *_, w in half)) if cfg.mudd_gate else 0
    # HeadComposition's own in_proj, out_proj (under the MUDD gate its weights are the gate's columns)
    dc = 0 if cfg.mudd_gate else len(cfg.dc_layers) * (2 * cfg.n_head * d + (2 * cfg.n_head) ** 2)
    return attn_layers * attn + cfg.n_layer * mlp + vocab * d + smear + ve_gates * ve_gate + skip_gate + mudd + mudd_gate + dc


def attention_flops(cfg, windows, max_seq_len=None):
    """Forward + backward FLOPs per token of q.k and p.v at (long, short) windows in tokens.

    Each query is counted against a full window of keys (itself and the w before it, as FA3's
    window (w, 0)), capped at the step's max_seq_len (None: cfg.max_seq_len; no piece of a document
    is longer): the causal mask's skipped pairs count, as in the usual 6N + 12 L d T estimate. A paired
    layer (#58) has twice the queries and half the heads over pieces twice as long: the same count.
    A DC layer (#85) reads again over DC_WINDOW keys: every head's q.k, the heads' probabilities mixed
    (one multiply-add per head and key) and the mix times each head's values.
    Forward: 2 FLOPs per multiply-add, for q.k and p.v; backward twice the forward."""
    longest = max_seq_len or cfg.max_seq_len
    h, dh = cfg.n_head, cfg.head_dim
    keys = sum(min(windows[0 if layer in cfg.long_window_layers else 1] + 1,
                   longest * (2 if layer in cfg.paired_head_layers else 1))
               for layer in range(cfg.n_layer) if layer not in cfg.no_attn_layers)
    dc = len(cfg.dc_layers) * h * min(DC_WINDOW, longest) * (2 * dh + 1)  # multiply-adds
    return 3 * 2 * (2 * h * dh * keys + dc)


def flops_per_token(cfg, windows, max_seq_len=None):
    """Model FLOPs per trained token: 6 per matmul weight (2 forward, 4 backward) plus attention.
    MFU is these FLOPs per second over the device's matmul peak; the optimizers' work is not counted."""
    return 6 * matmul_params(cfg) + attention_flops(cfg, windows, max_seq_len)


PEAK_SIZE = dict(cuda=8192, cpu=1024)  # side of the square matmul timed for the device's peak
PEAK_REPEATS = 3


def matmul_peak(device, dtype, size=None, repeats=PEAK_REPEATS):
    """FLOP/s of a size^3 matmul in `dtype` on `device`: the best of a few after one untimed.
    Timed, not looked up: it is what MFU is measured against on any device, GPU or CPU."""
    size = size or PEAK_SIZE[device.type]
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def config_json(cfg):
    """The config as JSON values (tuples as lists), as logs, records and checkpoints hold it."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


@functools.cache
def source_code():
    """This file's text: the log embeds it, a checkpoint keeps it to refuse resuming other code."""
    with open(os.path.abspath(__file__)) as f:
        return f.read()


def config_summary(cfg):
    """One console line: the preset, --baseline or --all_off where that leaves fewer values to list, and
    every value that differs from them (the log has the full JSON)."""
    def differing(rung):
        reference = Config(**{**PRESETS[cfg.preset], **(RUNGS[rung](cfg.preset) if rung else {})},
                           preset=cfg.preset, run_id=cfg.run_id)
        return [f"--{f.name}={show_value(getattr(cfg, f.name))}" for f in fields(Config)
                if getattr(cfg, f.name) != getattr(reference, f.name)]

    rung = min(["", *RUNGS], key=lambda r: len(differing(r)))
    flags = [f"--preset={cfg.preset}", *([f"--{rung}"] if rung else []), *differing(rung)]
    return f"config: {' '.join(flags)} (the full config is in the log)"


class Tracker:
    """The run's metrics, as the .jsonl holds them, also sent to Weights & Biases and/or TensorBoard,
    the trackers people already watch; each is imported only when asked for, so neither is needed
    otherwise. Scalars go under `<kind>/<name>` (train/train_loss, val/val_loss) at their step."""

    def __init__(self, cfg):
        self.wandb = self.writer = None
        self.step = 0  # the last step seen: the final record has none
        if cfg.wandb:
            wandb = import_for("wandb", "--wandb", "wandb")
            # the run id as the W&B id: a resumed run continues its W&B run
            self.wandb = wandb.init(project=cfg.wandb, name=cfg.run_id, id=cfg.run_id, resume="allow",
                                    config=config_json(cfg), dir=cfg.log_dir)
        if cfg.tensorboard:
            tensorboard = import_for("torch.utils.tensorboard", "--tensorboard", "tensorboard")
            self.writer = tensorboard.SummaryWriter(os.path.join(cfg.log_dir, "tensorboard", cfg.run_id))
            self.writer.add_text("config", json.dumps(config_json(cfg), indent=1))

    def record(self, kind, step=None, **values):
        if kind == "config":
            return
        self.step = self.step if step is None else step
        scalars = {f"{kind}/{name}": value for name, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.wandb is not None:
            self.wandb.log(scalars, step=self.step)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, self.step)
            self.writer.flush()

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.writer is not None:
            self.writer.close()


def import_for(module, flag, package):
    """Import an optional tracker's module, or stop with one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"error: {flag} needs the {package} package, which is not installed (pip install {package})") from None


def parameter_table(model, optimizers):
    """Lines: a header, one row per trainable parameter (name, shape, count, storage dtype, init,
    optimizer, lr at lr_mult 1, betas, weight decay) in columns two spaces apart, then `parameters: N`.
    Read from the model and the optimizers as built, so it says what training does."""
    settings = optimizers.settings()
    rows = [("parameter", "shape", "count", "dtype", "init", "optimizer", "lr", "betas", "weight_decay")]
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, p in params:
        optimizer, lr, betas, wd = settings[p]
        shape = "x".join(map(str, p.shape)) or "()"
        dtype = str(p.dtype).removeprefix("torch.")
        rows.append((name, shape, str(p.numel()), dtype, p.init, optimizer, f"{lr:.6g}", ",".join(f"{b:g}" for b in betas),
                     f"{wd:g}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    total = sum(p.numel() for _, p in params)
    padding = sum(p[model.cfg.vocab_size :].numel() for _, p in params if p.dim() == 2 and p.size(0) == model.vocab)
    unpadded = [f"without the padding rows past vocab_size, as nanoGPT counts GPT-2: {total - padding}"] if padding else []
    return lines + unpadded + [f"parameters: {total}"]


class RunLog:
    """Writes `<log_dir>/<run_id>.txt` and `.jsonl` on rank 0; every line is flushed as written.

    The console gets the log's path first and a one-line config summary; the log gets the full config.
    An existing log is never overwritten: only a resumed run continues it (appends). A run that stops
    before its first step (a refusal, an interrupted warmup) removes the log it made, so its run id
    stays free and no unfinished log sits among the finished ones."""

    def __init__(self, cfg, backend):
        self.enabled = backend.is_master
        self.console = cfg.progress
        self.path = os.path.join(cfg.log_dir, f"{cfg.run_id}.txt")
        self.metrics_path = os.path.join(cfg.log_dir, f"{cfg.run_id}.jsonl")
        self.started = False  # set when the timed loop begins: from then on the log stays, whatever happens
        if not self.enabled:  # rank 0 alone looks (the others could see the log it has just made); main shares its verdict
            return
        exists = os.path.exists(self.path) or os.path.exists(self.metrics_path)
        if exists and not cfg.resume:
            raise SystemExit(f"error: --run_id={cfg.run_id}: {self.path} already exists and a log is never overwritten; "
                             "choose another --run_id, or continue that run with --resume")
        if cfg.resume == "auto" and os.path.exists(self.path) and finished(self.path):
            raise SystemExit(f"error: --resume=auto: {self.path} says that run finished (its final line is there); "
                             "nothing to resume")
        saved = latest_checkpoint(checkpoint_dir(cfg)) if cfg.save_every or cfg.save_final else None
        if saved and not cfg.resume:  # another run's checkpoints (a shared --checkpoint_dir)
            raise SystemExit(f"error: {saved} already exists and a checkpoint is never overwritten; choose another "
                             "--checkpoint_dir, or continue that run with --resume")
        try:
            os.makedirs(cfg.log_dir, exist_ok=True)
            if cfg.save_every or cfg.save_final:  # before the log files: a refusal here leaves none
                flag = f"--checkpoint_dir={cfg.checkpoint_dir}" if cfg.checkpoint_dir else f"--log_dir={cfg.log_dir}"
                require_writable(checkpoint_dir(cfg), flag)
            self.tracker = Tracker(cfg)  # first: a tracker that cannot start leaves no log behind
            self.text = open(self.path, "a" if exists else "w")
            self.metrics = open(self.metrics_path, "a" if exists else "w")
        except OSError as e:
            raise SystemExit(f"error: --log_dir={cfg.log_dir}: cannot write the run's log there ({e.strerror or e})") from None
        self.created = not exists
        self.show(f"log: {self.path}")
        if exists:
            self.line(f"continued by a resumed run: {config_summary(cfg)}")
            return
        self.text.write(source_code())
        self.text.write(f"{SEPARATOR}\n{versions_and_hardware()}\n{SEPARATOR}\n")
        self.line("config: " + json.dumps(dataclasses.asdict(cfg)), console=False)
        self.show(config_summary(cfg))
        self.metric(kind="config", **dataclasses.asdict(cfg))

    def show(self, text):
        """Console only."""
        if self.enabled and self.console:
            print(text, flush=True)

    def line(self, text, console=True):
        if not self.enabled:
            return
        self.text.write(text + "\n")
        self.text.flush()
        if console:
            self.show(text)

    def metric(self, **record):
        if self.enabled:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            self.tracker.record(**record)

    def close(self):
        """Close the files; remove those this run made if it never reached its first step."""
        if not self.enabled:
            return
        self.text.close()
        self.metrics.close()
        self.tracker.close()
        if self.created and not self.started:
            os.remove(self.path)
            os.remove(self.metrics_path)


def finished(log_path):
    """Whether a run's log holds its final line (read after the embedded source, whose f-strings
    would otherwise read like log lines)."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split(SEPARATOR)[-1].splitlines()
    return any(line.startswith("final val_loss:") for line in lines)


def current_record(track):
    """The latest record of a track at the track's target (records/index.json), or None."""
    try:
        with open(RECORDS_INDEX) as f:
            entry = json.load(f)["tracks"][track]
    except (OSError, KeyError, ValueError):
        return None
    records = [r for r in entry["records"] if r.get("target", entry["target"]) == entry["target"]]
    return records[-1] if records else None


def versus_record(cfg, record, val_loss, train_ms):
    """The run against the track's record, or, when they did not do the same work, what differs."""
    name = record["name"]
    theirs = record.get("config")
    if theirs is None:
        return f"not compared with record {name}: its logs carry no config to check this run against"
    mine = config_json(cfg)
    differ = [f"{key}={show_value(mine[key])} (record: {show_value(theirs.get(key))})"
              for key in COMPARABLE_KEYS if mine[key] != theirs.get(key)]
    if differ:
        return f"not compared with record {name}: this run differs in {', '.join(differ)}"
    return (f"vs record {name}: val_loss {record['val_loss_mean']:.4f} (this run {val_loss - record['val_loss_mean']:+.4f}), "
            f"train_time {record['time_ms_mean']:.0f}ms (this run {train_ms - record['time_ms_mean']:+.0f}ms)")


# ------------------------------------------------------------------------------------------------
# Checkpoints: save, resume, and a clean stop on SIGINT / SIGTERM
# ------------------------------------------------------------------------------------------------

# flags that only say how a run is logged, saved and started: a resumed run may change them
RUN_ONLY_KEYS = ("run_id", "log_dir", "progress", "log_every", "save_every", "save_final", "checkpoint_dir",
                 "keep_checkpoints", "resume", "resume_any", "warmup_steps", "wandb", "tensorboard", "dry_run",
                 "activation_checkpointing")
CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")
STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # signal: exit status (128 + its number, as shells say)


def checkpoint_dir(cfg):
    return cfg.checkpoint_dir or os.path.join(cfg.log_dir, cfg.run_id)


def checkpoint_path(folder, step, rank=None):
    """step_000100.pt: the model and the run's state before step 100 (written last, so its presence
    means the set is complete); step_000100.rank{r}.pt: rank r's optimizer state, accumulated
    gradients and RNG, which differ between ranks (sharded moments, local gradients)."""
    name = f"step_{step:06d}"
    return os.path.join(folder, f"{name}.pt" if rank is None else f"{name}.rank{rank}.pt")


def saved_steps(folder):
    """The steps of the complete checkpoints in `folder` (those whose main file exists), newest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(m[1]) for m in map(CHECKPOINT_NAME.fullmatch, names) if m), reverse=True)


def latest_checkpoint(folder):
    """The checkpoint of the highest step in `folder`, or None."""
    steps = saved_steps(folder)
    return checkpoint_path(folder, steps[0]) if steps else None


def checkpoint_files(folder, step):
    """A checkpoint's files: the main one first, then the ranks'."""
    return [checkpoint_path(folder, step)] + sorted(glob.glob(os.path.join(glob.escape(folder), f"step_{step:06d}.rank*.pt")))


def remove_old_checkpoints(folder, keep):
    """Delete all but the newest `keep` complete checkpoints (0: keep all), each main file first, so a
    half-deleted one never counts as complete."""
    for step in saved_steps(folder)[keep:] if keep else []:
        for path in checkpoint_files(folder, step):
            os.remove(path)


def require_writable(folder, flag):
    """Stop at start, naming the flag, when checkpoints could not be written to `folder`: finding out
    at the end would lose the trained model. Tried by writing a file there; folders made for the try
    are removed again."""
    missing = []
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SystemExit(f"error: {flag}: cannot write checkpoints to {folder} ({e.strerror or e})") from None
    finally:
        for made in missing:  # deepest first
            if os.path.isdir(made):
                os.rmdir(made)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never replaces a good file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave an empty file in its place
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHECKPOINT_KEYS = ("config", "model", "tied")  # what every main checkpoint file holds


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file named in the message."""


def read_checkpoint(path, keys=CHECKPOINT_KEYS, mmap=False):
    """A checkpoint file's dict on the CPU, or a CheckpointError saying what is wrong with the file.
    mmap: map the tensors instead of reading them (a quick check of the file's structure)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (expected a checkpoint written by train_gpt.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        # torch's weights-only refusal is a page of advice; its one line that names the object will do
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        refusal = [line for line in lines if line.startswith("WeightsUnpickler error:")]
        reason = refusal[0].split(". ")[0] if refusal else f"{type(e).__name__}: {lines[0] if lines else 'no message'}"
        raise CheckpointError(f"{path}: not a checkpoint torch.load(weights_only=True) can read ({reason})") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a train_gpt.py checkpoint (expected a dict with "
                              f"{', '.join(map(repr, keys))}; missing {', '.join(map(repr, missing))})")
    return state


def load_checkpoint(path, flag="--resume", keys=CHECKPOINT_KEYS):
    """read_checkpoint for a flag of this trainer: a bad file is one `error:` line naming the flag."""
    try:
        return read_checkpoint(path, keys)
    except CheckpointError as e:
        raise SystemExit(f"error: {flag}={e}") from None


def checkpoint_differences(state, cfg):
    """What differs between the run that wrote `state` and this one: config values (beyond
    RUN_ONLY_KEYS) and the source, each as a short phrase."""
    mine = config_json(cfg)
    theirs = state["config"]
    differ = [f"{k}={show_value(theirs.get(k))} (this run: {show_value(v)})"
              for k, v in mine.items() if k not in RUN_ONLY_KEYS and theirs.get(k) != v]
    if state["source"] != source_code():
        differ.append("the source of train_gpt.py")
    return differ


def ranks_to_read(written_by, backend):
    """The rank files this rank resumes from: its own on the same number of ranks, every one of the
    `written_by` ranks' to reshard them."""
    return [backend.rank] if written_by == backend.world_size else range(written_by)


def rank_mean_grad(grads_by_rank, name, device):
    """A parameter's gradient to resume with, from what each rank of the saved run had accumulated
    (Adam's tables between its steps): their mean, on every rank of this run. The optimizers average
    across ranks, so the step applies the same sum whatever the number of ranks; on the same number
    of ranks (one entry: this rank's own) it is resumed as saved."""
    grads = [g[name] for g in grads_by_rank if name in g]
    if not grads:
        return None
    return (grads[0] if len(grads) == 1 else sum(grads) / len(grads)).to(device)


def rng_state():
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


class StopSignal:
    """SIGINT and SIGTERM ask the run to stop at a step boundary; a second signal acts at once (the
    default handlers are back). Ranks must stop at the same step, so with several they combine their
    flags in a one-number all-reduce on the CPU (gloo), which never waits for the GPU. It is started
    at one boundary and read at the next, travelling while the step runs: no rank waits for the
    others at a boundary (a blocking check would be a host barrier every step), and a signal stops
    the run one step later than it would stop a single process."""

    def __init__(self, backend):
        self.received = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self.group = None
        self.pending = None  # (flag, work): the all-reduce started at the last boundary
        if backend.world_size > 1:
            self.group = dist.new_group(backend="gloo") if backend.device.type == "cuda" else dist.group.WORLD

    def _handle(self, sig, frame):
        self.received = sig
        self.restore_handlers()

    def requested(self):
        """Call at every step boundary. The signal to stop at this one (0: none), the same on every
        rank: this process's so far, or with several ranks the one any rank had by the previous
        boundary."""
        if self.group is None:
            return self.received
        agreed = self.finish()
        if not agreed:  # after a stop no boundary follows
            flag = torch.tensor([int(self.received)])
            self.pending = flag, dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def finish(self):
        """Wait for the all-reduce in flight, if any; return its result (0 when none was)."""
        if self.pending is None:
            return 0
        flag, work = self.pending
        self.pending = None
        work.wait()
        return int(flag)

    def restore_handlers(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def close(self):
        """Put the handlers back and let go of the group and of an all-reduce left in flight by an
        error: an exception's traceback can keep this object alive, and a group or a collective
        still referenced keeps gloo's threads running after destroy_process_group (see
        setup_backend), which waits for that all-reduce."""
        self.restore_handlers()
        self.group = self.pending = None


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def eta_seconds(ms_per_flop, flops_left, vals_left, val_seconds):
    """Time to the end of the run: the remaining steps' model FLOPs (later stages have larger batches
    and longer windows) at the latest rate, plus the remaining validations at the average duration of
    those done (none done yet: not counted)."""
    val_mean = sum(val_seconds) / len(val_seconds) if val_seconds else 0.0
    return ms_per_flop * flops_left / 1000 + vals_left * val_mean


def format_duration(seconds):
    """1.2s, 3.4min, 5.6h or 7.8 days: a duration as a person reads it."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{' ' if unit == 'days' else ''}{unit}"
    return f"{seconds:.1f}s"


def gradient_norm(params):
    """The norm of all gradients of `params` together, on the device (no host read)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()) if grads else torch.zeros(())


def split_batch(cfg, world):
    """(parts, accum, loss_factor): how `world` ranks share every batch, training and validation.

    The recipe cuts each batch into accum_world_size micro-batches. Any world size works whose least
    common multiple with accum_world_size divides every batch: each batch is cut into `parts` (that
    multiple) micro-batches of batch / parts tokens, and each rank runs `accum` = parts / world of
    them per step. Fewer ranks than accum_world_size (a divisor) accumulate; more (a multiple) take
    a smaller slice each. The loss is a sum over tokens and the ranks average their gradients, so
    scaling each micro-batch's loss by world / accum_world_size makes the gradient applied the
    global batch's sum / accum_world_size for every world size: the record's scale, which Adam's eps
    is measured against."""
    a = cfg.accum_world_size
    batches = sorted(set(cfg.batch_tokens) | {cfg.val_batch_tokens})
    for tokens in batches:
        if tokens % a:
            raise SystemExit(f"error: batch of {tokens} tokens does not split over accum_world_size={a}")
    common = math.gcd(*batches)
    parts = math.lcm(a, world)
    if common % parts == 0:
        return parts, parts // world, world / a
    works = [n for n in range(1, common + 1) if common % n == 0 and common % math.lcm(a, n) == 0]
    shown = ", ".join(map(str, works[:8])) + (", ..." if len(works) > 8 else "")
    raise SystemExit(
        f"error: world size {world} cannot split the batches of preset {cfg.preset} (accum_world_size={a}, "
        f"batch_tokens={show_value(cfg.batch_tokens)}, val_batch_tokens={cfg.val_batch_tokens}): "
        f"lcm({world}, {a}) = {parts} micro-batches must divide every batch; world sizes that work: {shown}"
    )


# ------------------------------------------------------------------------------------------------
# Memory: the peak a configuration needs on a device, estimated before training
# ------------------------------------------------------------------------------------------------

GIB = 2**30
FP32_BYTES = 4
# eager autograd keeps these copies of a [tokens, d] residual stream per layer: the block's input before
# the x0 mix (the lambdas' product keeps it), after it (the attention's norm) and after the attention (the
# MLP's norm); outside the layers: the embedding, x0 and the final norm's input
STREAM_SAVES = 3
QKV_MATMULS = 3  # autocast casts an activation anew for each matmul (it caches only the weights' casts): the normed input, once per Q, K and V
SCORE_SAVES = 2  # blocked attention keeps its fp32 scores twice: masked (for the log-sum-exp) and exponentiated (the softmax)
EVAL_SCORE_COPIES = 3  # fp32 copies of a layer's blocked scores alive at once without gradients (scaled and masked, shifted, exponentiated)
LOSS_ROW_COPIES = 4  # fp32 [CE_ROWS, V] tensors the torch loss holds at once while it works on a block of rows
UPDATE_COPIES = 4  # temporaries of a tensor's size an optimizer update makes (the Nesterov mix, Polar Express's iterate and products, the normalized update; Adam's square, root, update and mask)
LOOKUP_KINDS = ("embed", "value_embed", "bigram")  # tables read by lookup, never multiplied: no compute-dtype copy
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v2, v1


class MemoryEstimate(NamedTuple):
    """A run's estimated peak per process, in bytes, and what it is made of."""
    peak: int
    phase: str  # where the peak falls: training, validation or the optimizer step
    parts: dict  # name -> bytes: the state that lives through the run and each phase's own
    train_tokens: int  # tokens of a micro-batch at the training phase's largest stage
    val_tokens: int  # tokens of a validation forward pass


def state_bytes(cfg, backend):
    """What lives through the whole run on one rank of backend.world_size, and the optimizer step's
    temporaries, from the model and the optimizers built on the meta device (exact dtypes and shards)."""
    meta = dataclasses.replace(backend, device=torch.device("meta"), rank=0, notes=())
    with torch.device("meta"):
        model = GPT(cfg, meta.ops, meta.attention, meta.compute_dtype, meta.table_dtype)
    optimizers = Optimizers(model, cfg, meta)
    world, c = meta.world_size, meta.compute_dtype.itemsize
    params = list(model.parameters())
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    adam = [p for group in optimizers.adam.param_groups for p in group["params"]]
    adam_state, adam_largest = 0, 0
    for p in adam:
        numel = -(-p.size(0) // world) * (p.numel() // p.size(0)) if optimizers.adam.split(p) else p.numel()  # its rows here
        share = numel * p.element_size()
        adam_state += 2 * share  # exp_avg and exp_avg_sq, in the gradient's dtype
        adam_largest = max(adam_largest, share)
    muon_state = stacks = gathered = muon_largest = 0
    for group in (optimizers.muon.param_groups if optimizers.muon else []):
        first = group["params"][0]
        count = sum(p.muon_blocks for p in group["params"])
        per_rank = -(-count // world)
        share = torch.empty(per_rank, *muon_view(first, first).shape[1:], dtype=first.dtype, device="meta")
        state = optimizers.muon._state(group, share, [1.0] * min(per_rank, count))  # NorMuon's own, on meta tensors
        muon_state += nbytes(t for t in state.values() if torch.is_tensor(t))
        stacks += nbytes([share]) * (world + (world > 1))  # the stacked gradients, and this rank's averaged share
        gathered += nbytes([share]) * world  # the updated weights, gathered (one rank: its own)
        muon_largest = max(muon_largest, share.numel() * FP32_BYTES)
    copies = [p for p in params if p.dim() >= 2 and p.kind not in LOOKUP_KINDS and p.dtype != meta.compute_dtype]
    return dict(parameters=nbytes(params) + nbytes(model.buffers()), gradients=nbytes(params), adam_gradients=nbytes(adam),
                optimizer=adam_state + muon_state, weight_copies=sum(p.numel() for p in copies) * c,
                step=stacks + gathered + UPDATE_COPIES * max(muon_largest, adam_largest), adam_every=optimizers.adam_every)


def layer_window(cfg, layer, windows):
    """The window in tokens layer `layer` attends over, of the (long, short) `windows`."""
    return windows[0 if layer in cfg.long_window_layers else 1]


def attention_keys(cfg, window):
    """Keys a block of window_block queries of the blocked attention scores: the window, in whole blocks, and its own block."""
    b = cfg.window_block
    return -(-window // b) * b + b


def blocked_path(cfg, blocked):
    """How the attention of `cfg` runs: "scores" (BlockedAttention's explicit fp32 scores: a slot needs
    the log-sum-exp), "blocks" (its fused kernel per query block), or "rows" (one fused causal call per
    row of --context; flex attention's saves are the same)."""
    if blocked and has_slot(cfg):
        return "scores"
    return "blocks" if blocked and not cfg.context else "rows"


def layer_activation_bytes(cfg, layer, window, c, s, blocked, fused_mlp):
    """Bytes per token layer `layer` keeps for its backward, counted from the ops of Block, Attention
    and MLP as eager autograd saves them (c: the compute dtype's bytes, s: the stream's). The #55-#85
    extras (value-embedding gates, MUDD, DC, XSA, paired heads) are not counted: at the cpu_head preset,
    which has them all, the measured peak is 1.026 of the estimate (docs/measurements.md)."""
    d, inner, heads = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_head
    total = STREAM_SAVES * s * d
    if layer not in cfg.no_attn_layers:
        total += (QKV_MATMULS if c != s else 1) * c * d + (s * d if cfg.attn_gate else 0)  # the normed input, cast per matmul
        total += 2 * c * inner if cfg.qk_norm else 0  # q and k before their norms
        path = blocked_path(cfg, blocked)
        if path in ("scores", "blocks"):
            keys = attention_keys(cfg, window)
            total += c * inner * (cfg.window_block + 2 * keys) // cfg.window_block  # the query blocks, the key and value blocks
        if path == "scores":
            total += heads * keys * (SCORE_SAVES * FP32_BYTES + (c if c != FP32_BYTES else 0))  # scores, softmax, its cast
        elif path == "blocks":
            total += c * inner + FP32_BYTES * heads  # the fused kernel's output and log-sum-exp
        else:
            total += 4 * c * inner + FP32_BYTES * heads  # the fused kernel's q, k, v, output and log-sum-exp
        total += (2 if cfg.attn_gate else 1) * c * inner  # the output before the gate, and the projection's input
    return total + c * d + (1 if fused_mlp else 2) * c * cfg.mlp_hidden  # the MLP's input and hidden (eager: relu and its square)


def layer_eval_bytes(cfg, layer, window, c, s, blocked, fused_mlp):
    """Bytes per token a layer holds at once in a forward without gradients (validation): its largest temporaries."""
    mlp = (1 if fused_mlp else 2) * c * cfg.mlp_hidden
    scores = (EVAL_SCORE_COPIES * FP32_BYTES * cfg.n_head * attention_keys(cfg, window)
              if blocked_path(cfg, blocked) == "scores" and layer not in cfg.no_attn_layers else 0)
    return STREAM_SAVES * s * cfg.d_model + max(mlp, scores)


def memory_estimate(cfg, backend, state=None):
    """The peak memory of one process of a run of `cfg` on `backend` (its device's ops, attention,
    dtypes and world size), as the largest of three moments, each on top of the parameters and the
    optimizer state (and, through the warmup, its copy of the parameters):
    training: the gradients still held then (Adam's between its steps; all, from a step's second
      micro-batch), the compute-dtype copies of the weights, every layer's saved activations at the
      largest stage's micro-batch (with activation checkpointing only the blocks' inputs and one
      block's activations) and the loss's two [tokens, vocab] tensors (logits and their gradient);
    validation: Adam's gradients if it can fall between Adam's steps, the logits of a validation pass
      and one layer's temporaries;
    the optimizer step: every gradient and the step's stacks, gathers and temporaries.
    Counted from the code, not measured per device: see tests/test_memory.py for how close it comes
    on the CPU. `state`: state_bytes(cfg, backend), when already known (it depends on neither
    activation_checkpointing, accum_world_size nor val_batch_tokens)."""
    state = state or state_bytes(cfg, backend)
    parts_per_batch, accum, _ = split_batch(cfg, backend.world_size)
    c = backend.compute_dtype.itemsize
    s = (backend.table_dtype or torch.float32).itemsize
    blocked, fused = isinstance(backend.attention, BlockedAttention), backend.ops.name == "triton"
    vocab = -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    loss_rows = 0 if fused else LOSS_ROW_COPIES * CE_ROWS * vocab * FP32_BYTES
    d = cfg.d_model
    adam_held = state["adam_gradients"] if state["adam_every"] > 1 else 0  # Adam's, accumulating between its steps
    train_held = state["gradients"] if accum > 1 else adam_held  # from a step's second micro-batch on: all of them
    # a validation falls between two of Adam's steps in the warmup, and in the run if val_every is not a multiple of adam_every
    val_held = adam_held if cfg.warmup_steps or cfg.val_every % state["adam_every"] else 0
    base = state["parameters"] + state["optimizer"] + (state["parameters"] if cfg.warmup_steps else 0)
    sched = Schedule(cfg)
    train, train_tokens, activations = 0, 0, 0
    for _, start, _ in sched.stage_ranges():
        tokens, windows = sched.batch_tokens(start) // parts_per_batch, sched.windows(sched.window_blocks(start))
        layers = [layer_activation_bytes(cfg, i, layer_window(cfg, i, windows), c, s, blocked, fused)
                  for i in range(cfg.n_layer)]
        # checkpointed: per layer the stream before and after its x0 mix (the MLP norm's input is inside the
        # block), and one block's activations while the backward runs it again
        kept = cfg.n_layer * (STREAM_SAVES - 1) * s * d + max(layers) if cfg.activation_checkpointing else sum(layers)
        stage_activations = tokens * (kept + STREAM_SAVES * s * d + c * d)  # and the embedding, x0, the head's input
        loss = 2 * tokens * vocab * c + loss_rows
        if stage_activations + loss > train:
            train, train_tokens, activations = stage_activations + loss, tokens, stage_activations
    val_tokens = cfg.val_batch_tokens // parts_per_batch
    val_windows = [sched.windows(sched.window_blocks(start)) for start in sched.stage_starts()]
    val_windows.append(sched.windows(sched.final_window_blocks()))
    layer_eval = max(layer_eval_bytes(cfg, i, layer_window(cfg, i, w), c, s, blocked, fused)
                     for i in range(cfg.n_layer) for w in val_windows)
    validation = val_tokens * (vocab * c + layer_eval) + loss_rows
    parts = dict(parameters=state["parameters"], gradients=state["gradients"], optimizer=state["optimizer"],
                 activations=activations, loss=train - activations, validation=validation, step=state["step"])
    moments = {"training": base + train_held + state["weight_copies"] + train, "validation": base + val_held + validation,
               "optimizer step": base + state["gradients"] + state["step"]}
    phase = max(moments, key=moments.get)
    return MemoryEstimate(moments[phase], phase, parts, train_tokens, val_tokens)


def device_memory(device):
    """Bytes of memory the device has: a GPU's total, or the host's physical memory (its cgroup's limit if lower)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def processes_sharing(backend):
    """How many of the run's processes share this device's memory: one per GPU; on a CPU, every rank on the host."""
    if backend.device.type == "cuda":
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", backend.world_size))


def peak_detail(estimate):
    """What the phase of the peak adds, in words."""
    p, gib = estimate.parts, lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    if estimate.phase == "training":
        return f"{gib(p['activations'] + p['loss'])} of activations and loss at {estimate.train_tokens:,} tokens per micro-batch of each process"
    if estimate.phase == "validation":
        return f"{gib(p['validation'])} of logits and temporaries at {estimate.val_tokens:,} tokens per validation pass of each process"
    return f"{gib(p['step'])} of the optimizer step's stacks, gathers and temporaries"


def memory_line(estimate, where=""):
    """`memory: ...`, the estimate as a log line: the peak, what it is made of, and `where` (what the device has)."""
    p, gib = estimate.parts, lambda n: f"{n / GIB:.2f}"  # noqa: E731
    return (f"memory: estimated peak {gib(estimate.peak)} GiB per process{where} at the {estimate.phase}: "
            f"{peak_detail(estimate)} (parameters {gib(p['parameters'])}, gradients {gib(p['gradients'])}, optimizer state "
            f"{gib(p['optimizer'])}, training activations {gib(p['activations'])} and loss {gib(p['loss'])}, validation "
            f"{gib(p['validation'])}, optimizer step {gib(p['step'])} GiB); counted from the code, not measured")


def splits(cfg, world_size):
    """Whether `world_size` ranks can split cfg's batches and validation slices (split_batch, ValLoader)."""
    try:
        parts, _, _ = split_batch(cfg, world_size)
    except SystemExit:
        return False
    return cfg.val_batch_tokens % parts == 0 and cfg.val_tokens % (cfg.val_batch_tokens // parts * world_size) == 0


def fitting_flags(cfg, backend, budget, state):
    """The first flags, as {name: value}, whose estimate fits in `budget` bytes per process, and that
    estimate; None if none does. The training micro-batches are kept if anything fits with them (a
    halved --val_batch_tokens, then with --activation_checkpointing=true, which changes no number);
    only then is --accum_world_size doubled (finer micro-batches: slightly other numbers)."""
    accum = cfg.accum_world_size
    while splits(dataclasses.replace(cfg, accum_world_size=accum), backend.world_size):
        for checkpointing in sorted({cfg.activation_checkpointing, True}):
            val = cfg.val_batch_tokens
            while val >= 1:
                flags = dict(accum_world_size=accum, activation_checkpointing=checkpointing, val_batch_tokens=val)
                trial = dataclasses.replace(cfg, **flags)
                if splits(trial, backend.world_size):
                    estimate = memory_estimate(trial, backend, state)
                    if estimate.peak <= budget:
                        return {k: v for k, v in flags.items() if v != getattr(cfg, k)}, estimate
                val //= 2
        accum *= 2
    return None


def check_memory(cfg, backend):
    """The `memory:` log line of this run; when the estimate exceeds the device's memory (and
    --memory_check is on), one `error:` line naming the flags that would make it fit."""
    state = state_bytes(cfg, backend)
    estimate = memory_estimate(cfg, backend, state)
    available, sharing = device_memory(backend.device), processes_sharing(backend)
    ranks = f" x {sharing} processes on this host" if sharing > 1 else ""
    line = memory_line(estimate, f"{ranks} of {available / GIB:.2f} GiB here")
    if estimate.peak * sharing <= available or not cfg.memory_check:
        return line
    fit = fitting_flags(cfg, backend, available // sharing, state)
    if fit is None:
        advice = ("no setting of --val_batch_tokens, --activation_checkpointing and --accum_world_size fits: a smaller "
                  "--batch_tokens, more devices or more memory would")
    else:
        flags, smaller = fit
        advice = f"{' '.join(f'--{k}={show_value(v)}' for k, v in flags.items())} would need {smaller.peak / GIB:.2f} GiB"
    raise SystemExit(f"error: out of memory ahead: the estimated peak is {estimate.peak / GIB:.2f} GiB per process{ranks} "
                     f"(at the {estimate.phase}: {peak_detail(estimate)}) but this {backend.device.type} device has "
                     f"{available / GIB:.2f} GiB; {advice} (--memory_check=false trains anyway)")


class Trainer:
    """Owns the model, optimizers, loaders and schedule; runs steps, validation and the timed loop."""

    def __init__(self, cfg, backend, log):
        self.cfg, self.backend, self.log = cfg, backend, log
        self.schedule = Schedule(cfg)
        self.parts, self.accum, self.loss_factor = split_batch(cfg, backend.world_size)
        self.memory = check_memory(cfg, backend)  # before anything is allocated: a run that cannot fit stops here
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg, backend.ops, backend.attention, backend.compute_dtype, backend.table_dtype).to(backend.device)
        if cfg.compile or cfg.compile_elementwise:
            torch._dynamo.config.cache_size_limit = 64  # one graph per (stage, window, tied), per update's shape and betas
        self.forward = torch.compile(self.model, fullgraph=True, dynamic=False) if cfg.compile else self.model
        self.optimizers = Optimizers(self.model, cfg, backend)
        # every step's MTP weights on the device up front: making them inside a step would copy
        # from the host and stall the GPU stream each step
        self.mtp_weights = [torch.tensor(self.schedule.mtp_weights(s), device=backend.device) for s in range(self.schedule.total)]
        # #88: None where the weight is 0 (off, or past the second third): that step's graph has no prefix term
        self.prefix_weights = [torch.tensor([w], device=backend.device) if w else None
                               for w in map(self.schedule.prefix_weight, range(self.schedule.total))]
        self.tokens_before = list(itertools.accumulate((self.schedule.batch_tokens(s) for s in range(self.schedule.total)), initial=0))
        # the model FLOPs before each step: what the ETA and the least cost are counted in
        self.flops_before = list(itertools.accumulate((self.step_flops(s) for s in range(self.schedule.total)), initial=0))
        self.peak_flops = matmul_peak(backend.device, backend.compute_dtype)  # what the train line's MFU is against
        require_disjoint(cfg.train_files, cfg.val_files)
        self.new_train_loader()
        # a quick lower bound, from the shard headers alone: the document tails longer than
        # max_seq_len and the shard tails a step does not fit in are dropped on top of it, which
        # only reading every shard would tell; the loader stops with its own error if it runs out
        needed = sum(self.schedule.batch_tokens(s) + self.parts for s in range(self.schedule.total))
        if needed > self.train_loader.available:
            raise SystemExit(
                f"error: the schedule needs at least {needed:,} training tokens but {cfg.train_files} holds "
                f"{self.train_loader.available:,}; download more shards or shorten the schedule"
            )
        self.val_loader = ValLoader(cfg.val_files, cfg.val_tokens, cfg.val_batch_tokens // self.parts,
                                    backend.rank, backend.world_size, cfg.vocab_size, backend.device)

    def new_train_loader(self):
        b = self.backend
        self.train_loader = TrainLoader(self.cfg.train_files, b.rank, b.world_size, self.cfg.vocab_size, b.device, self.accum)

    def begin_step(self, step):
        """Make the schedule's changes to the model for `step` (untie, window and YaRN); return the
        step's attention windows, MTP weights and tokens per micro-batch."""
        cfg, sched = self.cfg, self.schedule
        if step == sched.untie_step:
            self.model.untie()
            self.optimizers.adam.copy_state(self.model.lm_head, self.model.embed)
        blocks = sched.window_blocks(step)
        self.model.rotary.set_window(blocks[0] * cfg.window_block, cfg.yarn)
        return sched.windows(blocks), self.mtp_weights[step], sched.batch_tokens(step) // self.parts

    def train_step(self, step):
        """One optimizer step (with gradient accumulation). Returns this rank's means over tokens, by
        name: train_loss (what the step minimized, the model's loss), next_token_loss (the plain
        next-token cross-entropy in it, val_loss's training twin) and, when on, the shell penalty; on
        steps that log a train line also grad_norm, the norm of this rank's gradient of the summed
        loss before the step (Adam's tables with what they accumulated since its last step)."""
        cfg, sched = self.cfg, self.schedule
        windows, weights, micro_tokens = self.begin_step(step)
        last = step == sched.total - 1
        total, next_total, shell_total = 0.0, 0.0, 0.0
        for micro in range(self.accum):
            inputs, targets, _ = self.train_loader.next_batch(micro_tokens, sched.max_seq_len(step))
            # both summed over tokens; the next-token sum is a by-product of the loss's pass
            loss, next_token = self.forward(inputs, targets, windows, weights, self.prefix_weights[step], next_token=True)
            total += loss.detach() / (micro_tokens * self.accum)
            next_total += next_token / (micro_tokens * self.accum)
            if cfg.shell_lambda:
                # outside the compiled forward (shared with validation): it
                # repeats the cheap embedding lookup, and keeps the penalty out of the val loss
                shell = cfg.shell_lambda * shell_penalty(self.model.embed_tokens(inputs))
                shell_total += shell.detach() / self.accum
                loss = loss + shell * micro_tokens  # a per-token penalty, summed like the loss
            if micro == self.accum - 1:
                self.optimizers.arm(step, last)
            (loss * self.loss_factor).backward()
        logged = dict(train_loss=total, next_token_loss=next_total, **({"shell": shell_total} if cfg.shell_lambda else {}))
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            logged["grad_norm"] = gradient_norm(self.model.parameters())
        # the clip is on the mean token loss's gradient; the one applied is the batch's sum / accum_world_size
        clip = cfg.grad_clip * sched.batch_tokens(step) / cfg.accum_world_size
        self.optimizers.step(step, sched.lr_mult(step), sched.momentum(step), last, freeze_scalars=sched.scalars_frozen(step),
                             clip=clip)
        if cfg.fp8_mlp:
            self.rescale_fp8_mlps(step + 1)
        return logged

    def rescale_fp8_mlps(self, step):
        """The FP8 MLPs' down-projection scales for `step` (#89), from the step just done. The ReLU^2
        amax is the max over micro-batches and ranks (HEAD: each rank its previous micro-batch's), so
        every rank, and a run resumed from rank 0's checkpoint, uses the same scales."""
        mlps = [block.mlp for block in self.model.blocks]
        amaxes = torch.stack([mlp.act_amax for mlp in mlps])
        if self.backend.world_size > 1:
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX)
        for mlp, act_amax in zip(mlps, amaxes):
            mlp.rescale(step, act_amax)

    @torch.no_grad()
    def validate(self, blocks, yarn=True):
        """Mean cross-entropy over the first val_tokens tokens (all ranks) at (long, short) window
        blocks; `yarn=False` takes a new long window as it is (the final validation's)."""
        cfg = self.cfg
        self.model.rotary.set_window(blocks[0] * cfg.window_block, cfg.yarn and yarn)
        windows = self.schedule.windows(blocks)
        one = torch.ones(1, device=self.backend.device)
        self.model.eval()
        losses = [self.forward(x, y, windows, one) / x.numel() for x, y in self.val_loader]
        self.model.train()
        loss = torch.stack(losses).mean()
        if self.backend.world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        return loss.item()

    def log_sinks(self, step, blocks):
        """The sink metric on the first validation slice, at the windows validation just used."""
        inputs, _ = next(iter(self.val_loader))
        self.model.eval()
        alphas = self.model.first_token_attention(inputs, self.schedule.windows(blocks))
        self.model.train()
        share = sink_share(alphas)
        strongest = ",".join(f"{a:.3f}" for a in alphas.max(1).values.tolist())
        self.log.line(f"sink step:{step} share:{share:.3f} per_layer:[{strongest}]")
        self.log.metric(kind="sink", step=step, share=share, alpha=alphas.tolist(), threshold=SINK_THRESHOLD)

    def warmup(self):
        """Untimed: compile every graph the timed run uses and run a few real steps of every schedule
        stage (at least adam_every, so that Adam's compiled update runs too), then restore the model, the
        optimizers and the data so the timed run starts from scratch.

        Steps and validations go in the run's order, so the windows and the YaRN scale (a constant in
        the compiled graph) take the values the run gives them, with one validation per graph the run's
        validations need: a stage's windows and scale, tied or not, and the final windows."""
        if not self.cfg.warmup_steps:
            return
        sched = self.schedule
        steps = max(self.cfg.warmup_steps, self.optimizers.adam_every)
        model_state = clone_tree(self.model.state_dict())
        optim_state = clone_tree(self.optimizers.state_dict())
        starts = set(sched.stage_starts()) | ({sched.untie_step} - {None})
        train = {step for start in starts for step in range(start, min(start + steps, sched.total))}
        graphs = {}  # (stage, final, tied) -> the first step that validates with that graph
        for step in sorted(self.validation_steps(), reverse=True):
            tied = sched.untie_step is None or step <= sched.untie_step
            graphs[sched.stage(step), step == sched.total, tied] = step
        validations = set(graphs.values())
        for step in sorted(train | validations):
            if step in validations:
                self.validate(*self.validation_blocks(step))
            if step in train:
                self.train_step(step)
        self.model.load_state_dict(model_state)
        self.model.tied = True
        self.optimizers.load_state_dict(optim_state)
        for p in self.model.parameters():
            p.grad = None
        self.new_train_loader()
        self.backend.synchronize()

    def save(self, step, train_ms):
        """Checkpoint the run as it stands before `step` (files: see checkpoint_path). Every rank
        writes its own part; rank 0 writes the main file last, once all parts are in place, then
        deletes the checkpoints past --keep_checkpoints. Returns the path and the sizes, for the log."""
        b, folder = self.backend, checkpoint_dir(self.cfg)
        os.makedirs(folder, exist_ok=True)
        grads = {name: p.grad for name, p in self.model.named_parameters() if p.grad is not None}
        save_atomic(dict(optimizers=self.optimizers.state_dict(), grads=grads, rng=rng_state()),
                    checkpoint_path(folder, step, b.rank))
        if b.world_size > 1:
            dist.barrier()
        if b.is_master:
            save_atomic(dict(config=config_json(self.cfg), source=source_code(), world_size=b.world_size,
                             step=step, train_ms=train_ms, model=self.model.state_dict(), tied=self.model.tied,
                             loader=self.train_loader.position()), checkpoint_path(folder, step))
        if b.world_size > 1:
            dist.barrier()
        path, sizes = checkpoint_path(folder, step), [os.path.getsize(f) for f in checkpoint_files(folder, step)]
        if b.is_master:
            remove_old_checkpoints(folder, self.cfg.keep_checkpoints)
        return (f"{path} ({sum(sizes) / 2**20:,.1f} MiB: model and run {sizes[0] / 2**20:,.1f}, optimizer state of "
                f"{len(sizes) - 1} rank(s) {sum(sizes[1:]) / 2**20:,.1f})")

    def resume(self, path):
        """Load a checkpoint written by the same config and source (or, with --resume_any, another
        config or source) on any number of ranks; return (step, train_ms) to continue from."""
        cfg, b = self.cfg, self.backend
        state = load_checkpoint(path)
        differ = checkpoint_differences(state, cfg)
        if differ and not cfg.resume_any:
            raise SystemExit(f"error: --resume={path}: the checkpoint comes from another run: {'; '.join(differ)} "
                             "(--resume_any=true resumes anyway)")
        if state["step"] >= self.schedule.total:
            raise SystemExit(f"error: --resume={path}: that run already finished (step {state['step']})")
        written_by = state["world_size"]
        parts = [load_checkpoint(checkpoint_path(os.path.dirname(path), state["step"], r), keys=("optimizers",))
                 for r in ranks_to_read(written_by, b)]
        self.model.load_state_dict(state["model"])
        self.model.tied = state["tied"]
        self.optimizers.load_state_dict(parts[0]["optimizers"] if written_by == b.world_size else
                                        self.optimizers.reshard([part["optimizers"] for part in parts]))
        for name, p in self.model.named_parameters():
            p.grad = rank_mean_grad([part["grads"] for part in parts], name, b.device)
        set_rng_state(parts[min(b.rank, len(parts) - 1)]["rng"])
        self.train_loader.seek(state["loader"])  # a position in the global order of parts: any world size
        resharded = f", resharded to {b.world_size}" if written_by != b.world_size else ""
        self.log.line(f"resumed from {path} at step {state['step']}/{self.schedule.total}, train_time {state['train_ms']:.0f}ms, "
                      f"written by {written_by} process(es){resharded}")
        if differ:
            self.log.line(f"resumed despite: {'; '.join(differ)}")
        return state["step"], state["train_ms"]

    def resume_point(self):
        """The checkpoint to continue from: --resume, or with --resume=auto the newest complete one
        whose files every rank can read (a line names each one passed over), or None."""
        if self.cfg.resume != "auto":
            return self.cfg.resume or None
        folder, b = checkpoint_dir(self.cfg), self.backend
        for step in saved_steps(folder):
            try:
                written_by = read_checkpoint(checkpoint_path(folder, step), CHECKPOINT_KEYS, mmap=True)["world_size"]
                for r in ranks_to_read(written_by, b):
                    read_checkpoint(checkpoint_path(folder, step, r), ("optimizers",), mmap=True)
                problem = None
            except CheckpointError as e:
                problem = str(e)
            problems = [problem] * b.world_size
            if b.world_size > 1:
                dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p), None)
            if problem is None:
                return checkpoint_path(folder, step)
            self.log.line(f"resume: passing over the checkpoint of step {step}: {problem}")
        self.log.line(f"resume: no readable checkpoint in {folder} yet, starting at step 0")
        return None

    def describe(self):
        """The run's set-up as log lines: the parameter table (its total on the console too), backend,
        schedule, what train_loss means."""
        cfg, b = self.cfg, self.backend
        *table, total = parameter_table(self.model, self.optimizers)
        for line in table:
            self.log.line(line, console=False)
        self.log.line(total)
        self.log.line(f"backend: {b.device.type} x {b.world_size}, accumulation {self.accum}, ops {b.ops.name}, "
                      f"attention {type(b.attention).__name__}, compute {str(b.compute_dtype).removeprefix('torch.')}, "
                      f"compile {cfg.compile}, records track {b.records_track(cfg.preset)}")
        for note in b.notes:
            self.log.line("fallback: " + note)
        self.log.line(self.memory)
        size, first = PEAK_SIZE[b.device.type], self.schedule.windows(self.schedule.window_blocks(0))
        flops = flops_per_token(cfg, first, self.schedule.max_seq_len(0))
        self.log.line(f"throughput: {flops / 1e6:.1f} MFLOP per token at the first stage; matmul peak "
                      f"{self.peak_flops / 1e9:.0f} GFLOP/s ({size}^3 {str(b.compute_dtype).removeprefix('torch.')}, timed "
                      "here per device): the train line's MFU is against it")
        self.log.line(f"cost: at least {format_duration(self.least_seconds())} of training here (the schedule's "
                      f"{self.tokens_before[-1]:,} tokens at the matmul peak of {b.world_size} device(s); runs reach a "
                      "fraction of it, see MFU)")
        for line in self.schedule.describe():
            self.log.line("schedule: " + line)
        if cfg.mtp or cfg.prefix_loss:
            prefix = " and, while its weight is on, of the next token's prefix token (#88)" if cfg.prefix_loss else ""
            stable = " (with --stablemax, each of StableMax's distribution)" if cfg.stablemax else ""
            self.log.line("note: train_loss is the multi-token-prediction loss, a weighted sum of the cross-entropies "
                          f"of the next tokens (README){prefix}; next_token_loss is the plain next-token cross-entropy "
                          f"of the step's tokens, as val_loss is of the validation tokens{stable}")

    def step_flops(self, step):
        """Model FLOPs of a step: its batch at its windows and longest piece."""
        sched = self.schedule
        return flops_per_token(self.cfg, sched.windows(sched.window_blocks(step)), sched.max_seq_len(step)) * sched.batch_tokens(step)

    def least_seconds(self):
        """The train time the schedule would take at 100% MFU: its FLOPs over the devices' peak."""
        return self.flops_before[-1] / (self.peak_flops * self.backend.world_size)

    def validation_steps(self):
        """The steps the run validates at: every val_every and the end."""
        every, total = self.cfg.val_every, self.schedule.total
        return set(range(0, total, every) if every else ()) | {total}

    def validation_blocks(self, step):
        """(window blocks, yarn) of the validation at `step`: the end's widens the long window without YaRN."""
        last = step == self.schedule.total
        return (self.schedule.final_window_blocks() if last else self.schedule.window_blocks(step)), not last

    def validation(self, step, train_ms):
        """Validate at `step` (the final validation's windows at the end), log it; return the loss."""
        cfg, sched = self.cfg, self.schedule
        blocks, yarn = self.validation_blocks(step)
        self.log.line(f"validating at step {step}/{sched.total}: {cfg.val_tokens:,} tokens, clock stopped")
        start = time.perf_counter()
        val_loss = self.validate(blocks, yarn)
        self.val_seconds.append(time.perf_counter() - start)
        avg = f"{train_ms / step:.2f}" if step else "nan"
        self.log.line(f"step:{step}/{sched.total} val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms step_avg:{avg}ms "
                      f"val_time:{1000 * self.val_seconds[-1]:.0f}ms")
        require_finite("val_loss", val_loss, step)
        self.log.metric(kind="val", step=step, val_loss=val_loss, train_time_ms=train_ms)
        if cfg.sink_metric and self.backend.is_master:
            self.log_sinks(step, blocks)
        return val_loss

    def mean_over_ranks(self, losses):
        """The step's losses averaged over ranks, as Python floats (a host read)."""
        if self.backend.world_size > 1:
            for value in losses.values():
                dist.all_reduce(value, op=dist.ReduceOp.AVG)
        return {name: float(value) for name, value in losses.items()}

    def log_train(self, step, losses, train_ms, vals_left):
        """The train line after `step` steps: the losses and grad norm, the lr multiplier of the
        last step, tokens/s and MFU over the steps since the previous line, the ETA."""
        sched = self.schedule
        losses = self.mean_over_ranks(losses)
        last_step, last_ms = self.last_train_line
        self.last_train_line = (step, train_ms)
        ms, flops = train_ms - last_ms, self.flops_before[step] - self.flops_before[last_step]
        tokens_per_s = 1000 * (self.tokens_before[step] - self.tokens_before[last_step]) / ms
        mfu = 1000 * flops / ms / self.backend.world_size / self.peak_flops
        eta = eta_seconds(ms / flops, self.flops_before[-1] - self.flops_before[step], vals_left, self.val_seconds)
        shown = " ".join(f"{name}:{value:.4f}" for name, value in losses.items())
        self.log.line(f"step:{step}/{sched.total} {shown} lr_mult:{sched.lr_mult(step - 1):.3f} "
                      f"tokens_per_s:{tokens_per_s:.0f} mfu:{100 * mfu:.1f}% train_time:{train_ms:.0f}ms "
                      f"step_avg:{train_ms / step:.2f}ms eta:{eta:.0f}s")
        self.log.metric(kind="train", step=step, **losses, lr_mult=sched.lr_mult(step - 1), tokens_per_s=tokens_per_s,
                        mfu=mfu, train_time_ms=train_ms)
        require_finite("train_loss", losses["train_loss"], step)

    def run(self):
        """Warmup, then the timed loop: validations, checkpoints and a stop on a signal happen at
        step boundaries with the clock stopped. Returns (final val loss, train ms)."""
        cfg, sched, log = self.cfg, self.schedule, self.log
        self.describe()
        if cfg.warmup_steps:
            log.line(f"warmup: {'compiling, ' if cfg.compile else ''}{cfg.warmup_steps} steps per schedule stage "
                     "and a validation per graph the run validates with, untimed and then undone")
            start = time.perf_counter()
            self.warmup()
            log.line(f"warmup: done in {time.perf_counter() - start:.1f}s")
        total, first, train_ms = sched.total, 0, 0.0
        path = self.resume_point()
        if path:
            first, train_ms = on_every_rank(self.backend, lambda: self.resume(path))
        val_steps = self.validation_steps()
        val_steps -= {first} if path else set()  # the saved run validated there before it saved
        save_steps = set(range(first + 1, total)) if cfg.save_every else set()
        save_steps = {s for s in save_steps if s % cfg.save_every == 0} | ({total} if cfg.save_final else set())
        val_loss, self.val_seconds, stop = float("nan"), [], StopSignal(self.backend)
        self.last_train_line = (first, train_ms)
        log.started = True
        self.backend.synchronize()
        t0 = time.perf_counter()
        if cfg.prefix_loss:  # #88: on the clock, as HEAD builds it (its warmup ran on the empty table too)
            self.model.load_prefix_table()
        try:
            for step in range(first, total + 1):
                signum = stop.requested()
                if step in val_steps or step in save_steps or signum:
                    self.backend.synchronize()
                    train_ms += 1000 * (time.perf_counter() - t0)
                    if step in val_steps:
                        val_loss = self.validation(step, train_ms)
                    if step in save_steps or signum:
                        log.line(f"checkpoint: {self.save(step, train_ms)}")
                    if signum:
                        log.line(f"interrupted at step {step} by {signal.Signals(signum).name}")
                        raise SystemExit(STOP_SIGNALS[signum])
                    self.backend.synchronize()
                    t0 = time.perf_counter()
                if step == total:
                    break
                losses = self.train_step(step)
                if cfg.log_every and (step + 1) % cfg.log_every == 0:
                    now = train_ms + 1000 * (time.perf_counter() - t0)
                    self.log_train(step + 1, losses, now, sum(s > step for s in val_steps))
                elif self.backend.loss_on_host or step + 1 in save_steps:  # never save a diverged model
                    require_finite("train_loss", self.mean_over_ranks(losses)["train_loss"], step + 1)
            stop.finish()  # the flag sent at the last boundary
        finally:
            stop.close()
        tokens = self.tokens_before[-1]
        peak = self.backend.peak_memory_mib()
        log.line(f"final val_loss:{val_loss:.4f} train_time:{train_ms:.0f}ms tokens:{tokens} peak_memory:{peak}MiB")
        log.metric(kind="final", val_loss=val_loss, train_time_ms=train_ms, tokens=tokens, peak_memory_mib=peak)
        record = current_record(self.backend.records_track(cfg.preset))
        if record:
            log.line(versus_record(cfg, record, val_loss, train_ms))
        return val_loss, train_ms


def require_finite(name, value, step):
    """Stop a diverged run: nothing after a nan or inf loss is worth training, timing or comparing.
    Checked every step on the CPU; on a GPU where the loss is on the host anyway (log lines,
    validations, checkpoints): no extra sync."""
    if not math.isfinite(value):
        raise SystemExit(f"error: loss is {value} at step {step} ({name})")


def clone_tree(obj):
    """A deep copy of nested lists/dicts of tensors (optimizer state snapshots)."""
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


class Interrupted(BaseException):
    """SIGINT or SIGTERM (its number the one argument) outside the timed loop's watch (start-up,
    warmup, a second signal)."""


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


FORESEEN = (ShardError, OSError, SystemExit)  # failures that end a run with one `error:` line, no traceback


def error_line(e):
    """The `error:` line of a foreseen failure, or None for a plain exit status (a signal's)."""
    message = e.code if isinstance(e, SystemExit) else f"error: {e}"
    return message if isinstance(message, str) else None


def memory_error_line(e):
    """The `error:` line for an allocation that failed (CUDA's OutOfMemoryError, the CPU allocator's
    RuntimeError), naming what was asked for and the flags that need less; None for other errors."""
    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in text)):
        return None
    in_bytes = re.search(r"tried to allocate (\d+) bytes", text, re.I)  # the CPU allocator's words
    in_units = re.search(r"tried to allocate ([\d.]+ [KMGT]iB)", text, re.I)  # CUDA's
    size = f"{int(in_bytes[1]) / 2**30:.2f} GiB" if in_bytes else in_units[1] if in_units else None
    asked = f"{size} more could not be allocated" if size else "an allocation failed"
    return (f"error: out of memory ({asked}). Less is needed per step with --activation_checkpointing=true "
            "(the same numbers, about a third more compute), a larger --accum_world_size (a multiple of this run's: "
            "finer slices of the same batch, slightly other numbers) or a smaller --val_batch_tokens; "
            "--batch_tokens and --max_seq_len shrink it too but change the recipe")


def on_every_rank(backend, start):
    """`start()`, a start-up step whose checks some ranks make alone (rank 0 alone looks at the log
    and checkpoint folders, each rank reads its own checkpoint part): its result, or, when it failed
    on any rank, the lowest failing rank's `error:` line as every rank's exit. Otherwise the other
    ranks would run on to their next collective and wait there for a rank that has gone."""
    try:
        result, error = start(), None
    except FORESEEN as e:
        result, error = None, error_line(e)
        if error is None:
            raise
    if backend.world_size > 1:
        errors = [None] * backend.world_size
        dist.all_gather_object(errors, error)
        error = next((message for message in errors if message), None)
    if error:
        raise SystemExit(error)
    return result


def fresh_run_id(preset, backend):
    """A new run id, rank 0's on every rank, so that all ranks write into one checkpoint folder."""
    ids = [f"{preset}_{uuid.uuid4().hex[:8]}"]
    if backend.world_size > 1:
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def dry_run(cfg):
    """--dry_run: the effective config, the schedule by stage, the estimated peak memory of one process
    and the parameter table, from the model and optimizers built on the meta device: no data, devices
    or process group, seconds for any preset."""
    backend = meta_backend(cfg)
    with torch.device("meta"):
        model = GPT(cfg, backend.ops, backend.attention, backend.compute_dtype, backend.table_dtype)
    lines = [config_summary(cfg).removesuffix(" (the full config is in the log)"), "config: " + json.dumps(config_json(cfg))]
    lines += ["schedule: " + line for line in Schedule(cfg).describe()]
    device = "cpu" if cfg.device == "cpu" else "cuda"
    lines.append(memory_line(memory_estimate(cfg, backend), f" as one process on {device} with {backend.ops.name} ops"))
    lines += parameter_table(model, Optimizers(model, cfg, backend))
    print("\n".join(lines), flush=True)


def main(argv=None):
    """Train. A bad flag: one `error:` line, exit 2. A foreseeable failure (data, log dir, world size):
    one `error:` line on stderr and in the log, exit 1, no traceback. A signal before the timed loop
    (or a second one in it): one `interrupted` line, exit 130 / 143, no traceback."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.dry_run:
        return dry_run(cfg)
    log, handlers = None, {sig: signal.signal(sig, raise_interrupted) for sig in STOP_SIGNALS}
    try:
        backend = setup_backend(cfg)
        cfg.run_id = cfg.run_id or fresh_run_id(cfg.preset, backend)
        log = on_every_rank(backend, lambda: RunLog(cfg, backend))
        return Trainer(cfg, backend, log).run()
    except Interrupted as e:
        signum = e.args[0]
        message = (f"interrupted by {signal.Signals(signum).name} before the first step or by a second "
                   "signal: no checkpoint written")
        if log:
            log.line(message, console=False)
        print(message, file=sys.stderr)
        raise SystemExit(STOP_SIGNALS[signum]) from None
    except FORESEEN as e:
        message = error_line(e)
        if message is None:  # a plain exit status, not an error of ours
            raise
        if log:
            log.line(message, console=False)  # stderr gets it from SystemExit
        raise SystemExit(message) from None
    except Exception as e:  # a bug or an unforeseen failure: the traceback goes to stderr, its gist to the log
        message = memory_error_line(e)
        if log:
            log.line(message or f"error: {type(e).__name__}: {e}", console=False)
        if message:
            raise SystemExit(message) from None
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if log:
            log.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
