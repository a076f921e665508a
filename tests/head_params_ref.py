"""An independent transcription of the public HEAD's per-parameter table (modded-nanogpt repo root,
records up to #89): NorMuonAndAdam's defaults, TrainingManager's param_table, and the shapes and
inits of GPT.__init__, written in HEAD's own terms (its labels and its banked storage) for the tests
to hold train_gpt's switches against.

Nothing here is imported from train_gpt. Only the parts that the switches touch are transcribed;
the bigram parameters are listed with their optimizer settings but their shapes belong to the
helpers that build them.
"""
import math

import torch

WORLD = 8  # HEAD pads its banks to a multiple of the GPU count
VOCAB = 50304  # 50257 rounded up to a multiple of 128
D_MODEL, N_HEAD, HEAD_DIM, N_LAYER = 768, 6, 128, 11
MLP_HIDDEN = 4 * D_MODEL
GATE_DIMS = 12
N_VE_TABLES = 5
ATTN_LAYERS = N_LAYER - 1  # layer 6 has no attention

# the logits: A * sigmoid((z + B) / C), in the eval path and the fused CE kernel alike (#54)
SOFTCAP_A, SOFTCAP_B, SOFTCAP_C = 23.0, 5.0, 7.5

# NorMuonAndAdam's defaults, as TrainingManager passes them
ADAM_LR, ADAM_EPS, ADAM_WD = 0.008, 1e-10, 0.005
MUON_LR, MUON_MOMENTUM, MUON_BETA2, MUON_WD = 0.023, 0.95, 0.9, 1.2
MLP_PROJ_LR_MUL = 2.0  # the odd matrices of mlp_bank (c_proj) step twice as far

# label: (optimizer, Adam betas, lr_mul, wd_mul); entries without lr_mul / wd_mul default to 1
PARAM_TABLE = {
    "qk_bank": ("normuon", None, 1.0, 1.0),
    "vo_bank": ("normuon", None, 1.0, 1.0),
    "mlp_bank": ("normuon", None, 1.0, 1.0),
    "scalars": ("adam", (0.9, 0.99), 5.0, 0.0),
    "smear_gate": ("adam", (0.9, 0.99), 0.01, 0.0),
    "ve_gate_bank": ("adam", (0.9, 0.99), 1.0, 1.0),
    "lm_head": ("adam", (0.5, 0.95), 1.0, 150.0),
    "bigram_embed": ("adam", (0.75, 0.95), 75.0, 5.0),
    "post_lambdas": ("adam", (0.9, 0.95), 1.0, 0.0),
    "resid_lambdas": ("adam", (0.9, 0.95), 5.0, 0.0),
    "value_embeds": ("adam", (0.75, 0.95), 75.0, 5.0),
    "embed": ("adam", (0.5, 0.95), 1.0, 150.0),
    "mudd_w1": ("adam", (0.9, 0.99), 0.25, 1.0),
    "mudd_w2": ("adam", (0.9, 0.99), 0.25, 1.0),
    "mudd_b2": ("adam", (0.9, 0.99), 0.25, 0.0),
    "mudd_gate_w1": ("adam", (0.9, 0.99), 0.1, 1.0),
    "mudd_gate_w2": ("adam", (0.9, 0.99), 0.1, 1.0),
    "mudd_gate_b2": ("adam", (0.9, 0.99), 0.1, 0.0),
    "_mudd_gate_scale": ("adam", (0.9, 0.99), 0.1, 0.0),
}


# #82/#85: HEAD's XSA layers (its xsa_layers). HEAD makes their strengths per token in the MUDD gate
# (mudd_gate_* above) and has no parameter for them; record #82 learned them as a parameter of their own,
# a zero [layer, head] bank stepped by Adam as below (same tuple layout as PARAM_TABLE; not HEAD's labels)
XSA_LAYERS = [1, 3, 4, 7]
# #85: DC on layer 10, its attention over `window=112` keys (0 <= query - key < 112, in the document);
# HEAD's MUDD gate makes its per-token (w1, w2) (no parameter of its own), #85's first version a small
# MLP per layer, the dc banks
DC_LAYERS = [10]
DC_WINDOW = 112
DC_HIDDEN = 2 * N_HEAD
RECORD_PARAM_TABLE = {
    "xsa_alphas": ("adam", (0.9, 0.95), 1.0, 0.0),  # #82
    "dc_w1_bank": ("adam", (0.9, 0.99), 0.25, 0.0),  # #85's first version
    "dc_w2_bank": ("adam", (0.9, 0.99), 0.25, 0.0),
}


def padded(n):
    return -(-n // WORLD) * WORLD


# #80: Q and K as one matrix per head pair: per attention layer, 3 Q pairs then 3 K pairs
QK_GROUPS = ATTN_LAYERS * 2 * (N_HEAD // 2)
VO_MATRICES = ATTN_LAYERS * 2
INIT_BOUND = math.sqrt(3) * 0.5 / math.sqrt(D_MODEL)  # uniform(-b, b) has std 0.5 / sqrt(d)
# init_attn: every real matrix of qk_bank and vo_bank (Q, K, V and O) uniform(-INIT_BOUND, INIT_BOUND),
# O included (#64 made V and O nonzero; #67's scale 0.5 / sqrt(d) is what HEAD kept)
ATTN_INIT = ("uniform", INIT_BOUND)
# the banks NorMuon steps, stored in bf16 after init (`.bfloat16()`: rounded to nearest) beside a uint16
# "mantissa" per element in NorMuon's state (zeros at first): the lower 16 bits of an fp32 master (#57)
BF16_BANKS = ("qk_bank", "vo_bank", "mlp_bank")

# label: (storage shape, NorMuon's reshape or None, init); init is ("normal", std), ("uniform",
# bound), ("zeros",), or a description where it differs by slice
SHAPES = {
    "lm_head": ((D_MODEL, VOCAB), None, ("normal", 0.005)),  # stored (in, out)
    "embed": ((VOCAB, D_MODEL), None, "lm_head transposed"),
    "value_embeds": ((N_VE_TABLES * VOCAB, D_MODEL), None, ("normal", 0.01)),
    "ve_gate_bank": ((N_VE_TABLES, N_HEAD, GATE_DIMS), None, ("zeros",)),
    "smear_gate": ((1, GATE_DIMS), None, ("zeros",)),
    "qk_bank": ((padded(QK_GROUPS), 2 * HEAD_DIM, D_MODEL), (padded(QK_GROUPS), 2 * HEAD_DIM, D_MODEL),
                "uniform(-INIT_BOUND, INIT_BOUND), padding zeros"),
    "vo_bank": ((padded(VO_MATRICES), D_MODEL, D_MODEL), (padded(VO_MATRICES), D_MODEL, D_MODEL),
                "uniform(-INIT_BOUND, INIT_BOUND), padding zeros"),
    "mlp_bank": ((12, 2, MLP_HIDDEN, D_MODEL), (24, MLP_HIDDEN, D_MODEL), "c_fc uniform(-INIT_BOUND, INIT_BOUND), c_proj zeros"),
    # [layer, sublayer]: column 0 the attention, 1 the MLP (#77's form; layer 10's rows unused, MUDD's there)
    "resid_lambdas": ((N_LAYER, 2), None, ("constant", 1.1**0.5)),
    "post_lambdas": ((N_LAYER, 2), None, ("constant", 1.0)),
    # #81 init_mudd: two MLPs (the last layer's, the one after the loop) D_MODEL -> 64 -> 14 rows; w1
    # slice by slice with kaiming_uniform_(a=sqrt(5)): uniform(+-sqrt(1/3) * sqrt(3 / D_MODEL))
    "mudd_w1": ((2, 64, D_MODEL), None, ("uniform", 1 / math.sqrt(D_MODEL))),
    "mudd_w2": ((2, 14, 64), None, ("zeros",)),
    "mudd_b2": ((2, 14), None, "MUDD_STARTS / MUDD_SCALE"),
    # #85 init_mudd_gate: the same shape of MLP pair, 41 rows (the longer of its two halves)
    "mudd_gate_w1": ((2, 64, D_MODEL), None, ("uniform", 1 / math.sqrt(D_MODEL))),
    "mudd_gate_w2": ((2, 41, 64), None, ("zeros",)),
    "mudd_gate_b2": ((2, 41), None, "MUDD_GATE_STARTS by slot / MUDD_GATE_SCALE"),
    "_mudd_gate_scale": ((), None, ("constant", 0.1)),
    "xsa_alphas": ((N_LAYER, N_HEAD), None, ("zeros",)),  # #82's bank (HEAD: MUDD-gate outputs)
    # #85's first version, one [hidden, d] and one [2 heads, hidden] per attention layer (layer 10's used)
    "dc_w1_bank": ((ATTN_LAYERS, DC_HIDDEN, D_MODEL), None, ("normal", math.sqrt(2.0 / (D_MODEL + DC_HIDDEN)))),
    "dc_w2_bank": ((ATTN_LAYERS, 2 * N_HEAD, DC_HIDDEN), None,
                   ("the w1 rows normal", math.sqrt(1.0 / DC_HIDDEN) * 2.0 / (N_HEAD + 2.0) * 0.01, "the w2 rows zeros")),
}

# #81 forward_mudd: coefficients = (gelu(x w1[k]^T) w2[k, :n]^T + b2[k, :n]) * MUDD_SCALE, n = 14 at the
# start of layer 10 (k = 0) and 5 after the loop (k = 1). Their starts (b2 * MUDD_SCALE) by (k, row), the
# rest 0: layer 10's value-embedding gates (rows 6, 7), residual and post lambdas of attention (8, 9) and
# MLP (12, 13), bigram lambda (11); after the loop, -0.5 on layer 7's output (row 1: backout's place)
MUDD_SCALE = 0.1
MUDD_STARTS = {(0, 6): 2.0, (0, 7): 2.0, (0, 8): 1.1**0.5, (0, 9): 1.0, (0, 11): 0.05, (0, 12): 1.1**0.5,
               (0, 13): 1.0, (1, 1): -0.5}
# what each row multiplies. Layer 10 (its input x = h9): rows 0-2 into V, from h0 (layer 0's input, the
# bigram term included), h7 (layer 7's output), x; rows 3-5 recombine the stream as (1 + m5) x + m3 h0
# + m4 h7; the value-embedding gate is m6 for the first half of the heads, m7 for the second (no
# sigmoid); then x <- m8 x + m9 attn + m10 h0 + m11 bigram, x <- m12 x + m13 mlp. After the loop:
# x <- x + m0 h0 + m1 h7 + m2 h9 + m3 ve(table 0) + m4 h3.
MUDD_LAYER10_ROWS = 14
MUDD_AFTER_ROWS = 5

# #85 forward_mudd_gate: the same MLP form times the learned _mudd_gate_scale. Its columns, in order,
# per half (kind, layer); a "head" kind takes N_HEAD columns, the others one. The first half reads x0,
# the second the stream entering layer MUDD_GATE_LAYER.
MUDD_GATE_LAYER = 4
MUDD_GATE_PRE = [("xsa", 1), ("xsa", 3), ("attn", 3)] + [(k, i) for i in (0, 1, 2, 3) for k in ("x0", "bigram")]
MUDD_GATE_POST = ([("xsa", 4), ("xsa", 7), ("attn", 10)] + [(k, i) for i in (4, 5, 7, 8, 9) for k in ("x0", "bigram")]
                  + [("skip", 6), ("dc_w1", 10), ("dc_w2", 10)])
HEADWISE = {"xsa", "attn", "dc_w1", "dc_w2"}
MUDD_GATE_SCALE = 0.1
# starts (b2 * scale) by kind: attention gates multiply the head outputs as they are (no sigmoid); the
# skip is sigmoid(skip_lambda) * its column; x0 and bigram columns multiply x0 and the bigram embedding
MUDD_GATE_STARTS = {"xsa": 0.0, "attn": 0.25, "x0": 0.0, "bigram": 0.05, "skip": 0.5, "dc_w1": 1.0, "dc_w2": 0.0}
ATTN_GATE_LAYERS = (3, 10)  # HEAD's only attention gates: the MUDD gate's


def gate_width(kind, n_head=N_HEAD):
    return n_head if kind in HEADWISE else 1


# init_mudd_gate's b2 as HEAD fills it, by column at its own shape: (half, columns, start); the other
# columns 0, every stored value start / MUDD_GATE_SCALE. The halves' columns: 26 before layer 4 (XSA of
# layers 1 and 3: 0-11, the attention gate of 3: 12-17, x0 then bigram of layers 0-3: 18-25), 41 from it
# (XSA of 4 and 7: 0-11, the attention gate of 10: 12-17, x0 then bigram of layers 4, 5, 7, 8, 9: 18-27,
# the skip: 28, DC's w1 of layer 10: 29-34, its w2: 35-40, which dc_weights[10] reads as (29:35, 35:41))
MUDD_GATE_COLUMNS = (26, 41)
MUDD_GATE_B2_FILLS = [(0, slice(12, 18), 0.25), (0, slice(19, 26, 2), 0.05), (1, slice(12, 18), 0.25),
                      (1, slice(19, 28, 2), 0.05), (1, slice(28, 29), 0.5), (1, slice(29, 35), 1.0)]
# how the XSA and DC columns are read: alpha = tanh(column) per head (y -= alpha (y . v / |v|^2) v,
# |v|^2 floored at 1e-8), w1 RMS-normed over the heads (eps 1e-6, in fp32), w2 as is, no sigmoid on any
XSA_EPS, DC_W1_NORM_EPS = 1e-8, 1e-6


def mudd_gate_b2_init():
    """[2, 41]: init_mudd_gate's b2."""
    b2 = torch.zeros(2, max(MUDD_GATE_COLUMNS))
    for half, columns, start in MUDD_GATE_B2_FILLS:
        b2[half, columns] = start / MUDD_GATE_SCALE
    return b2

# which value-embedding table (and which of ve_gate_bank's gates) each layer uses: `.01.....234`
VE_LAYOUT = [None, 0, 1, None, None, None, None, None, 2, 3, 4]


def ve_gate(ve_head, x_head, w):
    """The gate per head, HEAD's way: 2 sigmoid(w . [x[:6], ve[:6]]) (x the normed attention input)."""
    return 2 * torch.sigmoid(torch.cat([x_head, ve_head], dim=-1) @ w.T)


def adam_settings(label):
    """Adam's (lr, betas, eps, decay coefficient) at lr multiplier 1: the decay is lr^2 * wd * wd_mul."""
    optim, betas, lr_mul, wd_mul = {**PARAM_TABLE, **RECORD_PARAM_TABLE}[label]
    assert optim == "adam"
    lr = ADAM_LR * lr_mul
    return lr, betas, ADAM_EPS, lr * lr * ADAM_WD * wd_mul


def muon_settings(label, matrix_index=0):
    """NorMuon's (lr, decay coefficient, (momentum, beta2)) for one matrix of a bank at lr multiplier 1.

    The lr multiplier is sqrt(max(1, rows / cols)) of the bank's per-rank chunk shape, times 2 for
    mlp_bank's odd (c_proj) matrices; the decay is wd * lr_base * (the matrix's lr)."""
    _, reshape, _ = SHAPES[label]
    rows, cols = reshape[-2:]
    lr = MUON_LR * max(1.0, rows / cols) ** 0.5 * PARAM_TABLE[label][2]
    if label == "mlp_bank" and matrix_index % 2 == 1:
        lr *= MLP_PROJ_LR_MUL
    return lr, MUON_WD * PARAM_TABLE[label][3] * MUON_LR * lr, (MUON_MOMENTUM, MUON_BETA2)
