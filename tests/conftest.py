import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Triton picks interpreter or compiler when a kernel is decorated, i.e. when train_gpt is first
# imported; set it here, before any test module imports train_gpt, so the Triton kernels run on CPU
# tensors. CPU code paths ignore it; the sm_90 compile check runs in a subprocess without it.
os.environ["TRITON_INTERPRET"] = "1"
