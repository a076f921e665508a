"""Backend: the CUDA attention's block mask, and the compiled model the GPU runs, on the CPU.

The block mask is built from document boundaries at 128-token block level; it must equal what
create_block_mask finds by evaluating every (query, key) pair. The compiled checks run inductor on
the CPU, as the GPU would compile: flex attention (forward only: it has no CPU backward) and the
CPU attention (forward and backward, through the Trainer) through every stage change of the
schedule and the final validation, counting the graphs dynamo builds.
"""
import math
import os
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import op_spy
import train_gpt as tg

BOS = 50256


def packing(n, docs, seed):
    """Document ids [n] of `docs` random documents packed in one sequence (non-decreasing)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n - 1, generator=gen)[: docs - 1] + 1
    is_start = torch.zeros(n, dtype=torch.long)
    is_start[0] = 1
    is_start[starts] = 1
    return is_start.cumsum(0)


def reference_mask(docs, window):
    """FlashAttention 3's window_size=(window, 0): one document, the key at most `window` back."""
    def allowed(b, h, q, k):
        back = q - k
        return (docs[q] == docs[k]) & (back >= 0) & (back <= window)

    return create_block_mask(allowed, None, None, docs.numel(), docs.numel(), device="cpu")


def listed(counts, indices):
    """Per query (or key) block, the sorted block indices a BlockMask lists."""
    return [sorted(indices[0, 0, i, : counts[0, 0, i]].tolist()) for i in range(counts.shape[-1])]


# lengths on and off the 128 grid; windows below, at and above a block; one to many documents;
# windows one short of a tile multiple (the farthest pair of two tiles just fits: a full tile) and
# one past it (the closest pair of tiles a multiple apart just fits: a partial tile)
@pytest.mark.parametrize("n, docs, window, seed", [
    (1024, 1, 1024, 0), (1000, 3, 128, 1), (1537, 7, 384, 2), (300, 2, 1, 3), (2048, 20, 896, 4),
    (777, 40, 200, 5), (1280, 4, 5000, 6), (129, 1, 64, 7), (1024, 1, 127, 8), (1024, 1, 255, 9),
    (1024, 1, 129, 10), (1024, 2, 257, 11), (700, 1, 256, 12), (640, 1, 0, 13),
])
def test_block_mask_equals_create_block_mask(n, docs, window, seed):
    doc_ids = packing(n, docs, seed)
    assert_same_mask(tg.FlexAttention().mask(doc_ids, window), reference_mask(doc_ids, window), seed)


@pytest.mark.parametrize("n, row, window", [(1024, 256, 255), (1000, 300, 299), (512, 64, 63), (640, 1024, 1023)])
def test_rows_block_mask_equals_create_block_mask(n, row, window):
    """--context's rows (FlexAttention(row): the rows told apart by position): the mask of documents
    position // row, whole rows and a cut last one."""
    doc_ids = torch.arange(n) // row
    assert_same_mask(tg.FlexAttention(row).mask(doc_ids, window), reference_mask(doc_ids, window), n)


def assert_same_mask(got, want, seed):
    """The same tiles listed, and flex attention through both the same."""
    n = want.seq_lengths[0]
    assert got.seq_lengths == want.seq_lengths == (n, n)
    for counts, indices in [("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                            ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")]:
        assert torch.equal(getattr(got, counts), getattr(want, counts)), counts
        assert listed(getattr(got, counts), getattr(got, indices)) == listed(getattr(want, counts), getattr(want, indices)), indices
    q, k, v = torch.randn(3, 1, 2, n, 16, generator=torch.Generator().manual_seed(seed)).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled
        y = flex_attention(q, k, v, block_mask=got, scale=0.3)
        y_ref = flex_attention(q, k, v, block_mask=want, scale=0.3)
    assert torch.allclose(y, y_ref, atol=1e-6)


def test_block_mask_never_visits_token_pairs(monkeypatch):
    """At the speedrun's 49,152 tokens per GPU the mask is built from 384 x 384 tiles, without
    create_block_mask, which evaluates the mask at all 2.4 billion (query, key) pairs (the per-token
    test runs only inside flex_attention, on partial tiles)."""
    import torch.nn.attention.flex_attention as flex

    def every_pair(*args, **kwargs):
        raise AssertionError("create_block_mask evaluates the mask at every (query, key) pair")

    monkeypatch.setattr(flex, "create_block_mask", every_pair)
    n, window = 49152, 13 * 128
    doc_ids = packing(n, 40, 0)
    mask = tg.FlexAttention().mask(doc_ids, window)
    tiles = n // tg.FLEX_BLOCK
    assert mask.kv_num_blocks.shape == (1, 1, tiles) and mask.kv_indices.shape == (1, 1, tiles, tiles)
    # a window of 13 tiles reaches at most 14 key tiles from any query tile
    assert int((mask.kv_num_blocks + mask.full_kv_num_blocks).max()) <= window // tg.FLEX_BLOCK + 1


# ------------------------------------------------------------------------------------------------
# The compiled model through the whole schedule (inductor on the CPU)
# ------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the speedrun preset's switches (compile, FP8 head, MTP, untie, YaRN, key offset, value embeddings,
# skip, backout, gates) on a 3-layer model with a layer without attention, and a schedule of 4 stages
SPEEDRUN_SHAPED = [
    "--device=cpu", "--n_layer=3", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=256",
    "--no_attn_layers=1", "--long_window_layers=2", "--skip_from=0", "--skip_to=2", "--backout_layer=1",
    "--value_embeds=1", "--num_steps=6", "--extension_steps=2", "--batch_tokens=256,384,512",
    "--accum_world_size=1", "--long_windows=1,2,3", "--extension_window=4", "--final_window=5",
    "--max_seq_len=256", "--val_tokens=512", "--val_batch_tokens=512", "--val_every=0", "--log_every=0",
    "--progress=false", "--warmup_steps=1", "--momentum_warmup_steps=2", "--momentum_cooldown_steps=2",
    f"--train_files={ROOT}/data/sample/sample_train_*.bin", f"--val_files={ROOT}/data/sample/sample_val_*.bin",
]


def graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# HEAD's switches on the same small shape (a value-embedding table on layers 0 and 2, a small bigram
# table, MUDD into the last layer, the MUDD gate's second half at layer 1, paired heads on the
# short-window layer 0, XSA and DC on the long-window layer 2, fed by the gate's columns), with its schedule rules
HEAD_SHAPED = SPEEDRUN_SHAPED + [
    "--softcap=23", "--softcap_offset=5", "--ve_layout=0.0", "--ve_init_std=0.01", "--ve_gate=x_ve", "--qk_head_pairs=true",
    "--bigram_vocab=512", "--bigram_signs=64", "--rounded_stages=true", "--first_seq_len=128", "--untie_after_adam=true",
    "--prefix_loss=0.25", "--muon_beta2=0.9", "--attn_lr_mul=1", "--adam_eps=1e-10", "--head_wd_mul=150",
    "--scalar_freeze_steps=0", "--adam_betas=0.5,0.95", "--value_embed_betas=0.75,0.95", "--smear_gate_betas=0.9,0.99",
    "--fp8_mlp=true", "--sublayer_resid=true", "--post_lambdas=true", "--lane_layer=0", "--paired_head_layers=0",
    "--mudd=true", "--mudd_gate=true", "--mudd_gate_layer=1", "--mudd_gate_attn=0,2", "--attn_gate=false",
    "--xsa_layers=2", "--dc_layers=2",
    "--uniform_attn_init=true", "--bf16_weights=true",
]


def compiled_trainer(tmp_path, attention, run_id, table_dtype=None, flags=SPEEDRUN_SHAPED):
    torch._dynamo.reset()
    cfg = tg.parse_args(flags + [f"--log_dir={tmp_path}", f"--run_id={run_id}"])
    assert cfg.compile and cfg.fp8_head and cfg.mtp and cfg.yarn and cfg.untie_frac < 1
    backend = tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, attention, table_dtype=table_dtype)
    return tg.Trainer(cfg, backend, tg.RunLog(cfg, backend))


def stage_graphs(schedule):
    """Graphs a run must compile for its steps: one per distinct (batch, window, MTP length, tied,
    prefix loss on)."""
    return len({(schedule.batch_tokens(s), schedule.long_window_blocks(s), len(schedule.mtp_weights(s)),
                 schedule.untie_step is None or s < schedule.untie_step, schedule.prefix_weight(s) > 0)
                for s in range(schedule.total)})


def test_compiled_flex_forward_through_every_stage(tmp_path):
    """What the GPU compiles first: the model with flex attention (its block mask built inside the
    graph, the YaRN scale a constant), fullgraph, at every stage change and the final validation.
    Forward only, since flex attention has no backward on the CPU."""
    trainer = compiled_trainer(tmp_path, tg.FlexAttention(), "flex")
    schedule = trainer.schedule
    assert stage_graphs(schedule) == 4
    start = graphs()
    with torch.no_grad():
        for step in range(schedule.total):
            windows, weights, tokens = trainer.begin_step(step)
            inputs, targets, _ = trainer.train_loader.next_batch(tokens, trainer.cfg.max_seq_len)
            loss = trainer.forward(inputs, targets, windows, weights)
            assert torch.isfinite(loss)
    assert graphs() - start == 4  # one per stage, none within a stage (the MTP weights change every step)
    val_loss = trainer.validate(schedule.final_window_blocks(), yarn=False)
    assert graphs() - start == 5 and 10 < val_loss < 11.5  # ~ln(50304) for an untrained model


def counting(calls):
    """Wrap a function to append, per call, the number of graphs it compiled."""
    def wrapper(fn):
        def counted(*args, **kwargs):
            before = graphs()
            out = fn(*args, **kwargs)
            calls.append(graphs() - before)
            return out
        return counted
    return wrapper


def test_compiled_head_shaped_training_compiles_only_in_the_warmup(tmp_path):
    """HEAD's switches on the speedrun-shaped model, compiled (fullgraph) by inductor with the CPU attention
    and the FP8 head, forward, backward and the optimizers' updates: the untimed warmup compiles a graph
    per stage (and the untie, the prefix loss on or off), the final validation's and the optimizers'
    (NorMuon's and Adam's, a graph per group shape), the timed run none; and the run trains.
    (tests/test_train.py counts the graphs of both presets' schedules with dynamo's eager backend.)"""
    trainer = compiled_trainer(tmp_path, tg.BlockedAttention(128), "head", flags=HEAD_SHAPED)
    per_step, per_forward, per_optimizer_step = [], [], []
    trainer.train_step = counting(per_step)(trainer.train_step)
    trainer.forward = counting(per_forward)(trainer.forward)
    trainer.optimizers.step = counting(per_optimizer_step)(trainer.optimizers.step)
    start = graphs()
    val_loss, _ = trainer.run()
    total, stages = trainer.schedule.total, stage_graphs(trainer.schedule)
    warmup = len(per_step) - total
    optimizer_graphs = sum(per_optimizer_step)
    assert per_step[warmup:] == [0] * total and per_optimizer_step[warmup:] == [0] * total and optimizer_graphs > 0
    assert sum(per_step[:warmup]) == stages + optimizer_graphs and stages == 4
    # + the final validation's, compiled in the warmup too
    assert sum(per_forward) == stages + 1 and per_forward[-1] == 0 and graphs() - start == stages + 1 + optimizer_graphs
    assert 5 < val_loss < 11
    # MUDD's and its gate's output weights start at zero: moved, the compiled backward reached them
    assert trainer.model.mudd.w2.abs().sum() > 0 and trainer.model.mudd_gate.w2.abs().sum() > 0


FOUR_HEADS = ["--n_head=4", "--head_dim=16"]
# paired heads on a short- and a long-window layer (XSA and DC, which HEAD keeps off paired layers, off)
PAIRED_FLEX = HEAD_SHAPED + FOUR_HEADS + ["--paired_head_layers=0,2", "--xsa_layers=", "--dc_layers="]


def test_compiled_flex_paired_heads_match_the_eager_blocked_attention():
    """The GPU's path of paired heads (#58): the HEAD-shaped model with flex attention, its 2T
    sequences' block masks built inside the graph, compiled fullgraph, gives the eager CPU attention's
    hidden states; three documents over 320 tokens (640 positions, 5 tiles). Four heads, two pair
    sequences: with one, the [1, 1, 2T, D] input is a view of the rotary's output, which inductor's CPU
    flex template cannot read (torch 2.13: it unpacks the buffer's 3-d size)."""
    cfg = tg.parse_args(PAIRED_FLEX)
    assert cfg.paired_head_layers == (0, 2) and 2 in cfg.long_window_layers
    torch.manual_seed(0)
    model = tg.GPT(cfg, tg.TorchOps, tg.FlexAttention(), torch.float32).eval()  # eval: no FP8 MLP rounding
    with torch.no_grad():  # the zero-initialized matrices and gates get values, so attention shows
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    idx = torch.randint(0, BOS, (320,), generator=torch.Generator().manual_seed(1))
    idx[[0, 70, 200]] = BOS
    windows = (256, 128)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model.hidden(idx, windows, tg.BlockedAttention(128))
        got = torch.compile(model.hidden, fullgraph=True, dynamic=False)(idx, windows)
        unpaired = tg.GPT(tg.parse_args(PAIRED_FLEX + ["--paired_head_layers="]), tg.TorchOps,
                          tg.BlockedAttention(128), torch.float32).eval()
        unpaired.load_state_dict(model.state_dict())
        assert (unpaired.hidden(idx, windows) - want).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_flex_forward_head_shaped_is_the_cpu_attentions(tmp_path):
    """HEAD's switches (XSA and DC among them) with the CUDA attention, compiled fullgraph by inductor: a
    batch's loss is the eager CPU attention's (in eval, without FP8: bf16 round-off apart), and so is the
    plain next-token loss beside it (next_token=True, the train line's: cross_entropy on the eager
    model's logits). DC's read runs the same torch code under both (it is not an attention backend's:
    flex cannot mix heads' probabilities). Four heads: the paired layer's pair sequences need two (see
    the test above)."""
    trainer = compiled_trainer(tmp_path, tg.FlexAttention(), "flex_head", flags=HEAD_SHAPED + FOUR_HEADS)
    model = trainer.model.eval()
    with torch.no_grad():  # the MUDD gate's XSA and DC columns off their starts, the zero-initialized weights alive
        for name, p in model.named_parameters():
            if name == "mudd_gate.w2":
                p.normal_(0, 0.5)
            elif not p.any():
                p.normal_(0, 0.02)
    windows, weights, tokens = trainer.begin_step(0)
    inputs, targets, _ = trainer.train_loader.next_batch(tokens, trainer.cfg.max_seq_len)
    cfg = trainer.cfg
    with torch.no_grad():
        got, got_next = trainer.forward(inputs, targets, windows, weights, next_token=True)
        model.attention = tg.BlockedAttention(cfg.window_block)
        want = model(inputs, targets, windows, weights)
        # the train line's plain next-token loss: cross_entropy on the eager model's softcapped logits
        z = model.logits(model.hidden(inputs, windows)).double()
        capped = cfg.softcap * torch.sigmoid((z + cfg.softcap_offset) / cfg.softcap_temp)
        want_next = torch.nn.functional.cross_entropy(capped, targets, reduction="sum")
    assert torch.isfinite(got) and (got - want).abs() / inputs.numel() < 1e-3, (got, want)
    assert (got_next - want_next).abs() / inputs.numel() < 1e-3, (got_next, want_next)
    assert len(weights) == 3 and got > 1.5 * got_next  # the MTP loss weighs in two more tokens' cross-entropies


@pytest.mark.parametrize("avx512_bf16, amx, want", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                                    (False, True, torch.bfloat16)])
def test_cpu_dtype_auto_follows_native_bf16(monkeypatch, avx512_bf16, amx, want):
    """--cpu_dtype=auto takes bf16 only where the CPU multiplies it natively; bf16 and fp32 are taken
    as asked on any CPU; CUDA ignores the flag (the fused kernels need bf16)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    backend = tg.setup_backend(tg.parse_args(["--preset=cpu"]))
    assert backend.device.type == "cpu" and backend.compute_dtype == want
    assert tg.setup_backend(tg.parse_args(["--preset=cpu", "--cpu_dtype=bf16"])).compute_dtype == torch.bfloat16
    assert tg.setup_backend(tg.parse_args(["--preset=cpu", "--cpu_dtype=fp32"])).compute_dtype == torch.float32


def test_records_track_follows_the_matmul_dtype():
    """fp32 CPU runs (no native bf16) are timed on a track of their own, never against bf16 hosts."""
    def track(dtype, preset):
        return tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, None, dtype).records_track(preset)
    assert track(torch.bfloat16, "cpu") == "cpu" and track(torch.bfloat16, "speedrun") == "speedrun"
    assert track(torch.float32, "cpu") == "cpu-fp32"


# ------------------------------------------------------------------------------------------------
# The dtypes of the CUDA path, on the CPU: CUDA's autocast rules (tests/op_spy.py) and the record's
# storage (the head, the embedding tables and the gates in bf16)
# ------------------------------------------------------------------------------------------------


def test_cuda_autocast_rules_follow_the_dispatch_table():
    """The emulation: under autocast, rms_norm (CUDA: fp32 since torch 2.12) and square (pow) come back
    fp32, while matmuls stay bf16 and ops without a CUDA rule keep their input's dtype."""
    assert op_spy.cuda_only_fp32("rms_norm") and op_spy.cuda_only_fp32("square") and op_spy.cuda_only_fp32("exp")
    assert not any(map(op_spy.cuda_only_fp32, ("linear", "matmul", "sigmoid", "embedding", "cat", "to")))
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), op_spy.CudaAutocastRules():
        h = torch.nn.functional.linear(x, torch.randn(8, 8))
        assert h.dtype == torch.bfloat16 and torch.sigmoid(h).dtype == torch.bfloat16
        assert torch.nn.functional.rms_norm(h, (8,)).dtype == torch.float32 and h.square().dtype == torch.float32
    with op_spy.CudaAutocastRules():  # outside autocast nothing changes
        assert torch.nn.functional.rms_norm(x.bfloat16(), (8,)).dtype == torch.bfloat16
    # torch 2.11 (the lent GPU's) has no CUDA rule for rms_norm, 2.12 on has one
    with torch.autocast("cpu", dtype=torch.bfloat16), op_spy.CudaAutocastRules((2, 11)):
        assert torch.nn.functional.rms_norm(h, (8,)).dtype == torch.bfloat16


@pytest.mark.parametrize("version", op_spy.SUPPORTED_TORCH, ids=lambda v: "torch%d.%d" % v)
@pytest.mark.parametrize("table_dtype", [None, torch.bfloat16], ids=["fp32-tables", "bf16-tables"])
def test_attention_gets_the_compute_dtype_under_cuda_autocast_rules(table_dtype, version):
    """q, k and v reach attention in bf16 under CUDA's autocast rules of each supported torch, where
    (from 2.12) rms_norm (q, k) returns fp32 and a float32 value-embedding table promotes v: the hard
    "same dtype" error of flex attention, or its fp32 kernels. Value embeddings and the key offset on."""
    calls = op_spy.record_op_inputs(cuda_rules=version, table_dtype=table_dtype)
    attention = [args for name, args in calls if name == "attention"]
    cfg = tg.parse_args(op_spy.SMALL)
    assert cfg.value_embeds and cfg.key_offset and len(attention) == cfg.n_layer - len(cfg.no_attn_layers)
    assert all(dtype == torch.bfloat16 for args in attention for dtype, _ in args), attention


@pytest.mark.parametrize("version", op_spy.SUPPORTED_TORCH, ids=lambda v: "torch%d.%d" % v)
def test_cuda_storage_keeps_the_tables_and_the_stream_in_bf16(version):
    """The record's precision on CUDA: the head, the embedding tables and the gates stored in bf16 and
    so their Adam moments; the residual stream bf16 from the embedding on (under CUDA's autocast rules,
    where rms_norm alone would make it fp32); matrices, scalars and the step sizes stay float32."""
    built = []
    calls = op_spy.record_op_inputs(cuda_rules=version, table_dtype=torch.bfloat16, built=built)
    model, optimizers = built
    assert {dtype for name, args in calls if name == "block" for dtype, _ in args} == {torch.bfloat16}
    for name, p in model.named_parameters():
        want = torch.bfloat16 if p.kind in tg.TABLE_KINDS else torch.float32
        assert p.dtype == want and p.grad is None and torch.isfinite(p.float()).all(), name
    kinds = {p.kind for p in model.parameters()}
    assert {"head", "value_embed", "gate", "smear_gate"} <= kinds
    adam = optimizers.adam
    for p, state in adam.state.items():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == p.dtype
    assert {p.kind for p in adam.state} >= {"head", "value_embed", "smear_gate", "scalar"}
    assert all(h.dtype == torch.float32 for h in [*adam.hyper.values(), *optimizers.muon.hyper.values()])
    # the fp32 model from the same seed starts from the same values, rounded
    torch.manual_seed(0)
    fp32 = tg.GPT(tg.parse_args(op_spy.SMALL), tg.TorchOps, None)
    torch.manual_seed(0)
    bf16 = tg.GPT(tg.parse_args(op_spy.SMALL), tg.TorchOps, None, table_dtype=torch.bfloat16)
    assert torch.equal(bf16.lm_head, fp32.lm_head.bfloat16()) and torch.equal(bf16.blocks[0].mlp.up, fp32.blocks[0].mlp.up)


@pytest.mark.parametrize("version", op_spy.SUPPORTED_TORCH, ids=lambda v: "torch%d.%d" % v)
def test_bf16_weights_compute_what_cuda_autocast_computes_anyway(version):
    """#57 under CUDA's autocast rules (bf16 tables): autocast casts fp32 matrices to bf16 by rounding to
    nearest, and the bf16 matrices start as exactly that rounding (their fp32 masters' mantissas 0), so
    the first loss and every matrix's gradient are bitwise the fp32 model's; then NorMuon steps: the
    matrices stay bf16, their momentum and second moment fp32, their mantissas uint16 and nonzero."""
    runs = {}
    for bf16 in (False, True):
        cfg, model, optimizers = op_spy.build([f"--bf16_weights={str(bf16).lower()}"], torch.bfloat16)
        idx = torch.randint(0, cfg.vocab_size, (op_spy.TOKENS + 1,), generator=torch.Generator().manual_seed(0))
        schedule = tg.Schedule(cfg)
        with op_spy.CudaAutocastRules(version):
            loss = model(idx[:-1], idx[1:], schedule.windows(schedule.window_blocks(0)), torch.tensor(schedule.mtp_weights(0)))
        loss.backward()
        grads = {name: p.grad.float() for name, p in model.named_parameters() if p.kind == "matrix"}
        runs[bf16] = loss.detach(), grads, model, optimizers
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1].keys() == runs[False][1].keys() and len(runs[True][1]) == 5 * 4 + 6 * 2
    for name, grad in runs[True][1].items():
        assert torch.equal(grad, runs[False][1][name]), name
    _, _, model, optimizers = runs[True]
    schedule = tg.Schedule(model.cfg)
    optimizers.step(0, schedule.lr_mult(0), schedule.momentum(0), last=True)
    assert {p.dtype for p in model.parameters() if p.kind == "matrix"} == {torch.bfloat16}
    states = [state for state in optimizers.muon.state.values() if "mantissa" in state]
    assert len(states) == 2 and len(optimizers.muon.state) == 3  # Q, K, V, O; the MLP's; the gates keep none
    for state in states:
        assert state["momentum"].dtype == state["second_moment"].dtype == torch.float32
        assert state["mantissa"].dtype == torch.uint16 and state["mantissa"].view(torch.int16).any()


def test_compiled_training_with_bf16_tables(tmp_path):
    """The CUDA storage compiled by inductor (the speedrun-shaped model, blocked attention): two steps,
    the second with Adam's bf16 update, then a validation, all finite."""
    trainer = compiled_trainer(tmp_path, tg.BlockedAttention(128), "bf16_tables", table_dtype=torch.bfloat16)
    assert trainer.model.lm_head.dtype == torch.bfloat16
    head = trainer.model.lm_head.detach().clone()
    losses = [trainer.train_step(step)["train_loss"].item() for step in range(2)]
    assert all(map(math.isfinite, losses)) and not torch.equal(head, trainer.model.lm_head)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for p, s in trainer.optimizers.adam.state.items() if p.kind == "head")
    assert 5 < trainer.validate(trainer.schedule.window_blocks(0)) < 11.5


def test_compiled_bigram_embed_matches_eager():
    """The bigram embedding's int32 hash, sign lookup and table gradient as inductor compiles them
    (fullgraph, as the model is compiled), against eager and the gradient's definition."""
    torch._dynamo.reset()
    cfg = tg.parse_args(["--preset=cpu", "--bigram_vocab=1001", "--bigram_signs=64"])
    torch.manual_seed(0)
    bigram = tg.BigramEmbed(cfg)
    with torch.no_grad():
        bigram.weight.normal_()
    idx = torch.randint(0, cfg.vocab_size, (256,), generator=torch.Generator().manual_seed(1))
    idx[[0, 100]] = BOS
    upstream = torch.randn(256, cfg.d_model)

    def run(fn):
        bigram.weight.grad = None
        out = fn(idx)
        (out * upstream).sum().backward()
        return out, bigram.weight.grad.clone()

    want, want_grad = run(bigram)
    got, got_grad = run(torch.compile(bigram, fullgraph=True, dynamic=False))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad)
    # each position adds its upstream gradient, times its signs, to the row it read
    signs = bigram.signs[tg.bigram_sign_rows(idx, 64)]
    rows = tg.bigram_hash(idx, 1001).long()
    torch.testing.assert_close(got_grad, torch.zeros(1001, cfg.d_model).index_add_(0, rows, upstream * signs))


@pytest.mark.parametrize("capability, hip, off", [((9, 0), None, False), ((8, 9), None, False), ((12, 0), None, False),
                                                   ((8, 6), None, True), ((8, 0), None, True), ((9, 4), "6.2", True)])
def test_fp8_falls_back_where_the_gpu_has_no_fp8_matmul(monkeypatch, capability, hip, off):
    """sm_89 and newer keep the FP8 head; an A100 (sm_80), an RTX 3090 (sm_86) and a ROCm build turn it
    off with a line saying why; the CPU keeps it (its twin is exact)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    cfg = tg.parse_args([])
    notes = [note for note in tg.fall_back(cfg, torch.device("cuda", 0)) if note.startswith("--fp8")]
    assert cfg.fp8_head is not off and len(notes) == int(off)
    if off:
        assert notes[0].startswith("--fp8_head=false here: ") and ("ROCm" in notes[0] if hip else f"sm_{capability[0]}{capability[1]} has no FP8" in notes[0])
    cpu = tg.parse_args([])
    assert tg.fall_back(cpu, torch.device("cpu")) == [] and cpu.fp8_head


def test_rocm_runs_the_torch_twins_and_says_why(monkeypatch):
    """A ROCm build (torch.version.hip set): besides FP8, --triton falls back, with one line saying that
    the kernels' launch configs are sized for NVIDIA's shared memory and that the torch twins run instead;
    the ops chosen after it are the twins. A CUDA build keeps the kernels and says nothing."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))  # an MI300X's gfx942
    monkeypatch.setattr(torch.version, "hip", "6.2")
    cfg = tg.parse_args([])
    notes = tg.fall_back(cfg, torch.device("cuda", 0))
    assert not cfg.triton and not cfg.fp8_head
    triton_lines = [note for note in notes if note.startswith("--triton=false here: ROCm;")]
    assert len(notes) == 2 and len(triton_lines) == 1 and "\n" not in triton_lines[0]
    assert "65,536" in triton_lines[0] and "torch twins run instead" in triton_lines[0]
    assert tg.device_ops(cfg, cuda=True)[0] is tg.TorchOps
    monkeypatch.setattr(torch.version, "hip", None)
    nvidia = tg.parse_args([])
    assert tg.fall_back(nvidia, torch.device("cuda", 0)) == [] and nvidia.triton
    assert tg.device_ops(nvidia, cuda=True)[0] is getattr(tg, "TritonOps", tg.TorchOps)


# --baseline (the GPT-2 recipe) on a small shape: rows of 128 tokens, learned positions, LayerNorm, GELU
GPT2_SHAPED = [
    "--baseline", "--device=cpu", "--n_layer=2", "--d_model=128", "--n_head=2", "--mlp_hidden=512", "--context=128",
    "--num_steps=3", "--batch_tokens=512,512,512", "--max_seq_len=512", "--accum_world_size=1", "--val_tokens=512",
    "--val_batch_tokens=512", "--val_every=0", "--log_every=0", "--progress=false", "--warmup_steps=1",
    f"--train_files={ROOT}/data/sample/sample_train_*.bin", f"--val_files={ROOT}/data/sample/sample_val_*.bin",
]


def test_compiled_gpt2_baseline_training(tmp_path):
    """The GPT-2 rung compiled (fullgraph) by inductor with the CPU attention: the warmup compiles every
    graph the run uses, the timed run none, and it trains finite. (Its flex-attention forward does not
    lower on the CPU: inductor finds no CPU flex template for it; the GPU's is untested here.)"""
    torch._dynamo.reset()
    cfg = tg.parse_args(GPT2_SHAPED + [f"--log_dir={tmp_path}", "--run_id=gpt2"])
    assert cfg.compile and cfg.position_embedding and cfg.context == 128 and cfg.norm == "layernorm"
    backend = tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, tg.BlockedAttention(cfg.window_block))
    trainer = tg.Trainer(cfg, backend, tg.RunLog(cfg, backend))
    per_step = []
    trainer.train_step = counting(per_step)(trainer.train_step)
    val_loss, _ = trainer.run()
    warmup = len(per_step) - trainer.schedule.total
    assert per_step[warmup:] == [0] * trainer.schedule.total and 5 < val_loss < 11.5


@pytest.mark.parametrize("stablemax, prefix", [(False, True), (True, False)])
def test_compiled_cpu_loss_matches_the_naive_loss(stablemax, prefix):
    """--compile_elementwise's loss (the blocks of rows compiled by inductor) against a plain
    log-softmax (or log-StableMax) written out here: the loss, its gradient, and the loss without one
    (validation); 70 rows, so two whole blocks and a partial one. The plain next-token loss returned
    beside it (next_token=True, the train line's), compiled and eager, is the first target's term."""
    gen = torch.Generator().manual_seed(5)
    n, vocab, cap, temp, offset, weights = 70, 300, 23.0, 7.5, 5.0, torch.tensor([1.0, 0.5])
    z = (4 * torch.randn(n, vocab, generator=gen)).bfloat16()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    prefixes = torch.randint(0, vocab, (n,), generator=gen)
    prefixes[::3] = tg.NO_PREFIX
    extra = (prefixes, torch.tensor([0.25])) if prefix else ()
    ops = tg.compiled_torch_ops()
    op = ops.stablemax_mtp_ce if stablemax else ops.softcap_mtp_ce

    def log_probs(logits):
        l = cap * torch.sigmoid((logits.float() + offset) / temp)
        a = torch.sign(l) * torch.log1p(l.abs()) if stablemax else l
        return a - torch.logsumexp(a, dim=-1, keepdim=True)

    def naive(logits):
        logp = log_probs(logits)
        out = torch.zeros(n)
        for k, w in enumerate(weights):
            out[: n - k] -= w * logp[torch.arange(n - k), targets[k:]]
        if prefix:
            has = prefixes >= 0
            out[has] -= 0.25 * logp[has.nonzero()[:, 0], prefixes[has]]
        return out

    got_z, want_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = op(got_z, targets, weights, cap, temp, offset, *extra), naive(want_z)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    (got * torch.arange(n)).sum().backward()
    (want * torch.arange(n)).sum().backward()
    assert got_z.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got_z.grad.float(), want_z.grad.float(), rtol=2**-7, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(op(z, targets, weights, cap, temp, offset, *extra), want.detach(), rtol=1e-5, atol=1e-4)
    plain = -log_probs(z)[torch.arange(n), targets]
    for table in (ops, tg.TorchOps):
        fn = table.stablemax_mtp_ce if stablemax else table.softcap_mtp_ce
        loss, next_token = fn(z.clone().requires_grad_(), targets, weights, cap, temp, offset, *extra, next_token=True)
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(next_token, plain, rtol=1e-5, atol=1e-4)
        assert loss.requires_grad and not next_token.requires_grad


def test_the_cpu_backend_keeps_freed_memory_for_reuse():
    """After setup_backend on a CPU, a large tensor freed stays mapped in the process, and eight more
    allocated and freed in turn grow the heap by at most one tensor (reused, not mapped anew), where
    by default (the reference: a process without it) the freed memory is unmapped at once. In
    subprocesses: the setting is for the whole process. The test reads the mappings, not page faults:
    a CI host once counted a fault per page on a reused tensor's first touch, where this host counts
    none (faults also count a kernel's NUMA-hinting and swap-cache hits)."""
    import subprocess
    import sys

    script = (
        "import sys, torch, train_gpt as tg\n"
        "if sys.argv[1] == 'on': tg.setup_backend(tg.parse_args(['--preset=cpu']))\n"
        "def spans():\n"
        "    return [(*(int(a, 16) for a in line.split()[0].split('-')), line) for line in open('/proc/self/maps')]\n"
        "def heap():\n"
        "    return sum(hi - lo for lo, hi, line in spans() if '[heap]' in line)\n"
        "x = torch.ones(2**24)\n"  # 64 MB, touched
        "address = x.data_ptr()\n"
        "del x\n"
        "mapped = any(lo <= address < hi for lo, hi, _ in spans())\n"
        "first = heap()\n"
        "for _ in range(8):\n"
        "    torch.ones(2**24).sum()\n"
        "print(int(mapped), heap() - first)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kept = {mode: [int(v) for v in subprocess.run([sys.executable, "-c", script, mode], cwd=root, capture_output=True,
                                                  text=True, check=True).stdout.split()] for mode in ("off", "on")}
    assert kept["off"][0] == 0, kept  # the reference: the freed tensor's pages went back to the OS
    assert kept["on"][0] == 1, kept  # kept in the process
    assert kept["on"][1] <= 2**26 + 2**20, kept  # and reused: the heap did not grow by a tensor per allocation
