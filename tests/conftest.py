import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Triton picks interpreter or compiler when a kernel is decorated, i.e. when train_gpt is first
# imported; set it here, before any test module imports train_gpt, so the Triton kernels run on CPU
# tensors. CPU code paths ignore it; the sm_90 compile check runs in a subprocess without it.
os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (`-n 2`, as CI runs) each worker takes one core: torch's default of one thread per
# core in every worker would oversubscribe the two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
