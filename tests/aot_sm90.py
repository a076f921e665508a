"""Compile every Triton kernel of train_gpt.py for H100 (sm_90), or any other architecture, without a GPU
and report its figures.

Each kernel is compiled at the record's shapes with the dtypes the model really feeds it, as recorded
by a spy on the ops table during a training step (tests/op_spy.py), not with hand-picked ones.

Run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled). Prints one JSON object:
kernel -> registers, spill stores/loads (from the wheel's ptxas), shared memory bytes, wgmma used.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import op_spy  # noqa: E402
import train_gpt as T  # noqa: E402

H100 = triton.backends.compiler.GPUTarget("cuda", 90, 32)
TOKENS, WIDTH, HIDDEN, VOCAB = 49152, 768, 3072, 50304  # one rank's record batch and the model widths
CE_SCALARS = dict(cap=30.0, inv_temp=1 / 7.5, offset=0.0, NUM_WEIGHTS=3, SOFTCAP=True, BLOCK_V=T.CE_BLOCK_V)
PREFIX_ON = ["--prefix_loss=0.25"]  # #88: the loss op then also takes the prefix targets and their weight
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64"}


def recorded_pointers():
    """op -> Triton pointer types of its tensor arguments, as the model feeds them on CUDA (under CUDA's
    autocast rules, tables stored in bf16: tests/op_spy.py)."""
    seen = {}
    for name, args in op_spy.record_op_inputs(PREFIX_ON, cuda_rules=True, table_dtype=torch.bfloat16):
        if name not in op_spy.OPERANDS:  # attention and the residual stream: not Triton kernels of ours
            continue
        types = [POINTER[dtype] for dtype, _ in args]
        if seen.setdefault(name, types) != types:
            raise RuntimeError(f"{name} is called with different dtypes: {seen[name]} and {types}")
    return seen


def sym_args(a, m, n, axpby):
    return dict(a_ptr=a, out_ptr=a, m=m, n=n, s_ab=m * n, s_am=n, s_an=1, s_ob=m * m, s_om=m, s_on=1,
                alpha=-2.0, beta=0.5, AXPBY=axpby, BLOCK=T.SYM_BLOCK, BLOCK_K=T.SYM_BLOCK_K, DOT_FP32=False)


def kernel_table(pointers):
    """name -> (kernel, arguments at the record's shapes with the recorded dtypes, launch options, multiplies)."""
    (gram,), (sym,) = pointers["sym_mm"], pointers["sym_axpby"]
    x, w = pointers["linear_relu2"]
    z, t, mtp, prefix, prefix_weight = pointers["softcap_mtp_ce"]

    def ce_kernels(p, pw):
        """The two loss kernels, with the #88 prefix target (pointers) or without (None)."""
        return (
            (T._softcap_ce_fwd_kernel,
             dict(z_ptr=z, t_ptr=t, w_ptr=mtp, p_ptr=p, pw_ptr=pw, loss_ptr="*fp32", next_ptr="*fp32", lse_ptr="*fp32",
                  n_rows=TOKENS, vocab=VOCAB, s_z=VOCAB, **CE_SCALARS),
             dict(num_warps=T.CE_WARPS), False),
            (T._softcap_ce_bwd_kernel,
             dict(z_ptr=z, t_ptr=t, w_ptr=mtp, p_ptr=p, pw_ptr=pw, lse_ptr="*fp32", grad_ptr="*fp32", dz_ptr=z, n_rows=TOKENS,
                  vocab=VOCAB, s_z=VOCAB, s_dz=VOCAB, **CE_SCALARS),
             dict(num_warps=T.CE_WARPS), False),
        )

    ce_fwd, ce_bwd = ce_kernels(None, None)
    ce_fwd_prefix, ce_bwd_prefix = ce_kernels(prefix, prefix_weight)
    return {
        "sym_mm": (T._sym_mm_kernel, sym_args(gram, WIDTH, HIDDEN, False), dict(num_warps=T.SYM_WARPS, num_stages=T.SYM_STAGES), True),
        "sym_axpby": (T._sym_mm_kernel, sym_args(sym, WIDTH, WIDTH, True), dict(num_warps=T.SYM_WARPS, num_stages=T.SYM_STAGES), True),
        "linear_relu2": (
            T._linear_relu2_kernel,
            dict(x_ptr=x, w_ptr=w, out_ptr=x, M=TOKENS, N=HIDDEN, K=WIDTH, s_xm=WIDTH, s_xk=1,
                 s_wn=WIDTH, s_wk=1, s_om=HIDDEN, s_on=1, BLOCK_M=T.MM_BLOCK_M, BLOCK_N=T.MM_BLOCK_N,
                 BLOCK_K=T.MM_BLOCK_K, GROUP_M=T.MM_GROUP_M, DOT_FP32=False),
            dict(num_warps=T.MM_WARPS, num_stages=T.MM_STAGES), True),
        "softcap_ce_fwd": ce_fwd,
        "softcap_ce_bwd": ce_bwd,
        "softcap_ce_fwd_prefix": ce_fwd_prefix,
        "softcap_ce_bwd_prefix": ce_bwd_prefix,
    }


KERNELS = kernel_table(recorded_pointers())


def specialize(kernel, args):
    """Signature, constexprs and attributes the way the JIT would specialize these arguments."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args[name]
        if i in kernel.constexprs or value is None or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, str):  # a pointer: torch allocations are 16-byte aligned
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def ptxas_report(ptx, workdir):
    """Registers and spills from `ptxas -v` of the wheel (the first binary that accepts this PTX version)."""
    path = os.path.join(workdir, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    errors = []
    for ptxas in sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*"))):
        run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", path + ".cubin"], capture_output=True, text=True)
        if run.returncode == 0:
            text = run.stdout + run.stderr
            return dict(ptxas=os.path.basename(ptxas),
                        registers=int(re.search(r"Used (\d+) registers", text).group(1)),
                        spill_stores=int(re.search(r"(\d+) bytes spill stores", text).group(1)),
                        spill_loads=int(re.search(r"(\d+) bytes spill loads", text).group(1)))
        errors.append(f"{os.path.basename(ptxas)}: {run.stderr.strip()[:300]}")
    raise RuntimeError("no ptxas accepted the PTX: " + "; ".join(errors))


def build(name, target, overrides):
    """Compile one kernel for `target` (overrides replace its arguments or launch options); its options too."""
    kernel, args, options, _ = KERNELS[name]
    args = {k: overrides.get(k, v) for k, v in args.items()}
    options = {k: overrides.get(k, v) for k, v in options.items()}
    signature, constexprs, attrs = specialize(kernel, args)
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options), kernel, options


def shared_memory(capabilities, **overrides):
    """kernel -> {capability: bytes of shared memory per block it needs when built for that
    architecture}, e.g. capabilities (80, 86): A100 and RTX 3090."""
    return {name: {c: build(name, triton.backends.compiler.GPUTarget("cuda", c, 32), overrides)[0].metadata.shared
                   for c in capabilities}
            for name in KERNELS}


def compile_report(name, **overrides):
    """Compile one kernel for H100 (overrides replace its arguments or launch options) and report its figures."""
    compiled, kernel, options = build(name, H100, overrides)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as workdir:
        report = ptxas_report(ptx, workdir)
    return dict(report, kernel=kernel.__name__, shared=compiled.metadata.shared, wgmma="wgmma" in ptx, **options)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    print(json.dumps({name: compile_report(name) for name in (sys.argv[1:] or KERNELS)}, indent=1))
