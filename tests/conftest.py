import os
import sys

import pytest

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


# Test models run the elementwise passes eager (--compile_elementwise=false in each file's flags, where
# the cpu preset compiles them): compiling them anew in every test would add minutes to the suite.
# tests/test_backend.py and tests/test_train.py check the compiled ones against eager.
@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles as a fresh process would: torch.compile's caches (and its limit of graphs per
    function) would otherwise fill with every earlier test's shapes."""
    yield
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()


PATTERN = "a b c d e f g h"  # the tiny checkpoint's training text is this, over and over
PATTERN_REPEATS = 8  # per document: 64 tokens after its BOS
TINY_STEPS = 15  # untie at step 10, YaRN at step 5 (long window 1 -> 2 blocks)
TINY_DOCS = 3 * TINY_STEPS + 10  # a step reads 129 tokens: two 64-token pieces (max_seq_len) and one more


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The final checkpoint of a tiny model trained by the Trainer on documents that repeat PATTERN, with the untie step and a YaRN window change behind it."""
    import types
    import warnings

    import numpy as np
    import torch

    import train_gpt as tg
    from data.tokenize_corpus import gpt2_encoding

    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    doc = [tg.BOS_ID] + gpt2_encoding().encode_ordinary(" ".join([PATTERN] * PATTERN_REPEATS))
    tg.write_shard(folder / "tiny_train_000000.bin", np.array(doc * TINY_DOCS))
    tg.write_shard(folder / "tiny_val_000000.bin", np.array(doc * 10))
    cfg = tg.parse_args([
        "--preset=cpu", "--compile_elementwise=false", "--n_layer=2", "--d_model=64", "--n_head=2", "--head_dim=32",
        "--mlp_hidden=128", "--long_window_layers=1", "--value_embeds=2", "--window_block=64", "--long_windows=1,2,2", "--extension_window=2",
        "--final_window=2", "--max_seq_len=64", "--skip_from=0", "--skip_to=1", "--backout_layer=0",
        f"--num_steps={TINY_STEPS}", "--batch_tokens=128,128,128", "--val_every=0", "--log_every=0",
        "--val_tokens=256", "--val_batch_tokens=128", "--progress=false", "--run_id=tiny",
        f"--log_dir={folder}", f"--train_files={folder}/tiny_train_*.bin", f"--val_files={folder}/tiny_val_*.bin",
        # lrs well above the cpu preset's, and next-token loss only: the pattern is learnt in 15 steps
        "--value_embeds=0", "--adam_lr=0.1", "--muon_lr=0.05", "--mtp=false",
    ])
    backend = tg.setup_backend(cfg)
    log = tg.RunLog(cfg, backend)
    # trained in fp32: this host multiplies bf16 several times slower; the tests run it in bf16
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(tg, "COMPUTE_DTYPE", torch.float32)
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")  # it then runs in fp32, as meant
        trainer = tg.Trainer(cfg, backend, log)
        val_loss, _ = trainer.run()
    log.close()
    path = tg.checkpoint_path(tg.checkpoint_dir(cfg), TINY_STEPS)  # the run's own final checkpoint
    return types.SimpleNamespace(path=path, cfg=cfg, model=trainer.model, val_loss=val_loss, pattern=PATTERN)
