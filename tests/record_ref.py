"""An independent transcription of record #53 (modded-nanogpt commit 9060ff47, "multi-token prediction
+ untie LM head at 2/3", 1880 + 40 steps): its schedule formulas, its optimizer update rules and
per-parameter hyperparameters, and its model's parameters, written from the record's code in its own
terms, for the tests to hold train_gpt against.

Nothing here is imported from train_gpt. Storage shapes are the record's: attention as one
(4d x d) [Q; K; V; O] matrix, the MLP's c_fc and c_proj both as (hidden x d), c_proj transposed.
"""
import math

import torch

SCHEDULED, EXTENSION = 1880, 40
TOTAL = SCHEDULED + EXTENSION
WS_SCHEDULE, WS_FINAL, WS_VALIDATE = (3, 7, 11), 13, 20
BS_SCHEDULE, BS_EXTENSION = (8 * 2048 * 8, 16 * 2048 * 8, 24 * 2048 * 8), 24 * 2048 * 8
TRANSITION_STEPS = 40
# the model: width, MLP hidden (4 x width), heads, the attention gate's inputs; 11 layers, layer 6
# without attention, 3 value-embedding tables
D_MODEL, MLP_HIDDEN, N_HEAD, GATE_DIMS = 768, 4 * 768, 6, 12
RECORD_DIMS = (D_MODEL, MLP_HIDDEN, N_HEAD, GATE_DIMS)
N_LAYER, NO_ATTN_LAYER, VALUE_EMBEDS = 11, 6, 3
# the optimizers: NorMuon lr, weight decay and beta2; DistAdam lr and weight decay, the main one's
# betas and the scalar one's
MUON_LR, MUON_WD, MUON_BETA2 = 0.023, 1.2, 0.95
ADAM_LR, ADAM_WD = 0.008, 0.005
ADAM_BETAS, SCALAR_BETAS = (0.65, 0.95), (0.9, 0.99)
SPLIT_STEP = math.ceil(2 / 3 * SCHEDULED)
COPY_STEP = (SPLIT_STEP - 2) | 1  # the record copies lm_head into embed after this step's optimizers

# ---------------------------------------------------------------------------- schedule


def record_lr(step):
    if step > SCHEDULED:
        return 0.1
    x = step / SCHEDULED
    lr_max = 1.0
    if x > 1 / 3:
        lr_max = 1.52
    if x > 2 / 3:
        lr_max = 1.73
    if x >= 1 - 0.55:
        w = (1 - x) / 0.55
        return lr_max * w + (1 - w) * 0.1
    return lr_max


def record_ws(step):
    """(short, long) window in blocks of 128 tokens."""
    if step >= SCHEDULED:
        return WS_FINAL // 2, WS_FINAL
    long = WS_SCHEDULE[int(len(WS_SCHEDULE) * step / SCHEDULED)]
    return long // 2, long


def record_bs(step):
    if step >= SCHEDULED:
        return BS_EXTENSION
    return BS_SCHEDULE[int(len(BS_SCHEDULE) * step / SCHEDULED)]


def record_momentum(step):
    cooldown_start = TOTAL - 50
    if step < 300:
        return 0.85 + step / 300 * (0.95 - 0.85)
    if step > cooldown_start:
        return 0.95 - (step - cooldown_start) / 50 * (0.95 - 0.85)
    return 0.95


def record_mtp(step):
    x = step / SCHEDULED
    if x < 1 / 3:
        return [1.0, 0.5, 0.25 * (1 - 3 * x)]
    if x < 2 / 3:
        return [1.0, 0.5 * (1 - (3 * x - 1))]
    return [1.0]


def record_transitions():
    """Per step: True while the scalar optimizer is paused (40 steps from a batch or window change)."""
    ws_long, batch, left, frozen = record_ws(0)[1], BS_SCHEDULE[0], 0, []
    for step in range(TOTAL):
        changed = record_ws(step)[1] != ws_long or record_bs(step) != batch
        ws_long, batch = record_ws(step)[1], record_bs(step)
        if changed:
            left = TRANSITION_STEPS
        frozen.append(left > 0)
        left -= left > 0
    return frozen


# ---------------------------------------------------------------------------- optimizer rules

POLAR_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(g, dtype):
    x = g.to(dtype)
    if g.size(-2) > g.size(-1):
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * (1 + 2e-2) + 1e-6)
    for a, b, c in POLAR_COEFFS:
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if g.size(-2) > g.size(-1):
        x = x.mT
    return x


def variance_reduction(v, buf, beta2, red_dim):
    """The record's apply_normuon_variance_reduction, step by step (the record runs it in fp32 on a
    bf16 v and keeps the result in bf16; here the caller picks one precision for all of it)."""
    v_mean = v.square().mean(dim=red_dim, keepdim=True)
    size = v.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    buf.lerp_(v_mean, 1 - beta2)
    step_size = buf.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * size) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return v * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))


def record_muon_rates(storage, lr_mul, wd_mul, step):
    """NorMuon's step size sqrt(max(1, rows / cols)) * lr_mul * lr of the storage shape, its decay
    coefficient wd_mul * wd * lr times that, and its (momentum, beta2)."""
    lr = MUON_LR * record_lr(step)
    eff_lr = math.sqrt(max(1.0, storage[-2] / storage[-1])) * lr_mul * lr
    return eff_lr, wd_mul * MUON_WD * lr * eff_lr, (record_momentum(step), MUON_BETA2)


def record_adam_rates(lr_mul, wd_mul, step, wd=ADAM_WD):
    """DistAdam's lr (before the bias correction) and its decay coefficient lr * wd * wd_mul * lr."""
    lr = ADAM_LR * record_lr(step) * lr_mul
    return lr, lr * wd * wd_mul * lr


class RecordNorMuon:
    """NorMuon (lr 0.023, wd 1.2, beta2 0.95) on one parameter at a time. `storage` is the record's
    shape of the matrix the parameter lives in, `transpose` whether the record stores it transposed."""

    def __init__(self, dtype):
        self.dtype, self.state = dtype, {}

    @torch.no_grad()
    def step(self, p, storage, lr_mul, wd_mul, is_gate, transpose, step):
        eff_lr, decay, (momentum, beta2) = record_muon_rates(storage, lr_mul, wd_mul, step)
        g = p.grad.T if transpose else p.grad
        w = p.detach().T if transpose else p.detach()
        st = self.state.setdefault(p, {})
        buf = st.setdefault("momentum", torch.zeros_like(g))
        buf.lerp_(g, 1 - momentum)
        g = g.lerp(buf, momentum)
        v = polar_express(g, self.dtype)
        red_dim = -1 if is_gate or storage[-2] >= storage[-1] else -2
        if "second" not in st:
            st["second"] = torch.zeros_like(g[..., :, :1] if red_dim == -1 else g[..., :1, :])
        v = variance_reduction(v.to(g.dtype), st["second"], beta2, red_dim)
        mask = (v * w) >= 0
        new = w - w * mask * decay - v * eff_lr
        p.copy_(new.T if transpose else new)


class RecordAdam:
    """DistAdam's step for one parameter: bias-corrected step size, eps on the raw root, cautious
    (strict) decay lr^2 * wd * wd_mul, lr = 0.008 * schedule * lr_mul."""

    def __init__(self, betas, wd=ADAM_WD, eps=1e-8):
        self.betas, self.wd, self.eps, self.state = betas, wd, eps, {}

    @torch.no_grad()
    def step(self, p, lr_mul, wd_mul, step):
        beta1, beta2 = self.betas
        lr, decay = record_adam_rates(lr_mul, wd_mul, step, self.wd)
        st = self.state.setdefault(p, dict(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)))
        st["step"] += 1
        t = st["step"]
        st["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        update = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + self.eps) * (lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t))
        mask = (update * p) > 0
        update = update + p * mask * decay
        p.sub_(update)


def record_label(name, d, hidden, n_head, gate_dims):
    """Our parameter name -> the record's (optimizer, storage shape, lr_mul, wd_mul, transposed)."""
    leaf = name.split(".")[-1]
    if ".attn." in name and leaf in ("q", "k", "v", "o"):
        return "muon", (4 * d, d), 1.0, 1.0, False
    if ".attn." in name and leaf == "gate":
        return "muon_gate", (n_head, gate_dims), 1.0, 1.0, False
    if leaf == "up":
        return "muon", (hidden, d), 1.0, 1.0, False
    if leaf == "down":
        return "muon", (hidden, d), 2.0, 1.0, True
    if name == "lm_head" or name == "embed":
        return "adam", None, 1.0, 1.0, False
    if name.startswith("value_embeds."):
        return "adam", None, 75.0, 1.0, False
    if name == "smear_gate":
        return "adam", None, 0.01, 0.0, False
    if name == "x0_lambdas":
        return "adam", None, 5.0, 0.0, False
    # resid lambdas, attention lambdas, smear, backout and skip lambdas: the record's `scalars`
    return "scalar_adam", None, 5.0, 0.0, False


def record_parameter_names():
    """The record's parameters in our names (its qkvo_w as q, k, v, o; its `scalars` as resid,
    attention, smear, backout and skip lambdas, less the attention-less layer's unused pair)."""
    names = ["lm_head", "embed", "smear_gate", "smear_lambda", "x0_lambdas", "resid_lambdas", "backout_lambda",
             "skip_gate"] + [f"value_embeds.{i}" for i in range(VALUE_EMBEDS)]
    for layer in range(N_LAYER):
        names += [f"blocks.{layer}.mlp.up", f"blocks.{layer}.mlp.down"]
        if layer != NO_ATTN_LAYER:
            names += [f"blocks.{layer}.attn.{leaf}" for leaf in ("q", "k", "v", "o", "gate", "lambdas")]
    return names


def record_hyperparams(name, step, dims=RECORD_DIMS):
    """Our parameter name -> the record's (optimizer label, lr, decay coefficient, betas) at `step`;
    NorMuon's betas are (momentum, beta2), the decay coefficient multiplies the masked weight."""
    kind, storage, lr_mul, wd_mul, _ = record_label(name, *dims)
    if kind.startswith("muon"):
        return (kind, *record_muon_rates(storage, lr_mul, wd_mul, step))
    return (kind, *record_adam_rates(lr_mul, wd_mul, step), ADAM_BETAS if kind == "adam" else SCALAR_BETAS)
