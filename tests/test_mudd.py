"""#81 MUDD connections and #85 the MUDD gate: the model's forward against HEAD's, written here
block by block from the attention and MLP modules (tests/head_params_ref.py holds HEAD's layout and
starts), the coefficients against their eager formula, the gate's XSA and DC columns against those
layers worked by hand, the parameters against HEAD's table, and the flags' errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import head_params_ref as hr
import op_spy
import train_gpt as T

BOS = 50256
# HEAD's layer layout at a tiny width: 11 layers, no attention on 6, skip 3 -> 6, backout and lane 7,
# value embeddings .01.....234, the bigram table, the sublayer form, no #53 attention gate
HEAD_TINY = ["--preset=cpu", "--compile_elementwise=false", "--n_layer=11", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=128",
             "--no_attn_layers=6", "--long_window_layers=3,10", "--skip_from=3", "--skip_to=6",
             "--backout_layer=7", "--lane_layer=7", "--value_embeds=5", "--ve_layout=.01.....234", "--ve_gate=x_ve",
             "--ve_init_std=0.01", "--bigram_vocab=97", "--bigram_signs=16", "--sublayer_resid=true",
             "--post_lambdas=true", "--attn_gate=false", "--mudd_gate_layer=4", "--mudd_gate_attn=3,10",
             "--window_block=32"]
WINDOWS = (64, 32)
# HEAD's XSA and DC layers, whose strengths and weights the gate's columns make
XSA_DC = [f"--xsa_layers={','.join(map(str, hr.XSA_LAYERS))}", f"--dc_layers={','.join(map(str, hr.DC_LAYERS))}"]


def tiny_model(*flags, seed=0, jitter=0.3):
    cfg = T.parse_args(HEAD_TINY + list(flags))
    torch.manual_seed(seed)
    model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block), torch.get_default_dtype())
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + jitter * torch.randn_like(p))  # away from the init: every coefficient and table alive
    return model


def tokens(n=96, seed=2):
    idx = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))
    idx[[0, 40]] = BOS
    return idx


def gelu(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def mlp_coefs(mlp, x, which, n, scale):
    """HEAD's forward_mudd / forward_mudd_gate: (gelu(x w1^T) w2[:n]^T + b2[:n]) * scale."""
    return (gelu(x @ mlp.w1[which].T) @ mlp.w2[which, :n].T + mlp.b2[which, :n]) * scale


def heads_layout(half, cfg):
    """HEAD's gate columns of one half, as (kind, layer, width), less the XSA and DC columns of the layers
    that cfg does not list (HEAD_TINY lists none)."""
    listed = {"xsa": cfg.xsa_layers, "dc_w1": cfg.dc_layers, "dc_w2": cfg.dc_layers}
    return [(k, i, hr.gate_width(k, cfg.n_head)) for k, i in (hr.MUDD_GATE_PRE, hr.MUDD_GATE_POST)[half]
            if i in listed.get(k, (i,))]


def gate_columns(model, x, half, layout):
    """{(kind, layer): [T, width]} of HEAD's gate half by the column layout."""
    gate = model.mudd_gate
    out = mlp_coefs(gate, x, half, sum(w for *_, w in layout), gate.scale)
    cols, at = {}, 0
    for kind, layer, width in layout:
        cols[kind, layer] = out[:, at : at + width]
        at += width
    return cols


def attend_with(attend, v_add, head_gate):
    """The attention with v_add [T, H, D] added to its values and its heads scaled by head_gate [T, H]."""
    def call(q, k, v, mask, scale, need_lse):
        if v_add is not None:
            v = v + v_add.to(v.dtype)
        y, lse = attend(q, k, v, mask, scale, need_lse)
        return (y if head_gate is None else y * head_gate[..., None].to(y.dtype)), lse
    return call


def heads_hidden(model, idx, windows, mudd, gated):
    """GPT.forward of the public HEAD up to the final norm, on HEAD's layout: cache[k] the stream
    after layer k (cache[0]: layer 0's input with its bigram term, cache[9]: layer 10's input). The
    gate's first half from x0, its second from layer 4's input; without it the x0 and bigram lambdas,
    no skip factor and no attention gates. MUDD's 14 coefficients at layer 10 and 5 after the loop;
    without it layer 10 as the others and backout."""
    cfg, H = model.cfg, model.cfg.n_head
    masks = [model.attention.mask((idx == BOS).cumsum(0), w) for w in windows]
    x0 = T.norm(model.embed_tokens(idx))
    bigram = model.bigram_embed(idx)
    ve = [None if t is None else model.value_embeds[t][idx] for t in model.ve_tables]
    r, p = model.resid_lambdas, model.post_lambdas
    halves = [heads_layout(h, cfg) for h in (0, 1)] if mudd else model.mudd_gate.halves if gated else None
    g = gate_columns(model, x0, 0, halves[0]) if gated else {}
    x0_coef = (lambda i: g["x0", i]) if gated else (lambda i: model.x0_lambdas[i])
    bigram_coef = (lambda i: g["bigram", i]) if gated else (lambda i: model.bigram_embed.lambdas[i])
    x = x0 + bigram_coef(0) * bigram
    cache = {0: x}
    mu = None
    for i, block in enumerate(model.blocks):
        if gated and i == hr.MUDD_GATE_LAYER:
            g.update(gate_columns(model, x, 1, halves[1]))
        if i == 6:
            x = x + torch.sigmoid(model.skip_gate) * (g["skip", 6] if gated else 1) * cache[3]
        else:
            reads = T.norm(cache.get(7, x))
            mask = masks[0] if block.long else masks[1]
            head_gate = g.get(("attn", i))
            if mudd and i == 10:
                cache[9] = x
                mu = mlp_coefs(model.mudd, x, 0, hr.MUDD_LAYER10_ROWS, hr.MUDD_SCALE).split(1, dim=-1)
                v_add = (mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * x).view(x.size(0), H, -1)
                x = (1 + mu[5]) * x + mu[3] * cache[0] + mu[4] * cache[7]
                ve_gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(H // 2, dim=-1)
                v_add = ve_gate[..., None] * ve[i].view(v_add.shape) + v_add
                y = block.attn(reads, None, model.rotary, attend_with(model.attention, v_add, head_gate), mask)
                x = mu[8] * x + mu[9] * y + mu[10] * cache[0] + mu[11] * bigram
            else:
                y = block.attn(reads, ve[i], model.rotary, attend_with(model.attention, None, head_gate), mask)
                x = r[i, 0] * x + p[i, 0] * y + x0_coef(i) * x0 + (bigram_coef(i) * bigram if i else 0)
        y = block.mlp(T.norm(x))
        x = mu[12] * x + mu[13] * y if mudd and i == 10 else r[i, 1] * x + p[i, 1] * y
        if i in (3, 7):
            cache[i] = x
    if not mudd:
        return T.norm(x - model.backout_lambda * cache[7])
    m = mlp_coefs(model.mudd, x, 1, hr.MUDD_AFTER_ROWS, hr.MUDD_SCALE).split(1, dim=-1)
    return T.norm(x + m[0] * cache[0] + m[1] * cache[7] + m[2] * cache[9] + m[3] * ve[1] + m[4] * cache[3])


@pytest.fixture
def float64():
    """float64 throughout: the random model amplifies float32's rounding past any tight tolerance."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("mudd, gated", [(True, True), (True, False), (False, True)])
def test_forward_matches_heads(float64, mudd, gated):
    model = tiny_model(f"--mudd={mudd}", f"--mudd_gate={gated}")
    idx = tokens()
    with torch.no_grad():
        got = model.hidden(idx, WINDOWS)
        torch.testing.assert_close(got, heads_hidden(model, idx, WINDOWS, mudd, gated), rtol=1e-10, atol=1e-10)
        # the coefficients matter: MUDD's and the gate's output weights zeroed, the forward moves
        for part in (model.mudd, model.mudd_gate):
            if part is not None:
                part.w2.zero_()
        assert not torch.allclose(model.hidden(idx, WINDOWS), got, atol=1e-3)


def xsa_by_hand(y, v, alpha):
    """HEAD's gated XSA, as the unit-vector form: each head's y less tanh(alpha) of its part along v / |v|."""
    unit = v / v.norm(dim=-1, keepdim=True)
    return y - torch.tanh(alpha)[..., None] * (y * unit).sum(-1, keepdim=True) * unit


def dc_by_hand(q, k, v, w1, w2, docs, scale):
    """HEAD's DC term of each head h, dense: w2_h sum_g w1_g P_g v_h, w1 over its RMS across the heads and
    P_g head g's softmax over the keys of its document less than DC_WINDOW back."""
    t = torch.arange(len(docs))
    back = t[:, None] - t
    allowed = (docs[:, None] == docs) & (back >= 0) & (back < hr.DC_WINDOW)
    p = (torch.einsum("qgd,kgd->gqk", q, k) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
    w1 = w1 / (w1.square().mean(-1, keepdim=True) + hr.DC_W1_NORM_EPS).sqrt()
    return w2[..., None] * torch.einsum("gqk,qg,khd->qhd", p, w1, v)


class SpyAttention:
    """The model's attention backend, keeping each call's q, k, v, scale and plain output y (one call per
    attention layer, in order)."""

    def __init__(self, attention):
        self.attention, self.calls = attention, []

    def mask(self, docs, window):
        return self.attention.mask(docs, window)

    def __call__(self, q, k, v, mask, scale, need_lse):
        y, lse = self.attention(q, k, v, mask, scale, need_lse)
        self.calls.append(dict(q=q, k=k, v=v, scale=scale, y=y))
        return y, lse


def test_gate_columns_drive_xsa_and_dc(float64):
    """HEAD's XSA layers (1, 3, 4, 7) and DC layer (10) under the gate, the biases of their columns set
    far from 0: each such layer's attention output, within the whole forward, is its heads' plain output
    y (spied where the backend returns it) plus DC's read with the columns' (w1, w2), less XSA's
    tanh(column) share along v, times the layer's head gate, through the output projection; the columns
    worked out here as HEAD's gate makes them (the first half from x0, the second from layer 4's input)."""
    # a third of the usual jitter: at 0.3 the values reaching layer 10 grow past 1e8, where DC's fp32 read
    # (HEAD's kernel's precision) is off from the float64 reference by more than any fixed tolerance
    model = tiny_model("--mudd=true", "--mudd_gate=true", *XSA_DC, jitter=0.1)
    gate, layouts = model.mudd_gate, [heads_layout(half, model.cfg) for half in (0, 1)]
    with torch.no_grad():
        for half, layout in enumerate(layouts):
            at = 0
            for kind, _, width in layout:
                if kind in ("xsa", "dc_w1", "dc_w2"):
                    gate.b2[half, at : at + width] = torch.linspace(-9.0, 6.0, width)
                at += width
    idx = tokens(160)
    spy, post_input, outputs = SpyAttention(model.attention), [], {}
    hooks = [model.blocks[hr.MUDD_GATE_LAYER].register_forward_pre_hook(lambda _, args: post_input.append(args[0]))]
    hooks += [block.attn.register_forward_hook(lambda _, args, out, i=i: outputs.update({i: out}))
              for i, block in enumerate(model.blocks) if block.attn is not None]
    with torch.no_grad():
        model.hidden(idx, WINDOWS, spy)
        for hook in hooks:
            hook.remove()
        cols = {**gate_columns(model, T.norm(model.embed_tokens(idx)), 0, layouts[0]),
                **gate_columns(model, post_input[0], 1, layouts[1])}
    docs = (idx == BOS).cumsum(0)
    attn_layers = [i for i, block in enumerate(model.blocks) if block.attn is not None]

    def project(attn, y, i):
        """The head gate of layer i (if any), then the output projection."""
        y = y * cols["attn", i][..., None] if ("attn", i) in cols else y
        return F.linear(y.flatten(1), attn.lambdas[1] * attn.o)

    with torch.no_grad():
        for i in sorted(set(hr.XSA_LAYERS) | set(hr.DC_LAYERS)):
            attn, seen = model.blocks[i].attn, spy.calls[attn_layers.index(i)]
            y = seen["y"]
            if i in hr.DC_LAYERS:
                y = y + dc_by_hand(seen["q"], seen["k"], seen["v"], cols["dc_w1", i], cols["dc_w2", i], docs, seen["scale"])
            if i in hr.XSA_LAYERS:
                y = xsa_by_hand(y, seen["v"], cols["xsa", i])
            torch.testing.assert_close(outputs[i], project(attn, y, i), rtol=1e-5, atol=1e-5, msg=f"layer {i}")
            assert not torch.allclose(outputs[i], project(attn, seen["y"], i), atol=1e-3), i


def test_coefficients_match_the_eager_formula():
    """Both MLPs of MUDD and of the gate, at random weights: (gelu(x w1^T) w2^T + b2) * scale, the gate's
    split into its slots in HEAD's column order (its XSA and DC columns included)."""
    model = tiny_model("--mudd=true", "--mudd_gate=true", *XSA_DC)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for which, n in ((0, len(T.MUDD_INTO_LAST)), (1, len(T.MUDD_AFTER_LAST))):
            torch.testing.assert_close(model.mudd.coefs(x, which, n, T.MUDD_SCALE), mlp_coefs(model.mudd, x, which, n, 0.1))
        for half in (0, 1):
            got, want = model.mudd_gate(x, half), gate_columns(model, x, half, heads_layout(half, model.cfg))
            assert list(got) == list(want)
            for key in want:
                torch.testing.assert_close(got[key], want[key], msg=str(key))
    assert (len(T.MUDD_INTO_LAST), len(T.MUDD_AFTER_LAST)) == (hr.MUDD_LAYER10_ROWS, hr.MUDD_AFTER_ROWS)


def test_mudd_starts_as_the_model_without_it():
    """At MUDD's init (output weights zero) the last layer and the mix after it are those of the
    model without MUDD at its lambdas' starts and backout's 0.5 (the last layer without a value
    embedding, whose MUDD gate starts at 2 where 2 sigmoid's starts at 1)."""
    flags = ["--value_embeds=4", "--ve_layout=.01.....23."]
    off = tiny_model("--mudd=false", *flags)
    on = tiny_model("--mudd=true", *flags, jitter=0.0)
    with torch.no_grad():
        off.backout_lambda.fill_(T.BACKOUT_INIT)
        off.resid_lambdas[10] = 1.1**0.5
        off.post_lambdas[10] = 1.0
        off.x0_lambdas[10] = 0.0
        off.bigram_embed.lambdas[10] = 0.05
        missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert {k.split(".")[0] for k in missing} == {"mudd"} and unexpected == ["backout_lambda"]
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(on.hidden(idx, WINDOWS), off.hidden(idx, WINDOWS))


def test_starts_are_heads():
    """b2 times its scale at every slot: HEAD's MUDD_STARTS and, slot by slot, its gate starts;
    w1 as nn.Linear's default init, w2 zeros, the gate's scale 0.1."""
    model = tiny_model("--mudd=true", "--mudd_gate=true", *XSA_DC, jitter=0.0)
    want = torch.zeros(2, hr.MUDD_LAYER10_ROWS)
    for (k, row), value in hr.MUDD_STARTS.items():
        want[k, row] = value
    torch.testing.assert_close(model.mudd.b2.detach() * hr.MUDD_SCALE, want)
    gate = model.mudd_gate
    assert gate.scale.item() == pytest.approx(hr.MUDD_GATE_SCALE)
    for half in (0, 1):
        layout = heads_layout(half, model.cfg)
        starts = [hr.MUDD_GATE_STARTS[k] for k, _, w in layout for _ in range(w)]
        got = gate.b2[half].detach() * hr.MUDD_GATE_SCALE
        torch.testing.assert_close(got[: len(starts)], torch.tensor(starts))
        assert not got[len(starts):].any()
    bound = 1 / math.sqrt(64)
    for mlp in (model.mudd, gate):
        assert not mlp.w2.any() and mlp.w1.abs().max() <= bound and mlp.w1.abs().max() > 0.95 * bound
        assert abs(mlp.w1.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_head_preset_has_heads_mudd_parameters():
    """--preset=head: MUDD's and the gate's parameters shape for shape as HEAD's (the gate's 41 rows:
    its XSA and DC columns included), the gate's layout HEAD's column for column, and none of what they
    replace: x0, bigram and backout lambdas, the #53 attention gates, #82's XSA strengths and #85's
    first-form DC weight MLP."""
    cfg = T.parse_args(["--preset=head"])
    with torch.device("meta"):
        model = T.GPT(cfg, T.TorchOps, T.BlockedAttention(cfg.window_block))
    params = dict(model.named_parameters())
    ours = {"mudd.w1": "mudd_w1", "mudd.w2": "mudd_w2", "mudd.b2": "mudd_b2", "mudd_gate.w1": "mudd_gate_w1",
            "mudd_gate.w2": "mudd_gate_w2", "mudd_gate.b2": "mudd_gate_b2", "mudd_gate.scale": "_mudd_gate_scale"}
    assert {name for name in params if name.startswith("mudd")} == set(ours)
    layout = [[(k, i, hr.gate_width(k)) for k, i in half] for half in (hr.MUDD_GATE_PRE, hr.MUDD_GATE_POST)]
    assert list(model.mudd_gate.halves) == layout == [heads_layout(half, cfg) for half in (0, 1)]
    assert [sum(w for *_, w in half) for half in layout] == list(hr.MUDD_GATE_COLUMNS)
    for name, label in ours.items():
        assert tuple(params[name].shape) == hr.SHAPES[label][0], name
    gone = ("x0_lambdas", "bigram_embed.lambdas", "backout_lambda")
    assert not any(name in params for name in gone)
    assert not any(name.endswith((".gate", ".xsa")) or ".composition." in name for name in params)
    assert sorted(i for half in layout for k, i, _ in half if k == "attn") == list(hr.ATTN_GATE_LAYERS)
    assert sorted(i for half in layout for k, i, _ in half if k == "xsa") == hr.XSA_LAYERS


def test_optimizer_settings_are_heads():
    """Adam lr 0.008 x 0.25 (MUDD) and x 0.1 (the gate), betas (0.9, 0.99), decay on the weights only."""
    model = tiny_model("--mudd=true", "--mudd_gate=true", jitter=0.0)
    opt = T.Optimizers(model, model.cfg, T.Backend(torch.device("cpu"), 0, 1, T.TorchOps, None))
    table = opt.hyperparams(1.0, 0.95)
    labels = {"mudd.w1": "mudd_w1", "mudd.w2": "mudd_w2", "mudd.b2": "mudd_b2", "mudd_gate.w1": "mudd_gate_w1",
              "mudd_gate.w2": "mudd_gate_w2", "mudd_gate.b2": "mudd_gate_b2", "mudd_gate.scale": "_mudd_gate_scale"}
    params = dict(model.named_parameters())
    for name, label in labels.items():
        lr, betas, _, decay = hr.adam_settings(label)
        assert table[params[name]] == (pytest.approx(lr, rel=1e-12), pytest.approx(decay, rel=1e-12), betas), name


def test_gradients_reach_what_is_used():
    """Every MUDD and gate parameter gets a gradient (every column's bias, the XSA and DC ones included);
    layer 10's own value-embedding gate, whose place MUDD takes (HEAD keeps it unused in its bank), gets
    none, as do the gate rows past a half's slots."""
    model = tiny_model("--mudd=true", "--mudd_gate=true", *XSA_DC)
    idx = tokens(64)
    model(idx, torch.roll(idx, -1), WINDOWS, torch.tensor([1.0])).backward()
    for name, p in model.named_parameters():
        if name.startswith("mudd"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.blocks[10].attn.ve_gate.grad is None and model.blocks[9].attn.ve_gate.grad is not None
    pre = sum(w for *_, w in model.mudd_gate.halves[0])
    assert not model.mudd_gate.b2.grad[0, pre:].any() and model.mudd_gate.b2.grad[1].all()


def test_matmul_params_count_the_mudd_mlps():
    """Per token: each MLP's d x 64 and 64 x rows once: 64 (2 d + 14 + 5) for MUDD, and for the gate
    64 (2 d + 2 + 8 + 2 + 10 + 1) at HEAD's tiny layout (two heads, attention gates on 3 and 10); with
    HEAD's XSA and DC layers 4 x 2 XSA and 2 x 2 DC columns more, and DC's own MLP (2H x d + 2H x 2H)
    only without the gate."""
    base = T.matmul_params(T.parse_args(HEAD_TINY))
    assert T.matmul_params(T.parse_args(HEAD_TINY + ["--mudd=true"])) - base == 64 * (128 + 19)
    assert T.matmul_params(T.parse_args(HEAD_TINY + ["--mudd=true", "--mudd_gate=true"])) - base == 64 * (128 + 19) + 64 * (128 + 23)
    assert T.matmul_params(T.parse_args(HEAD_TINY + XSA_DC)) - base == 4 * 64 + 4 * 4
    gated = T.matmul_params(T.parse_args(HEAD_TINY + XSA_DC + ["--mudd=true", "--mudd_gate=true"]))
    assert gated - base == 64 * (128 + 19) + 64 * (128 + 23 + 8 + 4)


@pytest.mark.parametrize("flags, message", [
    (["--mudd=true", "--sublayer_resid=false"], "--mudd=true: expected --sublayer_resid=true"),
    (["--mudd_gate=true", "--sublayer_resid=false"], "--mudd_gate=true: expected --sublayer_resid=true"),
    (["--mudd=true", "--backout_layer=-1"], "--backout_layer=-1: expected a layer index from 0 to 10"),
    (["--mudd=true", "--skip_from=-1"], "--skip_from=-1: expected a layer index from 0 to 10"),
    (["--mudd=true", "--no_attn_layers=10"], "--no_attn_layers=10: expected the last layer to have attention"),
    (["--mudd=true", "--n_head=1", "--head_dim=64"], "--n_head=1: expected an even number of heads"),
    (["--mudd_gate=true", "--mudd_gate_layer=11"], "--mudd_gate_layer=11: expected a layer index from 0 to 10"),
    (["--mudd_gate=true", "--mudd_gate_attn=3,6"], "--mudd_gate_attn=3,6: expected each value a layer with attention"),
    (["--mudd_gate=true", "--skip_x0_gate=true"], "--skip_x0_gate=true: expected false with --mudd_gate=true"),
])
def test_flags_refuse_what_mudd_cannot_build(flags, message):
    with pytest.raises(T.ConfigError, match="^" + message.replace("+", r"\+")):
        T.parse_args(HEAD_TINY + flags)


def test_switches_off_cost_nothing():
    """Off (every preset but head): no MUDD parameters, and the layout's lambdas all there."""
    for preset in ("speedrun", "cpu"):
        cfg = T.parse_args([f"--preset={preset}"])
        assert not cfg.mudd and not cfg.mudd_gate
    model = tiny_model()
    names = {name for name, _ in model.named_parameters()}
    assert not any(name.startswith("mudd") for name in names)
    assert {"x0_lambdas", "bigram_embed.lambdas", "backout_lambda"} <= names
    assert model.mudd is None and model.mudd_gate is None


@pytest.mark.parametrize("version", op_spy.SUPPORTED_TORCH, ids=lambda v: "torch%d.%d" % v)
def test_cuda_dtypes_keep_the_stream_and_attention_in_bf16(version):
    """Under CUDA's autocast rules with CUDA's storage: MUDD's and the gate's weights stored in bf16 as
    HEAD stores them (the gate's scale float32), every block's input stream and every attention input
    bf16 with both on (XSA and DC fed by the gate's columns), and a training step finite."""
    flags = ["--sublayer_resid=true", "--post_lambdas=true", "--bigram_vocab=97", "--mudd=true", "--mudd_gate=true",
             "--mudd_gate_layer=2", "--mudd_gate_attn=1,5", "--attn_gate=false", "--xsa_layers=1,4", "--dc_layers=5"]
    built = []
    calls = op_spy.record_op_inputs(flags, cuda_rules=version, table_dtype=torch.bfloat16, built=built)
    model, _ = built
    assert {dtype for name, args in calls if name in ("block", "attention") for dtype, _ in args} == {torch.bfloat16}
    for name, p in model.named_parameters():
        if name.startswith("mudd"):
            want = torch.float32 if name == "mudd_gate.scale" else torch.bfloat16
            assert p.dtype == want and torch.isfinite(p.float()).all(), name
