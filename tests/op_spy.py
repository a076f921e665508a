"""What the model really feeds each fused op: a spy on the ops table (and on fp8_linear).

A small model with every switch of the speedrun preset (FP8 head included) runs one training step
on the CPU: forward, backward and both optimizers. The spy records the dtype and shape of every
tensor argument each fused op receives. The dtypes do not depend on the device, because each fused
op's caller casts its operands itself instead of relying on autocast (whose fp32 and bf16 op lists
differ between CPU and CUDA); test_kernels.py asserts the contract and aot_sm90.py compiles the
kernels for H100 with exactly these dtypes.
"""
import torch

import train_gpt as T

FUSED_OPS = ("sym_mm", "sym_axpby", "linear_relu2", "softcap_mtp_ce")
# leading tensor arguments of each op that a kernel multiplies (the rest: targets, MTP weights)
OPERANDS = {"sym_mm": 1, "sym_axpby": 1, "linear_relu2": 2, "softcap_mtp_ce": 1, "fp8_linear": 2}
SMALL = ["--device=cpu", "--compile=false", "--n_layer=6", "--d_model=128", "--n_head=2", "--head_dim=64", "--mlp_hidden=512",
         "--vocab_size=1000", "--no_attn_layers=3", "--long_window_layers=1,5", "--skip_from=1", "--skip_to=3",
         "--backout_layer=4", "--window_block=64"]
TOKENS = 256


def spied_ops(base, calls):
    """A subclass of the ops table `base` whose fused ops first append (name, [(dtype, shape)]) to `calls`."""

    def spy(name):
        op = getattr(base, name)

        def call(*args):
            calls.append((name, [(a.dtype, tuple(a.shape)) for a in args if torch.is_tensor(a)]))
            return op(*args)

        return staticmethod(call)

    return type(f"Spied{base.__name__}", (base,), {name: spy(name) for name in FUSED_OPS})


def record_op_inputs(flags=()):
    """[(op name, [(dtype, shape) of each tensor argument])] for one training step of the small model."""
    calls = []
    ops = spied_ops(T.TorchOps, calls)
    cfg = T.parse_args(SMALL + list(flags))
    backend = T.Backend(torch.device("cpu"), 0, 1, ops, T.BlockedAttention(cfg.window_block))
    torch.manual_seed(0)
    model = T.GPT(cfg, ops, backend.attention)
    optimizers = T.Optimizers(model, cfg, backend)
    fp8_linear = T.fp8_linear

    def fp8_spy(x, w, *rest):
        calls.append(("fp8_linear", [(x.dtype, tuple(x.shape)), (w.dtype, tuple(w.shape))]))
        return fp8_linear(x, w, *rest)

    T.fp8_linear = fp8_spy  # GPT.logits looks the function up at call time
    try:
        idx = torch.randint(0, cfg.vocab_size, (TOKENS + 1,), generator=torch.Generator().manual_seed(0))
        schedule = T.Schedule(cfg)
        windows = schedule.windows(schedule.window_blocks(0))
        model(idx[:-1], idx[1:], windows, torch.tensor(schedule.mtp_weights(0))).backward()
        optimizers.step(0, schedule.lr_mult(0), schedule.momentum(0), last=True)
    finally:
        T.fp8_linear = fp8_linear
    return calls
