"""Optimizers: Polar Express, NorMuon normalization, cautious masks, Adam vs torch, NorMuon vs a reference,
the speedrun preset's first steps vs the record's update rules and its full-width per-parameter lr, decay
and betas vs the record's."""
import copy
import math
import os
import re
import zlib

import numpy as np
import pytest
import head_params_ref as hr
import record_ref as rr
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPEC section 3, as tests/record_ref.py transcribes it (not from the code)
SPEC_COEFFS = rr.POLAR_COEFFS


def test_coefficients_match_spec():
    assert [tuple(c) for c in tg.POLAR_EXPRESS_COEFFS] == SPEC_COEFFS


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768)])
def test_polar_express_singular_values(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    x = tg.polar_express(g, tg.TorchOps)
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x.float())
    assert s.min() >= 0.5 and s.max() <= 1.5, (s.min().item(), s.max().item())
    # the input's singular values spread widely; the output's do not
    s_in = torch.linalg.svdvals(g)
    assert s_in.max() / s_in.min() > 2.5  # (Marchenko-Pastur: about 3 for this aspect ratio)
    # orthogonalization keeps the singular vectors: X is close to U V^T of G
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = (x.float() * (u @ vh)).sum() / (x.float().norm() * (u @ vh).norm())
    assert cos > 0.97


def test_polar_express_batch_and_scale():
    torch.manual_seed(1)
    g = torch.randn(3, 64, 32)
    x = tg.polar_express(g, tg.TorchOps)
    for i in range(3):  # a stack is handled matrix by matrix
        assert torch.equal(x[i], tg.polar_express(g[i], tg.TorchOps))
        # and the input's scale hardly matters (only through bf16 rounding, amplified by the iterations)
        xi = tg.polar_express(1000 * g[i], tg.TorchOps).float()
        assert (x[i].float() - xi).norm() / xi.norm() < 0.15


def test_normuon_tall_rows():
    u = torch.tensor([[1.0, 1, 1], [2, 2, 2], [3, 0, 0], [0, 0, 4]])[None]
    sm = torch.zeros(1, 4, 1)
    out = tg.normuon_normalize(u, sm, 0.95, -1)
    # row mean squares 1, 4, 3, 16/3; the EMA starts at 0 so it holds 0.05 * those
    assert torch.allclose(sm.view(-1), 0.05 * torch.tensor([1.0, 4, 3, 16 / 3]))
    # rows divided by their RMS: [1,1,1], [1,1,1], [sqrt3,0,0], [0,0,sqrt3] (norm^2 12);
    # rescaled to the input's Frobenius norm sqrt(3 + 12 + 9 + 16) = sqrt(40)
    r3 = math.sqrt(3)
    want = torch.tensor([[1.0, 1, 1], [1, 1, 1], [r3, 0, 0], [0, 0, r3]]) * math.sqrt(40 / 12)
    assert torch.allclose(out[0], want, atol=1e-6)
    assert torch.allclose(out.norm(), torch.tensor(math.sqrt(40.0)))
    # second call: the EMA mixes the old mean squares (0.95) with the new ones (0.05)
    u2 = torch.tensor([[2.0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]])[None]
    out2 = tg.normuon_normalize(u2, sm, 0.95, -1)
    ms = torch.tensor([4 / 3, 0, 1, 1])
    sm_want = 0.95 * 0.05 * torch.tensor([1.0, 4, 3, 16 / 3]) + 0.05 * ms
    assert torch.allclose(sm.view(-1), sm_want)
    v = u2[0] / sm_want.sqrt()[:, None]
    assert torch.allclose(out2[0], v * (u2.norm() / v.norm()), atol=1e-6)


def test_normuon_wide_columns():
    u = torch.tensor([[1.0, 1, 1], [2, 2, 2], [3, 0, 0], [0, 0, 4]]).T[None]  # 3 x 4: per column
    sm = torch.zeros(1, 1, 4)
    out = tg.normuon_normalize(u, sm, 0.95, -2)
    assert torch.allclose(sm.view(-1), 0.05 * torch.tensor([1.0, 4, 3, 16 / 3]))
    r3 = math.sqrt(3)
    want = torch.tensor([[1.0, 1, 1], [1, 1, 1], [r3, 0, 0], [0, 0, r3]]).T * math.sqrt(40 / 12)
    assert torch.allclose(out[0], want, atol=1e-6)


def test_normuon_reduce_dim():
    """Rows of tall and square matrices, columns of wide ones; a gate (one row per head) always by row."""
    assert tg.normuon_reduce_dim((8, 4), "matrix") == -1 and tg.normuon_reduce_dim((4, 4), "matrix") == -1
    assert tg.normuon_reduce_dim((4, 8), "matrix") == -2 and tg.normuon_reduce_dim((6, 12), "gate") == -1


def test_cautious_mask():
    update = torch.tensor([[1.0, -2.0, 0.0], [3.0, -1.0, 0.5]])
    param = torch.tensor([[2.0, 1.0, -1.0], [-3.0, -4.0, 0.0]])
    # same sign -> 1; opposite sign or a zero on either side -> 0
    want = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mask = tg.cautious_mask(update, param)
    assert torch.equal(mask, want) and mask.dtype == param.dtype
    # not strict (the record's NorMuon): a zero on either side counts as agreeing
    loose = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert torch.equal(tg.cautious_mask(update, param, strict=False), loose)


def adam_pair(seed=0, shapes=((5, 4), (7,))):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref, g


def set_grads(ours, ref, g):
    for a, b in zip(ours, ref):
        grad = torch.randn(a.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()


@pytest.mark.parametrize("steps", [1, 5])
def test_adam_matches_torch(steps):
    ours, ref, g = adam_pair()
    opt = tg.Adam([dict(params=ours)], lr=0.01, betas=(0.65, 0.95), eps=1e-8, weight_decay=0.0, cautious=False)
    torch_opt = torch.optim.Adam(ref, lr=0.01, betas=(0.65, 0.95), eps=1e-8)
    for _ in range(steps):
        set_grads(ours, ref, g)
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
        assert torch.allclose(opt.state[a]["exp_avg"], torch_opt.state[b]["exp_avg"])
        assert torch.allclose(opt.state[a]["exp_avg_sq"], torch_opt.state[b]["exp_avg_sq"])


def test_adam_decoupled_decay_matches_adamw():
    """Our decay is lr^2 * wd (the record's); torch's AdamW decays lr * its weight_decay."""
    ours, ref, g = adam_pair(1)
    opt = tg.Adam([dict(params=ours)], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=30.0, cautious=False)
    torch_opt = torch.optim.AdamW(ref, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01 * 30.0)
    for _ in range(3):
        set_grads(ours, ref, g)
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


def test_adam_cautious_decay_one_step():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, -4.0]))
    p.grad = torch.tensor([0.5, 0.5, -0.5, -0.5])
    opt = tg.Adam([dict(params=[p])], lr=0.1, betas=(0.9, 0.99), eps=0.0, weight_decay=0.5, cautious=True)
    opt.step()
    # first Adam step: update = sign(grad); decay only where update and weight share a sign
    update = torch.tensor([1.0, 1.0, -1.0, -1.0])
    w = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(p.detach(), w - 0.1**2 * 0.5 * mask * w - 0.1 * update)


def test_adam_eps_on_the_uncorrected_root():
    """The record's Adam: lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), eps added before
    the bias correction; with gradients near eps this differs from torch's m^ / (sqrt(v^) + eps)."""
    p = torch.nn.Parameter(torch.zeros(3))
    g = torch.tensor([1e-8, -2e-8, 4e-8])
    opt = tg.Adam([dict(params=[p])], lr=0.1, betas=(0.65, 0.95), eps=1e-8, weight_decay=0.0, cautious=False)
    for t in (1, 2):
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        m = (1 - 0.65**t) * g  # constant gradients: the EMAs are the bias factors times g
        v = (1 - 0.95**t) * g * g
        want = 0.1 * math.sqrt(1 - 0.95**t) / (1 - 0.65**t) * m / (v.sqrt() + 1e-8)
        torch.testing.assert_close(before - p.detach(), want, rtol=1e-5, atol=0)
        torch_style = 0.1 * (m / (1 - 0.65**t)) / ((v / (1 - 0.95**t)).sqrt() + 1e-8)
        assert not torch.allclose(want, torch_style, rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# NorMuon against a from-scratch reference
# ------------------------------------------------------------------------------------------------


def ref_polar(g, dtype=torch.bfloat16):
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (1.02 * x.norm(dim=(-2, -1), keepdim=True) + 1e-6)
    for a, b, c in SPEC_COEFFS:
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x.mT if tall else x


def ref_normuon_step(w, g, state, lr, wd, mom, beta2, lr_mul, per_row=False, dtype=torch.bfloat16):
    """One NorMuon step on one matrix, per SPEC section 3 and the record's code: step lr * lr_mul,
    decay wd * lr * (lr * lr_mul) where update and weight agree or either is 0; returns the new weight."""
    state.setdefault("m", torch.zeros_like(g))
    rows, cols = g.shape
    tall = per_row or rows >= cols
    state.setdefault("v", g.new_zeros(rows, 1) if tall else g.new_zeros(1, cols))
    # lerp exactly as SPEC's momentum EMA is usually written; the same float32 rounding matters here
    # because bf16 Polar Express amplifies a 1-ulp input difference to a few percent of the output
    state["m"] = torch.lerp(state["m"], g, 1 - mom)
    nesterov = torch.lerp(g, state["m"], mom)
    u = ref_polar(nesterov, dtype).to(g.dtype)
    ms = (u * u).mean(dim=1, keepdim=True) if tall else (u * u).mean(dim=0, keepdim=True)
    state["v"] = beta2 * state["v"] + (1 - beta2) * ms
    n = u / state["v"].sqrt()
    u = n * (u.norm() / n.norm())
    step_lr = lr * lr_mul
    mask = ~(((u > 0) & (w < 0)) | ((u < 0) & (w > 0)))
    return w - wd * lr * step_lr * mask.to(w.dtype) * w - step_lr * u


def test_normuon_matches_reference():
    torch.manual_seed(3)
    shapes = [(16, 32), (16, 32), (16, 32), (32, 16), (32, 16), (24, 24), (4, 8)]
    kinds = ["matrix"] * 6 + ["gate"]
    lr_muls = [1.0, 2.0, 1.0, 4.0, 2.0, 1.0, 1.0]  # different multipliers within one shape group
    params = []
    for s, kind, lr_mul in zip(shapes, kinds, lr_muls):
        params.append(tg.tag(torch.nn.Parameter(torch.randn(s)), kind, lr_mul))
    lr, wd, mom, beta2 = 0.1, 5.0, 0.9, 0.95  # large decay so that the cautious term is visible
    opt = tg.NorMuon(params, lr, wd, mom, beta2, tg.TorchOps)
    ref_w = [p.detach().clone() for p in params]
    ref_state = [{} for _ in params]
    for step in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            ref_w[i] = ref_normuon_step(ref_w[i], g, ref_state[i], lr, wd, mom, beta2, lr_muls[i], kinds[i] == "gate")
            delta, ref_delta = p.detach() - before[i], ref_w[i] - before[i]
            err = (delta - ref_delta).norm() / ref_delta.norm()
            assert err < 1e-4, (step, i, err.item())
            # keep the two in lock-step so bf16 rounding does not compound over steps
            ref_w[i] = p.detach().clone()


def test_normuon_decay_scales_with_lr_squared():
    """The same step with and without weight decay differs by exactly wd * lr * (lr * lr_mul) * mask * w."""
    torch.manual_seed(4)
    w0 = torch.randn(8, 8)
    g = torch.randn(8, 8)
    moves = []
    for wd in (0.0, 3.0):
        p = tg.tag(torch.nn.Parameter(w0.clone()), "matrix", lr_mul=2.0)
        p.grad = g.clone()
        tg.NorMuon([p], 0.05, wd, 0.9, 0.95, tg.TorchOps).step()
        moves.append(p.detach())
    u_sign = -(moves[0] - w0)  # the update (lr * lr_mul * u) from the run without decay
    mask = (u_sign * w0 >= 0).float()
    assert torch.allclose(moves[0] - moves[1], 3.0 * 0.05 * (0.05 * 2.0) * mask * w0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The speedrun preset's first steps against the record's update rules (record_ref.py)
# ------------------------------------------------------------------------------------------------

VOCAB = 1024
PRESET_SMALL = ["--device=cpu", "--compile=false", "--fp8_head=false", "--triton=false", "--warmup_steps=0",
                "--vocab_size=1024", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=256",
                "--batch_tokens=128,256,384", "--accum_world_size=2", "--window_block=32", "--progress=false",
                # the loaders are faked; the trainer still checks that these name disjoint shards
                f"--train_files={ROOT}/data/sample/sample_train_*.bin", f"--val_files={ROOT}/data/sample/sample_val_*.bin"]


class FakeLoader:
    """Stands in for both loaders: random tokens, every batch kept for the reference to replay."""

    available = 10**12

    def __init__(self, *args):
        self.gen = torch.Generator().manual_seed(7)
        self.batches = []

    def next_batch(self, tokens, max_seq_len):
        buf = torch.randint(0, VOCAB, (tokens + 1,), generator=self.gen)
        self.batches.append((buf[:-1], buf[1:]))
        return buf[:-1], buf[1:], None


def record_loss(model, idx, targets, step, block):
    """The record's training loss: MTP cross-entropies of softcapped logits, summed over tokens.
    The per-token losses come from our op (checked against plain cross-entropy in test_kernels and
    test_model): Adam at eps 1e-8 turns any rounding difference in a tiny gradient into a visible
    update difference, so both sides must round the same way. The reduction is the record's."""
    short, long = rr.record_ws(step)
    z = F.linear(model.hidden(idx, (long * block, short * block)), model.lm_head)
    return tg.TorchOps.softcap_mtp_ce(z, targets, torch.tensor(rr.record_mtp(step)), 30.0, 7.5).sum()


def record_steps(model, batches, steps, dims, block, reduce_mean=False):
    """Train `model` through `steps` by the record's rules on the given micro-batches (2 per step)."""
    labels = {name: rr.record_label(name, *dims) for name, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    muon, adam, scalar_adam = rr.RecordNorMuon(torch.get_default_dtype()), rr.RecordAdam(rr.ADAM_BETAS), rr.RecordAdam(rr.SCALAR_BETAS)
    frozen = rr.record_transitions()
    batches = iter(batches)
    ws_long = None
    for step in steps:
        if step == rr.SPLIT_STEP:
            model.tied = False
        new_long = rr.record_ws(step)[1]
        if new_long != ws_long:
            model.rotary.set_window(new_long * block, True)
            ws_long = new_long
        for _ in range(2):
            idx, targets = next(batches)
            loss = record_loss(model, idx, targets, step, block)
            (loss / (idx.numel() if reduce_mean else 1) / 2).backward()
        for name, p in params.items():
            kind, storage, lr_mul, wd_mul, transpose = labels[name]
            if kind.startswith("muon"):
                muon.step(p, storage, lr_mul, wd_mul, kind == "muon_gate", transpose, step)
                p.grad = None
            elif step % 2 == 1 and p.grad is not None:
                if kind == "adam":
                    adam.step(p, lr_mul, wd_mul, step)
                elif not frozen[step]:
                    scalar_adam.step(p, lr_mul, wd_mul, step)
        if step % 2 == 1:
            model.zero_grad(set_to_none=True)
        if frozen[step]:
            for name, p in params.items():
                if labels[name][0] == "scalar_adam":
                    p.grad = None
        if step == rr.COPY_STEP:
            with torch.no_grad():
                params["embed"].copy_(params["lm_head"])
            adam.state[params["embed"]] = {k: v.clone() if torch.is_tensor(v) else v
                                           for k, v in adam.state[params["lm_head"]].items()}


# The two sides' largest gap: 1.4e-7 on an AMD EPYC (Zen 4) host, in the value embeddings after the untie's
# Adam steps, whose float64 BLAS sums in another order than the Intel hosts' (below 1e-7 there); every other
# parameter within 1e-9. A tenth of the smallest move the test asserts (1e-5), so a wrong rule still shows.
PRESET_STEP_TOL = 1e-6


@pytest.fixture
def float64():
    """Everything in float64: Adam at eps 1e-8 and lr 0.6 (value embeddings) multiplies a gradient's
    rounding error by up to lr / eps, so only float64 leaves the two sides comparable to PRESET_STEP_TOL."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def preset_trainer(monkeypatch):
    monkeypatch.setattr(tg, "COMPUTE_DTYPE", torch.float64)
    monkeypatch.setattr(tg, "TrainLoader", FakeLoader)
    monkeypatch.setattr(tg, "ValLoader", FakeLoader)
    # the preset's 2M-token validation passes, whose logits the memory check counts, never run here
    cfg = tg.parse_args(PRESET_SMALL + ["--memory_check=false"])
    backend = tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    torch.manual_seed(0)
    trainer = tg.Trainer(cfg, backend, None)
    with torch.no_grad():  # give the zero-initialized matrices, gates and tables values so every rule shows
        for p in trainer.model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return cfg, trainer


@pytest.mark.parametrize("start, n", [(0, 3), (626, 3), (1252, 4), (1879, 3)])
def test_preset_steps_match_the_record(monkeypatch, float64, start, n):
    """From the same weights and batches, our trainer's steps equal the record's rules: NorMuon with
    the merged-shape multipliers (Q, K, V, O x2, MLP up x2, down x4) and decay wd * lr * lr_eff, gates
    in NorMuon, Adam on odd steps with lr^2 decay, the summed loss, the scalars paused after a change,
    the absolute lr floor, and the untie at 1254. Starts: momentum warmup and 3-token MTP; the first
    batch/window change; the untie; the extension (window change, floor lr, momentum cooldown)."""
    import warnings
    warnings.filterwarnings("ignore", message=".*autocast.*")
    cfg, trainer = preset_trainer(monkeypatch)
    ref = copy.deepcopy(trainer.model)
    block = cfg.window_block  # smaller than the record's 128 to suit the short test sequences
    trainer.model.rotary.set_window(rr.record_ws(start)[1] * block, True)  # both start from that stage's
    ref.rotary.set_window(rr.record_ws(start)[1] * block, True)             # window, unscaled
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    steps = range(start, start + n)
    for step in steps:
        trainer.train_step(step)
    dims = (cfg.d_model, cfg.mlp_hidden, cfg.n_head, cfg.gate_dims)
    record_steps(ref, trainer.train_loader.batches, steps, dims, block)
    frozen = rr.record_transitions()
    scalars_step = any(s % 2 and not frozen[s] for s in steps)
    for (name, ours), theirs in zip(trainer.model.named_parameters(), ref.parameters()):
        # every parameter moves, but the embedding before it unties and the scalars while paused
        if name == "embed":
            should_move = rr.SPLIT_STEP in steps[:-1]
        else:
            should_move = rr.record_label(name, *dims)[0] != "scalar_adam" or scalars_step
        assert bool((ours - before[name]).abs().max() > 1e-5) == should_move, name
        torch.testing.assert_close(ours, theirs, rtol=0, atol=PRESET_STEP_TOL, msg=name)
    if start == 0:  # the same rules on a per-token mean loss land elsewhere: Adam's eps is no longer negligible
        mean_ref = copy.deepcopy(ref)
        with torch.no_grad():
            for p, b in zip(mean_ref.parameters(), before.values()):
                p.copy_(b)
        mean_ref.rotary.set_window(rr.record_ws(start)[1] * block, True)
        record_steps(mean_ref, trainer.train_loader.batches, steps, dims, block, reduce_mean=True)
        assert not torch.allclose(mean_ref.lm_head, ref.lm_head, rtol=0, atol=1e-6)


# odd steps, on which Adam steps too: the first third in the momentum warmup, the second third at
# its peak and in its cooldown, the last third in its cooldown, and the extension (the floor lr,
# momentum cooling down)
TABLE_STEPS = (1, 701, 1001, 1301, 1901)
TABLE_REL = 1e-9  # both sides multiply the same numbers in other orders


def test_preset_hyperparams_match_the_record():
    """The full speedrun model (the shape multipliers depend on the widths, which the steps above
    shrink): every parameter's lr, decay coefficient and betas as our optimizers step with them
    equal the record's, per record_ref, at steps of every lr stage. Prints the table under -s."""
    cfg = tg.parse_args(["--preset=speedrun", "--device=cpu", "--compile=false"])
    model = tg.GPT(cfg, tg.TorchOps, None)
    optimizers = tg.Optimizers(model, cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))
    sched = tg.Schedule(cfg)
    names = {p: name for name, p in model.named_parameters()}
    assert sorted(names.values()) == sorted(rr.record_parameter_names())
    muon = {p for group in optimizers.muon.param_groups for p in group["params"]}
    rows = set()
    for step in TABLE_STEPS:
        ours = optimizers.hyperparams(sched.lr_mult(step), sched.momentum(step))
        assert set(ours) == set(names)
        for p, (lr, decay, betas) in ours.items():
            kind, want_lr, want_decay, want_betas = rr.record_hyperparams(names[p], step)
            assert (p in muon) == kind.startswith("muon"), names[p]
            want = pytest.approx((want_lr, want_decay, *want_betas), rel=TABLE_REL, abs=0)
            assert (lr, decay, *betas) == want, (names[p], step)
            rows.add((re.sub(r"\.\d+", ".*", names[p]), step, kind, lr, decay, tuple(betas)))
    print(f"\n{'parameters':<22} {'step':>5} {'record optimizer':<17} {'lr':>11} {'decay':>11}  betas")
    for group, step, kind, lr, decay, betas in sorted(rows):
        print(f"{group:<22} {step:>5} {kind:<17} {lr:>11.4e} {decay:>11.4e}  ({betas[0]:.4f}, {betas[1]:.2f})")


# ------------------------------------------------------------------------------------------------
# Optimizers on 1, 2 and 3 ranks (sharded, hooks, padding) and compiled, against an eager reference
# ------------------------------------------------------------------------------------------------

TOY_FLAGS = ["--compile=false", "--adam_every=2"]
TOY_STEPS, TOY_ACCUM = 5, 2  # Adam steps after steps 1, 3 and 4 (the last)
TOY_UNTIE, TOY_FREEZE = 2, 3  # the embedding unties at step 2; the scalars' gradients are dropped at 3


def toy_lr_mult(step):
    return 1.0 - 0.1 * step


def toy_momentum(step):
    return 0.85 + 0.02 * step


class ToyModel(torch.nn.Module):
    """A parameter of every kind the optimizers tell apart. On 2 ranks the head and embedding (10
    rows) split evenly and the value embeddings (9) pad; on 3 the reverse; the bigram table (8) and
    the [4, 2] sublayer lambdas (#73) split on 2 and pad on 3. NorMuon's groups: 6 MLP
    matrices (3 tall, handled transposed, with 3 wide), 5 square ones, 3 gates (wide, per row)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(shape, kind, lr_mul=1.0):
            return tg.tag(torch.nn.Parameter(torch.randn(shape, generator=g)), kind, lr_mul)

        self.head, self.embed = param((10, 6), "head"), param((10, 6), "embed")
        self.value_embeds = torch.nn.ParameterList(param((9, 6), "value_embed") for _ in range(2))
        self.smear_gate, self.x0 = param((1, 4), "smear_gate"), param((3,), "x0")
        self.lambdas, self.skip = param((3,), "scalar"), param((), "scalar")
        self.matrices = torch.nn.ParameterList(
            [param((12, 6), "matrix", 1.0 + i) for i in range(3)] + [param((6, 12), "matrix", 2.0 + i) for i in range(3)]
            + [param((6, 6), "matrix", 1.0 + i / 2) for i in range(5)] + [param((2, 4), "gate", 1.0 + i) for i in range(3)])
        self.bigram = param((8, 6), "bigram")
        self.resid_lambdas, self.post_lambdas = param((4, 2), "resid_lambda"), param((4, 2), "lambda")


def toy_in_use(name, step):
    """The embedding takes no gradient until it unties (it reads the head)."""
    return name != "embed" or step >= TOY_UNTIE


def toy_coeffs(name, shape, rank, step, micro):
    """The micro-batch's loss a . w + b . w^2 / 2 for one parameter: gradient a + b w, per rank."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name} {rank} {step} {micro}".encode()))
    return torch.randn(shape, generator=g), torch.rand(shape, generator=g)


def toy_train(model, opt, rank, start=0, stop=TOY_STEPS):
    """Steps start..stop-1 as the trainer takes them; returns which parameters' gradients were
    on their way to the other ranks after each backward (step, micro-batch) -> names."""
    launched = {}
    for step in range(start, stop):
        if step == TOY_UNTIE:
            with torch.no_grad():
                model.embed.copy_(model.head)
            opt.adam.copy_state(model.head, model.embed)
        last = step == TOY_STEPS - 1
        for micro in range(TOY_ACCUM):
            loss = 0.0
            for name, p in model.named_parameters():
                if toy_in_use(name, step):
                    a, b = toy_coeffs(name, p.shape, rank, step, micro)
                    loss = loss + (a * p).sum() + (b * p * p).sum() / 2
            if micro == TOY_ACCUM - 1:
                opt.arm(step, last)
            loss.backward()
            launched[step, micro] = sorted(name for name, p in model.named_parameters() if p in opt.adam.reducing)
        opt.step(step, toy_lr_mult(step), toy_momentum(step), last, freeze_scalars=step == TOY_FREEZE)
    return launched


def toy_optimizers(model, rank, world, perp, extra=()):
    flags = TOY_FLAGS + (["--perp_grad=all", "--perp_grad_rescale=true"] if perp else [])
    cfg = tg.parse_args(flags + list(extra))
    return tg.Optimizers(model, cfg, tg.Backend(torch.device("cpu"), rank, world, tg.TorchOps, None))


def ref_perp(g, w):
    """perpGrad with the norm restored, in float32 as the trainer computes it."""
    w32, g32 = w.float(), g.float()
    perp = g32 - (w32 * g32).sum() / max(w32.square().sum().item(), torch.finfo(torch.float32).tiny) * w32
    left, full = perp.norm(), g32.norm()
    return (perp * (full / left) if left > torch.finfo(torch.float32).eps * full else torch.zeros_like(perp)).to(g.dtype)


def ref_adam_step(w, g, state, lr, betas, eps, wd, cautious):
    """Adam as the record: bias-corrected step size, eps on the raw root, decay lr^2 * wd first."""
    b1, b2 = betas
    t = state["step"] = state.get("step", 0) + 1
    state["m"] = b1 * state.get("m", torch.zeros_like(g)) + (1 - b1) * g
    state["v"] = b2 * state.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
    update = state["m"] / (state["v"].sqrt() + eps)
    if wd:
        w = w - lr * lr * wd * ((update * w > 0) if cautious else 1) * w
    return w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * update


def ref_toy_train(model, world, perp):
    """The toy run by the update rules, one parameter at a time: the ranks' gradients (each rank's
    summed over its micro-batches, and for Adam over the steps since it last stepped) perpGrad'ed
    per rank, then averaged; NorMuon every step, Adam every second step and the last."""
    cfg = tg.parse_args(TOY_FLAGS)
    kinds = {name: p.kind for name, p in model.named_parameters()}
    lr_muls = {name: p.lr_mul for name, p in model.named_parameters()}
    w = {name: p.detach().clone() for name, p in model.named_parameters()}
    muon_state, adam_state, pending = {}, {}, {}  # pending: name -> per-rank gradient sums for Adam
    adam_lr = {"head": (cfg.adam_lr, cfg.adam_betas, cfg.adam_wd), "embed": (cfg.adam_lr, cfg.adam_betas, cfg.adam_wd),
               "value_embed": (cfg.adam_lr * cfg.value_embed_lr_mul, cfg.adam_betas, cfg.adam_wd),
               "smear_gate": (cfg.adam_lr * cfg.smear_gate_lr_mul, cfg.adam_betas, 0.0),
               "x0": (cfg.adam_lr * cfg.scalar_lr_mul, cfg.adam_betas, 0.0),
               "scalar": (cfg.adam_lr * cfg.scalar_lr_mul, cfg.scalar_betas, 0.0),
               "bigram": (cfg.adam_lr * cfg.bigram_lr_mul, cfg.bigram_betas, cfg.adam_wd * cfg.bigram_wd_mul),
               "resid_lambda": (cfg.adam_lr * cfg.resid_lambda_lr_mul, cfg.lambda_betas, 0.0),
               "lambda": (cfg.adam_lr, cfg.lambda_betas, 0.0)}

    def average(grads, name):
        return torch.stack([ref_perp(g, w[name]) if perp else g for g in grads]).mean(0)

    for step in range(TOY_STEPS):
        if step == TOY_UNTIE:
            w["embed"] = w["head"].clone()
            adam_state["embed"] = copy.deepcopy(adam_state["head"])
        grads = {name: [sum(a + b * w[name] for a, b in (toy_coeffs(name, w[name].shape, r, step, micro)
                                                           for micro in range(TOY_ACCUM))) for r in range(world)]
                 for name in w if toy_in_use(name, step)}
        lr_mult = toy_lr_mult(step)
        for name, gs in grads.items():
            if kinds[name] in ("matrix", "gate"):
                w[name] = ref_normuon_step(w[name], average(gs, name), muon_state.setdefault(name, {}),
                                           cfg.muon_lr * lr_mult, cfg.muon_wd, toy_momentum(step), cfg.muon_beta2,
                                           lr_muls[name], kinds[name] == "gate", torch.float64)
            elif kinds[name] == "scalar" and step == TOY_FREEZE:
                pending.pop(name, None)
            else:
                pending[name] = [a + b for a, b in zip(pending[name], gs)] if name in pending else gs
        if (step + 1) % cfg.adam_every == 0 or step == TOY_STEPS - 1:
            for name, gs in pending.items():
                lr, betas, wd = adam_lr[kinds[name]]
                w[name] = ref_adam_step(w[name], average(gs, name), adam_state.setdefault(name, {}), lr * lr_mult,
                                        betas, cfg.adam_eps, wd, cautious=True)
            pending = {}
    return w, adam_state


def toy_rank(rank, world, store, out):
    """One rank of the toy run (spawned): both perpGrad settings, then the warmup's snapshot and
    restore (sharded Adam state included) and a rerun from there; saves what the test compares."""
    torch.set_default_dtype(torch.float64)
    tg.COMPUTE_DTYPE = torch.float64
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result = {}
    for perp in (False, True):
        model = ToyModel()
        opt = toy_optimizers(model, rank, world, perp)
        result[perp, "launched"] = toy_train(model, opt, rank)
        result[perp] = {name: p.detach().clone() for name, p in model.named_parameters()}
        result[perp, "head"] = {k: opt.adam.state[model.head][k] for k in ("exp_avg", "exp_avg_sq")}
    model = ToyModel()
    opt = toy_optimizers(model, rank, world, False)
    toy_train(model, opt, rank, stop=TOY_UNTIE)
    model_state, opt_state = tg.clone_tree(model.state_dict()), tg.clone_tree(opt.state_dict())
    toy_train(model, opt, rank, start=TOY_UNTIE)
    first = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    toy_train(model, opt, rank, start=TOY_UNTIE)
    result["rerun"] = all(torch.equal(first[name], p) for name, p in model.named_parameters())
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def check_toy(result, ref, rank, world):
    for perp in (False, True):
        want, want_state = ref[perp]
        for name, theirs in want.items():
            torch.testing.assert_close(result[perp][name], theirs, rtol=1e-9, atol=1e-9, msg=f"{name} perp={perp}")
        # each rank keeps only its rows of the head's moments (zero-padded to whole shares)
        per_rank = -(-10 // world)
        for ours, key in ((result[perp, "head"]["exp_avg"], "m"), (result[perp, "head"]["exp_avg_sq"], "v")):
            rows = F.pad(want_state["head"][key], (0, 0, 0, per_rank * world - 10))[rank * per_rank: (rank + 1) * per_rank]
            torch.testing.assert_close(ours, rows, rtol=1e-9, atol=1e-12)
    assert result["rerun"]
    # the tables' reduce-scatters start during the last backward before each Adam step, none other
    for (step, micro), names in result[False, "launched"].items():
        tables = ["head", "value_embeds.0", "value_embeds.1", "bigram", "resid_lambdas", "post_lambdas"]
        tables += ["embed"] if step >= TOY_UNTIE else []
        adam_steps = step % 2 == 1 or step == TOY_STEPS - 1
        assert names == (sorted(tables) if world > 1 and adam_steps and micro == TOY_ACCUM - 1 else []), (step, micro)


@pytest.fixture(scope="module")
def toy_reference():
    """The reference runs for 1, 2 and 3 ranks, both perpGrad settings, in float64."""
    torch.set_default_dtype(torch.float64)
    try:
        return {world: {perp: ref_toy_train(ToyModel(), world, perp) for perp in (False, True)} for world in (1, 2, 3)}
    finally:
        torch.set_default_dtype(torch.float32)


def test_optimizers_one_rank_match_the_rules(tmp_path, monkeypatch, toy_reference):
    monkeypatch.setattr(tg, "COMPUTE_DTYPE", torch.float64)
    try:
        toy_rank(0, 1, None, str(tmp_path))
    finally:
        torch.set_default_dtype(torch.float32)
    check_toy(torch.load(tmp_path / "rank0.pt"), toy_reference[1], 0, 1)


@pytest.mark.parametrize("world", [2, 3])
def test_optimizers_across_ranks_match_the_rules(tmp_path, toy_reference, world):
    """gloo ranks spawned here: Adam's tables reduce-scattered from the gradient hooks (padded on 3
    ranks for the head, on 2 for the value embeddings), NorMuon's groups padded or not."""
    mp.spawn(toy_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for rank, result in enumerate(results):
        check_toy(result, toy_reference[world], rank, world)


class CompileToy(torch.nn.Module):
    """One Adam table and one NorMuon group (a tall matrix among wide ones): two graphs to compile."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.head = tg.tag(torch.nn.Parameter(torch.randn(10, 6, generator=g)), "head")
        shapes = [(12, 6), (6, 12), (6, 12)]
        self.matrices = torch.nn.ParameterList(
            tg.tag(torch.nn.Parameter(torch.randn(s, generator=g)), "matrix", 1.0 + i) for i, s in enumerate(shapes))


def compile_toy_steps(model, opt, ranks):
    """Two steps of CompileToy on gradients averaged over `ranks` (NorMuon steps twice, Adam after
    the second, the last); returns the parameters."""
    for step in range(2):
        for name, p in model.named_parameters():
            coeffs = [toy_coeffs(name, p.shape, r, step, 0) for r in ranks]
            p.grad = sum(a + b * p.detach() for a, b in coeffs) / len(coeffs)
        opt.step(step, toy_lr_mult(step), toy_momentum(step), last=step == 1)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_compiled_step_matches_eager(monkeypatch):
    """--compile: the fused Adam update and the NorMuon update through inductor (CPU) land where eager does."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(tg, "COMPUTE_DTYPE", torch.float64)
    torch.set_default_dtype(torch.float64)
    try:
        runs = []
        for compile in (False, True):
            model = CompileToy()
            # one Polar Express iteration: a smaller graph compiles faster, and the rest is the same code
            opt = toy_optimizers(model, 0, 1, False, ["--polar_steps=1", f"--compile={compile}"])
            graphs = counters["stats"]["unique_graphs"]
            runs.append(compile_toy_steps(model, opt, [0]))
        assert counters["stats"]["unique_graphs"] - graphs == 2  # the compiled run compiled both updates
    finally:
        torch.set_default_dtype(torch.float32)
    for name, eager in runs[0].items():
        assert not torch.equal(eager, CompileToy().get_parameter(name).double())  # it moved
        torch.testing.assert_close(runs[1][name], eager, rtol=1e-10, atol=1e-12, msg=name)


def compiled_rank(rank, world, store, out):
    """One rank of the compiled, sharded toy run (spawned): each rank its own gradients."""
    torch.set_default_dtype(torch.float64)
    tg.COMPUTE_DTYPE = torch.float64
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = CompileToy()
    opt = toy_optimizers(model, rank, world, False, ["--polar_steps=1", "--compile=true"])
    torch.save(compile_toy_steps(model, opt, [rank]), os.path.join(out, f"compiled{rank}.pt"))
    dist.destroy_process_group()


def test_compiled_sharded_steps_match_one_eager_process(tmp_path, monkeypatch):
    """What the GPUs run: the compiled updates on each rank's share (the head's rows split, the
    group of 3 matrices padded to 4), against one eager process stepping on the ranks' average."""
    mp.spawn(compiled_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    monkeypatch.setattr(tg, "COMPUTE_DTYPE", torch.float64)
    torch.set_default_dtype(torch.float64)
    try:
        model = CompileToy()
        eager = compile_toy_steps(model, toy_optimizers(model, 0, 1, False, ["--polar_steps=1"]), [0, 1])
    finally:
        torch.set_default_dtype(torch.float32)
    for rank in range(2):
        ranked = torch.load(tmp_path / f"compiled{rank}.pt")
        for name, want in eager.items():
            torch.testing.assert_close(ranked[name], want, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")


# ------------------------------------------------------------------------------------------------
# The HEAD's optimizer settings (head_params_ref.py) through our switches, and #80's head pairs
# ------------------------------------------------------------------------------------------------

# the optimizer-side and simple model switches at the HEAD's values (the `head` preset sets these)
HEAD_SWITCHES = ["--softcap=23", "--softcap_offset=5", "--value_embeds=5", "--ve_layout=.01.....234",
                 "--ve_init_std=0.01", "--ve_gate=x_ve", "--adam_betas=0.5,0.95", "--adam_eps=1e-10",
                 "--value_embed_betas=0.75,0.95", "--smear_gate_betas=0.9,0.99", "--head_wd_mul=150",
                 "--value_embed_wd_mul=5", "--muon_beta2=0.9", "--attn_lr_mul=1", "--qk_head_pairs=true",
                 "--scalar_freeze_steps=0", "--sublayer_resid=true", "--post_lambdas=true", "--lane_layer=7",
                 "--mudd=true", "--mudd_gate=true", "--attn_gate=false",
                 f"--xsa_layers={','.join(map(str, hr.XSA_LAYERS))}", f"--dc_layers={','.join(map(str, hr.DC_LAYERS))}",
                 "--uniform_attn_init=true", "--bf16_weights=true"]


def head_label(name):
    """Our parameter name -> (HEAD's label, index of the matrix within its bank's per-layer pair), or None
    where HEAD has no such parameter (#82's XSA strengths and #85's first-form DC MLP among them: HEAD's
    MUDD gate makes both)."""
    leaf = name.split(".")[-1]
    if name in ("lm_head", "embed", "smear_gate", "resid_lambdas", "post_lambdas"):
        return name, 0
    if name == "bigram_embed.weight":
        return "bigram_embed", 0
    if name.startswith("value_embeds."):
        return "value_embeds", 0
    if leaf == "ve_gate":
        return "ve_gate_bank", 0
    if leaf in ("q", "k"):
        return "qk_bank", 0
    if leaf in ("v", "o"):
        return "vo_bank", 0
    if leaf in ("up", "down"):
        return "mlp_bank", int(leaf == "down")  # c_fc even, c_proj odd
    if leaf in ("lambdas", "smear_lambda", "skip_gate"):
        return "scalars", 0
    if name.startswith(("mudd.", "mudd_gate.")):  # #81/#85
        return {"mudd_gate.scale": "_mudd_gate_scale"}.get(name, name.replace(".", "_")), 0
    return None


@pytest.fixture(scope="module")
def head_model():
    """`--preset=head`'s model (the speedrun's shape), on the meta device (shapes and settings only)."""
    cfg = tg.parse_args(["--preset=head", "--compile=false"])
    with torch.device("meta"):
        model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    return cfg, model, tg.Optimizers(model, cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))


def test_head_preset_gives_heads_optimizer_settings(head_model):
    """Every parameter of `--preset=head` has a label of HEAD's table and its optimizer settings, and
    every label of HEAD's table has a parameter: nothing more (no XSA strength or DC weight MLP of a
    layer's own, which the MUDD gate's columns replace), nothing less."""
    _, model, opt = head_model
    table = opt.hyperparams(1.0, hr.MUON_MOMENTUM)
    checked = set()
    for name, p in model.named_parameters():
        label = head_label(name)
        assert label is not None, name
        label, index = label
        optim = hr.PARAM_TABLE[label][0]
        lr, decay, betas = table[p]
        if optim == "adam":
            want_lr, want_betas, _, want_decay = hr.adam_settings(label)
            assert p.kind not in ("matrix", "gate"), name
        else:
            want_lr, want_decay, want_betas = hr.muon_settings(label, index)
            assert p.kind == "matrix", name
        assert lr == pytest.approx(want_lr, rel=1e-12), name
        assert decay == pytest.approx(want_decay, rel=1e-12), name
        assert tuple(betas) == want_betas, name
        checked.add(label)
    assert checked == set(hr.PARAM_TABLE)
    assert all(group["eps"] == hr.ADAM_EPS for group in opt.adam.param_groups)


def test_head_preset_gives_heads_shapes(head_model):
    """Each HEAD bank's matrices, one for one: Q and K as head-pair blocks (#80), V and O, the MLP's,
    five value-embedding tables and their five gates (#70), the head (HEAD stores it transposed), and
    MUDD's and the MUDD gate's MLPs as HEAD's, the gate's output weights [2, 41, 64] with its XSA and DC
    columns (#81/#85)."""
    _, model, _ = head_model
    params = dict(model.named_parameters())
    qk = [m for name, p in params.items() if name.endswith((".q", ".k")) for m in tg.muon_view(p, p).unbind(0)]
    assert len(qk) == hr.QK_GROUPS and {m.shape for m in qk} == {hr.SHAPES["qk_bank"][1][1:]}
    vo = [tg.muon_view(p, p) for name, p in params.items() if name.endswith((".v", ".o"))]
    assert len(vo) == hr.VO_MATRICES and {m.shape[1:] for m in vo} == {hr.SHAPES["vo_bank"][1][1:]}
    # HEAD stores c_proj as (hidden, d) too: our down projection transposed
    mlp = [p if name.endswith(".up") else p.mT for name, p in params.items() if name.endswith((".up", ".down"))]
    assert len(mlp) == 2 * hr.N_LAYER and {m.shape for m in mlp} == {hr.SHAPES["mlp_bank"][1][1:]}
    tables = [p for name, p in params.items() if name.startswith("value_embeds.")]
    assert sum(t.size(0) for t in tables) == hr.SHAPES["value_embeds"][0][0]
    assert {t.size(1) for t in tables} == {hr.SHAPES["value_embeds"][0][1]}
    gates = [p for name, p in params.items() if name.endswith(".ve_gate")]
    assert (len(gates), *gates[0].shape) == hr.SHAPES["ve_gate_bank"][0]
    assert tuple(params["lm_head"].mT.shape) == hr.SHAPES["lm_head"][0]
    assert tuple(params["smear_gate"].shape) == hr.SHAPES["smear_gate"][0]
    for name in ("resid_lambdas", "post_lambdas"):
        assert tuple(params[name].shape) == hr.SHAPES[name][0], name
    mudd = {head_label(name)[0]: p for name, p in params.items() if name.startswith("mudd")}
    assert set(mudd) == {"mudd_w1", "mudd_w2", "mudd_b2", "mudd_gate_w1", "mudd_gate_w2", "mudd_gate_b2", "_mudd_gate_scale"}
    for label, p in mudd.items():
        assert tuple(p.shape) == hr.SHAPES[label][0], label
    assert hr.SHAPES["mudd_gate_w2"][0][1] == max(hr.MUDD_GATE_COLUMNS)
    # #57: the banks' matrices are bf16, every other parameter as the backend stores it (fp32 here)
    for name, p in params.items():
        assert p.dtype == (torch.bfloat16 if head_label(name)[0] in hr.BF16_BANKS else torch.float32), name


def test_head_preset_gives_heads_mudd_gate_starts():
    """init_mudd_gate at HEAD's shape, column for column: b2 HEAD's starts over the scale (XSA's and
    DC's w2 columns 0, DC's w1 columns 1 / 0.1, the attention gates 0.25 / 0.1, ...), w2 zeros, the
    scale 0.1: the gate as `--preset=head` builds it."""
    gate = tg.MuddGate(tg.parse_args(["--preset=head"]))
    torch.testing.assert_close(gate.b2.detach(), hr.mudd_gate_b2_init())
    assert tuple(gate.w2.shape) == hr.SHAPES["mudd_gate_w2"][0] and not gate.w2.any()
    assert gate.scale.item() == pytest.approx(hr.MUDD_GATE_SCALE)
    assert [sum(w for *_, w in half) for half in gate.halves] == list(hr.MUDD_GATE_COLUMNS)


def test_head_switches_give_heads_inits():
    """N(0, 0.01) value embeddings and zero gates (#70), at a width where the std is well measured."""
    cfg = tg.parse_args(["--preset=cpu", "--n_layer=11", "--no_attn_layers=6", "--long_window_layers=3,10",
                         "--skip_from=3", "--skip_to=6", "--backout_layer=7", "--vocab_size=2000"] + HEAD_SWITCHES)
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    std = hr.SHAPES["value_embeds"][2][1]
    for table in model.value_embeds:
        assert table.std().item() == pytest.approx(std, rel=0.02) and abs(table.mean().item()) < std / 50
    gates = [block.attn.ve_gate for block in model.blocks if block.attn is not None and block.attn.ve_gate is not None]
    assert len(gates) == hr.N_VE_TABLES and all(not g.any() for g in gates)
    assert [table for table in tg.value_embed_tables(cfg)] == hr.VE_LAYOUT
    for name in ("resid_lambdas", "post_lambdas"):
        shape, _, (_, value) = hr.SHAPES[name]
        torch.testing.assert_close(getattr(model, name).detach(), torch.full(shape, value), msg=name)


@pytest.mark.parametrize("uniform", [False, True])
def test_attention_init_statistics(uniform):
    """#64/#67 on: Q, K, V and O are HEAD's uniform(+-INIT_BOUND) (head_params_ref), O not zero. Off:
    #53's Q, K and V uniform with std 1/sqrt(768), so bound sqrt(3/768) = 1/16, and O zeros. At the
    speedrun's width (768 x 768 each), where max, std and the share near 0 are well measured."""
    cfg = tg.parse_args([f"--uniform_attn_init={str(uniform).lower()}"])
    torch.manual_seed(0)
    attn = tg.Attention(cfg, 0)
    bound = hr.ATTN_INIT[1] if uniform else 1 / 16
    for name in ("q", "k", "v", "o"):
        w = getattr(attn, name).detach()
        assert w.shape == ((768, 768)), name
        if name == "o" and not uniform:
            assert not w.any()
            continue
        assert bound * 0.999 < w.abs().max() <= bound, name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01), name
        assert abs(w.mean().item()) < bound / 300, name
        # uniform puts 1% of the values within bound / 100 of 0 (a normal of that std would put 1.4%)
        assert (w.abs() < bound / 100).float().mean().item() == pytest.approx(0.01, abs=0.002), name
    assert not torch.equal(attn.q, attn.k)  # drawn one after the other, not copies


def split_params(generator, blocks):
    """Q/K-like matrices cut into head-pair blocks: wide (8 x 6 in 2 blocks of 4 x 6), tall blocks
    (16 x 6 in 2 of 8 x 6, each handled transposed), and an unsplit 4 x 6 sharing the wide blocks' group."""
    specs = [((8, 6), 2, 1.0), ((8, 6), 2, 2.0), ((16, 6), 2, 1.5), ((4, 6), 1, 3.0)]
    return [tg.tag(torch.nn.Parameter(torch.randn(shape, generator=generator)), "matrix", lr_mul, b if blocks else 1)
            for shape, b, lr_mul in specs]


def test_normuon_head_pairs_match_reference():
    """#80: each block is its own NorMuon matrix: orthogonalized and normalized on its own."""
    g = torch.Generator().manual_seed(5)
    params = split_params(g, blocks=True)
    lr, wd, mom, beta2 = 0.1, 5.0, 0.9, 0.9
    opt = tg.NorMuon(params, lr, wd, mom, beta2, tg.TorchOps)
    states = [[{}, {}] for _ in params]
    for step in range(2):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        before = [p.detach().clone() for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for p, grad, w0, state in zip(params, grads, before, states):
            blocks = p.muon_blocks
            want = torch.cat([ref_normuon_step(w, gb, st, lr, wd, mom, beta2, p.lr_mul)
                              for w, gb, st in zip(w0.chunk(blocks), grad.chunk(blocks), state)])
            err = (p.detach() - want).norm() / (want - w0).norm()
            assert err < 1e-4, (step, tuple(p.shape), err.item())
            with torch.no_grad():
                p.copy_(want)  # in lock-step, so bf16 rounding does not compound
    # splitting changes the update: the whole matrix orthogonalized at once lands elsewhere
    whole = split_params(torch.Generator().manual_seed(5), blocks=False)
    for p, grad in zip(whole, [torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) for p in whole]):
        p.grad = grad
    split = split_params(torch.Generator().manual_seed(5), blocks=True)
    for p, q in zip(split, whole):
        p.grad = q.grad.clone()
    tg.NorMuon(whole, lr, wd, mom, beta2, tg.TorchOps).step()
    tg.NorMuon(split, lr, wd, mom, beta2, tg.TorchOps).step()
    assert not torch.allclose(whole[0], split[0], atol=1e-3)


def head_pairs_steps(rank, world):
    """Two NorMuon steps of the split matrices on the ranks' average gradient (each rank its own)."""
    params = split_params(torch.Generator().manual_seed(6), blocks=True)
    opt = tg.NorMuon(params, 0.1, 5.0, 0.9, 0.9, tg.TorchOps, rank, world)
    for step in range(2):
        for i, p in enumerate(params):
            coeffs = [toy_coeffs(str(i), p.shape, r, step, 0) for r in ([rank] if world > 1 else range(3))]
            p.grad = sum(a + b * p.detach() for a, b in coeffs) / len(coeffs)
        opt.step()
    return [p.detach().clone() for p in params]


def head_pairs_rank(rank, world, store, out):
    torch.set_default_dtype(torch.float64)
    tg.COMPUTE_DTYPE = torch.float64
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.save(head_pairs_steps(rank, world), os.path.join(out, f"pairs{rank}.pt"))
    dist.destroy_process_group()


def test_normuon_head_pairs_sharded_match_one_process(tmp_path, monkeypatch):
    """3 gloo ranks share the blocks, not the parameters: the wide group's 5 blocks (2 + 2 + 1 of
    three parameters) pad to 6, the tall group's 2 to 3; the ranks land where one process does."""
    mp.spawn(head_pairs_rank, args=(3, str(tmp_path / "store"), str(tmp_path)), nprocs=3)
    monkeypatch.setattr(tg, "COMPUTE_DTYPE", torch.float64)
    torch.set_default_dtype(torch.float64)
    try:
        want = head_pairs_steps(0, 1)
    finally:
        torch.set_default_dtype(torch.float32)
    for rank in range(3):
        for ours, theirs in zip(torch.load(tmp_path / f"pairs{rank}.pt"), want):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=f"rank {rank}")


# ------------------------------------------------------------------------------------------------
# #57: bf16 weights whose fp32 masters' lower halves NorMuon keeps (a uint16 mantissa per element)
# ------------------------------------------------------------------------------------------------

# (shape, head-pair blocks, lr_mul): two NorMuon groups, one wide (four matrices, one split in two
# blocks: five, padded to 6 on 2 ranks, to 8 on 8) and one tall (two, handled transposed)
BF16_SPECS = [((8, 16), 1, 1.0), ((8, 16), 2, 2.0), ((16, 8), 1, 1.5), ((8, 16), 1, 3.0), ((16, 8), 1, 1.0)]
BF16_STEPS = 4


def bf16_grad(step, index, rank, shape):
    """Rank `rank`'s gradient: multiples of 1/64 below 1/4, whose sums over 8 ranks and their means are
    exact in bf16 and in fp32, so an average taken in either dtype is the same number."""
    g = torch.Generator().manual_seed(1000 * step + 10 * index + rank)
    return torch.randint(-15, 16, shape, generator=g) / 64


def bf16_layout(t, blocks):
    """A matrix as NorMuon stacks it: its row blocks, a tall block transposed."""
    t = t.unflatten(0, (blocks, -1))
    return t.mT if t.size(-2) > t.size(-1) else t


def bf16_weights_run(rank, world, bf16):
    """BF16_STEPS NorMuon steps from starts that bf16 holds exactly; with `bf16` the weights are bf16
    and NorMuon keeps their mantissas. Returns the weights and, per group, (its parameters' indices,
    this rank's mantissas or None)."""
    g = torch.Generator().manual_seed(7)
    params = []
    for shape, blocks, lr_mul in BF16_SPECS:
        w = torch.randn(shape, generator=g).bfloat16()
        params.append(tg.tag(torch.nn.Parameter(w if bf16 else w.float()), "matrix", lr_mul, blocks))
    opt = tg.NorMuon(params, 0.1, 5.0, 0.9, 0.9, tg.TorchOps, rank, world, mantissa=bf16)
    for step in range(BF16_STEPS):
        for i, p in enumerate(params):
            p.grad = bf16_grad(step, i, rank, p.shape).to(p.dtype)
        opt.step()
    index = {id(p): i for i, p in enumerate(params)}
    groups = [([index[id(p)] for p in group["params"]], opt.state[group["params"][0]].get("mantissa"))
              for group in opt.param_groups]
    return [p.detach().clone() for p in params], groups


def fp32_from_halves(high, low):
    """The fp32 numbers whose upper 16 bits are bf16 `high`'s and lower 16 uint16 `low`'s, in numpy."""
    hi = high.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    lo = low.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    return torch.from_numpy(((hi << 16) | lo).view(np.float32))


def check_bf16_masters(runs, world):
    """runs[rank][bf16]: every rank's bf16 weights alike, and, joined with the ranks' mantissas in
    shard order, bitwise the fp32 weights the fp32 run reached; the mantissas are not all 0."""
    on, groups = runs[0][True]
    off, _ = runs[0][False]
    for rank in range(world):
        assert all(torch.equal(a, b) for a, b in zip(runs[rank][True][0], on)), rank
        assert all(torch.equal(a, b) for a, b in zip(runs[rank][False][0], off)), rank
    assert all(w.dtype == torch.bfloat16 for w in on) and all(w.dtype == torch.float32 for w in off)
    for g, (indices, _) in enumerate(groups):
        high = torch.cat([bf16_layout(on[i], BF16_SPECS[i][1]) for i in indices])
        want = torch.cat([bf16_layout(off[i], BF16_SPECS[i][1]) for i in indices])
        low = torch.cat([runs[rank][True][1][g][1] for rank in range(world)])[: len(high)]
        assert low.dtype == torch.uint16 and runs[0][False][1][g][1] is None
        master = fp32_from_halves(high, low)
        assert torch.equal(master.view(torch.int32), want.contiguous().view(torch.int32)), g
        assert (low.view(torch.int16) != 0).float().mean() > 0.9, g  # the lower halves carry bits


def test_bf16_weights_step_the_fp32_masters_exactly():
    """One process: (bf16 weight, mantissa) after each of 4 steps is bitwise the fp32 run's weight."""
    check_bf16_masters([{bf16: bf16_weights_run(0, 1, bf16) for bf16 in (False, True)}], 1)


def bf16_rank(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    runs = {bf16: bf16_weights_run(rank, world, bf16) for bf16 in (False, True)}
    torch.save(runs, os.path.join(out, f"bf16_{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 8])
def test_bf16_weights_sharded_step_the_fp32_masters_exactly(tmp_path, world):
    """gloo ranks, each its own gradients (averaged in bf16 on the wire with the switch, in fp32
    without): each rank keeps its share's mantissas, and weights and shares join to the fp32 run's."""
    mp.spawn(bf16_rank, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    check_bf16_masters([torch.load(tmp_path / f"bf16_{rank}.pt") for rank in range(world)], world)


def test_bf16_weights_state_survives_a_checkpoint(tmp_path):
    """Saved and loaded as a checkpoint is (tg.save_atomic, tg.read_checkpoint): the mantissas stay
    uint16 and the momentum fp32 (torch's load would round it to the bf16 weights' dtype), so 2 steps,
    save, load into a fresh optimizer and 2 more land bitwise where 4 uninterrupted steps land."""
    def build():
        g = torch.Generator().manual_seed(7)
        params = [tg.tag(torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()), "matrix", m, b) for s, b, m in BF16_SPECS]
        return params, tg.NorMuon(params, 0.1, 5.0, 0.9, 0.9, tg.TorchOps, mantissa=True)

    def steps(params, opt, start, stop):
        for step in range(start, stop):
            for i, p in enumerate(params):
                p.grad = bf16_grad(step, i, 0, p.shape).bfloat16()
            opt.step()

    params, opt = build()
    steps(params, opt, 0, BF16_STEPS)
    whole = [p.detach().clone() for p in params]
    params, opt = build()
    steps(params, opt, 0, BF16_STEPS // 2)
    path = str(tmp_path / "state.pt")
    tg.save_atomic(dict(weights=[p.detach() for p in params], optimizer=opt.state_dict()), path)
    saved = tg.read_checkpoint(path, keys=("weights", "optimizer"))
    params, opt = build()
    with torch.no_grad():
        for p, w in zip(params, saved["weights"]):
            p.copy_(w)
    opt.load_state_dict(saved["optimizer"])
    assert len(opt.state) == 2  # the two groups' states
    for state in opt.state.values():
        assert state["mantissa"].dtype == torch.uint16 and state["momentum"].dtype == torch.float32
        assert state["second_moment"].dtype == torch.float32
    steps(params, opt, BF16_STEPS // 2, BF16_STEPS)
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, whole))


def test_sublayer_lambdas_adam_groups():
    """#73-#77's param_table: resid_lambdas Adam lr x5, post_lambdas, x0_lambdas and bigram_lambdas
    lr x1, all betas (0.9, 0.95) and no decay; none of them paused with the scalars (#57 dropped that)."""
    flags = ["--preset=cpu", "--bigram_vocab=97", "--sublayer_resid=true", "--post_lambdas=true"]
    model = tg.GPT(tg.parse_args(flags), tg.TorchOps, None)
    opt = tg.Optimizers(model, model.cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))
    table = opt.hyperparams(0.5, 0.9)
    want = {"resid_lambdas": 0.008 * 5 * 0.5, "post_lambdas": 0.008 * 0.5, "x0_lambdas": 0.008 * 0.5,
            "bigram_embed.lambdas": 0.008 * 0.5}
    params = dict(model.named_parameters())
    for name, lr in want.items():
        assert table[params[name]] == (pytest.approx(lr), 0.0, (0.9, 0.95)), name
        assert all(p is not params[name] for p in opt.scalars), name
    assert table[params["resid_lambdas"]][0] == pytest.approx(hr.adam_settings("resid_lambdas")[0] * 0.5)
    # the betas and resid lr factor are flags
    model = tg.GPT(tg.parse_args(flags + ["--lambda_betas=0.8,0.9", "--resid_lambda_lr_mul=2"]), tg.TorchOps, None)
    opt = tg.Optimizers(model, model.cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))
    assert opt.hyperparams(1.0, 0.9)[model.resid_lambdas] == (pytest.approx(0.016), 0.0, (0.8, 0.9))
