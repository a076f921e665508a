"""The seeds' techniques (SPEC section 4): each formula against numbers worked out by hand or a
dense torch reference, and every switch on at once still training on a tiny CPU run."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import head_params_ref as hr
import sample
import train_gpt as T

TINY = ["--preset=cpu", "--compile_elementwise=false", "--n_layer=2", "--d_model=32", "--n_head=2", "--head_dim=16", "--mlp_hidden=64",
        "--long_window_layers=1", "--skip_from=-1", "--backout_layer=-1", "--value_embeds=2", "--window_block=16"]
# the seeds' techniques, HEAD's bigram embedding (#62/#83), FP8 MLP (#84/#89), prefix-token loss (#88)
# and sublayer form (#73/#77), all at once
ALL_ON = ["--shell_lambda=0.008", "--gate_attn=relu", "--gate_mlp=sigmoid", "--head_gate=true",
          "--sink_metric=true", "--sink_logit=true", "--kv_bias=true", "--stablemax=true",
          "--perp_grad=all", "--perp_grad_rescale=true", "--bigram_vocab=1001", "--bigram_signs=64",
          "--fp8_mlp=true", "--prefix_loss=0.25", "--sublayer_resid=true", "--post_lambdas=true", "--lane_layer=0"]


def test_shell_penalty_by_hand():
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # d = 4, so 2d = 8
    # row 0: ||x||^2 = 9, sqrt(8 / 9.1) = 0.93761 < 1     -> hinge 0
    # row 1: ||x||^2 = 4, sqrt(8 / 4.1) = 1.396861 - 1    -> hinge 0.396861
    # mean hinge 0.198431; mean row [2, .5, .5, .5], ||.||^2 = 4.75, / sqrt(4) -> 2.375
    assert T.shell_penalty(x).item() == pytest.approx(0.198431 + 2.375, abs=1e-5)


def test_shell_penalty_hinge_vanishes_outside_the_shell():
    x = torch.tensor([[4.0, 0.0, 0.0, 0.0], [-4.0, 0.0, 0.0, 0.0]])  # ||x||^2 = 16 > 8 - 0.1, mean 0
    assert T.shell_penalty(x).item() == 0.0


def test_stablemax_by_hand():
    logits = torch.tensor([[-2.0, 0.0, 3.0]] * 3)
    # s = [1/3, 1, 4], sum 16/3 -> probabilities [1/16, 3/16, 12/16]
    loss = T.TorchOps.stablemax_mtp_ce(logits, torch.tensor([0, 1, 2]), torch.tensor([1.0]), 0.0, 1.0)
    torch.testing.assert_close(loss, -torch.tensor([1 / 16, 3 / 16, 12 / 16]).log())


def test_stablemax_mtp_weights_by_hand():
    logits = torch.tensor([[-2.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    # row 1: s = [2, 1, 1], sum 4 -> probabilities [1/2, 1/4, 1/4]
    # row 0 scores targets 2 (k=0, weight 1) and 0 (k=1, weight 0.5); row 1 only its k=0 target 0
    loss = T.TorchOps.stablemax_mtp_ce(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.5]), 0.0, 1.0)
    expected = [-math.log(12 / 16) - 0.5 * math.log(1 / 16), -math.log(1 / 2)]
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_stablemax_reads_softcapped_logits():
    z = torch.tensor([[-9.0, 0.0, 5.0]])
    capped = 30 * torch.sigmoid(z / 7.5)
    got = T.TorchOps.stablemax_mtp_ce(z, torch.tensor([1]), torch.tensor([1.0]), 30.0, 7.5)
    want = T.TorchOps.stablemax_mtp_ce(capped, torch.tensor([1]), torch.tensor([1.0]), 0.0, 1.0)
    torch.testing.assert_close(got, want)


def stablemax_reference(z, targets, weights, cap, temp):
    """-sum_k w_k log StableMax(l)[t_{i+k}] straight from the definition, differentiated by autograd."""
    l = cap * torch.sigmoid(z / temp) if cap else z
    s = torch.where(l >= 0, l + 1, 1 / (1 - l))
    log_p = (s / s.sum(-1, keepdim=True)).log()
    n = len(targets)
    return torch.stack([
        sum(weights[k] * -log_p[i, targets[i + k]] for k in range(len(weights)) if i + k < n) for i in range(n)
    ])


@pytest.mark.parametrize("cap", [0.0, 30.0])
def test_stablemax_loss_and_gradient_match_the_definition(cap):
    gen = torch.Generator().manual_seed(3)
    z = (4 * torch.randn(6, 50, generator=gen, dtype=torch.float64)).requires_grad_()
    targets, weights = torch.randint(0, 50, (6,), generator=gen), torch.tensor([1.0, 0.5, 0.25])
    upstream = torch.rand(6, generator=gen, dtype=torch.float64)
    loss = T.TorchOps.stablemax_mtp_ce(z, targets, weights, cap, 7.5)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), z)
    want = stablemax_reference(z, targets, weights, cap, 7.5)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), z)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_log_stablemax_finite_for_huge_logits():
    z = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-1e4, -1e4, 1e4, 1e4]], requires_grad=True)
    loss = T.TorchOps.stablemax_mtp_ce(z, torch.tensor([1, 2]), torch.tensor([1.0]), 0.0, 1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    # row 0: s = [10001, 1/10001, 1, 4]; the target's loss is log(sum) + log(10001)
    assert loss[0].item() == pytest.approx(math.log(10006 + 1 / 10001) + math.log(10001), rel=1e-6)


def test_model_trains_and_validates_on_stablemax_cross_entropy():
    """A StableMax model predicts p = s(l) / sum s(l): its validation loss is -log p(target), summed,
    the same measure as a softmax model's, here written out from the definition of s."""
    cfg = T.parse_args(TINY + ["--stablemax=true", "--fp8_head=false"])
    torch.manual_seed(0)
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    idx = torch.randint(0, 1000, (64,))
    idx[0] = T.BOS_ID
    targets = torch.randint(0, 1000, (64,))
    args = (idx, targets, (32, 16), torch.tensor([1.0]))
    with torch.no_grad():
        train = model(*args)
        model.eval()
        val = model(*args)
        with torch.autocast("cpu", dtype=T.COMPUTE_DTYPE):
            x = model.hidden(idx, (32, 16))
        l = T.softcap(model.logits(x).double(), 30.0, 7.5)
    s = torch.where(l >= 0, l + 1, 1 / (1 - l))
    want = -(s / s.sum(-1, keepdim=True)).gather(1, targets[:, None]).log().sum()
    torch.testing.assert_close(val.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(train, val)  # one target, weight 1: the training loss is the same sum
    softmax_ce = T.TorchOps.softcap_mtp_ce(model.logits(x), targets, torch.tensor([1.0]), 30.0, 7.5).sum()
    # the softmax of the same logits, what validation measured before, is told apart at this tolerance
    assert not torch.isclose(softmax_ce.double(), want, rtol=1e-6, atol=0)


def test_orthogonal_gradient():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8, generator=gen))
    g = torch.randn(16, 8, generator=gen)
    for rescale in (False, True):
        w.grad = g.clone()
        T.orthogonalize_grads([w], rescale)
        cosine = (w.grad * w).sum() / (w.grad.norm() * w.norm())
        assert abs(cosine.item()) < 1e-6
        if rescale:
            assert w.grad.norm().item() == pytest.approx(g.norm().item(), rel=1e-6)
        else:  # the removed part is the projection onto w: g - g_perp is parallel to w
            removed = g - w.grad
            torch.testing.assert_close(removed, (g * w).sum() / (w * w).sum() * w.detach())


def test_orthogonal_gradient_by_hand_and_zero_weights():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    w.grad = torch.tensor([3.0, 4.0])  # <w,g>/<w,w> = 3: g_perp = [0, 4], rescaled to ||g|| = 5: [0, 5]
    zero = torch.nn.Parameter(torch.zeros(2))
    zero.grad = torch.tensor([3.0, 4.0])
    T.orthogonalize_grads([w, zero], rescale=True)
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(zero.grad, torch.tensor([3.0, 4.0]))  # zero weights keep their gradient


def test_orthogonal_gradient_of_a_scalar_is_zero_not_nan():
    """A scalar's gradient is all along its weight: nothing is left, and rescaling must not blow
    rounding noise (or an exact 0, as inf * 0) up; large gradients (a summed loss) once made NaN."""
    for value in (0.3, 1.7):
        s = torch.nn.Parameter(torch.tensor(value))
        s.grad = torch.tensor(250.0)
        T.orthogonalize_grads([s], rescale=True)
        assert s.grad.item() == 0.0


@pytest.mark.parametrize("which, kinds", [("matrices", {"matrix"}), ("all", None), ("none", set())])
def test_perp_grad_chooses_its_parameters(which, kinds):
    cfg = T.parse_args(TINY + [f"--perp_grad={which}"])
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    backend = T.Backend(torch.device("cpu"), 0, 1, T.TorchOps, None)
    opt = T.Optimizers(model, cfg, backend)
    chosen = {id(p) for p in opt.perp_muon + opt.perp_adam}
    want = {id(p) for p in model.parameters() if kinds is None or p.kind in kinds}
    assert chosen == want
    assert all(p.kind in ("matrix", "gate") for p in opt.perp_muon)  # NorMuon's (the attention gates are)


def sink_alpha(q, k, docs, window, slot_logit=None):
    probe = T.SinkProbe(T.BlockedAttention(4))
    v = torch.randn_like(q)
    probe(q, k, v, probe.mask(docs, window), 1.0, False)
    return probe.alpha(0, slot_logit)


def test_sink_metric_is_one_when_every_query_looks_at_the_first_token():
    L, H, D = 10, 2, 4
    docs = torch.tensor([0] * 4 + [1] * L)
    q = torch.zeros(len(docs), H, D)
    q[..., 0] = 10.0
    k = torch.zeros(len(docs), H, D)
    k[[0, 4], :, 0] = 10.0  # each document's first key scores 100, every other key 0
    torch.testing.assert_close(sink_alpha(q, k, docs, window=64), torch.ones(H))


def test_sink_metric_on_uniform_causal_attention():
    L, H, D = 12, 3, 4
    docs = torch.zeros(L, dtype=torch.long)
    q, k = torch.zeros(L, H, D), torch.randn(L, H, D)  # all scores 0: query i spreads 1/(i+1)
    # the first token's own query is not counted (it can only see itself)
    expected = sum(1 / (i + 1) for i in range(1, L)) / (L - 1)
    torch.testing.assert_close(sink_alpha(q, k, docs, window=64), torch.full((H,), expected))
    # an extra slot of logit 0 joins every query's softmax: 1/(i+2)
    expected = sum(1 / (i + 2) for i in range(1, L)) / (L - 1)
    got = sink_alpha(q, k, docs, 64, lambda q: torch.zeros(q.shape[:2]))
    torch.testing.assert_close(got, torch.full((H,), expected))


def test_sink_metric_skips_queries_past_the_window():
    L, H, D = 12, 1, 4
    q, k = torch.zeros(L, H, D), torch.zeros(L, H, D)
    # window 5: queries 1..5 see the first token (1/2 ... 1/6); queries 6.. cannot and are not counted
    expected = sum(1 / (i + 1) for i in range(1, 6)) / 5
    got = sink_alpha(q, k, torch.zeros(L, dtype=torch.long), window=5)
    torch.testing.assert_close(got, torch.full((H,), expected))


class DenseAttention:
    """Reference attention: the full softmax with an explicit mask, keeping every call's probabilities."""

    def __init__(self):
        self.probs = []

    def mask(self, docs, window):
        pos = torch.arange(docs.numel())
        return (docs[:, None] == docs[None]) & (pos[:, None] >= pos[None]) & (pos[:, None] - pos[None] <= window)

    @torch.autocast("cpu", enabled=False)
    def __call__(self, q, k, v, mask, scale, need_lse):
        s = (scale * torch.einsum("thd,shd->hts", q.float(), k.float())).masked_fill(~mask, float("-inf"))
        self.probs.append(s.softmax(-1))
        return torch.einsum("hts,shd->thd", self.probs[-1], v.float()).type_as(v), s.logsumexp(-1).T


def test_model_sink_metric_matches_dense_attention_probabilities():
    cfg = T.parse_args(TINY + ["--n_layer=3", "--no_attn_layers=1", "--long_window_layers=2"])
    torch.manual_seed(0)
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, 1000, (120,))
    idx[[0, 30, 45]] = T.BOS_ID  # documents of 30, 15 and 75 tokens; windows 32 and 16
    windows = (32, 16)
    got = model.first_token_attention(idx, windows)
    model.attention = dense = DenseAttention()
    with torch.no_grad(), torch.autocast("cpu", dtype=T.COMPUTE_DTYPE):
        model.hidden(idx, windows)
    start = torch.tensor([0] * 30 + [30] * 15 + [45] * 75)
    pos = torch.arange(120)
    want = []
    for probs, window in zip(dense.probs, (16, 32)):  # layer 0 short, layer 2 long; layer 1 has none
        counted = (pos > start) & (pos - start <= window)
        want.append(probs[:, pos, start][:, counted].mean(1))
    assert got.shape == (2, cfg.n_head)
    torch.testing.assert_close(got, torch.stack(want), atol=5e-3, rtol=0)


def test_sink_share():
    alphas = torch.tensor([[0.9, 0.1], [0.31, 0.3]])  # two of four above 0.3
    assert T.sink_share(alphas) == 0.5


def dense_attention_with_slot(q, k, v, docs, window, scale, slot_logit, slot_value):
    """Reference: the slot literally appended as one more key column of the softmax."""
    n = q.size(0)
    pos = torch.arange(n)
    allowed = (docs[:, None] == docs[None]) & (pos[:, None] >= pos[None]) & (pos[:, None] - pos[None] <= window)
    s = scale * torch.einsum("thd,shd->hts", q, k)
    s = s.masked_fill(~allowed, float("-inf"))
    s = torch.cat([s, slot_logit.T[..., None]], dim=-1)  # [H, T, T + 1]
    values = torch.cat([v.transpose(0, 1), slot_value[:, None]], dim=1)  # [H, T + 1, D]
    return (s.softmax(-1) @ values).transpose(0, 1)


@pytest.mark.parametrize("backend", ["blocked", "flex"])
@pytest.mark.parametrize("switches", [["--sink_logit=true"], ["--kv_bias=true"], ["--sink_logit=true", "--kv_bias=true"]])
def test_extra_slot_matches_dense_reference(backend, switches):
    cfg = T.parse_args(TINY + switches)
    gen = torch.Generator().manual_seed(1)
    attn = T.Attention(cfg, 0)
    with torch.no_grad():
        for p in (attn.sink, attn.key_bias, attn.value_bias):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=gen))
    n, h, d = 50, cfg.n_head, cfg.head_dim
    q, k, v = (torch.randn(n, h, d, generator=gen) for _ in range(3))
    docs = torch.tensor([0] * 20 + [1] * 30)
    scale, window = 0.3, 24
    attention = T.BlockedAttention(16) if backend == "blocked" else T.FlexAttention()
    y, lse = attention(q, k, v, attention.mask(docs, window), scale, True)
    got = T.add_slot(y, lse, attn.slot_logit(q, scale), attn.value_bias)
    # the slot's logit and value, written out independently of Attention.slot_logit
    sink = attn.sink if attn.sink is not None else torch.zeros(h)
    bias = scale * torch.einsum("thd,hd->th", q, attn.key_bias) if attn.key_bias is not None else 0.0
    value = attn.value_bias if attn.value_bias is not None else torch.zeros(h, d)
    with torch.no_grad():
        want = dense_attention_with_slot(q, k, v, docs, window, scale, (sink + bias).expand(n, h), value)
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act, fn", [("relu", F.relu), ("sigmoid", torch.sigmoid)])
def test_output_gate_by_hand(act, fn):
    gate = T.OutputGate(2, act)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.0]]))
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])
    # W x = [1 - 2, 2] = [-1, 2]; relu -> [0, 2] so y -> [0, 8]; sigmoid -> [0.268941, 0.880797]
    expected = {"relu": [[0.0, 8.0]], "sigmoid": [[3 * 0.268941, 4 * 0.880797]]}[act]
    torch.testing.assert_close(gate(x, y), torch.tensor(expected), atol=1e-5, rtol=0)
    assert gate.weight.kind == "matrix" and gate.act is fn


def test_output_gate_init_passes_gradient():
    gate = T.OutputGate(32, "relu")
    x = T.norm(torch.randn(64, 32))
    out = gate(x, torch.ones(64, 32))
    out.sum().backward()
    assert 0.2 < (out > 0).float().mean() < 0.8 and gate.weight.grad.abs().sum() > 0


def test_block_gates_each_sublayer_with_its_normed_input():
    cfg = T.parse_args(TINY + ["--gate_attn=relu", "--gate_mlp=sigmoid", "--value_embeds=0"])
    torch.manual_seed(0)
    block = T.Block(cfg, 0, T.TorchOps)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # the zero-init projections would hide the sublayers
    rotary, attention = T.Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale), T.BlockedAttention(16)
    docs = torch.zeros(40, dtype=torch.long)
    masks = [attention.mask(docs, 32), attention.mask(docs, 16)]
    x = torch.randn(40, cfg.d_model)
    with torch.no_grad(), torch.autocast("cpu", dtype=T.COMPUTE_DTYPE):  # as GPT.hidden runs blocks
        got = block(x, None, rotary, attention, masks)
        h = T.norm(x)
        x = x + block.attn(h, None, rotary, attention, masks[1]) * F.relu(h @ block.attn_out_gate.weight.T)
        h = T.norm(x)
        want = x + block.mlp(h) * torch.sigmoid(h @ block.mlp_out_gate.weight.T)
    torch.testing.assert_close(got, want)


def test_head_gate_scales_each_head_by_a_sigmoid_of_the_whole_input():
    cfg = T.parse_args(TINY + ["--head_gate=true", "--attn_gate=false", "--d_model=32"])
    torch.manual_seed(0)
    gated = T.Attention(cfg, 0, torch.float32)
    plain = T.Attention(T.parse_args(TINY + ["--attn_gate=false"]), 0, torch.float32)
    assert gated.gate.shape == (cfg.n_head, cfg.d_model) and gated.gate.kind == "gate"
    with torch.no_grad():
        gated.gate.copy_(torch.randn_like(gated.gate))
        for name in ("q", "k", "v"):
            getattr(plain, name).copy_(getattr(gated, name))
        plain.o.copy_(torch.eye(cfg.d_model))  # d = heads x head_dim: the output is the heads' concatenation
        gated.o.copy_(torch.eye(cfg.d_model))
    rotary, attention = T.Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale), T.BlockedAttention(16)
    mask = attention.mask(torch.zeros(40, dtype=torch.long), 32)
    x = T.norm(torch.randn(40, cfg.d_model))
    with torch.no_grad():
        heads = plain(x, None, rotary, attention, mask).view(40, cfg.n_head, cfg.head_dim)
        want = heads * torch.sigmoid(x @ gated.gate.T)[..., None]
        got = gated(x, None, rotary, attention, mask)
    torch.testing.assert_close(got, want.reshape(40, -1))


def test_switches_off_add_no_parameters():
    names = lambda flags: {n for n, _ in T.GPT(T.parse_args(TINY + flags), T.TorchOps, None).named_parameters()}
    off, on = names([]), names(ALL_ON)
    assert off < on
    new = {n.split(".")[-1] for n in on - off}
    assert new == {"weight", "sink", "key_bias", "value_bias", "lambdas", "post_lambdas"}


@pytest.mark.parametrize("flag", ["--gate_attn=tanh", "--gate_mlp=yes", "--perp_grad=some"])
def test_word_flags_reject_unknown_words(flag):
    with pytest.raises(T.ConfigError, match=flag.split("=")[0][2:]):
        T.parse_args([flag])


def write_counting_shards(folder):
    """Documents of 40 tokens that count up by one from a random start: learnable in a few steps."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[T.BOS_ID], (rng.integers(0, 500) + np.arange(39)) % 500]) for _ in range(400)]
    tokens = np.concatenate(docs)
    T.write_shard(folder / "train_000000.bin", tokens[:12000])
    T.write_shard(folder / "val_000000.bin", tokens[12000:])


def test_every_switch_on_trains(tmp_path):
    write_counting_shards(tmp_path)
    flags = TINY + ALL_ON + [
        f"--train_files={tmp_path}/train_*.bin", f"--val_files={tmp_path}/val_*.bin", f"--log_dir={tmp_path}",
        "--run_id=all_on", "--num_steps=20", "--batch_tokens=256,256,256", "--max_seq_len=64",
        "--long_windows=2,2,2", "--extension_window=2", "--final_window=2", "--val_every=10",
        "--val_tokens=1024", "--val_batch_tokens=512", "--log_every=1", "--progress=false", "--adam_lr=0.02",
    ]
    T.main(flags)
    records = [json.loads(line) for line in open(tmp_path / "all_on.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    val = [r["val_loss"] for r in records if r["kind"] == "val"]
    sinks = [r for r in records if r["kind"] == "sink"]
    # the penalty is logged every step; its hinge may reach 0 once the embeddings sit on the shell
    assert len(train) == 20 and all("shell" in r and r["shell"] >= 0 for r in train) and train[0]["shell"] > 0
    first, last = (np.mean([r["train_loss"] for r in part]) for part in (train[:3], train[-3:]))
    assert last < first - 0.3, (first, last)
    # val is StableMax's cross-entropy (ALL_ON has it): s grows linearly, so it falls slower than softmax's
    assert val[-1] < val[0] - 0.1, val
    assert len(sinks) == len(val) and all(0 <= s["share"] <= 1 for s in sinks)
    assert np.array(sinks[0]["alpha"]).shape == (2, 2)
    text = open(tmp_path / "all_on.txt").read()
    assert " shell:" in text and "\nsink step:20 share:" in text


# ------------------------------------------------------------------------------------------------
# HEAD techniques (#54-#80) on the optimizer side and in the model's small parts
# ------------------------------------------------------------------------------------------------


def tiny_batch():
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 1000, (64,), generator=gen)
    idx[0] = T.BOS_ID
    return idx, torch.randint(0, 1000, (64,), generator=gen)


def test_softcap_offset_loss_is_heads_formula():
    """#54: the model's validation loss, and the sampler's logits, are 23 sigmoid((z + 5) / 7.5)."""
    cap = ["--softcap=23", "--softcap_offset=5", "--softcap_temp=7.5", "--fp8_head=false"]
    cfg = T.parse_args(TINY + cap)
    torch.manual_seed(0)
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block)).eval()
    with torch.no_grad():
        model.lm_head.mul_(400)  # logits of a few units, so the offset's asymmetry shows
    idx, targets = tiny_batch()
    windows = (32, 16)
    with torch.no_grad():
        loss = model(idx, targets, windows, torch.tensor([1.0]))
        with torch.autocast("cpu", dtype=T.COMPUTE_DTYPE):
            z = model.logits(model.hidden(idx, windows)).float()
    logits = hr.SOFTCAP_A * torch.sigmoid((z + hr.SOFTCAP_B) / hr.SOFTCAP_C)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction="sum"))
    torch.testing.assert_close(sample.softcapped_logits(model, idx, windows), logits)
    symmetric = F.cross_entropy(hr.SOFTCAP_A * torch.sigmoid(z / hr.SOFTCAP_C), targets, reduction="sum")
    assert abs(loss - symmetric) > 1e-3  # the offset matters


@pytest.mark.parametrize("mode", ["x", "x_ve"])
def test_value_embedding_gate_formula(mode):
    """#55 reads x[:12]; #70 (HEAD) reads x[:6] and ve[:6]; each head gets 2 sigmoid(w_h . g) of its ve."""
    cfg = T.parse_args(TINY + [f"--ve_gate={mode}"])
    attn = T.Attention(cfg, 0, torch.float32)
    gen = torch.Generator().manual_seed(3)
    n, h, d = 20, cfg.n_head, cfg.head_dim
    x, ve = T.norm(torch.randn(n, cfg.d_model, generator=gen)), torch.randn(n, h * d, generator=gen)
    torch.testing.assert_close(attn.gated_ve(x, ve), ve.view(n, h, d))  # zero init: a gate of 1
    with torch.no_grad():
        attn.ve_gate.copy_(torch.randn(attn.ve_gate.shape, generator=gen))
    w = attn.ve_gate.detach()
    if mode == "x":
        gate = 2 * torch.sigmoid(x[:, :12] @ w.T)
    else:
        gate = hr.ve_gate(ve[:, :6], x[:, :6], w)
    torch.testing.assert_close(attn.gated_ve(x, ve), gate[..., None] * ve.view(n, h, d))


def test_value_embedding_layout_and_gates_by_layer():
    cfg = T.parse_args(TINY + ["--n_layer=4", "--value_embeds=2", "--ve_layout=.0.1", "--ve_gate=x_ve"])
    assert T.value_embed_tables(cfg) == [None, 0, None, 1]
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    assert [block.attn.ve_gate is not None for block in model.blocks] == [False, True, False, True]
    assert all(block.attn.ve_gate.kind == "adam_gate" for block in model.blocks if block.attn.ve_gate is not None)


def test_value_embedding_gate_is_wired_into_v():
    """A zero gate (2 sigmoid(0) = 1) leaves the model as without gates; a nonzero one changes it."""
    idx, targets = tiny_batch()
    losses = []
    for gate in ("none", "x_ve", "x_ve"):
        cfg = T.parse_args(TINY + [f"--ve_gate={gate}", "--ve_init_std=0.5", "--fp8_head=false"])
        torch.manual_seed(0)
        model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
        with torch.no_grad():
            for block in model.blocks:
                block.attn.o.normal_()  # zero-init output projections would hide v
            if len(losses) == 2:
                model.blocks[0].attn.ve_gate.fill_(3.0)
            losses.append(model(idx, targets, (32, 16), torch.tensor([1.0])))
    torch.testing.assert_close(losses[1], losses[0])
    assert abs(losses[2] - losses[0]) > 1e-3


def test_value_embedding_init_std():
    cfg = T.parse_args(TINY + ["--ve_init_std=0.01"])
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    for table in model.value_embeds:
        assert table.std().item() == pytest.approx(0.01, rel=0.05)
    default = T.GPT(T.parse_args(TINY), T.TorchOps, T.BlockedAttention(cfg.window_block))
    assert not any(table.any() for table in default.value_embeds)


def test_skip_x0_gate_formula():
    """#55: the skip is scaled by sigmoid(skip_gate) * 2 sigmoid(w . x0[:12]) per token."""
    cfg = T.parse_args(TINY + ["--n_layer=3", "--long_window_layers=1", "--skip_from=0", "--skip_to=2", "--skip_x0_gate=true"])
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(10, cfg.d_model, generator=gen)
    with torch.no_grad():
        model.skip_x0_gate.copy_(torch.randn(model.skip_x0_gate.shape, generator=gen))
        want = torch.sigmoid(torch.tensor(-1.5)) * 2 * torch.sigmoid(x0[:, :12] @ model.skip_x0_gate.T)
        torch.testing.assert_close(model.skip_scale(x0, {}), want)


def test_gates_adam_settings():
    """The #55/#56/#70 gates on Adam: the value-embedding and (#56) attention gates at the base lr, the
    scalars' betas and the base decay (HEAD's ve_gate_bank, #63's attn_gate_bank); the skip gate at
    lr x 0.05, no decay (#55's skip_gate)."""
    cfg = T.parse_args(TINY + ["--n_layer=3", "--long_window_layers=1", "--skip_from=0", "--skip_to=2",
                               "--skip_x0_gate=true", "--ve_gate=x_ve", "--attn_gate_adam=true", "--compile=false"])
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    opt = T.Optimizers(model, cfg, T.Backend(torch.device("cpu"), 0, 1, T.TorchOps, None))
    table = opt.hyperparams(1.0, 0.9)
    gates = [block.attn.ve_gate for block in model.blocks if block.attn.ve_gate is not None]
    attn_gates = [block.attn.gate for block in model.blocks]
    assert gates and all(g not in opt.muon.hyperparams() for g in attn_gates)
    for gate in gates + attn_gates:
        assert table[gate] == (cfg.adam_lr, cfg.adam_lr**2 * cfg.adam_wd, cfg.scalar_betas)
    assert table[model.skip_x0_gate] == (cfg.adam_lr * 0.05, 0.0, cfg.scalar_betas)


# ------------------------------------------------------------------------------------------------
# #88 the prefix-token loss: the table against tiktoken, the loss against an eager formula
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    from data.tokenize_corpus import gpt2_encoding

    return gpt2_encoding()


@pytest.fixture(scope="module")
def head_prefix_table():
    return T.prefix_tokens(50304, 50257)


def longest_prefix_token(enc, token, vocab_size=50257):
    """The reference: try every shorter prefix of the token's bytes on tiktoken, longest first."""
    text = enc.decode_single_token_bytes(token)
    for n in range(len(text) - 1, 0, -1):
        try:
            prefix = enc.encode_single_token(text[:n])
        except KeyError:
            continue
        if prefix < vocab_size:
            return prefix
    return T.NO_PREFIX


@pytest.mark.parametrize("text,prefix", [(" the", " th"), (" th", " t"), ("the", "th"), ("ing", "in"),
                                         (" Hello", " Hell"), (" a", " "), ("a", None), (" ", None)])
def test_prefix_table_by_hand(gpt2, head_prefix_table, text, prefix):
    token = gpt2.encode_single_token(text)
    want = T.NO_PREFIX if prefix is None else gpt2.encode_single_token(prefix)
    assert head_prefix_table[token].item() == want


def test_prefix_table_equals_tiktoken_everywhere(gpt2, head_prefix_table):
    """Every GPT-2 token against the brute-force reference; <|endoftext|> and the padding rows have none."""
    assert head_prefix_table.shape == (50304,) and head_prefix_table.dtype == torch.int64
    want = [longest_prefix_token(gpt2, t) for t in range(T.BOS_ID)]
    assert head_prefix_table[: T.BOS_ID].tolist() == want
    assert (head_prefix_table[T.BOS_ID :] == T.NO_PREFIX).all()
    assert (head_prefix_table >= 0).sum() == 50000  # all but the 256 single bytes


def test_prefix_table_of_a_smaller_vocabulary(gpt2):
    """A model of 290 tokens cannot predict " th" (294): " the" falls back to " t"."""
    table = T.prefix_tokens(384, 290)
    the, t = gpt2.encode_single_token(" the"), gpt2.encode_single_token(" t")
    assert gpt2.encode_single_token(" th") >= 290 and table[the].item() == t
    assert table.tolist() == [longest_prefix_token(gpt2, i, 290) for i in range(290)] + [T.NO_PREFIX] * 94


def eager_prefix_mtp_loss(z, targets, weights, prefixes, prefix_weight, stablemax):
    """loss_i = sum_k w_k nll_i(t_{i+k}) + pw nll_i(p_i) (no term where p_i < 0), nll from the
    log-softmax of 23 sigmoid((z + 5) / 7.5) (of its LogStableMax with `stablemax`)."""
    l = 23 * torch.sigmoid((z + 5) / 7.5)
    a = torch.sign(l) * torch.log1p(l.abs()) if stablemax else l
    logp = torch.log_softmax(a, dim=-1)
    n = len(targets)
    rows = []
    for i in range(n):
        loss = sum(w * -logp[i, targets[i + k]] for k, w in enumerate(weights) if i + k < n)
        if prefixes[i] >= 0:
            loss = loss + prefix_weight * -logp[i, prefixes[i]]
        rows.append(loss)
    return torch.stack(rows)


@pytest.mark.parametrize("stablemax", [False, True])
def test_prefix_loss_and_gradient_against_eager_formula(stablemax):
    gen = torch.Generator().manual_seed(8)
    n, vocab = 40, 300
    z = 4 * torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    prefixes = torch.randint(0, vocab, (n,), generator=gen)
    prefixes[1::5] = targets[1::5]
    prefixes[::3] = T.NO_PREFIX
    weights, prefix_weight = [1.0, 0.5, 0.25], 0.2
    op = T.TorchOps.stablemax_mtp_ce if stablemax else T.TorchOps.softcap_mtp_ce
    mine = z.clone().requires_grad_()
    loss = op(mine, targets, torch.tensor(weights), 23.0, 7.5, 5.0, prefixes, torch.tensor([prefix_weight]))
    ref = z.clone().requires_grad_()
    want = eager_prefix_mtp_loss(ref, targets, weights, prefixes, prefix_weight, stablemax)
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    loss.backward(grad.float())
    want.backward(grad)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-5, atol=1e-6)
    plain = op(z, targets, torch.tensor(weights), 23.0, 7.5, 5.0)
    assert (loss - plain)[::3].abs().max() < 1e-6 and (loss - plain)[1::3].min() > 0  # only rows with a prefix


def prefix_model(flags=()):
    cfg = T.parse_args(TINY + ["--softcap=23", "--softcap_offset=5", "--fp8_head=false", "--prefix_loss=0.25"] + list(flags))
    torch.manual_seed(0)
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    with torch.no_grad():
        model.lm_head.mul_(400)  # logits of a few units
    return model


def test_model_adds_the_prefix_term_on_its_own_logits(head_prefix_table):
    """forward(..., w) = forward(...) + w * sum_i CE(softcapped logits_i, table[target_i]), the table
    filled by load_prefix_table (empty before: no term), kept out of the state dict."""
    model = prefix_model()
    assert (model.prefix_table == T.NO_PREFIX).all() and "prefix_table" not in model.state_dict()
    idx, targets = tiny_batch()
    targets[:8] = torch.tensor([262, 294, 64, 220, 1169, T.BOS_ID, 278, 257])  # " the", " th", "a", " ", ...
    windows, mtp = (32, 16), torch.tensor([1.0, 0.5])
    plain = model(idx, targets, windows, mtp)
    torch.testing.assert_close(model(idx, targets, windows, mtp, torch.tensor([0.3])), plain)  # the table is empty
    model.load_prefix_table()
    assert torch.equal(model.prefix_table, head_prefix_table)
    with torch.no_grad(), torch.autocast("cpu", dtype=T.COMPUTE_DTYPE):
        z = model.logits(model.hidden(idx, windows)).float()
    prefixes = head_prefix_table[targets]
    has = prefixes >= 0
    ce = F.cross_entropy(23 * torch.sigmoid((z[has] + 5) / 7.5), prefixes[has], reduction="sum")
    torch.testing.assert_close(model(idx, targets, windows, mtp, torch.tensor([0.3])), plain + 0.3 * ce)


def prefix_run(tmp_path, prefix_loss):
    """A 6-step run (thirds at steps 0, 2, 4) on the sample; the prefix weight and the table's state
    each training forward received."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = T.parse_args(TINY + [f"--prefix_loss={prefix_loss}", "--num_steps=6", "--rounded_stages=true",
                               "--batch_tokens=64,64,64", "--max_seq_len=64", "--val_every=0", "--val_tokens=128",
                               "--val_batch_tokens=128", "--save_final=false", "--progress=false", f"--log_dir={tmp_path}",
                               f"--train_files={root}/data/sample/sample_train_*.bin",
                               f"--val_files={root}/data/sample/sample_val_*.bin"])
    backend = T.Backend(torch.device("cpu"), 0, 1, T.TorchOps, T.BlockedAttention(cfg.window_block))
    trainer = T.Trainer(cfg, backend, T.RunLog(cfg, backend))
    seen, forward = [], trainer.forward

    def spy(idx, targets, windows, mtp, prefix_weight=None, **kwargs):
        if trainer.model.training:
            filled = bool((trainer.model.prefix_table >= 0).any()) if prefix_loss else None
            seen.append((None if prefix_weight is None else prefix_weight.item(), filled))
        return forward(idx, targets, windows, mtp, prefix_weight, **kwargs)

    trainer.forward = spy
    trainer.run()
    return trainer, seen


def test_trainer_passes_the_weight_while_it_is_not_zero(tmp_path):
    """prefix_loss through the first third, fading over the second, then no weight (no prefix term
    in the graph); the table is filled by the time the first step runs."""
    trainer, seen = prefix_run(tmp_path, 0.25)
    assert seen == [(0.25, True), (0.25, True), (0.25, True), (0.125, True), (None, True), (None, True)]


def test_prefix_loss_off_costs_nothing(tmp_path):
    """prefix_loss=0: no table, and the Trainer passes no weight (the graphs have no prefix term)."""
    trainer, seen = prefix_run(tmp_path, 0.0)
    assert seen == [(None, None)] * 6 and not hasattr(trainer.model, "prefix_table")


def test_compiled_prefix_forward_matches_eager_without_recompiles():
    """Inductor on the CPU: the prefix term compiles fullgraph, and a new weight value is a new
    tensor value, not a new graph."""
    from torch._dynamo.utils import counters

    model = prefix_model()
    model.load_prefix_table()
    idx, targets = tiny_batch()
    windows, mtp = (32, 16), torch.tensor([1.0, 0.5])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    before = counters["stats"]["unique_graphs"]
    for w in (0.25, 0.1):
        weight = torch.tensor([w])
        torch.testing.assert_close(compiled(idx, targets, windows, mtp, weight), model(idx, targets, windows, mtp, weight),
                                   rtol=1e-4, atol=1e-3)
    assert counters["stats"]["unique_graphs"] - before == 1
