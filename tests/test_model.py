"""Model: attention masks (flex vs blocked vs dense SDPA), the MTP loss and its schedule, untying,
value-embedding assignment, half-RoPE with YaRN and the partial key offset."""
import copy
import math
import warnings

import head_params_ref as hr
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

BOS = 50256


# ------------------------------------------------------------------------------------------------
# Attention: FlexAttention (block mask) == BlockedAttention == SDPA with a dense boolean mask
# ------------------------------------------------------------------------------------------------


def dense_mask(docs, window):
    """FlashAttention 3's window_size=(window, 0) in a document, query by query: query q sees the
    keys from max(its document's start, q - window) up to q itself, at most window + 1 of them."""
    ids = docs.tolist()
    mask = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    start = 0
    for q in range(len(ids)):
        if ids[q] != ids[start]:
            start = q
        mask[q, max(start, q - window) : q + 1] = True
    return mask


def sdpa(q, k, v, mask, scale):
    y = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                       attn_mask=mask, scale=scale)
    return y.transpose(0, 1)


def dense_lse(q, k, mask, scale):
    s = torch.einsum("thd,shd->hts", q, k) * scale
    return s.masked_fill(~mask, float("-inf")).logsumexp(-1).transpose(0, 1)


@pytest.fixture(scope="module")
def packed():
    """Three documents (lengths 100, 150, 50) in one packed sequence of 300 tokens, as GPT.hidden builds them."""
    torch.manual_seed(0)
    idx = torch.randint(0, BOS, (300,))
    idx[[0, 100, 250]] = BOS
    docs = (idx == BOS).cumsum(0)
    T, H, D = 300, 2, 16
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    return docs, q, k, v


@pytest.mark.parametrize("window", [0, 1, 63, 64, 128, 149, 192, 1000])
def test_attention_implementations_agree(packed, window):
    docs, q, k, v = packed
    scale = 0.3
    mask = dense_mask(docs, window)
    want = sdpa(q, k, v, mask, scale)
    want_lse = dense_lse(q, k, mask, scale)
    blocked = tg.BlockedAttention(64)
    y, lse = blocked(q, k, v, blocked.mask(docs, window), scale, True)
    assert torch.allclose(y, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-4)
    y2, none = blocked(q, k, v, blocked.mask(docs, window), scale, False)
    assert none is None and torch.allclose(y2, want, atol=1e-5)
    flex = tg.FlexAttention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled
        fm = flex.mask(docs, window)
        yf, lsef = flex(q, k, v, fm, scale, True)
        yf2, _ = flex(q, k, v, fm, scale, False)
    assert torch.allclose(yf, want, atol=1e-5) and torch.allclose(yf2, want, atol=1e-5)
    assert torch.allclose(lsef, want_lse, atol=1e-4)
    if window == 0:  # each token sees only itself
        assert torch.allclose(y, v, atol=1e-6)


@pytest.mark.parametrize("window", [1, 63, 64, 127, 128, 129, 255, 256, 400])
def test_window_counts_the_keys_before_the_query(window):
    """With all scores 0 a query's log-sum-exp is the log of how many keys it sees: itself and the
    `window` keys before it (FA3's count), fewer only at its document's start. Two documents of 400
    and 115 tokens (longer and shorter than the windows), 515 tokens: off the 64 and 128 grids."""
    n, second = 515, 400
    docs = (torch.arange(n) >= second).long()
    q = torch.zeros(n, 1, 8)
    k, v = torch.randn(2, n, 1, 8).unbind(0)
    pos = torch.arange(n)
    since_start = torch.where(pos < second, pos, pos - second)
    want = torch.log(torch.clamp(since_start, max=window) + 1.0)
    blocked = tg.BlockedAttention(64)
    _, lse = blocked(q, k, v, blocked.mask(docs, window), 1.0, True)
    assert torch.allclose(lse[:, 0], want, atol=1e-5)
    flex = tg.FlexAttention()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled
        _, lse = flex(q, k, v, flex.mask(docs, window), 1.0, True)
    assert torch.allclose(lse[:, 0], want, atol=1e-5)


def test_blocked_attention_bf16(packed):
    """The model calls attention on bf16 q, k, v under autocast; still close to the fp32 dense result."""
    docs, q, k, v = packed
    blocked = tg.BlockedAttention(64)
    y, _ = blocked(q.bfloat16(), k.bfloat16(), v.bfloat16(), blocked.mask(docs, 128), 0.3, False)
    want = sdpa(q, k, v, dense_mask(docs, 128), 0.3)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), want, atol=3e-2)


def explicit_attention(q, k, v, mask, scale):
    """softmax(q k^T * scale, over the keys `mask` [T, T] allows) v in float64, head by head: the reference
    the fused kernel's paths are checked against (a kernel of their own, not SDPA)."""
    s = torch.einsum("thd,shd->hts", q.double(), k.double()) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", p, v.double())


@pytest.mark.parametrize("rows, told, window, row", [
    ([0] * 64 + [1] * 64 + [2] * 64, 64, 63, 64),  # llm.c's rows: one causal call over [rows, H, L, D]
    ([5] * 64 + [6] * 64 + [7] * 64, 64, 100, 64),  # ids from any start; a window past the row is the row
    ([0] * 64 + [1] * 64 + [2] * 64, 64, 62, 0),  # a window shorter than a row: per query block
    ([0] * 64 + [1] * 64 + [2] * 60, 64, 63, 0),  # a short last row
    ([0] * 64 + [1] * 64 + [2] * 64, 0, 63, 0),  # rows the attention is not told of
    ([0] * 60 + [1] * 68 + [2] * 64, 0, 127, 0),  # documents of other lengths
])
def test_blocked_attention_fused_paths_match_explicit_softmax(rows, told, window, row):
    """Without the log-sum-exp, BlockedAttention runs the CPU's fused kernel: causal per row where it
    is told the documents are rows and the window spans one, else per query block with its mask.
    Output and gradients of q, k, v equal an explicit float64 softmax's; with the log-sum-exp asked
    the explicit fp32 path gives the same output."""
    torch.manual_seed(1)
    docs = torch.tensor(rows)
    T, H, D = docs.numel(), 2, 16
    q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
    blocked = tg.BlockedAttention(32, told)
    mask = blocked.mask(docs, window)
    assert mask.row == row
    y, none = blocked(q, k, v, mask, 0.3, False)
    assert none is None
    g = torch.randn(T, H, D)
    got = torch.autograd.grad(y, (q, k, v), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_y = explicit_attention(*leaves, dense_mask(docs, window), 0.3)
    want = torch.autograd.grad(want_y, leaves, g.double())
    torch.testing.assert_close(y.double(), want_y.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    y_lse, lse = blocked(q, k, v, mask, 0.3, True)
    torch.testing.assert_close(y_lse.double(), want_y.detach(), atol=1e-5, rtol=1e-5)
    assert lse.shape == (T, H)


def test_causal_rows_in_bf16_are_close_to_the_exact_attention():
    """The GPT-2 rungs call the row path on bf16 q, k, v under autocast: bf16 out, close to float64."""
    torch.manual_seed(2)
    docs = torch.arange(256) // 128
    q, k, v = (torch.randn(256, 2, 32) for _ in range(3))
    blocked = tg.BlockedAttention(64, 128)
    mask = blocked.mask(docs, 127)
    assert mask.row == 128
    y, _ = blocked(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 32**-0.5, False)
    want = explicit_attention(q, k, v, dense_mask(docs, 127), 32**-0.5)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), want, atol=3e-2)


@pytest.mark.parametrize("flags", [[], ["--xsa_layers=0,2", "--dc_layers=3"]])
def test_gpt_forward_same_with_flex_and_blocked(flags):
    """The whole model (docs from BOS, two windows, key offset, gates; XSA and DC) gives the same hidden
    states and loss with the CUDA attention (flex, forward only on CPU) as with the CPU one."""
    cfg = tg.parse_args(TINY + ["--n_layer=4", "--long_window_layers=1,3", "--skip_from=1", "--skip_to=2",
                                "--backout_layer=2", *flags])
    torch.manual_seed(5)
    blocked = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    with torch.no_grad():  # give the zero-initialized matrices and gates values so every path matters
        for p in blocked.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    flex = tg.GPT(cfg, tg.TorchOps, tg.FlexAttention())
    flex.load_state_dict(blocked.state_dict())
    idx = torch.randint(0, BOS, (300,))
    idx[[0, 90, 200]] = BOS
    w = torch.tensor([1.0, 0.5])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ha, hb = blocked.hidden(idx, (64, 32)), flex.hidden(idx, (64, 32))
        la, lb = blocked(idx, idx, (64, 32), w), flex(idx, idx, (64, 32), w)
    # both run under bf16 autocast: agreement to a few bf16 roundings
    # the loss is summed over the 300 tokens: compare it per token
    assert (ha - hb).abs().max() < 1e-2 and (la - lb).abs() / idx.numel() < 1e-4, ((ha - hb).abs().max(), (la - lb).abs())


# ------------------------------------------------------------------------------------------------
# Multi-token prediction loss and its schedule
# ------------------------------------------------------------------------------------------------


def naive_mtp(z, targets, weights, cap, temp, offset=0.0):
    """sum_k w_k CE(softcapped logits_t, target_{t+k}) per token, targets past the end dropped."""
    l = cap * torch.sigmoid((z.float() + offset) / temp) if cap > 0 else z.float()
    n = targets.numel()
    out = torch.zeros(n)
    for k, w in enumerate(weights):
        if k >= n:
            break
        ce = F.cross_entropy(l[: n - k], targets[k:], reduction="none")
        out[: n - k] += w * ce
    return out


@pytest.mark.parametrize("weights, cap, offset", [((1.0, 0.5, 0.25), 30.0, 0.0), ((1.0, 0.3), 30.0, 0.0),
                                                  ((1.0,), 30.0, 0.0), ((1.0, 0.5, 0.125), 0.0, 0.0),
                                                  ((1.0, 0.5, 0.25), 23.0, 5.0)])
def test_mtp_loss_matches_naive(weights, cap, offset):
    torch.manual_seed(1)
    n, vocab = 37, 101
    z = (torch.randn(n, vocab) * 10).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    got = tg.TorchOps.softcap_mtp_ce(z, targets, torch.tensor(weights), cap, 7.5, offset)
    z2 = z.detach().clone().requires_grad_()
    want = naive_mtp(z2, targets, weights, cap, 7.5, offset)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    got.mean().backward()
    want.mean().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-7)
    if len(weights) > 1:  # the last token has no t+1 target: only the k = 0 term
        last = F.cross_entropy((cap * torch.sigmoid((z2[-1:] + offset) / 7.5)) if cap else z2[-1:], targets[-1:])
        assert torch.allclose(got[-1], weights[0] * last, atol=1e-5)


def test_mtp_weights_schedule():
    cfg = tg.parse_args([])
    sched = tg.Schedule(cfg)
    N = 1880

    def close(a, b):
        return len(a) == len(b) and all(math.isclose(x, y, abs_tol=1e-12) for x, y in zip(a, b))

    assert close(sched.mtp_weights(0), [1, 0.5, 0.25])
    # 1/3 of 1880 is 626.67: step 626 is the last of the first third, 627 the first of the second
    assert close(sched.mtp_weights(626), [1, 0.5, 0.25 * (1 - 3 * 626 / N)])
    assert close(sched.mtp_weights(627), [1, 0.5 * (2 - 3 * 627 / N)])
    # 2/3 of 1880 is 1253.33: step 1253 is still in the second third, 1254 in the last
    assert close(sched.mtp_weights(1253), [1, 0.5 * (2 - 3 * 1253 / N)])
    assert close(sched.mtp_weights(1254), [1])
    assert close(sched.mtp_weights(1900), [1])  # extension steps
    # continuity of the fading term: near zero at each boundary
    assert sched.mtp_weights(626)[2] < 0.001 and sched.mtp_weights(1253)[1] < 0.001
    assert close(tg.Schedule(tg.parse_args(["--mtp=false"])).mtp_weights(0), [1])


# ------------------------------------------------------------------------------------------------
# Untying at 2/3: the embedding starts from the head's weight and Adam moments
# ------------------------------------------------------------------------------------------------

TINY = ["--preset=cpu", "--compile_elementwise=false", "--n_layer=2", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=128",
        "--long_window_layers=1", "--value_embeds=2", "--window_block=32", "--long_windows=1,2,2", "--extension_window=2",
        "--final_window=2", "--batch_tokens=256,256,256", "--max_seq_len=128", "--val_tokens=512",
        "--val_batch_tokens=256", "--skip_from=-1", "--backout_layer=-1", "--progress=false"]


def synthetic_shards(folder, n_tokens=20000, seed=0):
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        d = np.concatenate([[BOS], rng.integers(0, 1000, rng.integers(20, 200))])
        docs.append(d)
        total += d.size
    tokens = np.concatenate(docs)
    tg.write_shard(str(folder / "syn_train_000000.bin"), tokens)
    tg.write_shard(str(folder / "syn_val_000000.bin"), tokens[:4000])
    return [f"--train_files={folder}/syn_train_*.bin", f"--val_files={folder}/syn_val_*.bin"]


def test_untie_copies_weight_and_adam_state(tmp_path):
    cfg = tg.parse_args(TINY + synthetic_shards(tmp_path) + ["--num_steps=6", "--extension_steps=0"])
    backend = tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    trainer = tg.Trainer(cfg, backend, None)
    model, adam = trainer.model, trainer.optimizers.adam
    assert trainer.schedule.untie_step == 4  # ceil(2/3 * 6)
    for step in range(4):  # Adam steps after steps 1 and 3
        trainer.train_step(step)
        assert model.tied
    head_before = model.lm_head.detach().clone()
    state_before = {k: v.clone() for k, v in adam.state[model.lm_head].items() if torch.is_tensor(v)}
    assert state_before["exp_avg"].abs().sum() > 0
    trainer.train_step(4)  # unties first; Adam does not step on step 4 (adam_every=2)
    assert not model.tied
    assert torch.equal(model.embed, model.lm_head) and torch.equal(model.lm_head, head_before)
    s_head, s_embed = adam.state[model.lm_head], adam.state[model.embed]
    assert s_embed["step"] == s_head["step"] == 2
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(s_embed[key], s_head[key]) and torch.equal(s_head[key], state_before[key])
        assert s_embed[key].data_ptr() != s_head[key].data_ptr()  # copies, not shared
    assert model.embed.data_ptr() != model.lm_head.data_ptr()
    # after untying the embedding gets its own gradient, and the last step (Adam steps) separates them
    assert model.embed.grad is not None
    trainer.train_step(5)
    assert not torch.equal(model.embed, model.lm_head)
    assert s_embed["step"] == 3 and not torch.equal(s_embed["exp_avg"], s_head["exp_avg"])


def test_value_embed_tables_record():
    cfg = tg.parse_args([])  # 11 layers, 3 tables
    want = [1, 2, None, None, None, None, None, None, 0, 1, 2]
    assert tg.value_embed_tables(cfg) == want
    assert tg.value_embed_tables(tg.parse_args(["--value_embeds=0"])) == [None] * 11


# ------------------------------------------------------------------------------------------------
# Rotary (half-RoPE), YaRN and the partial key offset
# ------------------------------------------------------------------------------------------------


def test_rotary_half_dims_still():
    D = 64
    rot = tg.Rotary(D, 1024.0, 0.1)
    quarter = D // 4
    want = torch.cat([(1 / 1024) ** torch.linspace(0, 1, quarter), torch.zeros(quarter)])
    assert torch.allclose(rot.freqs, want)
    torch.manual_seed(2)
    x = torch.randn(50, 3, D)
    y = rot(x)
    # dims D/4..D/2 and 3D/4..D pair with zero frequencies: untouched
    assert torch.equal(y[..., quarter : 2 * quarter], x[..., quarter : 2 * quarter])
    assert torch.equal(y[..., 3 * quarter :], x[..., 3 * quarter :])
    # the rest rotate (position 0 does not), keeping the norm of each pair
    assert torch.allclose(y[0], x[0])
    assert not torch.allclose(y[1:, :, :quarter], x[1:, :, :quarter])
    pair = lambda t: t[..., :quarter] ** 2 + t[..., 2 * quarter : 3 * quarter] ** 2
    assert torch.allclose(pair(y), pair(x), atol=1e-5)
    # hand-computed rotation of dims (0, D/2) at t = 7 with frequency 1
    t = 7
    c, s = math.cos(t), math.sin(t)
    assert torch.allclose(y[t, :, 0], x[t, :, 0] * c + x[t, :, D // 2] * s, atol=1e-5)
    assert torch.allclose(y[t, :, D // 2], x[t, :, D // 2] * c - x[t, :, 0] * s, atol=1e-5)
    # relative positions: q(t).k(s) depends only on t - s
    q = torch.randn(1, 1, D).expand(50, 1, D)
    k = torch.randn(1, 1, D).expand(50, 1, D)
    dots = (rot(q) * rot(k)).sum(-1)[:, 0]  # same position for both: t - s = 0 everywhere
    assert torch.allclose(dots, dots[0].expand(50), atol=1e-4)


def test_rotary_start_is_the_absolute_position():
    """Tokens run from position `start` on (a KV-cache step) turn as in the whole sequence."""
    rot = tg.Rotary(64, 1024.0, 0.1)
    torch.manual_seed(4)
    x = torch.randn(40, 3, 64)
    assert torch.equal(rot(x[25:], 25), rot(x)[25:])
    assert not torch.allclose(rot(x[25:]), rot(x)[25:])


def test_yarn_scale_and_frequencies():
    rot = tg.Rotary(128, 1024.0, 0.1)
    freqs0 = rot.freqs.clone()
    rot.set_window(384, yarn=True)  # first call records the window
    assert math.isclose(rot.attn_scale, 0.1, rel_tol=1e-6)
    assert torch.equal(rot.freqs, freqs0)
    rot.set_window(384, yarn=True)  # same window: nothing changes
    assert math.isclose(rot.attn_scale, 0.1, rel_tol=1e-6)
    rot.set_window(896, yarn=True)
    s1 = 0.1 * (0.2 * math.log(896 / 384) + 1)
    assert math.isclose(rot.attn_scale, s1, rel_tol=1e-6)
    # the fastest frequency (1 rad/token, 61 turns per old window) is kept; the slowest (1/1024,
    # 0.06 turns) is divided by the growth factor; zero frequencies stay zero
    assert math.isclose(rot.freqs[0].item(), 1.0, rel_tol=1e-6)
    assert math.isclose(rot.freqs[31].item(), (1 / 1024) * 384 / 896, rel_tol=1e-5)
    assert torch.equal(rot.freqs[32:], torch.zeros(32))
    assert torch.all(rot.freqs[:32] <= freqs0[:32] + 1e-9)
    rot.set_window(1408, yarn=True)
    s2 = s1 * (0.2 * math.log(1408 / 896) + 1)
    assert math.isclose(rot.attn_scale, s2, rel_tol=1e-6)
    off = tg.Rotary(128, 1024.0, 0.1)
    off.set_window(384, yarn=False)
    off.set_window(896, yarn=False)
    assert math.isclose(off.attn_scale, 0.1, rel_tol=1e-6) and torch.equal(off.freqs, freqs0)
    assert off.window == 896 and isinstance(off.attn_scale, float)


def test_key_offset_moves_still_dims(tmp_path):
    cfg = tg.parse_args(TINY)
    layer = cfg.long_window_layers[0]
    torch.manual_seed(3)
    with_offset = tg.Attention(cfg, layer, torch.float32)
    plain_cfg = tg.parse_args(TINY + ["--key_offset=false"])
    plain = tg.Attention(plain_cfg, layer, torch.float32)
    plain.load_state_dict(with_offset.state_dict())
    assert with_offset.key_offset and not plain.key_offset
    assert not tg.Attention(cfg, 0).key_offset  # only long-window layers
    rot = tg.Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale)
    seen = {}

    def spy(name):
        def attend(q, k, v, mask, scale, need_lse):
            seen[name] = (q, k, v)
            return v, None
        return attend

    x = torch.randn(5, cfg.d_model)
    with_offset(x, None, rot, spy("off"), None)
    plain(x, None, rot, spy("plain"), None)
    q1, k1, v1 = seen["off"]
    q0, k0, v0 = seen["plain"]
    assert torch.equal(q1, q0) and torch.equal(v1, v0)
    # by hand, element by element: in the still dims (the last half of each half of the head, which
    # RoPE does not turn) key t takes key t - 1's value and token 0 keeps its own, as the record's
    # in-place shift of k[1:] from k[:-1] does; the rotating dims are left alone
    D = cfg.head_dim
    want = k0.clone()
    for t in range(1, k0.size(0)):
        for d in range(D):
            if D // 4 <= d < D // 2 or d >= 3 * D // 4:
                want[t, :, d] = k0[t - 1, :, d]
    assert torch.equal(k1, want)
    assert not torch.equal(k1, k0)


def test_head_is_fp8_only_while_training():
    """The record runs the lm_head in FP8 when training and in bf16 for validation."""
    cfg = tg.parse_args(TINY + ["--fp8_head=true"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    x = tg.norm(torch.randn(16, cfg.d_model))
    bf16 = F.linear(x.bfloat16(), model.lm_head.bfloat16())
    model.eval()
    assert torch.equal(model.logits(x), bf16)
    model.train()
    fp8 = model.logits(x)
    assert not torch.equal(fp8, bf16)
    assert (fp8.float() - bf16.float()).norm() < 0.1 * bf16.float().norm()  # e4m3 operands: a few % off


def test_fp8_head_gradient_reaches_the_stored_weight_unrounded():
    """The head's weight gradient through the FP8 path is the fp32 product of the quantized operands
    (the record's), not rounded to bf16 on its way to an fp32 weight. Reference: float64 product
    of the dequantized e5m2 gradient and e4m3 inputs; fp32 accumulation over 64 rows stays within
    1e-6 of it, a bf16 rounding on the way would be ~1e-3 off."""
    cfg = tg.parse_args(TINY + ["--fp8_head=true"])
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    x = tg.norm(torch.randn(64, cfg.d_model))
    grad = (torch.randn(64, model.vocab) / 50).bfloat16()
    model.train()
    model.logits(x).backward(grad)
    assert model.lm_head.grad.dtype == torch.float32

    def dequantized(t, scale, dtype):  # divided in t's own dtype (bf16), as the record quantizes
        return (t / scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype).double() * scale

    x_q = dequantized(x.bfloat16(), tg.FP8_X_SCALE, torch.float8_e4m3fn)
    g_q = dequantized(grad, tg.FP8_GRAD_SCALE, torch.float8_e5m2)
    expected = g_q.T @ x_q
    error = ((model.lm_head.grad.double() - expected).norm() / expected.norm()).item()
    assert error < 1e-6, error


def test_fp32_compute_dtype_multiplies_in_fp32():
    """A model built for fp32 (the CPU backend's choice where bf16 is emulated) runs autocast-free:
    its hidden states and logits match a float64 copy's to fp32 rounding; the default bf16 model's
    are ~1e-2 off."""
    cfg = tg.parse_args(TINY)
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))  # the zero-init projections would hide the blocks
    bf16 = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    exact = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float64).double()
    bf16.load_state_dict(model.state_dict())
    exact.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (96,), generator=torch.Generator().manual_seed(1))
    idx[0] = BOS

    def outputs(m):
        x = m.hidden(idx, (64, 32))
        return x.double(), m.logits(x).double()

    want = outputs(exact)
    got, rounded = outputs(model), outputs(bf16)
    assert model.logits(torch.randn(4, cfg.d_model)).dtype == torch.float32
    assert all((a - b).abs().max() < 1e-4 * b.abs().max() for a, b in zip(got, want))
    assert all((a - b).abs().max() > 1e-3 * b.abs().max() for a, b in zip(rounded, want))


def test_attention_lambdas_scale_qkv_and_output():
    """Per-layer scalars (init 0.5, 1.0) multiply the QKV and output weights: v and the output scale
    with them (q and k are normed, so only v's factor shows)."""
    cfg = tg.parse_args(TINY)
    torch.manual_seed(1)
    attn = tg.Attention(cfg, 0, torch.float32)
    assert attn.lambdas.kind == "scalar" and attn.lambdas.tolist() == [0.5, 1.0]
    assert tg.Attention(tg.parse_args(TINY + ["--attn_lambdas=false"]), 0).lambdas is None
    with torch.no_grad():
        attn.o.normal_(0, 0.1)
    x = torch.randn(20, cfg.d_model)
    rotary, attention = tg.Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale), tg.BlockedAttention(16)
    mask = attention.mask(torch.zeros(20, dtype=torch.long), 16)
    rotary.set_window(16, True)
    y = attn(x, None, rotary, attention, mask)
    with torch.no_grad():
        attn.lambdas.copy_(torch.tensor([1.0, 3.0]))  # v doubles, the output triples: x6
    torch.testing.assert_close(attn(x, None, rotary, attention, mask), 6 * y, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Bigram hash embedding (#62) with the sign trick (#83)
# ------------------------------------------------------------------------------------------------

HEAD_BIGRAM_ROWS, HEAD_SIGN_ROWS = 377280, 8192  # the public HEAD's 50304 * 15 // 2 rows and 8192 signs


def head_bigram_row(prev, token, rows):
    """HEAD's get_bigram_hash for one pair, transcribed with Python ints (its int32 products never
    overflow below token id 2^31 / 36313 = 59138, above GPT-2's ids)."""
    return ((36313 * token) ^ (27191 * prev)) % (rows - 1)


def head_rows(tokens, rows):
    """HEAD hashes a rank's whole input sequence at once: position 0 takes the reserved last row,
    every other position pairs with the token before it, across document boundaries too."""
    return [rows - 1] + [head_bigram_row(p, t, rows) for p, t in zip(tokens, tokens[1:])]


def test_bigram_hash_is_heads():
    # by hand: 36313 * 10 = 363130, 27191 * 50256 = 1366510896, xor 1366738762 = 3622 * 377279 + 234224
    assert head_bigram_row(BOS, 10, HEAD_BIGRAM_ROWS) == 234224
    # a second document starts at position 4: its BOS pairs with the first document's last token (13)
    tokens = [BOS, 10, 50255, 13, BOS, 0, 0, 1, 50256, BOS]
    got = tg.bigram_hash(torch.tensor(tokens), HEAD_BIGRAM_ROWS)
    assert got.tolist() == head_rows(tokens, HEAD_BIGRAM_ROWS)
    assert got[0] == HEAD_BIGRAM_ROWS - 1 and got[4] == head_bigram_row(13, BOS, HEAD_BIGRAM_ROWS)
    # only the first position of the sequence takes the last row; a small table the same way
    assert (got[1:] < HEAD_BIGRAM_ROWS - 1).all()
    assert tg.bigram_hash(torch.tensor(tokens), 7).tolist() == head_rows(tokens, 7)
    assert tg.bigram_hash(torch.tensor([BOS]), 7).tolist() == [6]


def test_bigram_sign_rows_are_heads():
    tokens = [BOS, 10, 50255, 13, BOS, 8192, 0]
    # HEAD: (input[t-1] ^ input[t]) % 8192, position 0 -> sign row 0
    want = [0] + [(p ^ t) % HEAD_SIGN_ROWS for p, t in zip(tokens, tokens[1:])]
    assert tg.bigram_sign_rows(torch.tensor(tokens), HEAD_SIGN_ROWS).tolist() == want
    assert want[5] == (BOS ^ 8192) % 8192 == BOS % 8192  # 50256 = 6 * 8192 + 1104


def bigram_model(*flags, seed=0):
    cfg = tg.parse_args(TINY + ["--bigram_vocab=97", "--bigram_signs=16", *flags])
    torch.manual_seed(seed)
    return tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)


def test_bigram_embed_init_and_signs():
    model = bigram_model()
    bigram = model.bigram_embed
    assert bigram.weight.shape == (97, 64) and bigram.weight.kind == "bigram" and not bigram.weight.any()
    assert bigram.lambdas.kind == "scalar" and bigram.lambdas.tolist() == pytest.approx([0.05, 0.05])
    assert bigram.signs.shape == (16, 64) and set(bigram.signs.unique().tolist()) == {-1.0, 1.0}
    assert "bigram_embed.signs" in model.state_dict()  # every rank draws it from the seed; resume restores it
    assert bigram_model("--bigram_lambda_init=0.1").bigram_embed.lambdas.tolist() == pytest.approx([0.1, 0.1])
    assert bigram_model("--bigram_signs=0").bigram_embed.signs is None
    assert tg.GPT(tg.parse_args(TINY), tg.TorchOps, None).bigram_embed is None


@pytest.mark.parametrize("signs", [16, 0])
def test_bigram_forward_matches_a_reference(signs):
    """hidden() with the bigram on: x0 = norm(embedding), then before block i
    x <- resid_i x + x0_i x0 + bigram_i B, B[t] = table[hash(t-1, t)] * signs[(t-1 ^ t) % 16]."""
    model = bigram_model(f"--bigram_signs={signs}")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # the zero-init table and projections would hide it
    idx = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(2))
    idx[[0, 40]] = BOS
    tokens = idx.tolist()
    table, lambdas = model.bigram_embed.weight.detach(), model.bigram_embed.lambdas.detach()
    b = table[head_rows(tokens, 97)]
    if signs:
        b = b * model.bigram_embed.signs[[0] + [(p ^ t) % signs for p, t in zip(tokens, tokens[1:])]]
    windows = (64, 32)
    attention = model.attention
    masks = [attention.mask((idx == BOS).cumsum(0), w) for w in windows]
    with torch.no_grad():
        got = model.hidden(idx, windows)
        x = x0 = tg.norm(model.embed_tokens(idx))
        for i, block in enumerate(model.blocks):
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0 + lambdas[i] * b
            table_i = model.ve_tables[i]
            ve = None if table_i is None else model.value_embeds[table_i][idx]
            x = block(x, ve, model.rotary, attention, masks)
        want = tg.norm(x)
    torch.testing.assert_close(got, want)
    # and the bigram term is really there: without it the hidden states differ
    with torch.no_grad():
        model.bigram_embed.lambdas.zero_()
        assert not torch.allclose(model.hidden(idx, windows), got, atol=1e-3)


def test_bigram_switched_on_at_init_changes_nothing_else():
    """The table starts at zero and is made last: the other parameters draw the same init, and the
    model's output is the bigram-off model's."""
    on = bigram_model()
    torch.manual_seed(0)
    off = tg.GPT(tg.parse_args(TINY), tg.TorchOps, tg.BlockedAttention(32), torch.float32)
    theirs = dict(off.named_parameters())
    for name, p in on.named_parameters():
        if not name.startswith("bigram_embed."):
            assert torch.equal(p, theirs[name]), name
    idx = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    idx[0] = BOS
    with torch.no_grad():
        torch.testing.assert_close(on.hidden(idx, (64, 32)), off.hidden(idx, (64, 32)), rtol=0, atol=0)


def test_bigram_gradient_reaches_only_the_rows_read():
    model = bigram_model()
    with torch.no_grad():
        model.bigram_embed.weight.normal_()
    idx = torch.tensor([BOS, 5, 6, 5, 6, BOS, 7])
    model(idx, torch.roll(idx, -1), (64, 32), torch.tensor([1.0])).backward()
    touched = set(torch.nonzero(model.bigram_embed.weight.grad.abs().sum(1))[:, 0].tolist())
    assert touched == set(head_rows(idx.tolist(), 97)) and len(touched) == 6  # 7 positions, (5, 6) twice
    assert model.bigram_embed.lambdas.grad.abs().min() > 0


def test_bigram_table_in_adam_with_its_own_settings():
    """HEAD's bigram_embed group: Adam at lr x75, betas (0.75, 0.95), decay x5 (lr^2 * 0.005 * 5);
    its lambdas with the scalars (lr x5, betas (0.9, 0.99), no decay), as #62 kept them."""
    model = bigram_model()
    cfg = model.cfg
    opt = tg.Optimizers(model, cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))
    table = opt.hyperparams(2.0, 0.9)
    lr = 0.008 * 75 * 2.0
    (got_lr, decay, betas), (lambda_lr, lambda_decay, lambda_betas) = (table[p] for p in model.bigram_embed.parameters())
    assert (got_lr, decay, betas) == (pytest.approx(lr), pytest.approx(lr * lr * 0.005 * 5), (0.75, 0.95))
    assert (lambda_lr, lambda_decay, lambda_betas) == (pytest.approx(0.008 * 5 * 2.0), 0.0, (0.9, 0.99))
    assert any(p is model.bigram_embed.lambdas for p in opt.scalars)  # paused with them (scalar_freeze_steps)
    assert all(p is not model.bigram_embed.weight for g in opt.muon.param_groups for p in g["params"])


def test_bigram_table_stored_in_the_table_dtype():
    cfg = tg.parse_args(TINY + ["--bigram_vocab=97", "--bigram_signs=16"])
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(32), table_dtype=torch.bfloat16)
    assert model.bigram_embed.weight.dtype == torch.bfloat16 and model.bigram_embed.lambdas.dtype == torch.float32
    idx = torch.randint(0, 1000, (64,))
    assert model.bigram_embed(idx).dtype == torch.bfloat16  # the signs (fp32) multiply in the table's dtype


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    """Each block recomputed in the backward: the loss and every gradient bitwise equal to the plain
    model's (the same ops again, deterministic on the CPU), while of the tensors autograd keeps from
    the forward (a step's activation memory) those made inside the blocks are no longer kept (the
    checkpoint keeps each block's inputs itself) and the whole shrinks by most of what they were."""
    def step(checkpointing):
        cfg = tg.parse_args(TINY + ["--n_layer=4", "--long_window_layers=1,3", "--skip_from=1", "--skip_to=2",
                                    "--backout_layer=2", f"--activation_checkpointing={checkpointing}"])
        torch.manual_seed(5)
        model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        idx = torch.randint(0, BOS, (300,), generator=torch.Generator().manual_seed(1))
        idx[[0, 90, 200]] = BOS
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        inside = [False]
        kept = {True: {}, False: {}}  # inside a block or not: distinct storages kept, parameters aside
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
            block.register_forward_hook(lambda *_: inside.__setitem__(0, False))

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                kept[inside[0]][storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(idx, idx, (64, 32), torch.tensor([1.0, 0.5]))
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss, grads, sum(kept[True].values()), sum(kept[False].values())

    plain_loss, plain_grads, plain_inside, plain_outside = step(False)
    loss, grads, inside, outside = step(True)
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)
    # (outside, a few block outputs are now kept by the ops after the block instead of inside it)
    assert plain_inside > 1_000_000 and inside == 0, (plain_inside, inside)
    assert inside + outside < plain_outside + 0.2 * plain_inside, (outside, plain_outside, plain_inside)


def test_activation_checkpointing_compiles_to_the_same_gradients():
    """The checkpointed blocks under torch.compile (fullgraph, inductor): the loss and gradients of the
    compiled plain model, bitwise."""
    results = []
    for checkpointing in (False, True):
        cfg = tg.parse_args(TINY + ["--n_layer=2", "--long_window_layers=1", "--skip_from=0", "--skip_to=1",
                                    "--backout_layer=0", f"--activation_checkpointing={checkpointing}"])
        torch.manual_seed(0)
        model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)
        idx = torch.randint(0, BOS, (256,), generator=torch.Generator().manual_seed(1))
        idx[[0, 100]] = BOS
        torch._dynamo.reset()
        loss = torch.compile(model, fullgraph=True, dynamic=False)(idx, idx, (64, 32), torch.tensor([1.0, 0.5]))
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_grads), (loss, grads) = results
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)


def test_fp8_mlp_compiled_by_inductor_matches_eager():
    """A small FP8-MLP model's loss, MLP gradients and recorded ReLU^2 amax, compiled by inductor on
    the CPU (fullgraph, the buffer update inside the graph) against the same model run eagerly. The
    model computes in fp32 around the MLPs, where compiled and eager agree to ~1e-6 without FP8;
    inductor divides by the scale in fp32 where eager rounds to bf16 first, so some fp8 roundings
    flip (measured 3.5e-2 at most, bound 6e-2). In eval mode the model is the plain one, FP8 off."""
    cfg = tg.parse_args(TINY + ["--fp8_mlp=true"])
    attention = tg.BlockedAttention(cfg.window_block)
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, attention, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))  # the zero-init projections would hide the blocks
    for block in model.blocks:
        block.mlp.rescale(1, torch.tensor(50.0))
    idx = torch.randint(0, cfg.vocab_size, (128,), generator=torch.Generator().manual_seed(1))
    idx[0] = BOS
    targets, weights = idx.roll(-1), torch.ones(1)

    def run(m, forward):
        loss = forward(idx, targets, (64, 32), weights)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if ".mlp." in n}

    compiled = copy.deepcopy(model)
    torch._dynamo.reset()
    (loss, grads), (closs, cgrads) = run(model, model), run(compiled, torch.compile(compiled, fullgraph=True, dynamic=False))
    assert abs(closs - loss) <= 1e-3 * abs(loss)
    for name, g in grads.items():
        assert (cgrads[name].double() - g.double()).abs().max() <= 6e-2 * g.double().abs().max(), name
    for block, cblock in zip(model.blocks, compiled.blocks):
        assert 0 < block.mlp.act_amax.item() and abs(cblock.mlp.act_amax - block.mlp.act_amax) <= 1e-2 * block.mlp.act_amax
    plain = tg.GPT(tg.parse_args(TINY), tg.TorchOps, attention, torch.float32)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(idx, targets, (64, 32), weights), plain(idx, targets, (64, 32), weights))
        assert not torch.equal(loss, plain(idx, targets, (64, 32), weights))  # training ran in FP8


# ------------------------------------------------------------------------------------------------
# #73/#74/#77: residual and post lambdas per sublayer, x0 and bigram with the attention output,
# the layer-3 skip in place of layer 6's attention, the layer-7 lane
# ------------------------------------------------------------------------------------------------

# HEAD's layer layout at a tiny width: 11 layers, no attention on 6, skip 3 -> 6, backout and lane 7
HEAD_LAYOUT = ["--n_layer=11", "--no_attn_layers=6", "--long_window_layers=3,10", "--skip_from=3", "--skip_to=6",
               "--backout_layer=7", "--bigram_vocab=97", "--bigram_signs=16"]


def lambdas_model(*flags):
    cfg = tg.parse_args(TINY + HEAD_LAYOUT + list(flags))
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + 0.3 * torch.randn_like(p))  # lambdas away from their init, zero tables and projections alive
    return model


def records_hidden(model, idx, windows, sublayer, post, lane_layer):
    """hidden() as the records write GPT.forward, block by block from the attention and MLP modules.
    #53 (sublayer off): before block i, x <- r_i x + a_i x0 + b_i B; then x + attn(norm x), x + mlp(norm x).
    #77 (sublayer on): x = x0 + b_0 B, then per layer x <- r_i0 x + p_i0 attn(norm x_in) + a_i x0 + b_i B
    (b_0 B only at the start; nothing on a layer without attention), x <- r_i1 x + p_i1 mlp(norm x),
    where x_in is layer 7's output for the layers after it (the lane). The skip (layer 3's output,
    times sigmoid(skip_gate)) enters at layer 6's input, where its attention would be."""
    masks = [model.attention.mask((idx == BOS).cumsum(0), w) for w in windows]
    x0 = tg.norm(model.embed_tokens(idx))
    bigram, b = model.bigram_embed(idx), model.bigram_embed.lambdas
    r = model.resid_lambdas
    p = model.post_lambdas if post else torch.ones(len(model.blocks), 2)
    x = x0 + b[0] * bigram if sublayer else x0
    skip = backout = lane = None
    for i, block in enumerate(model.blocks):
        if i == 6:
            x = x + torch.sigmoid(model.skip_gate) * skip
        if not sublayer:
            x = r[i] * x + model.x0_lambdas[i] * x0 + b[i] * bigram
        table = model.ve_tables[i]
        ve = None if table is None else model.value_embeds[table][idx]
        if block.attn is not None:
            reads = lane if lane is not None and i > lane_layer else x
            y = block.attn(tg.norm(reads), ve, model.rotary, model.attention, masks[0] if block.long else masks[1])
            if sublayer:
                x = r[i, 0] * x + p[i, 0] * y + model.x0_lambdas[i] * x0 + (b[i] * bigram if i else 0)
            else:
                x = x + p[i, 0] * y
        y = block.mlp(tg.norm(x))
        x = r[i, 1] * x + p[i, 1] * y if sublayer else x + p[i, 1] * y
        if i == 3:
            skip = x
        if i == 7:
            backout = x
        if i == lane_layer:
            lane = x
    return tg.norm(x - model.backout_lambda * backout)


@pytest.mark.parametrize("sublayer,post,lane", [(True, True, 7), (True, False, -1), (False, True, -1),
                                                (False, False, 7), (True, True, 2)])
def test_sublayer_lambdas_and_lane_match_the_records_forward(sublayer, post, lane):
    model = lambdas_model(f"--sublayer_resid={sublayer}", f"--post_lambdas={post}", f"--lane_layer={lane}")
    idx = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(2))
    idx[[0, 40]] = BOS
    windows = (64, 32)
    with torch.no_grad():
        got = model.hidden(idx, windows)
        torch.testing.assert_close(got, records_hidden(model, idx, windows, sublayer, post, lane))
        # the post lambdas and the lane matter: the records' form without them differs
        if post:
            assert not torch.allclose(records_hidden(model, idx, windows, sublayer, False, lane), got, atol=1e-3)
        if lane >= 0:
            assert not torch.allclose(records_hidden(model, idx, windows, sublayer, post, -1), got, atol=1e-3)


def test_sublayer_lambdas_shapes_inits_and_kinds():
    """[n_layer, 2] (attention, MLP) as HEAD stores them: resid sqrt(1.1) (#73), post 1 (#77); the x0
    and bigram lambdas move to their Adam group under sublayer_resid; off, #53's per-layer resid 1.1."""
    cfg = tg.parse_args(TINY + HEAD_LAYOUT + ["--sublayer_resid=true", "--post_lambdas=true"])
    model = tg.GPT(cfg, tg.TorchOps, None)
    assert model.resid_lambdas.shape == (11, 2) and model.resid_lambdas.kind == "resid_lambda"
    assert model.resid_lambdas.flatten().tolist() == pytest.approx([math.sqrt(1.1)] * 22)
    assert model.post_lambdas.shape == (11, 2) and model.post_lambdas.kind == "lambda"
    assert model.post_lambdas.flatten().tolist() == [1.0] * 22
    assert model.x0_lambdas.kind == model.bigram_embed.lambdas.kind == "lambda" and not model.x0_lambdas.any()
    off = tg.GPT(tg.parse_args(TINY + HEAD_LAYOUT), tg.TorchOps, None)
    assert off.resid_lambdas.shape == (11,) and off.resid_lambdas.kind == "scalar" and not hasattr(off, "post_lambdas")
    assert off.resid_lambdas.tolist() == pytest.approx([1.1] * 11) and off.x0_lambdas.kind == "x0"
    # sublayer_resid without x0 mixing: its own resid lambdas, no x0 lambdas
    bare = tg.GPT(tg.parse_args(TINY + ["--sublayer_resid=true", "--x0_mixing=false"]), tg.TorchOps, None)
    assert bare.resid_lambdas.shape == (2, 2) and not hasattr(bare, "x0_lambdas")


def test_sublayer_lambdas_get_gradients_only_where_used():
    """Layer 6 has no attention, so its attention column gets no gradient (as in HEAD); every other does."""
    model = lambdas_model("--sublayer_resid=true", "--post_lambdas=true", "--lane_layer=7")
    idx = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(4))
    idx[0] = BOS
    model(idx, torch.roll(idx, -1), (64, 32), torch.tensor([1.0])).backward()
    for lambdas in (model.resid_lambdas, model.post_lambdas):
        used = lambdas.grad != 0
        assert not used[6, 0] and used.sum() == 21



def test_sublayer_lambdas_and_lane_compile_fullgraph():
    """The GPU compiles the model whole: with the three switches on (4 layers, no attention on 2, lane 1),
    inductor (fullgraph) gives eager's hidden states."""
    flags = ["--n_layer=4", "--no_attn_layers=2", "--long_window_layers=1", "--skip_from=0", "--skip_to=2",
             "--backout_layer=1", "--sublayer_resid=true", "--post_lambdas=true", "--lane_layer=1"]
    cfg = tg.parse_args(TINY + flags)
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".o", ".down", "_lambdas")):
                p.add_(0.1 * torch.randn_like(p))
    idx = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))
    idx[0] = BOS
    torch._dynamo.reset()
    with torch.no_grad():
        want = model.hidden(idx, (64, 32))
        got = torch.compile(model.hidden, fullgraph=True, dynamic=False)(idx, (64, 32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_blocked_attention_compiled_gradients_match_float64():
    """The CPU attention compiled by inductor: q, k and v gradients within fp32 round-off of an eager
    float64 run (an overlapping unfold of the keys compiled to k gradients off by more than their size)."""
    gen = torch.Generator().manual_seed(0)
    attention = tg.BlockedAttention(32)
    docs = torch.zeros(256, dtype=torch.long)
    docs[100:] = 1
    mask = attention.mask(docs, 64)
    inputs = [torch.randn(256, 2, 32, dtype=torch.float64, generator=gen) for _ in range(3)]
    out_grad = torch.randn(256, 2, 32, dtype=torch.float64, generator=gen)

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        y, _ = fn(*leaves, mask, 0.12, False)
        (y * out_grad.to(dtype)).sum().backward()
        return [t.grad.double() for t in leaves]

    torch._dynamo.reset()
    compiled = grads(torch.compile(attention.__call__, fullgraph=True, dynamic=False), torch.float32)
    for name, got, want in zip("qkv", compiled, grads(attention, torch.float64)):
        assert (got - want).abs().max() < 1e-5 * want.abs().max(), name


# ------------------------------------------------------------------------------------------------
# Paired-head attention (#58): HEAD's 2T sequences against plain masked softmax attention
# ------------------------------------------------------------------------------------------------


def paired_reference(q, k, v, docs, window, scale):
    """HEAD's paired attention written out, y [T, H, D] and lse [T, H] for q, k, v [T, H, D]: slot j's
    sequence holds head j of token i at position 2i and head j + H/2 at 2i + 1 (what HEAD's view of
    [T, H/2, 2D] as [2T, H/2, D] gives); position s sees position r of its document if 0 <= s - r <= window;
    one plain softmax per slot, its rows handed back to the heads they came from."""
    n, h, _ = q.shape
    pos = torch.arange(2 * n)
    doc = docs[pos // 2]
    back = pos[:, None] - pos
    visible = (doc[:, None] == doc) & (back >= 0) & (back <= window)
    ys, lses = [None] * h, [None] * h
    for j in range(h // 2):
        heads = j + (pos % 2) * (h // 2)
        qs, ks, vs = (t[pos // 2, heads] for t in (q, k, v))
        s = (qs @ ks.T * scale).masked_fill(~visible, float("-inf"))
        lse = s.logsumexp(-1)
        y = torch.softmax(s, -1) @ vs
        ys[j], ys[j + h // 2] = y[0::2], y[1::2]
        lses[j], lses[j + h // 2] = lse[0::2], lse[1::2]
    return torch.stack(ys, 1), torch.stack(lses, 1)


PAIRED_BACKENDS = {"blocked": lambda: tg.BlockedAttention(32), "flex": tg.FlexAttention}


def paired_attend(backend, q, k, v, docs, window, scale):
    """tg.paired_heads through `backend`, its mask over the 2T sequence as GPT.paired_masks makes it."""
    attention = PAIRED_BACKENDS[backend]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled
        mask = attention.mask(docs.repeat_interleave(2), window)
        return tg.paired_heads(attention, q, k, v, mask, scale, True)


@pytest.mark.parametrize("backend", list(PAIRED_BACKENDS))
def test_paired_heads_by_hand(backend):
    """One token, all scores equal: head j (position 0) sees only itself; head j + H/2 (position 1)
    sees its partner's key and its own, half each. Heads j and j + 1 never mix."""
    h = 4
    q = k = torch.zeros(1, h, 8)
    v = torch.randn(1, h, 8)
    y, lse = paired_attend(backend, q, k, v, torch.zeros(1, dtype=torch.long), 5, 0.3)
    torch.testing.assert_close(y[0, :2], v[0, :2])
    torch.testing.assert_close(y[0, 2:], (v[0, :2] + v[0, 2:]) / 2)
    torch.testing.assert_close(lse[0], torch.tensor([0.0, 0.0, math.log(2), math.log(2)]))


@pytest.mark.parametrize("backend", list(PAIRED_BACKENDS))
@pytest.mark.parametrize("window", [0, 1, 37, 64, 500])
def test_paired_heads_match_masked_softmax_on_the_interleaved_sequence(backend, window):
    """Six heads, three documents (70, 50 and 30 tokens, off the 32 and 128 grids): the output and the
    log-sum-exp of each backend, and the blocked one's q, k, v gradients (flex attention has no CPU
    backward), equal the float64 reference's."""
    gen = torch.Generator().manual_seed(window)
    n, h, d = 150, 6, 16
    docs = (torch.arange(n) >= 70).long() + (torch.arange(n) >= 120).long()
    inputs = [torch.randn(n, h, d, generator=gen) for _ in range(3)]
    out_grad = torch.randn(n, h, d, generator=gen)
    leaves = [t.clone().requires_grad_(backend == "blocked") for t in inputs]
    y, lse = paired_attend(backend, *leaves, docs, window, 0.3)
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    y_ref, lse_ref = paired_reference(*ref_leaves, docs, window, 0.3)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    if backend == "flex":
        return
    (y * out_grad).sum().backward()
    (y_ref * out_grad.double()).sum().backward()
    for name, got, want in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_paired_rotary_turns_each_head_at_its_place_in_the_pair_sequence():
    """HEAD's paired rotary: token t's even heads turn as position 2t, its odd heads as 2t + 1
    (start counted the same way)."""
    rot = tg.Rotary(32, 1024.0, 0.1)
    x = torch.randn(12, 6, 32, generator=torch.Generator().manual_seed(1))
    start = 5
    got = rot(x, start, paired=True)
    for t in range(12):
        for head in range(6):
            want = rot(x[t : t + 1, head : head + 1], 2 * (start + t) + head % 2)
            torch.testing.assert_close(got[t, head], want[0, 0], rtol=1e-6, atol=1e-6)


PAIRED = TINY + ["--n_head=4", "--head_dim=16", "--paired_head_layers=0,1"]


def paired_layer_reference(attn, rot, x, docs, window):
    """A paired layer's output by hand: QK-norm; RoPE (dims i and i + D/2 turned by position * freqs[i])
    at position 2t for even heads, 2t + 1 for odd ones; no key offset; paired_reference; the per-head
    gate; the output projection."""
    n, h, d = x.size(0), attn.n_head, attn.head_dim
    qkv_scale, out_scale = attn.lambdas
    q, k, v = ((x @ (qkv_scale * w).T).view(n, h, d) for w in (attn.q, attn.k, attn.v))
    q, k = (t / t.square().mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt() for t in (q, k))
    angle = (2 * torch.arange(n)[:, None] + torch.arange(h) % 2)[..., None] * rot.freqs
    turn = lambda t: torch.cat([t[..., : d // 2] * angle.cos() + t[..., d // 2 :] * angle.sin(),  # noqa: E731
                                t[..., d // 2 :] * angle.cos() - t[..., : d // 2] * angle.sin()], -1)
    y, _ = paired_reference(turn(q), turn(k), v, docs, window, rot.attn_scale)
    y = y * torch.sigmoid(x[:, : attn.gate.size(1)] @ attn.gate.T)[..., None]
    return y.reshape(n, h * d) @ (out_scale * attn.o).T


@pytest.mark.parametrize("backend", list(PAIRED_BACKENDS))
@pytest.mark.parametrize("layer", [0, 1])
def test_paired_layer_matches_a_reference_layer(backend, layer):
    """The Attention module on a paired layer (a short-window one, and a long-window one whose key
    offset HEAD drops), through either backend: the output as the reference's, and with the blocked
    attention (flex attention has no CPU backward) every weight's gradient too."""
    cfg = tg.parse_args(PAIRED)
    assert cfg.key_offset and layer in cfg.paired_head_layers
    torch.manual_seed(layer)
    attn = tg.Attention(cfg, layer, torch.float32)
    assert attn.paired and not attn.key_offset
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
        attn.lambdas.copy_(torch.tensor([0.7, 1.3]))
    rot = tg.Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale)
    rot.set_window(48, True)
    rot.set_window(96, True)  # YaRN-rescaled frequencies and scale, as the paired layers share them
    n, window = 90, 40
    docs = (torch.arange(n) >= 33).long()
    x = torch.randn(n, cfg.d_model, generator=torch.Generator().manual_seed(7))
    attention = PAIRED_BACKENDS[backend]()
    with warnings.catch_warnings(), torch.set_grad_enabled(backend == "blocked"):
        warnings.simplefilter("ignore")
        out = attn(x, None, rot, attention, attention.mask(docs.repeat_interleave(2), window))
    want = paired_layer_reference(attn, rot, x, docs, window)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    if backend == "flex":
        return
    out_grad = torch.randn_like(out)
    got_grads = torch.autograd.grad((out * out_grad).sum(), list(attn.parameters()))
    want_grads = torch.autograd.grad((want * out_grad).sum(), list(attn.parameters()))
    for (name, _), got, exp in zip(attn.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5, msg=name)


def test_gpt_paired_layers_use_the_pair_masks_and_flex_equals_blocked(monkeypatch):
    """The model with paired heads on a short (0) and a long (1) layer: flex and blocked attention give
    the same hidden states, which differ from the unpaired model's; only the windows the paired layers
    use get a mask over the 2T sequence, and with the switch off none is built."""
    cfg = tg.parse_args(PAIRED)
    torch.manual_seed(5)
    blocked = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)
    with torch.no_grad():
        for p in blocked.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    flex = tg.GPT(cfg, tg.TorchOps, tg.FlexAttention(), torch.float32)
    flex.load_state_dict(blocked.state_dict())
    unpaired = tg.GPT(tg.parse_args(PAIRED + ["--paired_head_layers="]), tg.TorchOps, tg.BlockedAttention(32), torch.float32)
    unpaired.load_state_dict(blocked.state_dict())
    idx = torch.randint(0, BOS, (200,), generator=torch.Generator().manual_seed(2))
    idx[[0, 77, 150]] = BOS
    windows = (64, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hb, hf, hu = blocked.hidden(idx, windows), flex.hidden(idx, windows), unpaired.hidden(idx, windows)
    torch.testing.assert_close(hf, hb, rtol=1e-4, atol=1e-4)
    assert (hb - hu).abs().max() > 1e-2
    docs = (idx == BOS).cumsum(0)
    short_only = tg.GPT(tg.parse_args(PAIRED + ["--paired_head_layers=0"]), tg.TorchOps, None, torch.float32)
    long_mask, short_mask = short_only.paired_masks(tg.BlockedAttention(32), idx, windows)
    want = tg.BlockedAttention(32).mask(docs.repeat_interleave(2), windows[1])
    assert long_mask is None and torch.equal(short_mask.allowed, want.allowed)

    def refuse(*args):
        raise AssertionError("a pair mask built with the switch off")

    monkeypatch.setattr(tg.GPT, "paired_masks", refuse)
    with torch.no_grad():
        unpaired.hidden(idx, windows)


def test_paired_layers_count_the_same_attention_flops_under_a_doubled_cap():
    """#58: 2T queries of H/2 heads, each over the window's positions: per token the keys of an unpaired
    layer, except that a document piece has 2 max_seq_len positions, so the cap doubles. By hand for
    the cpu shape (6 layers, long windows on 2 and 5, 4 heads of 64) at max_seq_len 64."""
    off = tg.parse_args(["--preset=cpu"])
    on = tg.parse_args(["--preset=cpu", "--paired_head_layers=0,2"])
    per_key = 3 * 2 * 2 * 4 * 64
    assert tg.attention_flops(on, (32, 16), 64) == tg.attention_flops(off, (32, 16), 64) == per_key * (2 * 33 + 4 * 17)
    assert tg.attention_flops(off, (200, 100), 64) == per_key * 6 * 64
    assert tg.attention_flops(on, (200, 100), 64) == per_key * (101 + 128 + 4 * 64)


# #82/#85 gated exclusive self attention (XSA)
# ------------------------------------------------------------------------------------------------


def xsa_reference(y, v, alpha):
    """#82's form: each head's output minus tanh(alpha) times its projection on the unit value v / |v|."""
    unit = v / v.norm(dim=-1, keepdim=True)
    return y - torch.tanh(alpha)[..., None] * (y * unit).sum(-1, keepdim=True) * unit


@pytest.mark.parametrize("per_token", [False, True])
def test_xsa_matches_the_records_form_forward_and_gradient(per_token):
    """alpha [H] (#82's static strengths) or [T, H] (per token, as HEAD's gate makes them): values and
    the gradients of y, v and alpha match the unit-vector form in float64."""
    gen = torch.Generator().manual_seed(0)
    y, v = (torch.randn(40, 3, 16, dtype=torch.float64, generator=gen) for _ in range(2))
    alpha = torch.randn((40, 3) if per_token else (3,), dtype=torch.float64, generator=gen)
    weight = torch.randn(40, 3, 16, dtype=torch.float64, generator=gen)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (y, v, alpha)]
        out = fn(*leaves)
        (out * weight).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    got, got_grads = run(tg.exclude_self_value)
    want, want_grads = run(xsa_reference)
    torch.testing.assert_close(got, want)
    for name, g, w in zip(("y", "v", "alpha"), got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)
    # what it is for: the output's component along v keeps 1 - tanh(alpha) of y's
    a = torch.tanh(alpha)
    torch.testing.assert_close((got * v).sum(-1), (1 - a) * (y * v).sum(-1))


def xsa_model(*flags):
    cfg = tg.parse_args(TINY + ["--attn_gate=false", "--attn_lambdas=false", *flags])
    torch.manual_seed(0)
    return tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)


def test_xsa_parameters_layers_and_optimizer_group():
    """One zero strength per head on each listed layer (tanh(0) = 0: the layer starts as plain attention),
    none elsewhere; Adam at adam_lr with the lambdas' betas and no decay, as #82 steps them."""
    model = xsa_model("--xsa_layers=1")
    assert model.blocks[0].attn.xsa is None and model.blocks[1].attn.xsa.shape == (2,)
    assert not model.blocks[1].attn.xsa.any() and model.blocks[1].attn.xsa.init == "zeros"
    cfg = model.cfg
    opt = tg.Optimizers(model, cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))
    lr, decay, betas = opt.hyperparams(1.0, cfg.muon_momentum)[model.blocks[1].attn.xsa]
    assert (lr, decay, tuple(betas)) == (cfg.adam_lr, 0.0, (0.9, 0.95))


def test_xsa_layer_output_matches_a_reference_and_starts_as_plain_attention():
    """The layer's output: the attention's y (spied where the backend returns it) with the records'
    XSA applied, then the output projection; at alpha = 0, the model without XSA exactly."""
    model, plain = xsa_model("--xsa_layers=1"), xsa_model()
    idx = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(1))
    idx[[0, 50]] = BOS
    windows = (64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(idx, windows), plain.hidden(idx, windows), rtol=0, atol=0)
        attn = model.blocks[1].attn
        attn.xsa.copy_(torch.tensor([0.7, -1.3]))
        for p in (attn.o, model.blocks[1].mlp.down):
            p.normal_(0, 0.05)
    seen = {}

    def spy(q, k, v, mask, scale, need_lse):
        seen["v"], (seen["y"], lse) = v, model.attention(q, k, v, mask, scale, need_lse)
        return seen["y"], lse

    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(2))
    mask = model.attention.mask((idx == BOS).cumsum(0), windows[0])
    with torch.no_grad():
        got = attn(x, None, model.rotary, spy, mask)
        want = F.linear(xsa_reference(seen["y"], seen["v"], attn.xsa).flatten(1), attn.o)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, F.linear(seen["y"].flatten(1), attn.o), atol=1e-3)


def test_xsa_strengths_get_gradients():
    model = xsa_model("--xsa_layers=0,1")
    idx = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    idx[0] = BOS
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.normal_(0, 0.05)
            block.mlp.down.normal_(0, 0.05)
    model(idx, torch.roll(idx, -1), (64, 32), torch.tensor([1.0])).backward()
    assert all(block.attn.xsa.grad.abs().min() > 0 for block in model.blocks)


# ------------------------------------------------------------------------------------------------
# #85 lightweight dynamically composable attention (DC)
# ------------------------------------------------------------------------------------------------


def dc_read_reference(q, k, v, w1, docs, scale):
    """Dense: each head's softmax over the keys of its document at most HEAD's window - 1 back (rel <
    window), the heads' probabilities mixed by w1 [T, H] per query, applied to every head's values."""
    back = torch.arange(len(docs))[:, None] - torch.arange(len(docs))
    allowed = (docs[:, None] == docs) & (back >= 0) & (back < hr.DC_WINDOW)
    s = torch.einsum("thd,shd->hts", q, k) * scale
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)  # [H, T, T]
    mixed = torch.einsum("hts,th->ts", p, w1)
    return torch.einsum("ts,shd->thd", mixed, v)


def test_dc_read_matches_a_dense_reference_forward_and_gradient():
    """Three documents (one longer than the window), 3 heads: values and the gradients of q, k, v and w1
    as the dense form gives them in float64, to fp32 round-off (the op scores and mixes in fp32, as HEAD's kernel)."""
    gen = torch.Generator().manual_seed(0)
    docs = torch.zeros(300, dtype=torch.long)
    docs[40:], docs[250:] = 1, 2
    q, k, v = (torch.randn(300, 3, 16, dtype=torch.float64, generator=gen) for _ in range(3))
    w1 = torch.randn(300, 3, dtype=torch.float64, generator=gen)
    weight = torch.randn(300, 3, 16, dtype=torch.float64, generator=gen)
    mask = tg.HeadComposition.mask(docs)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, w1)]
        out = fn(*leaves)
        (out * weight).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    got, got_grads = run(lambda *t: tg.TorchOps.composed_attention(*t, mask, 0.3))
    want, want_grads = run(lambda *t: dc_read_reference(*t, docs, 0.3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("q", "k", "v", "w1"), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    # the window: a key 112 back never counts, 111 back does
    near, far = (torch.zeros(300, 3, 16, dtype=torch.float64) for _ in range(2))
    near[249 - 111], far[249 - 112] = 1.0, 1.0  # keys of document 1 (40..249) as seen from 249
    read = lambda values: tg.TorchOps.composed_attention(q, k, values, torch.ones(300, 3, dtype=torch.float64), mask, 0.3)  # noqa: E731
    assert read(near)[249].abs().sum() > 0 and read(far)[249].abs().sum() == 0


def test_dc_layers_count_their_flops():
    """#85 on the cpu shape (4 heads of 64, width 256), by hand: per DC layer and token, the weight MLP's
    2H x d and 2H x 2H weights, and over min(112, max_seq_len) keys 4 x 64 multiply-adds for q.k, 4 for
    the mix, 4 x 64 for the mixed probabilities times the values; 2 FLOPs each, backward twice the forward."""
    off = tg.parse_args(["--preset=cpu"])
    on = tg.parse_args(["--preset=cpu", "--dc_layers=1,5"])
    assert tg.matmul_params(on) - tg.matmul_params(off) == 2 * (8 * 256 + 8 * 8)
    for longest, keys in ((512, 112), (64, 64)):
        extra = tg.attention_flops(on, (128, 64), longest) - tg.attention_flops(off, (128, 64), longest)
        assert extra == 2 * 3 * 2 * keys * (4 * 64 + 4 + 4 * 64), longest


def dc_model(*flags):
    cfg = tg.parse_args(TINY + ["--attn_gate=false", "--attn_lambdas=false", *flags])
    torch.manual_seed(0)
    return tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), torch.float32)


def test_dc_parameters_inits_and_optimizer_group():
    """#85's first form: w = out_proj gelu_tanh(in_proj x), in_proj [2H, d] N(0, 2 / (d + 2H)), out_proj [2H, 2H] with
    the w1 rows N(0, (sqrt(1 / 2H) 2 / (H + 2) 0.01)^2) and the w2 rows zero; Adam lr 0.008 x 0.25,
    betas (0.9, 0.99), no decay (#85's dc banks)."""
    model = dc_model("--dc_layers=1", "--n_head=8", "--head_dim=8", "--d_model=512")
    assert model.blocks[0].attn.composition is None
    dc = model.blocks[1].attn.composition
    h, d = 8, 512
    assert dc.in_proj.shape == (2 * h, d) and dc.out_proj.shape == (2 * h, 2 * h)
    assert dc.in_proj.std().item() == pytest.approx(math.sqrt(2 / (d + 2 * h)), rel=0.05)
    assert dc.out_proj[:h].std().item() == pytest.approx(math.sqrt(1 / (2 * h)) * 2 / (h + 2) * 0.01, rel=0.3)
    assert not dc.out_proj[h:].any()
    cfg = model.cfg
    opt = tg.Optimizers(model, cfg, tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None))
    table = opt.hyperparams(1.0, cfg.muon_momentum)
    lr, betas, _, decay = hr.adam_settings("dc_w1_bank")
    for p in (dc.in_proj, dc.out_proj):
        assert table[p][0] == pytest.approx(lr) and table[p][1] == decay == 0.0 and tuple(table[p][2]) == betas


def test_dc_layer_matches_a_reference_and_starts_as_plain_attention():
    """The attention output with DC: y (spied where the backend returns it) plus w2_h times the dense
    read with w1 RMS-normed across heads, (w1, w2) = out_proj gelu_tanh(in_proj x); at init (w2 = 0), y exactly."""
    model = dc_model("--dc_layers=1")
    attn = model.blocks[1].attn
    idx = torch.randint(0, 1000, (160,), generator=torch.Generator().manual_seed(1))
    idx[[0, 70]] = BOS
    docs = (idx == BOS).cumsum(0)
    x = torch.randn(160, 64, generator=torch.Generator().manual_seed(2))
    mask = model.attention.mask(docs, 64)
    seen = {}

    def spy(q, k, v, mask, scale, need_lse):
        seen.update(q=q, k=k, v=v)
        seen["y"], lse = model.attention(q, k, v, mask, scale, need_lse)
        return seen["y"], lse

    with torch.no_grad():
        attn.o.normal_(0, 0.05)
        dc_mask = tg.HeadComposition.mask(docs)
        torch.testing.assert_close(attn(x, None, model.rotary, spy, mask, 0, dc_mask=dc_mask),
                                   F.linear(seen["y"].flatten(1), attn.o), rtol=0, atol=0)
        attn.composition.out_proj.normal_(0, 0.5)
        got = attn(x, None, model.rotary, spy, mask, 0, dc_mask=dc_mask)
        raw = F.gelu(x @ attn.composition.in_proj.T, approximate="tanh") @ attn.composition.out_proj.T
        w1, w2 = raw[:, :2], raw[:, 2:]
        w1 = w1 / w1.square().mean(-1, keepdim=True).add(1e-6).sqrt()
        read = dc_read_reference(seen["q"], seen["k"], seen["v"], w1, docs, model.rotary.attn_scale)
        want = F.linear((seen["y"] + w2[..., None] * read).flatten(1), attn.o)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, F.linear(seen["y"].flatten(1), attn.o), atol=1e-3)


def test_dc_mixes_with_w1_rounded_to_the_attention_outputs_dtype():
    """HEAD norms w1 in fp32 and hands it to its kernel in the attention output's dtype (bf16 on a GPU):
    the read gets exactly that, the fp32 norm rounded once."""
    got = {}

    class Spy(tg.TorchOps):
        @staticmethod
        def composed_attention(q, k, v, w1, mask, scale):
            got["w1"] = w1
            return tg.TorchOps.composed_attention(q, k, v, w1, mask, scale)

    attn = tg.HeadComposition(tg.parse_args(TINY + ["--n_head=4", "--head_dim=8", "--dc_layers=1"]), Spy)
    gen = torch.Generator().manual_seed(0)
    q, k, v, y = (torch.randn(70, 4, 8, generator=gen).bfloat16() for _ in range(4))
    w1, w2 = torch.randn(70, 4, generator=gen), torch.randn(70, 4, generator=gen)
    docs = torch.zeros(70, dtype=torch.long)
    attn(y, None, q, k, v, tg.HeadComposition.mask(docs), 0.1, (w1, w2))
    normed = w1 / w1.square().mean(-1, keepdim=True).add(tg.DC_NORM_EPS).sqrt()
    assert got["w1"].dtype == torch.bfloat16 and torch.equal(got["w1"], normed.bfloat16())


def test_dc_weights_get_gradients():
    """At init only the w2 rows learn (w2 = 0 blocks the rest, as in #85); once w2 moves, all do."""
    model = dc_model("--dc_layers=1")
    idx = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(3))
    idx[[0, 30]] = BOS
    dc = model.blocks[1].attn.composition
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.normal_(0, 0.05)
            block.mlp.down.normal_(0, 0.05)
    model(idx, torch.roll(idx, -1), (64, 32), torch.tensor([1.0])).backward()
    assert not dc.in_proj.grad.any() and not dc.out_proj.grad[:2].any() and dc.out_proj.grad[2:].abs().sum() > 0
    with torch.no_grad():
        dc.out_proj.normal_(0, 0.5)
    model.zero_grad()
    model(idx, torch.roll(idx, -1), (64, 32), torch.tensor([1.0])).backward()
    assert dc.in_proj.grad.abs().sum() > 0 and dc.out_proj.grad.abs().min() > 0
