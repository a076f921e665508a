"""The estimated peak memory of a run (train_gpt.memory_estimate, what the trainer checks before it
trains) against the peak measured on the CPU, for a few small shapes. Prints a markdown table.

    python bench/memory.py

Measured: a fresh process imports torch and train_gpt, runs one small matmul and its backward (the
runtime's own first-use memory: kernels, thread pools), reads its high-water resident memory
(ru_maxrss), trains four steps of the shape (Adam steps on steps 1 and 3, so its moments and its
gradients held in between are there, as through the rest of a run) and validates at the end, and
reads it again: the difference is what the run added at its peak. It includes what the estimate
leaves out (the token shards the loaders hold, Python objects, the allocator's fragmentation),
which is why the shapes are large enough for the tensors to dominate.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_gpt as T  # noqa: E402

SAMPLE = [f"--train_files={ROOT}/data/sample/sample_train_*.bin", f"--val_files={ROOT}/data/sample/sample_val_*.bin"]
RUN = ["--preset=cpu", "--compile_elementwise=false", "--num_steps=4", "--extension_steps=0", "--val_every=0",
       "--log_every=0", "--save_final=false", "--progress=false", "--max_seq_len=512", "--window_block=64",
       "--long_windows=2,2,2", "--extension_window=2", "--final_window=2", "--val_tokens=8192"]
TWO_LAYERS = ["--n_layer=2", "--d_model=64", "--n_head=2", "--head_dim=32", "--mlp_hidden=128", "--long_window_layers=1",
              "--value_embeds=2", "--skip_from=0", "--skip_to=1", "--backout_layer=0"]
FOUR_LAYERS = ["--n_layer=4", "--d_model=256", "--n_head=4", "--head_dim=64", "--mlp_hidden=1024", "--long_window_layers=1,3",
               "--value_embeds=2", "--skip_from=1", "--skip_to=2", "--backout_layer=2", "--long_windows=4,4,4",
               "--extension_window=4", "--final_window=4"]
# name -> train_gpt flags (after RUN and SAMPLE)
SHAPES = {
    "2 x 64, 1,024-token batches": TWO_LAYERS + ["--batch_tokens=1024,1024,1024", "--val_batch_tokens=1024"],
    "2 x 64, 4,096-token batches": TWO_LAYERS + ["--batch_tokens=4096,4096,4096", "--val_batch_tokens=1024"],
    "2 x 64, 8,192-token validation passes": TWO_LAYERS + ["--batch_tokens=1024,1024,1024", "--val_batch_tokens=8192"],
    "4 x 256, 4,096-token batches": FOUR_LAYERS + ["--batch_tokens=4096,4096,4096", "--val_batch_tokens=1024"],
    "4 x 256, 4,096-token batches, checkpointed": FOUR_LAYERS + ["--batch_tokens=4096,4096,4096", "--val_batch_tokens=1024",
                                                                "--activation_checkpointing=true"],
}

CHILD = """
import json, resource, sys
import torch
import train_gpt as T

def high_water():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

argv = json.loads(sys.argv[1])
dtype = T.cpu_compute_dtype(T.parse_args(argv).cpu_dtype)
x = torch.randn(64, 64, requires_grad=True)
with torch.autocast("cpu", dtype=dtype, enabled=dtype.itemsize == 2):
    y = (x @ x).float().sum()
y.backward()
before = high_water()
T.main(argv)
print(json.dumps(high_water() - before))
"""


def flags(shape):
    return RUN + SAMPLE + SHAPES[shape]


def measure(argv):
    """Bytes a run of train_gpt `argv` (on the CPU) adds to its process's high-water resident memory."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv + [f"--log_dir={tmp}"])], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout.splitlines()[-1])


def estimate(argv):
    """train_gpt's estimate for a run of `argv` on this CPU, one process."""
    cfg = T.parse_args(argv)
    return T.memory_estimate(cfg, T.Backend(torch.device("cpu"), 0, 1, *T.device_ops(cfg, cuda=False)))


def main():
    print("| shape (layers x width) | estimated peak (MiB) | at the | measured peak (MiB) | measured / estimated |")
    print("| --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        est, got = estimate(flags(shape)), measure(flags(shape))
        print(f"| {shape} | {est.peak / 2**20:,.0f} | {est.phase} | {got / 2**20:,.0f} | {got / est.peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
