"""What the model really feeds each fused op: a spy on the ops table (and on fp8_linear).

A small model with every switch of the speedrun preset (FP8 head included) runs one training step
on the CPU: forward, backward and both optimizers. The spy records the dtype and shape of every
tensor argument each fused op and the attention receive, and the residual stream at each block.
The dtypes must not depend on the device, because each fused op's caller casts its operands itself
instead of relying on autocast, whose fp32 op lists differ between CPU and CUDA: CudaAutocastRules
applies CUDA's on the CPU. test_kernels.py and test_backend.py assert the contract, and aot_sm90.py
compiles the kernels for H100 with exactly the dtypes of the CUDA configuration.
"""
import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

import train_gpt as T

FUSED_OPS = ("sym_mm", "sym_axpby", "linear_relu2", "softcap_mtp_ce")
# leading tensor arguments of each op that a kernel multiplies (the rest: targets, MTP weights)
# (fp8_linear's weight is cast to e4m3 from the dtype it is stored in: bf16 on CUDA, float32 on a CPU)
OPERANDS = {"sym_mm": 1, "sym_axpby": 1, "linear_relu2": 2, "softcap_mtp_ce": 1, "fp8_linear": 1}
SMALL = ["--device=cpu", "--compile=false", "--n_layer=6", "--d_model=128", "--n_head=2", "--head_dim=64", "--mlp_hidden=512",
         "--vocab_size=1000", "--no_attn_layers=3", "--long_window_layers=1,5", "--skip_from=1", "--skip_to=3",
         "--backout_layer=4", "--window_block=64"]
TOKENS = 256


def spied_ops(base, calls):
    """A subclass of the ops table `base` whose fused ops first append (name, [(dtype, shape)]) to `calls`."""

    def spy(name):
        op = getattr(base, name)

        def call(*args, **kwargs):
            calls.append((name, [(a.dtype, tuple(a.shape)) for a in args if torch.is_tensor(a)]))
            return op(*args, **kwargs)

        return staticmethod(call)

    return type(f"Spied{base.__name__}", (base,), {name: spy(name) for name in FUSED_OPS})


# CUDA autocast's ops that do not run in fp32: lower precision (matmuls) or the widest input's dtype
CUDA_NOT_FP32 = {"addmv", "addr", "einsum", "mv", "matmul", "mm", "bmm", "linear", "addmm", "baddbmm", "addbmm", "prelu",
                 "chain_matmul", "linalg_multi_dot", "scaled_dot_product_attention", "conv1d", "conv2d", "conv3d",
                 "cat", "stack", "addcmul", "addcdiv", "atan2", "bilinear", "cross", "dot", "vdot", "tensordot",
                 "index_put", "index_copy", "scatter_add", "grid_sampler"}
# composite ops that reach autocast as another op: x.square() is pow(x, 2) there
DECOMPOSES_TO = {"square": "pow"}
# CUDA autocast rules that differ between the torch versions the GPU path supports (docs/gpu.md): the
# (major, minor) from which CUDA runs the op in fp32
FP32_SINCE = {"rms_norm": (2, 12)}
SUPPORTED_TORCH = [(2, 11), (2, 13)]  # the device's torch, and the one requirements.txt pins


@functools.cache
def cuda_only_fp32(name):
    """Whether CUDA autocast runs aten op `name` in fp32 while CPU autocast leaves it alone: torch's
    dispatch table has an AutocastCUDA kernel for it and only a fallthrough for AutocastCPU."""
    name = DECOMPOSES_TO.get(name, name)
    if name in CUDA_NOT_FP32:
        return False
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):  # not an aten op (a method such as Tensor.to)
        return False
    for overload in packet.overloads():  # pow has no default overload: pow.Tensor_Scalar, ...
        table = torch._C._dispatch_dump_table(f"aten::{name}" + ("" if overload == "default" else f".{overload}"))
        kernel = {line.split(":")[0]: "fallthrough" not in line for line in table.splitlines() if line.startswith("Autocast")}
        if kernel.get("AutocastCUDA", False) and not kernel.get("AutocastCPU", False):
            return True
    return False


class CudaAutocastRules(TorchFunctionMode):
    """CUDA's autocast on the CPU: inside an autocast region, an op that CUDA autocast runs in fp32 and
    CPU autocast does not (rms_norm since torch 2.12; exp, logsumexp, sum, pow, ...) returns fp32 for
    16-bit inputs, as it would on a GPU. The lists come from the running torch's dispatch table, so an
    op that a later torch adds to CUDA's fp32 list is emulated too; `version` (major, minor) applies
    another torch's rules where FP32_SINCE knows they differ."""

    def __init__(self, version=None):
        super().__init__()
        self.version = version

    def fp32(self, name):
        if self.version is not None and name in FP32_SINCE:
            return self.version >= FP32_SINCE[name]
        return cuda_only_fp32(name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "").strip("_")
        if (torch.is_tensor(out) and out.dtype in (torch.bfloat16, torch.float16)
                and torch.is_autocast_enabled("cpu") and self.fp32(name)):
            return out.float()
        return out


class SpiedAttention:
    """An attention backend that first appends ("attention", [(dtype, shape) of q, k, v]) to `calls`."""

    def __init__(self, inner, calls):
        self.inner, self.calls = inner, calls

    def mask(self, docs, window):
        return self.inner.mask(docs, window)

    def __call__(self, q, k, v, *rest):
        self.calls.append(("attention", [(t.dtype, tuple(t.shape)) for t in (q, k, v)]))
        return self.inner(q, k, v, *rest)


def build(flags=(), table_dtype=None, calls=None):
    """(cfg, model, optimizers) of the small model, its fused ops and attention spied into `calls`."""
    calls = [] if calls is None else calls
    ops = spied_ops(T.TorchOps, calls)
    cfg = T.parse_args(SMALL + list(flags))
    attention = SpiedAttention(T.BlockedAttention(cfg.window_block), calls)
    backend = T.Backend(torch.device("cpu"), 0, 1, ops, attention, table_dtype=table_dtype)
    torch.manual_seed(0)
    model = T.GPT(cfg, ops, attention, backend.compute_dtype, table_dtype)
    for block in model.blocks:  # the residual stream as each block receives it
        block.register_forward_pre_hook(lambda _, args: calls.append(("block", [(args[0].dtype, tuple(args[0].shape))])))
    return cfg, model, T.Optimizers(model, cfg, backend)


def record_op_inputs(flags=(), cuda_rules=False, table_dtype=None, built=None):
    """[(op name, [(dtype, shape) of each tensor argument])] for one training step of the small model
    (the fused ops, fp8_linear, attention and each block's input); `cuda_rules`: under CudaAutocastRules
    (True: the running torch's, (major, minor): that version's). `built`: a list that receives (model,
    optimizers) after the step."""
    calls = []
    cfg, model, optimizers = build(flags, table_dtype, calls)
    fp8_linear = T.fp8_linear

    def fp8_spy(x, w, *rest):
        calls.append(("fp8_linear", [(x.dtype, tuple(x.shape)), (w.dtype, tuple(w.shape))]))
        return fp8_linear(x, w, *rest)

    T.fp8_linear = fp8_spy  # GPT.logits looks the function up at call time
    try:
        idx = torch.randint(0, cfg.vocab_size, (TOKENS + 1,), generator=torch.Generator().manual_seed(0))
        schedule = T.Schedule(cfg)
        windows = schedule.windows(schedule.window_blocks(0))
        rules = CudaAutocastRules(None if cuda_rules is True else cuda_rules) if cuda_rules else contextlib.nullcontext()
        prefix_weight = None
        if cfg.prefix_loss:  # #88, as the Trainer passes it
            model.load_prefix_table()
            prefix_weight = torch.tensor([schedule.prefix_weight(0)])
        with rules:
            model(idx[:-1], idx[1:], windows, torch.tensor(schedule.mtp_weights(0)), prefix_weight).backward()
        optimizers.step(0, schedule.lr_mult(0), schedule.momentum(0), last=True)
    finally:
        T.fp8_linear = fp8_linear
    if built is not None:
        built += [model, optimizers]
    return calls
