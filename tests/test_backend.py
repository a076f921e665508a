"""Backend: the CUDA attention's block mask, and the compiled model the GPU runs, on the CPU.

The block mask is built from document boundaries at 128-token block level; it must equal what
create_block_mask finds by evaluating every (query, key) pair. The compiled checks run inductor on
the CPU, as the GPU would compile: flex attention (forward only: it has no CPU backward) and the
CPU attention (forward and backward, through the Trainer) through every stage change of the
schedule and the final validation, counting the graphs dynamo builds.
"""
import os
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

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
    def allowed(b, h, q, k):
        return (docs[q] == docs[k]) & (k <= q) & (q - k < window)

    return create_block_mask(allowed, None, None, docs.numel(), docs.numel(), device="cpu")


def listed(counts, indices):
    """Per query (or key) block, the sorted block indices a BlockMask lists."""
    return [sorted(indices[0, 0, i, : counts[0, 0, i]].tolist()) for i in range(counts.shape[-1])]


# lengths on and off the 128 grid; windows below, at and above a block; one to many documents
@pytest.mark.parametrize("n, docs, window, seed", [
    (1024, 1, 1024, 0), (1000, 3, 128, 1), (1537, 7, 384, 2), (300, 2, 1, 3), (2048, 20, 896, 4),
    (777, 40, 200, 5), (1280, 4, 5000, 6), (129, 1, 64, 7),
])
def test_block_mask_equals_create_block_mask(n, docs, window, seed):
    doc_ids = packing(n, docs, seed)
    got = tg.FlexAttention().mask(doc_ids, window)
    want = reference_mask(doc_ids, window)
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


def compiled_trainer(tmp_path, attention, run_id):
    torch._dynamo.reset()
    cfg = tg.parse_args(SPEEDRUN_SHAPED + [f"--log_dir={tmp_path}", f"--run_id={run_id}"])
    assert cfg.compile and cfg.fp8_head and cfg.mtp and cfg.yarn and cfg.untie_frac < 1
    backend = tg.Backend(torch.device("cpu"), 0, 1, tg.TorchOps, attention)
    return tg.Trainer(cfg, backend, tg.RunLog(cfg, backend))


def stage_graphs(schedule):
    """Graphs a run must compile for its steps: one per distinct (batch, window, MTP length, tied)."""
    return len({(schedule.batch_tokens(s), schedule.long_window_blocks(s), len(schedule.mtp_weights(s)),
                 schedule.untie_step is None or s < schedule.untie_step) for s in range(schedule.total)})


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


def test_compiled_training_through_every_stage(tmp_path):
    """Forward and backward compiled, with the CPU attention, and the optimizers' updates compiled:
    the untimed warmup compiles every stage (and the untie) and the final validation, and the timed run
    compiles nothing."""
    trainer = compiled_trainer(tmp_path, tg.BlockedAttention(128), "blocked")
    per_step, per_forward, per_optimizer_step = [], [], []
    trainer.train_step = counting(per_step)(trainer.train_step)
    trainer.forward = counting(per_forward)(trainer.forward)
    trainer.optimizers.step = counting(per_optimizer_step)(trainer.optimizers.step)
    start = graphs()
    val_loss, _ = trainer.run()
    total, schedule = trainer.schedule.total, trainer.schedule
    warmup = len(per_step) - total
    assert per_step[warmup:] == [0] * total
    # the optimizers: NorMuon's update and Adam's fused update compile in the warmup's steps (a
    # graph per group shape), never again; the model: a graph per stage in the warmup's steps
    optimizer_graphs = sum(per_optimizer_step)
    assert per_optimizer_step[warmup:] == [0] * total and optimizer_graphs > 0
    assert sum(per_step[:warmup]) == stage_graphs(schedule) + optimizer_graphs and stage_graphs(schedule) == 4
    # + the final validation's, in the warmup too
    assert sum(per_forward) == 5 and per_forward[-1] == 0 and graphs() - start == 5 + optimizer_graphs
    assert 5 < val_loss < 11


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
