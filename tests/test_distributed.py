"""Distributed: gloo runs under torchrun match 1-process runs with gradient accumulation.

Runs that cut each batch into the same number of micro-batches, max(world size, accum_world_size),
see the same token pieces: 1 process takes them one after the other, N processes side by side
(ranks walk the documents in the same order) and average their gradients (NorMuon's and Adam's
reduce-scatters, Adam's launched from gradient hooks during the backward). Each run goes through the hook at the end of this file, which saves its first
gradients and parameters next to the metrics log, and fails the run if any thread outlives main().
"""
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist

import train_gpt as tg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS = 50256

# 3 layers: NorMuon's q/k/v/o group holds 12 matrices (on 8 ranks 2 each: ranks 6 and 7 own only
# padding), the MLP group 6 (up, transposed, and down; on 4 ranks 2 each with 2 padding slots) and
# the gate group 3 (fewer than 4 or 8 ranks; on 2 ranks the second owns one gate and one padding slot)
TINY = ["--preset=cpu", "--compile_elementwise=false", "--n_layer=3", "--d_model=32", "--n_head=1", "--head_dim=32", "--mlp_hidden=128",
        "--long_window_layers=1", "--window_block=32", "--long_windows=1,2,2", "--extension_window=2",
        "--final_window=2", "--batch_tokens=256,256,256", "--max_seq_len=128", "--val_tokens=256",
        "--val_batch_tokens=256", "--skip_from=-1", "--backout_layer=-1", "--num_steps=3",
        "--extension_steps=0", "--log_every=1", "--progress=false", "--momentum_warmup_steps=2",
        "--momentum_cooldown_steps=2", "--save_final=false"]
STEPS = 3
COMPARED_STEPS = 2  # gradients of the first 2 steps and the parameters after them are compared
PADDED_VOCAB = 50304  # 50,257 rounded up to a multiple of 128: the columns of the head

# The runs compute in float64 (see the hook at the end). Measured on this machine (torch 2.13 CPU,
# OMP_NUM_THREADS=1), 2, 4 and 8 ranks against 1 process, each gap relative to the tensor's largest
# entry:
# - gradients of steps 0 and 1, averaged over ranks as the optimizers average them: at most 4.8e-15;
#   only the order of the sums differs (accumulated micro-batches vs a gloo average);
# - parameters after those 2 steps: at most 1.4e-12 (every matrix moved by at least 0.11 of its
#   largest entry: a matrix left out of a shard or updated from another's gradient is that far off);
# - train losses of all 3 steps and the final val loss: equal.
# A wrong split moves the gradients far more: a missing or doubled factor by 0.5 or 1, other data by
# whole tokens' worth.
GRAD_TOL = 1e-12
PARAM_TOL = 1e-9
LOSS_TOL = 1e-6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    e.pop("TRITON_INTERPRET", None)
    return e


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist_data")
    rng = np.random.default_rng(0)
    docs, total = [], 0
    while total < 10000:  # 3 steps x 264 tokens, with tails of long documents dropped
        d = np.concatenate([[BOS], rng.integers(0, 64, rng.integers(20, 300))])
        docs.append(d)
        total += d.size
    tokens = np.concatenate(docs)
    tg.write_shard(str(folder / "d_train_000000.bin"), tokens)
    tg.write_shard(str(folder / "d_val_000000.bin"), tokens[-3000:])
    return [f"--train_files={folder}/d_train_*.bin", f"--val_files={folder}/d_val_*.bin"]


def run(args, nproc, log_dir, run_id):
    """train_gpt.main on `nproc` gloo processes, through the hook at the end of this file."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    cmd += [os.path.abspath(__file__), *args, f"--log_dir={log_dir}", f"--run_id={run_id}"]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def failure(out):
    """The child's own error lines (torchrun's summary alone does not say what went wrong)."""
    lines = (out.stdout + out.stderr).splitlines()
    keep = [l for l in lines if "Error" in l or "error" in l or l.startswith("  File")]
    return "\n".join(keep[-40:])


def train(args, nproc, log_dir, run_id):
    """Run; return its metrics by kind, its gradients of the compared steps and the parameters after them."""
    start = time.perf_counter()
    out = run(args, nproc, log_dir, run_id)
    assert out.returncode == 0, failure(out)
    print(f"{run_id}: {nproc} process(es), {time.perf_counter() - start:.0f}s")
    by_kind = {}
    with open(os.path.join(log_dir, f"{run_id}.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            by_kind.setdefault(m["kind"], []).append(m)
    saved_path = os.path.join(log_dir, f"{run_id}.pt")
    saved = torch.load(saved_path)
    os.remove(saved_path)  # the embedding tables make it tens of MB
    return by_kind, saved["grads"], saved["params"]


def largest_gap(a, b, scale=1.0):
    """max |a - scale * b| over the tensors of two dicts, relative to each tensor's largest entry in a."""
    assert a.keys() == b.keys()
    return max((((a[k] - scale * b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a), default=0.0)


def loss_gaps(ref, other, kind, key):
    return [abs(a[key] - b[key]) for a, b in zip(ref[kind], other[kind], strict=True)]


def test_split_batch():
    """(parts, accum, loss factor) worked out by hand: each batch is cut into lcm(world,
    accum_world_size) micro-batches, and the gradient is the global sum / accum_world_size when each
    rank's loss is scaled by the factor and the ranks average."""
    speedrun = tg.parse_args([])  # accum_world_size 8; batches 131072, 262144, 393216 and val 2097152
    cases = {1: (8, 8, 1 / 8), 2: (8, 4, 1 / 4), 4: (8, 2, 1 / 2), 8: (8, 1, 1.0), 16: (16, 1, 2.0),
             32: (32, 1, 4.0), 131072: (131072, 1, 16384.0)}
    for world, expected in cases.items():
        assert tg.split_batch(speedrun, world) == expected
    for world, lcm in ((3, 24), (6, 24), (12, 24), (24, 24), (262144, 262144)):  # 131072 = 2^17 tokens
        with pytest.raises(SystemExit) as e:
            tg.split_batch(speedrun, world)
        assert e.value.code == (
            f"error: world size {world} cannot split the batches of preset speedrun (accum_world_size=8, "
            "batch_tokens=131072,262144,393216, val_batch_tokens=2097152): "
            f"lcm({world}, 8) = {lcm} micro-batches must divide every batch; "
            "world sizes that work: 1, 2, 4, 8, 16, 32, 64, 128, ...")
    # cpu preset: accum_world_size 1, batches 2048, 4096, 6144, val 8192: any power of 2 up to 2048
    cpu = tg.parse_args(["--preset=cpu"])
    assert tg.split_batch(cpu, 1) == (1, 1, 1.0)
    assert tg.split_batch(cpu, 2) == (2, 1, 2.0)
    assert tg.split_batch(cpu, 2048) == (2048, 1, 2048.0)
    with pytest.raises(SystemExit) as e:
        tg.split_batch(cpu, 4096)
    assert "world size 4096" in e.value.code
    # accum_world_size 6 with batches of 12 and 24 tokens: 1, 2, 3, 6 accumulate, 12 splits, 4 does
    # both (12 micro-batches, 3 per rank); 8 and 24 would need 24 micro-batches of a 12-token batch
    six = tg.parse_args(["--preset=cpu", "--accum_world_size=6", "--batch_tokens=12,24,24", "--val_batch_tokens=24"])
    assert tg.split_batch(six, 3) == (6, 2, 0.5)
    assert tg.split_batch(six, 12) == (12, 1, 2.0)
    assert tg.split_batch(six, 4) == (12, 3, 4 / 6)
    for world in (8, 24):
        with pytest.raises(SystemExit) as e:
            tg.split_batch(six, world)
        assert e.value.code.endswith(f"lcm({world}, 6) = 24 micro-batches must divide every batch; "
                                     "world sizes that work: 1, 2, 3, 4, 6, 12")
    # a batch that does not split over accum_world_size is refused whatever the world size
    for args in (["--accum_world_size=3"], ["--accum_world_size=2", "--val_batch_tokens=8193"]):
        with pytest.raises(SystemExit) as e:
            tg.split_batch(tg.parse_args(["--preset=cpu", *args]), 1)
        assert "does not split over accum_world_size=" in e.value.code


def ranks_match_one_process(args, worlds, tmp_path, name):
    """Train `args` on one process accumulating 8 micro-batches, then on each of `worlds` gloo ranks:
    the gradients, the parameters after COMPARED_STEPS steps and the losses agree within the
    tolerances above, the config is the same and only rank 0 writes logs."""
    args = args + ["--accum_world_size=8", "--val_every=0"]
    metrics, grads, params = train(args, 1, tmp_path, f"{name}1")
    # not vacuous: every matrix has a gradient by step 1, and train_loss is a per-token mean (at
    # init about ln(vocab) per target; up to 3 targets weighted 1, 1/2, 1/4), not a sum
    assert all(g.abs().max() > 0 for name, g in grads[1].items() if name.startswith("blocks.") and "lambdas" not in name)
    assert math.log(PADDED_VOCAB) < metrics["train"][0]["train_loss"] < 1.75 * math.log(PADDED_VOCAB)
    for world in worlds:
        m, g, p = train(args, world, tmp_path, f"{name}{world}")
        grad_gap = max(largest_gap(a, b) for a, b in zip(grads, g, strict=True))
        param_gap = largest_gap(params, p)
        train_gap, val_gap = max(loss_gaps(metrics, m, "train", "train_loss")), loss_gaps(metrics, m, "val", "val_loss")[0]
        print(f"{world} ranks: grads {grad_gap:.1e} params {param_gap:.1e} train {train_gap:.1e} val {val_gap:.1e}")
        assert grad_gap < GRAD_TOL and param_gap < PARAM_TOL and train_gap < LOSS_TOL and val_gap < LOSS_TOL
        assert [x["step"] for x in m["train"]] == [1, 2, 3] and [x["step"] for x in m["val"]] == [STEPS]
        assert m["final"][0]["val_loss"] == m["val"][-1]["val_loss"]
        assert {k: v for k, v in m["config"][0].items() if k != "run_id"} == {k: v for k, v in metrics["config"][0].items() if k != "run_id"}
    # only rank 0 writes logs
    files = sorted(f.name for f in tmp_path.iterdir() if f.is_file() and f.name.startswith(name))
    assert files == sorted(f"{name}{w}.{ext}" for w in (1, *worlds) for ext in ("jsonl", "txt"))
    return metrics


def test_two_and_eight_ranks_match_one_process_with_accumulation(tmp_path, data):
    """2 ranks each accumulate 4 of the 8 micro-batches, 8 ranks take one each."""
    ranks_match_one_process(TINY + data, (2, 8), tmp_path, "w")


# HEAD's switches (the head preset's, on TINY's 3 layers with two heads) and so every optimizer group
# they add: the bigram table (Adam, sharded by rows), value-embedding gates, sublayer and post lambdas,
# MUDD and its gate (with the XSA and DC columns), Q/K orthogonalized per head pair. Left out: the FP8
# MLP, whose rounding to 8 bits turns the runs' 1e-15 differences into whole FP8 steps in a few entries
# (its own tests hold it to an eager run), and #57's bf16 weights, which these float64 runs cannot hold
# (their own 1, 2 and 8 rank test is below).
HEAD_TINY = TINY + [
    "--n_head=2", "--head_dim=16", "--skip_from=0", "--skip_to=2", "--backout_layer=1", "--softcap=23", "--softcap_offset=5", "--value_embeds=1", "--ve_layout=0.0",
    "--ve_init_std=0.01", "--ve_gate=x_ve", "--qk_head_pairs=true", "--bigram_vocab=512", "--bigram_signs=64",
    "--rounded_stages=true", "--untie_after_adam=true", "--prefix_loss=0.25", "--muon_beta2=0.9", "--attn_lr_mul=1",
    "--adam_eps=1e-10", "--head_wd_mul=150", "--value_embed_wd_mul=5", "--scalar_freeze_steps=0",
    "--adam_betas=0.5,0.95", "--value_embed_betas=0.75,0.95", "--smear_gate_betas=0.9,0.99", "--sublayer_resid=true",
    "--post_lambdas=true", "--lane_layer=0", "--paired_head_layers=0", "--mudd=true", "--mudd_gate=true",
    "--mudd_gate_layer=1", "--mudd_gate_attn=0,2", "--attn_gate=false", "--xsa_layers=1,2", "--dc_layers=2",
    "--uniform_attn_init=true",
]


def test_head_switches_on_two_and_eight_ranks_match_one_process(tmp_path, data):
    ranks_match_one_process(HEAD_TINY + data, (2, 8), tmp_path, "h")


# The GPT-2 rung (#1, --baseline): AdamW alone, the rows of its matrices and tables split over the ranks,
# and the clip to a global gradient norm, which must count each rank's rows once and each replicated
# vector once, not once per rank; at 0.05 it clips every step
BASELINE_TINY = TINY + ["--baseline", "--context=64", "--grad_clip=0.05"]


def test_gpt2_rung_on_eight_ranks_matches_one_process(tmp_path, data):
    """Every parameter is AdamW's, whose hooks average the gradients in place: they reach the
    comparison through the parameters after the clipped steps (a clip that counted each replicated
    vector once per rank is 1e-1 off; the ranks' own norms summed in fp32 from fp64 gradients were
    2e-8 off, now summed in at least fp32: 7e-14)."""
    metrics = ranks_match_one_process(BASELINE_TINY + data, (8,), tmp_path, "b")
    # grad_norm: the summed loss's gradient over the step's 256 tokens; the clip is on the mean's
    assert all(m["grad_norm"] / 256 > 2 * 0.05 for m in metrics["train"])


def test_more_ranks_than_accum_world_size(tmp_path, data):
    """2 ranks at accum_world_size=1 cut each batch into 2 slices, one each: the pieces 1 process
    takes at accum_world_size=2. Their gradient is the global sum / 1, twice the other run's sum / 2.

    Only step 0's gradients are compared, not the parameters: the optimizers see the gradient's
    scale where it is tiny. Polar Express divides by |g| + 1e-6, so the gates' step-1 gradient (norm 3e-4) starts its iterations at
    singular value 0.976 or 0.980 and ends at 1.08 or 0.87; Adam's eps moves the value embeddings by
    0.17 of their largest entry. That is why every world size must keep the record's scale."""
    args = TINY + data + ["--val_every=3"]
    one, grads1, _ = train(args + ["--accum_world_size=2"], 1, tmp_path, "accum2_w1")
    two, grads2, _ = train(args + ["--accum_world_size=1"], 2, tmp_path, "accum1_w2")
    grad_gap = largest_gap(grads2[0], grads1[0], scale=2.0)  # step 1's depend on the parameters (below)
    train_gap = max(loss_gaps(one, two, "train", "train_loss")[:COMPARED_STEPS])
    # the plain next-token loss is averaged over ranks like train_loss: rank 0's half alone would differ
    next_gap = max(loss_gaps(one, two, "train", "next_token_loss")[:COMPARED_STEPS])
    val_gap = loss_gaps(one, two, "val", "val_loss")[0]  # at step 0: the same slices, split over ranks
    print(f"2 ranks vs 1 process: grads (x 2) {grad_gap:.1e} train {train_gap:.1e} next-token {next_gap:.1e} "
          f"val at step 0 {val_gap:.1e}")
    assert grad_gap < GRAD_TOL and train_gap < LOSS_TOL and next_gap < LOSS_TOL and val_gap < LOSS_TOL
    assert [x["step"] for x in two["val"]] == [0, STEPS]


def test_ranks_that_neither_divide_nor_multiply_accum_world_size(tmp_path, data):
    """3 ranks at accum_world_size=2 cut each batch into lcm(3, 2) = 6 micro-batches, 2 per rank: the
    pieces 1 process takes at accum_world_size=6. Their gradient is the global sum / 2, three times
    the other run's sum / 6 (compared at step 0, as above)."""
    args = TINY + data + ["--val_every=3", "--batch_tokens=384,384,384", "--val_batch_tokens=384", "--val_tokens=384"]
    one, grads1, _ = train(args + ["--accum_world_size=6"], 1, tmp_path, "accum6_w1")
    three, grads3, _ = train(args + ["--accum_world_size=2"], 3, tmp_path, "accum2_w3")
    # the zero-initialized output projections leave the matrices before them and some scalars a
    # step-0 gradient of zero or rounding noise (1e-16), whose sums in another order (3 ranks of 2,
    # not 6 one after the other) differ wholly; the rest agree to 2.5e-14
    real = {k for k, g in grads1[0].items() if g.abs().max() > 1e-12}
    assert {"lm_head", "blocks.0.attn.o", "blocks.2.mlp.down"} <= real
    grad_gap = largest_gap({k: grads3[0][k] for k in real}, {k: grads1[0][k] for k in real}, scale=3.0)
    val_gap = loss_gaps(one, three, "val", "val_loss")[0]
    print(f"3 ranks at accum 2 vs 1 process at accum 6: grads (x 3) {grad_gap:.1e} val at step 0 {val_gap:.1e}")
    assert grad_gap < GRAD_TOL and val_gap < LOSS_TOL and abs(one["train"][0]["train_loss"] - three["train"][0]["train_loss"]) < LOSS_TOL


def test_a_world_size_that_fits_no_rule_is_refused(tmp_path, data):
    args = TINY + data + ["--accum_world_size=3", "--batch_tokens=1539,1539,1539", "--val_batch_tokens=1539"]
    out = run(args, 2, tmp_path, "bad")
    assert out.returncode != 0
    assert "error: world size 2 cannot split the batches of preset cpu (accum_world_size=3" in out.stderr
    assert "lcm(2, 3) = 6 micro-batches must divide every batch; world sizes that work: 1, 3, 9, 19, 27, 57, 81, 171, ..." in out.stderr


def threads_alive():
    """The names of this process's native threads other than the calling one (Linux: /proc); threads
    Python started (inductor's compile pool, tqdm's monitor) are joined or let go at exit, not aborted."""
    python_threads = {str(t.native_id) for t in threading.enumerate()}
    names = []
    for task in os.listdir("/proc/self/task"):
        if task not in python_threads:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
    return sorted(names)


def train_and_save():
    """Test-only hook (this file run under torchrun): train as train_gpt.py does; rank 0 saves the
    gradients of the first COMPARED_STEPS steps, averaged over ranks as the optimizers average them,
    and the parameters after them to <log_dir>/<run_id>.pt. A thread still running after main(),
    whether it returned or raised, fails the run: gloo's workers alive at interpreter exit can abort
    a rank (see setup_backend), rarely, so the test asserts the cause, which is there every time."""
    run_trainer = tg.Trainer.run

    def run_and_save(trainer):
        grads, params, optimizer_step, adam = [], {}, trainer.optimizers.step, trainer.optimizers.adam
        hooked = {id(p) for group in adam.param_groups for p in group["params"]}

        def step(i, *args, **kwargs):
            if i < COMPARED_STEPS:
                grads.append({})
                for name, p in trainer.model.named_parameters():
                    # an armed Adam's hooks have already averaged its gradients in place (each rank
                    # keeping its rows): those reach the comparison through the parameters
                    if p.grad is not None and not (adam.armed and id(p) in hooked):
                        grads[i][name] = p.grad.clone()
                        if dist.is_initialized():
                            dist.all_reduce(grads[i][name], op=dist.ReduceOp.AVG)
            optimizer_step(i, *args, **kwargs)
            if i == COMPARED_STEPS - 1:
                params.update((name, p.detach().clone()) for name, p in trainer.model.named_parameters())

        trainer.optimizers.step = step
        result = run_trainer(trainer)
        if trainer.backend.is_master:
            torch.save(dict(grads=grads, params=params), os.path.join(trainer.cfg.log_dir, f"{trainer.cfg.run_id}.pt"))
        return result

    tg.Trainer.run = run_and_save
    # float64 throughout: Adam divides by sqrt(v) + 1e-8, so in float32 a gradient entry near zero
    # whose sums were added in another order (micro-batches vs ranks) moves its weight by up to lr
    # differently (value embeddings 8.5e-4 of their largest entry apart after 2 steps); in float64
    # the runs agree to 1e-12, and any real difference in the math stands out
    torch.set_default_dtype(torch.float64)
    tg.cpu_compute_dtype = lambda choice: torch.float64
    try:
        tg.main()
    except Exception:
        traceback.print_exc()  # the run's own error first: a failed thread check below would replace it
        raise
    finally:
        alive = threads_alive()
        if alive:
            raise SystemExit(f"error: threads still running after main() ended: {', '.join(alive)}")


if __name__ == "__main__":
    train_and_save()
