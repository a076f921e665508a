"""The estimated peak memory of a run (train_gpt.memory_estimate, what the trainer checks before it
trains) against the peak measured on the CPU, for a few small shapes. Prints a markdown table.

    python bench/memory.py

Each shape trains four steps (Adam steps on steps 1 and 3, so its moments and the gradients it
holds in between are there, as through the rest of a run) and validates at the end. Measured twice:
the tensors: the most bytes of tensors alive at once, from torch.profiler's memory timeline (the
CPU's counterpart of CUDA's max_memory_allocated, what the record's log reports), which is what the
estimate counts;
the process: in a fresh process that has imported torch and train_gpt and run one small matmul and
its backward (the runtime's first-use memory: kernels, thread pools), how far the run raises its
high-water resident memory (VmHWM, Linux): the tensors plus what glibc's heap holds beyond them
(fragmentation; freed memory is kept for reuse, keep_freed_memory) and the token shards the loaders read.
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
    "2 x 64, 8,192-token validation passes": TWO_LAYERS + ["--batch_tokens=1024,1024,1024", "--val_batch_tokens=8192"],
    "4 x 256, 4,096-token batches": FOUR_LAYERS + ["--batch_tokens=4096,4096,4096", "--val_batch_tokens=1024"],
    "4 x 256, 4,096-token batches, checkpointed": FOUR_LAYERS + ["--batch_tokens=4096,4096,4096", "--val_batch_tokens=1024",
                                                                "--activation_checkpointing=true"],
    "4 x 256, 4,096-token batches of 1,024-token rows": FOUR_LAYERS + ["--batch_tokens=4096,4096,4096", "--val_batch_tokens=1024",
                                                                      "--context=1024"],
}

# ru_maxrss would not do: it carries over the high water of the process that started this one (Linux
# keeps it across exec); VmHWM is this process's own
CHILD = """
import json, sys
import torch
import train_gpt as T

def high_water():
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))  # kB

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


def live_peak(timeline):
    """The most bytes of tensors alive at once in a torch.profiler memory timeline."""
    live, total, peak = {}, 0, 0
    for _, action, (key, _), size in timeline:
        if action.name in ("PREEXISTING", "CREATE"):
            total += size - live.get(key, 0)
            live[key] = size
        elif action.name == "DESTROY":
            total -= live.pop(key, 0)
        peak = max(peak, total)
    return peak


def tensor_peak(argv):
    """The most bytes of tensors alive at once while train_gpt `argv` runs (in this process, on the CPU)."""
    profiler = torch.profiler
    with tempfile.TemporaryDirectory() as tmp:
        with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                              with_stack=True) as prof:
            T.main(argv + [f"--log_dir={tmp}"])
    return live_peak(prof._memory_profile().timeline)  # torch's own (private) accounting behind export_memory_timeline


def flags(shape):
    return RUN + SAMPLE + SHAPES[shape]


def process_peak(argv):
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
    print("| shape (layers x width) | estimated peak (MiB) | at the | tensors' peak (MiB) | / estimate | process's peak (MiB) | / estimate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        est, tensors, process = estimate(flags(shape)), tensor_peak(flags(shape)), process_peak(flags(shape))
        print(f"| {shape} | {est.peak / 2**20:,.0f} | {est.phase} | {tensors / 2**20:,.0f} | {tensors / est.peak:.3f} | "
              f"{process / 2**20:,.0f} | {process / est.peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
