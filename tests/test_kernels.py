"""The Triton kernels against their torch twins (interpreted on CPU), their sm_90 builds, and FP8 lm_head.

Tolerances are max |error| / max |reference| unless stated: fp32 1e-5 (accumulation order),
fp16 2e-3 and bf16 1e-2 (a few roundings of the output format). The references run in fp32 on the
same (rounded) inputs. Under the interpreter the matmul kernels upcast bf16 operands to fp32 (its
bf16 dot is wrong), which matches the GPU's fp32 accumulation of exact bf16 products.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from triton.runtime.interpreter import InterpretedFunction

import op_spy
import train_gpt as T

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
HALF = [torch.float16, torch.bfloat16]  # the kernels take 2-byte operands only
POLAR_BC = (-22.48329292557795, 15.878769915207462)  # (b, c) of the first Polar Express step
# Shared memory per block (the opt-in maximum) by compute capability: A100 (8.0); RTX 3090 (8.6), RTX 4090
# and L4 (8.9); H100/H200 (9.0); B200 (10.0); RTX 5090 (12.0). From CUDA's programming guide.
SHARED_MEMORY_PER_BLOCK = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
SMEM_LIMIT = SHARED_MEMORY_PER_BLOCK[90]  # H100
MATMUL_KERNELS = ("sym_mm", "sym_axpby", "linear_relu2")


def assert_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * max |reference| {scale:.3g}"


def test_kernels_are_interpreted():
    assert isinstance(T._sym_mm_kernel, InterpretedFunction), (
        "train_gpt was imported before tests/conftest.py set TRITON_INTERPRET=1; the kernels cannot run on CPU")


# Polar Express shapes: 768x3072 scaled by 1/4, a stack of them, and sizes off the 128/64 tiles.
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(192, 768), (3, 192, 768), (2, 1, 130, 200), (1, 5)])
def test_sym_mm_matches_twin(shape, dtype):
    a = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) / math.sqrt(shape[-1])).to(dtype)
    out = T.TritonOps.sym_mm(a)
    assert out.shape == shape[:-1] + shape[-2:-1] and out.dtype == dtype
    assert torch.equal(out, out.mT), "the mirrored tiles must make the result exactly symmetric"
    assert_close(out, T.TorchOps.sym_mm(a.float()), TOL[dtype], f"sym_mm {shape} {dtype}")


def test_sym_mm_reads_strided_input():
    """polar_express hands tall matrices over transposed (a view), so the kernel follows strides."""
    a = (torch.randn(2, 768, 192, generator=torch.Generator().manual_seed(0)) / math.sqrt(768)).half().mT
    assert not a.is_contiguous()
    assert_close(T.TritonOps.sym_mm(a), T.TorchOps.sym_mm(a.float()), TOL[torch.float16], "sym_mm of a transposed view")


def test_kernels_refuse_fp32():
    """A kernel handed fp32 says so instead of launching tiles sized for 2-byte operands (on an H100,
    linear_relu2's fp32 tiles need more shared memory than the chip has: the crash this guards)."""
    a = torch.randn(64, 64)
    targets = torch.zeros(64, dtype=torch.long)
    calls = {
        "sym_mm": lambda: T.TritonOps.sym_mm(a),
        "sym_axpby": lambda: T.TritonOps.sym_axpby(a, 1.0, 1.0),
        "linear_relu2": lambda: T.TritonOps.linear_relu2(a, a),
        "softcap_mtp_ce": lambda: T.TritonOps.softcap_mtp_ce(a, targets, torch.ones(1), 30.0, 7.5),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name}: the Triton kernel takes bf16 or fp16"):
            call()
    with pytest.raises(TypeError, match="x is torch.bfloat16 but w is torch.float16"):
        T.TritonOps.linear_relu2(a.bfloat16(), a.half())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(192, 192), (2, 130, 130), (200, 200)])
def test_sym_axpby_matches_twin(shape, dtype):
    s = torch.randn(shape, generator=torch.Generator().manual_seed(1)) / math.sqrt(shape[-1])
    a = ((s + s.mT) / 2).to(dtype)
    out = T.TritonOps.sym_axpby(a, *POLAR_BC)
    assert torch.equal(out, out.mT)
    assert_close(out, T.TorchOps.sym_axpby(a.float(), *POLAR_BC), TOL[dtype], f"sym_axpby {shape} {dtype}")


def twin_grads(fn, inputs, grad):
    """Output and input gradients of `fn` by torch autograd, in fp32."""
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.float())
    return out, [t.grad for t in leaves]


def kernel_grads(fn, inputs, grad):
    """Output and input gradients of `fn` in the inputs' own dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out, [t.grad for t in leaves]


# MLP up projection: 768 -> 3072 scaled by 1/4 on 256 tokens, and sizes off the 128/256/64 tiles.
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("x_shape,w_shape", [((2, 128, 192), (768, 192)), ((3, 50, 100), (300, 100))])
def test_linear_relu2_matches_twin_and_autograd(x_shape, w_shape, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, generator=gen).to(dtype)
    w = (torch.randn(w_shape, generator=gen) / math.sqrt(w_shape[1])).to(dtype)
    grad = torch.randn(*x_shape[:-1], w_shape[0], generator=gen).to(dtype)
    out, (gx, gw) = kernel_grads(T.TritonOps.linear_relu2, (x, w), grad)
    ref, (rx, rw) = twin_grads(T.TorchOps.linear_relu2, (x, w), grad)
    assert out.dtype == gx.dtype == gw.dtype == dtype
    what = f"linear_relu2 {x_shape}x{w_shape} {dtype}"
    assert_close(out, ref, TOL[dtype], what + " output")
    # backward recovers relu(pre) as sqrt(output), which adds one rounding of the output format
    assert_close(gx, rx, 2 * TOL[dtype], what + " grad x")
    assert_close(gw, rw, 2 * TOL[dtype], what + " grad w")


def ce_case(rows, vocab, prefix, dtype, seed):
    """Random logits [rows, vocab] in `dtype`, targets, an output gradient and, with `prefix`, #88's
    (prefix targets, weight) with a third of the rows NO_PREFIX and a quarter equal to the target (the
    gradient's one-hot columns then add up), else ()."""
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    grad = torch.randn(rows, generator=gen)
    extra = ()
    if prefix:
        prefixes = torch.randint(0, vocab, (rows,), generator=gen)
        prefixes[::3] = T.NO_PREFIX
        prefixes[1::4] = targets[1::4]
        extra = (prefixes, torch.tensor([0.25]))
    return logits, targets, grad, extra


# Record vocabulary 50304 scaled by 1/16 (3144: one full and one partial 2048-block), a vocabulary
# smaller than a block, fewer rows than MTP weights; softcap on and off; with #88's prefix target
# (a third of the rows without one, some equal to an MTP target). The model passes the MTP and prefix
# weights as float32 tensors (new values never recompile); both ops take them.
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows,vocab,weights,cap,offset,prefix", [
    (64, 3144, (1.0, 0.5, 0.25), 30.0, 0.0, False),
    (37, 1000, (1.0, 0.3), 30.0, 0.0, False),
    (2, 50, (1.0, 0.5, 0.25), 30.0, 0.0, False),
    (37, 1000, (1.0, 0.5, 0.25), 0.0, 0.0, False),
    (20, 3144, (1.0,), 0.0, 0.0, False),
    (37, 1000, (1.0, 0.5, 0.25), 23.0, 5.0, False),  # #54's asymmetric cap
    (64, 3144, (1.0, 0.5, 0.25), 23.0, 5.0, True),  # HEAD's first third
    (2, 50, (1.0, 0.5), 30.0, 0.0, True),
    (20, 1000, (1.0,), 0.0, 0.0, True),
])
def test_softcap_mtp_ce_matches_twin_and_autograd(rows, vocab, weights, cap, offset, prefix, dtype):
    logits, targets, grad, extra = ce_case(rows, vocab, prefix, dtype, 3)
    weights = torch.tensor(weights)

    def kernel(z):
        return T.TritonOps.softcap_mtp_ce(z, targets, weights, cap, 7.5, offset, *extra)

    def twin(z):
        return T.TorchOps.softcap_mtp_ce(z, targets, weights, cap, 7.5, offset, *extra)

    loss, (dz,) = kernel_grads(kernel, (logits,), grad)
    ref, (rz,) = twin_grads(twin, (logits,), grad)
    what = f"softcap_mtp_ce {rows}x{vocab} w={weights.tolist()} cap={cap} offset={offset} prefix={prefix} {dtype}"
    assert loss.dtype == torch.float32 and loss.shape == (rows,)
    assert dz.dtype == dtype and dz.shape == logits.shape
    assert_close(loss, ref, 1e-5, what + " loss")  # fp32 math on the same logits in both
    assert_close(dz, rz, TOL[dtype], what + " dlogits")


# The plain next-token loss the kernel and its twin return beside the loss when asked (the train
# line's next_token_loss): the first target's term alone, whatever the weights (w_0 is not 1 in two
# cases), with and without the softcap and #88's prefix target, against cross_entropy on the
# softcapped logits written here. It has no gradient, and asking for it changes neither the loss nor
# the gradient.
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows,vocab,weights,cap,offset,prefix", [
    (64, 3144, (0.3, 0.5, 0.25), 23.0, 5.0, True),
    (37, 1000, (2.0,), 0.0, 0.0, False),
    (2, 50, (1.0, 0.5, 0.25), 30.0, 0.0, False),
])
def test_softcap_mtp_ce_next_token_is_the_plain_cross_entropy(rows, vocab, weights, cap, offset, prefix, dtype):
    logits, targets, grad, extra = ce_case(rows, vocab, prefix, dtype, 7)
    weights = torch.tensor(weights)
    z = logits.double()
    want = F.cross_entropy(cap * torch.sigmoid((z + offset) / 7.5) if cap else z, targets, reduction="none")
    for ops in (T.TritonOps, T.TorchOps):
        what = f"{ops.name} {rows}x{vocab} w={weights.tolist()} cap={cap} prefix={prefix} {dtype}"
        both, alone = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss, next_token = ops.softcap_mtp_ce(both, targets, weights, cap, 7.5, offset, *extra, next_token=True)
        only = ops.softcap_mtp_ce(alone, targets, weights, cap, 7.5, offset, *extra)
        assert next_token.dtype == torch.float32 and next_token.shape == (rows,) and not next_token.requires_grad
        assert_close(next_token, want, 1e-5, what + " next-token loss")
        loss.backward(grad)
        only.backward(grad)
        assert torch.equal(loss, only) and torch.equal(both.grad, alone.grad), what


# FP8 lm_head (on the CPU, fp32 products of the fp8 operands; torch._scaled_mm on CUDA). Inputs shaped like the head's: RMS-normed rows of width 768,
# weights of the init std, and the output gradient of the record's loss, summed over tokens: per
# token, softmax minus the one-hot target (entries from about 1e-5 to 1), which FP8_GRAD_SCALE
# must bring into e5m2's range without saturating (a scale meant for a mean loss would).
def fp8_case():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 768, generator=gen)
    x = (x / x.square().mean(-1, keepdim=True).sqrt()).bfloat16()
    w = 0.005 * torch.randn(512, 768, generator=gen)
    probs = torch.softmax(3 * torch.randn(64, 512, generator=gen), dim=-1)
    targets = torch.randint(0, 512, (64,), generator=gen)
    grad = (probs - F.one_hot(targets, 512)).bfloat16()
    return x, w, grad


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_fp8_linear_computes_the_product_of_its_fp8_operands():
    """Scales and layouts: exactly the product of the dequantized fp8 operands, up to bf16 output rounding."""
    x, w, grad = fp8_case()
    x_q = T._to_fp8(x, T.FP8_X_SCALE, torch.float8_e4m3fn).float() * T.FP8_X_SCALE
    w_q = T._to_fp8(w, T.FP8_W_SCALE, torch.float8_e4m3fn).float() * T.FP8_W_SCALE
    g_q = T._to_fp8(grad, T.FP8_GRAD_SCALE, torch.float8_e5m2).float() * T.FP8_GRAD_SCALE
    out, (gx, gw) = kernel_grads(T.fp8_linear, (x, w), grad)
    assert out.dtype == gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert_close(out, x_q @ w_q.T, 2**-8, "fp8 forward vs dequantized product")
    assert_close(gx, g_q @ w_q, 2**-8, "fp8 grad x vs dequantized product")
    assert_close(gw, g_q.T @ x_q, 1e-5, "fp8 grad w vs dequantized product")  # fp32 output


def test_fp8_linear_is_close_to_full_precision():
    """Relative Frobenius error vs fp32: e4m3 rounds each operand by <= 2^-4 (measured ~0.03);
    e5m2 gradients round by <= 2^-3 (measured 0.075; with a mean loss's scale of 2^-28 the summed
    loss's gradients saturate: 0.9997). Bounds 0.06 and 0.1."""
    x, w, grad = fp8_case()
    out, (gx, gw) = kernel_grads(T.fp8_linear, (x, w), grad)
    ref, (rx, rw) = twin_grads(lambda a, b: a @ b.T, (x, w), grad)
    errors = dict(out=relative_error(out, ref), grad_x=relative_error(gx, rx), grad_w=relative_error(gw, rw))
    assert errors["out"] < 0.06 and errors["grad_x"] < 0.1 and errors["grad_w"] < 0.1, errors


def test_the_cpu_fp8_matmul_equals_scaled_mm(monkeypatch):
    """On the CPU the FP8 products run as fp32 matmuls of the fp8 operands (the CPU's _scaled_mm is a
    scalar loop); they must equal torch._scaled_mm, the op CUDA runs, forward and backward, eager and
    compiled by inductor. Only the order of the sums differs: within one bf16 rounding."""
    x, w, grad = fp8_case()
    out, (gx, gw) = kernel_grads(T.fp8_linear, (x, w), grad)
    monkeypatch.setattr(T, "SCALED_MM", {})  # every device on torch._scaled_mm
    torch._dynamo.reset()
    for fn in (T.fp8_linear, torch.compile(T.fp8_linear, fullgraph=True)):
        ref, (rx, rw) = kernel_grads(fn, (x, w), grad)
        assert (out.dtype, gx.dtype, gw.dtype) == (ref.dtype, rx.dtype, rw.dtype)
        assert_close(out, ref, 2**-8, "forward vs _scaled_mm")
        assert_close(gx, rx, 2**-8, "grad x vs _scaled_mm")
        assert_close(gw, rw, 1e-6, "grad w vs _scaled_mm")  # fp32 output


def test_fp8_casts_saturate():
    big = torch.tensor([1e6, -1e6])
    assert T._to_fp8(big, 1.0, torch.float8_e4m3fn).float().tolist() == [448.0, -448.0]
    assert T._to_fp8(big, 1.0, torch.float8_e5m2).float().tolist() == [57344.0, -57344.0]


# FP8 MLP (#84/#89): e4m3 up projection scaled by the operands' amax now, ReLU^2 in bf16, e4m3 down
# projection at the delayed scales, backward in bf16 on the unquantized operands. The reference is
# the product of the dequantized operands, written here from the definition.
def e4m3(t, scale):
    """t / scale (divided in t's dtype) rounded to e4m3, saturating at +-448, dequantized in float64."""
    return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale.double()


def fp8_mlp_case(act_scale=None):
    cfg = T.parse_args(["--preset=cpu", "--fp8_mlp=true"])
    torch.manual_seed(5)
    mlp = T.MLP(cfg, T.TorchOps, torch.bfloat16)
    with torch.no_grad():
        mlp.down.copy_(0.02 * torch.randn_like(mlp.down))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, cfg.d_model, generator=gen)
    x = (x / x.square().mean(-1, keepdim=True).sqrt()).bfloat16().requires_grad_()
    grad = torch.randn(64, cfg.d_model, generator=gen).bfloat16()
    # step 1's scales: the ReLU^2 output's from a step before on these inputs (in bf16), the down
    # weight's from its own amax (step 1 <= FP8_MLP_EXACT_STEPS)
    mlp.rescale(1, T.TorchOps.linear_relu2(x.detach(), mlp.up.detach().bfloat16()).float().max())
    if act_scale is not None:
        mlp.act_scale.fill_(act_scale)
    return mlp, x, grad


def fp8_mlp_reference(mlp, x, grad):
    """(output, grad x, grad up, grad down, ReLU^2 output) from the definition, in float64."""
    up, down, xb = mlp.up.detach().bfloat16(), mlp.down.detach().bfloat16(), x.detach()
    amax = lambda t: t.abs().max().float() / 448
    h = (e4m3(xb, amax(xb)) @ e4m3(up, amax(up)).T).bfloat16().double()
    post = h.clamp(min=0).square().bfloat16()
    out = e4m3(post, mlp.act_scale) @ e4m3(down, mlp.down_scale).T
    g = grad.double()
    g_h = (g @ down.double()) * 2 * h.clamp(min=0)
    return out, g_h @ up.double(), g_h.T @ xb.double(), g.T @ post.double(), post


def test_fp8_mlp_computes_the_products_of_its_fp8_operands():
    """Forward: the product of the dequantized operands (bf16 roundings of h and of the output,
    and an fp8 step where those flip a rounding: 2^-6); backward: the bf16 product of the
    unquantized operands (a few bf16 roundings: 1e-2). The step's ReLU^2 amax is recorded."""
    mlp, x, grad = fp8_mlp_case()
    mlp.train()
    out = mlp(x)
    out.backward(grad)
    ref, gx, gup, gdown, post = fp8_mlp_reference(mlp, x, grad)
    assert out.dtype == x.grad.dtype == torch.bfloat16 and mlp.up.grad.dtype == torch.float32
    assert_close(out, ref, 2**-6, "fp8 mlp forward vs dequantized product")
    assert_close(x.grad, gx, 1e-2, "fp8 mlp grad x")
    assert_close(mlp.up.grad, gup, 1e-2, "fp8 mlp grad up")
    assert_close(mlp.down.grad, gdown, 1e-2, "fp8 mlp grad down")
    assert mlp.act_amax.item() == post.float().max().item()
    mlp.eval()  # validation: no FP8, no recorded amax
    mlp.act_amax.zero_()
    plain = F.linear(T.TorchOps.linear_relu2(x.detach(), mlp.up.bfloat16()), mlp.down.bfloat16())
    assert torch.equal(mlp(x.detach()), plain) and mlp.act_amax.item() == 0


def test_fp8_mlp_saturates_at_the_delayed_scale():
    """A ReLU^2 output above 448 x act_scale (a delayed scale too small for this step) is clamped to
    e4m3's largest, not turned into NaN: here the largest quarter of the range is cut."""
    mlp, x, grad = fp8_mlp_case()
    small = mlp.act_scale.item() / (4 * 1.8)
    mlp, x, grad = fp8_mlp_case(act_scale=small)
    mlp.train()
    out = mlp(x)
    ref, *_, post = fp8_mlp_reference(mlp, x, grad)
    assert (post.float() > 2 * 448 * small).any()  # some outputs are far out of range
    assert torch.isfinite(out).all()
    assert_close(out, ref, 2**-6, "saturated fp8 mlp forward")


def test_fp8_mlp_delayed_scales_follow_heads_rule():
    """Hand-computed: the ReLU^2 scale of step s is 1.8 x (step s-1's amax) / 448 (1 at step 0);
    the down weight's is its own amax / 448 through step 16, then 1.12 x (step s-1's amax) / 448."""
    mlp = T.MLP(T.parse_args(["--preset=cpu", "--fp8_mlp=true"]), T.TorchOps, torch.bfloat16)
    assert mlp.act_scale.item() == 1.0 and mlp.act_amax.item() == 0.0
    assert_close(mlp.down_scale, torch.tensor(1e-12 / 448), 1e-6, "step 0 down scale (zero weight)")
    weights = {s: 0.5 + s / 64 for s in range(1, 20)}  # bf16-exact
    for s in range(1, 20):
        with torch.no_grad():
            mlp.down.zero_()
            mlp.down[3, 7] = -weights[s]  # the amax is of |w|
        mlp.rescale(s, torch.tensor(2.0 * s))
        want_down = weights[s] / 448 if s <= 16 else weights[s - 1] * 1.12 / 448
        assert_close(mlp.act_scale, torch.tensor(2.0 * s * 1.8 / 448), 1e-6, f"act scale, step {s}")
        assert_close(mlp.down_scale, torch.tensor(want_down), 1e-6, f"down scale, step {s}")
        assert mlp.act_amax.item() == 0.0  # the next step's amax starts afresh
    mlp.rescale(20, torch.tensor(0.0))
    assert_close(mlp.act_scale, torch.tensor(1e-12 * 1.8 / 448), 1e-6, "act scale of an all-zero step")


# The whole model: a small CPU-preset GPT with every parameter perturbed (so zero-initialized
# projections do not hide the MLP), TorchOps vs TritonOps on the same batch. The model computes
# in bf16, so the loss agrees to 1e-4 and the gradients of the matrices the kernels produce
# (lm_head through the CE backward, MLP up/down through linear_relu2) to 2% in Frobenius norm,
# a few bf16 roundings (2^-8 each) apart.
MODEL_FLAGS = ["--preset=cpu", "--n_layer=4", "--d_model=128", "--n_head=2", "--head_dim=64", "--mlp_hidden=512",
               "--vocab_size=1000", "--long_window_layers=1,3", "--skip_from=1", "--skip_to=2", "--backout_layer=2"]


def model_loss_and_grads(cfg, ops, idx, targets):
    torch.manual_seed(0)
    model = T.GPT(cfg, ops, T.BlockedAttention(cfg.window_block))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    windows = (2 * cfg.window_block, cfg.window_block)
    loss = model(idx, targets, windows, torch.tensor([1.0, 0.5, 0.25]))
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def test_model_loss_same_with_triton_ops():
    cfg = T.parse_args(MODEL_FLAGS)
    gen = torch.Generator().manual_seed(5)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 192), generator=gen)
    loss, grads = model_loss_and_grads(cfg, T.TorchOps, idx, targets)
    triton_loss, triton_grads = model_loss_and_grads(cfg, T.TritonOps, idx, targets)
    assert abs(triton_loss - loss) <= 1e-4 * abs(loss), (triton_loss, loss)
    checked = [name for name in grads if name == "lm_head" or ".mlp." in name]
    assert len(checked) == 1 + 2 * cfg.n_layer
    for name in checked:
        assert relative_error(triton_grads[name], grads[name]) < 0.02, name


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu-rules", "cuda-rules-bf16-tables"])
def test_model_feeds_fused_ops_bf16(cuda):
    """The dtype contract, on what the model really passes (a spy on the ops table during one training
    step of a speedrun-shaped model): every operand a fused kernel or the FP8 head multiplies is bf16,
    under CPU autocast with float32 tables and under CUDA's autocast rules with the tables in bf16.
    Fails on code that hands the MLP kernel the fp32 residual stream."""
    calls = op_spy.record_op_inputs(cuda_rules=cuda, table_dtype=torch.bfloat16 if cuda else None)
    calls = [(name, args) for name, args in calls if name in op_spy.OPERANDS]
    assert {name for name, _ in calls} == set(op_spy.FUSED_OPS) | {"fp8_linear"}
    for name, args in calls:
        operands = [dtype for dtype, _ in args[: op_spy.OPERANDS[name]]]
        assert operands == [torch.bfloat16] * op_spy.OPERANDS[name], f"{name} received {args}"


# Ahead-of-time builds for H100 (no GPU needed), in a subprocess without TRITON_INTERPRET.
def run_aot(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def sm90_reports():
    return run_aot("import json, aot_sm90; print(json.dumps({k: aot_sm90.compile_report(k) for k in aot_sm90.KERNELS}))")


def test_sm90_builds_cover_every_kernel(sm90_reports):
    kernels = {name for name, value in vars(T).items() if isinstance(value, InterpretedFunction) and name.endswith("_kernel")}
    assert {r["kernel"] for r in sm90_reports.values()} == kernels


@pytest.mark.parametrize("name", ["sym_mm", "sym_axpby", "linear_relu2", "softcap_ce_fwd", "softcap_ce_bwd",
                                  "softcap_ce_fwd_prefix", "softcap_ce_bwd_prefix"])
def test_sm90_build_has_no_spills_and_fits(sm90_reports, name):
    r = sm90_reports[name]
    assert r["spill_stores"] == 0, f"{name}: ptxas reports {r['spill_stores']} bytes spill stores ({r['registers']} registers)"
    assert r["shared"] <= SMEM_LIMIT, f"{name}: {r['shared']} bytes of shared memory > {SMEM_LIMIT}"
    if name in MATMUL_KERNELS:
        assert r["wgmma"], f"{name}: no wgmma instruction in the sm_90 PTX"


def test_every_kernel_fits_the_shared_memory_of_every_gpu_generation():
    """The launch configs are the record's (tuned for H100) on every architecture: built for each, every
    kernel fits its shared memory, so none needs other configs or the torch twin there. The biggest,
    linear_relu2's 128x256x64 tiles, needs 98,304 bytes on sm_80-sm_89 and sm_120 (two operand
    buffers there; 144 KiB on sm_90), within the 101,376 of the consumer cards."""
    capabilities = sorted(SHARED_MEMORY_PER_BLOCK)
    needs = run_aot(f"import json, aot_sm90; print(json.dumps(aot_sm90.shared_memory({capabilities})))")
    assert len(needs) == 7  # every kernel, as test_sm90_builds_cover_every_kernel checks
    for name, by_capability in needs.items():
        for capability, limit in SHARED_MEMORY_PER_BLOCK.items():
            assert by_capability[str(capability)] <= limit, f"{name} on sm_{capability}: {by_capability[str(capability)]} > {limit} bytes"
    # and the check can fail: the same tiles fed fp32 need more than a consumer card has
    fp32 = run_aot("import json, aot_sm90; print(json.dumps(aot_sm90.shared_memory([86], x_ptr='*fp32', w_ptr='*fp32', "
                   "out_ptr='*fp32')))")
    assert fp32["linear_relu2"]["86"] > SHARED_MEMORY_PER_BLOCK[86], fp32


def test_sm90_probe_catches_fp32_operands():
    """The shared-memory check above can fail too: the tiles sized for bf16, fed fp32 (the crash the
    dtype contract guards), need 294,912 bytes, more than an H100 has."""
    r = run_aot("import json, aot_sm90; print(json.dumps(aot_sm90.compile_report('linear_relu2', "
                "x_ptr='*fp32', w_ptr='*fp32', out_ptr='*fp32')))")
    assert r["shared"] > SMEM_LIMIT, r


def test_sm90_probe_catches_spills():
    """The check above can fail: a 128x256 tile with 4 warps does spill."""
    r = run_aot("import json, aot_sm90; print(json.dumps(aot_sm90.compile_report('linear_relu2', BLOCK_N=256, num_warps=4)))")
    assert r["spill_stores"] > 0, r
