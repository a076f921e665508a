import torch, warnings, train_gpt as tg, sys
warnings.simplefilter("ignore")
sys.path.insert(0, "tests")
from test_model import TINY, BOS
def run(cfg, compiled, dtype=torch.float32):
    torch.manual_seed(0)
    m = tg.GPT(cfg, tg.TorchOps, tg.BlockedAttention(cfg.window_block), dtype)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0: p.normal_(0, 0.02)
    m = m.to(dtype) if dtype == torch.float64 else m
    idx = torch.randint(0, BOS, (256,), generator=torch.Generator().manual_seed(1)); idx[[0, 100]] = BOS
    torch._dynamo.reset()
    f = torch.compile(m, fullgraph=True, dynamic=False) if compiled else m
    loss = f(idx, idx, (64, 32), torch.tensor([1.0, 0.5], dtype=dtype)); loss.backward()
    return {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
for extra in ([], ["--key_offset=false"], ["--yarn=false"], ["--attn_gate=false"]):
    cfg = tg.parse_args(TINY + extra)
    ge, gc = run(cfg, False), run(cfg, True)
    n = "blocks.0.attn.k"
    print(extra, "k err/scale", (ge[n]-gc[n]).abs().max().item() / ge[n].abs().max().item())
