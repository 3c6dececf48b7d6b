"""Compile every Triton kernel for a GPU target with Triton's real compiler (no GPU needed).

Run as a script (``python -m atlas_kernels_tests._compile_kernels``) with TRITON_INTERPRET unset:
the interpreter checks numerics but not what the compiler rejects (types, layouts, constexpr
use), so this compiles each kernel to PTX and cubin for sm_90 in the specializations the
launchers use: storage dtypes, compute dtypes, K, partition modes, scales, bias, split-K.
Prints one line per compiled specialization and exits non-zero on the first failure.
"""
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from atlas_kernels.kernels import _coef_grad, _compose, _group, _linear  # noqa: E402

TARGET = GPUTarget("cuda", int(os.environ.get("ATLAS_SM", "90")), 32)
INTS_64 = {"key"}


def signature(fn, ptr_types, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types[name]
        else:
            sig[name] = "i64" if name in INTS_64 else "i32"
    return sig


def build(fn, ptr_types, consts, num_warps=4, num_stages=3):
    src = ASTSource(fn, signature(fn, ptr_types, consts), dict(consts))
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    assert "cubin" in k.asm or "ptx" in k.asm
    return k


def main() -> int:
    count = 0
    storages = ["fp32", "bf16", "fp16", "i8", "fp8e4nv"]
    computes = ["fp32", "bf16", "fp16"]
    modes = [(1, 0), (3, 1), (4, 2)]  # (K, MODE): none, contiguous, hash
    for st, out, (k, mode) in itertools.product(storages, computes, modes):
        scaled = st in ("i8", "fp8e4nv")
        name = f"{st}/{out}/K{k}M{mode}"
        build(_compose._compose_kernel,
              dict(theta0_ptr="*" + out, tau_ptr="*" + st, coef_ptr="*fp32", scale_ptr="*fp32", out_ptr="*" + out),
              dict(K=k, MODE=mode, HAS_SCALE=scaled, BLOCK=1024))
        build(_coef_grad._coef_grad_kernel,
              dict(grad_ptr="*" + out, tau_ptr="*" + st, scale_ptr="*fp32", partial_ptr="*fp32"),
              dict(K=k, MODE=mode, HAS_SCALE=scaled, BLOCK=1024))
        # dot_precision(): "ieee" for fp32 operands with torch's TF32 switch off (its default),
        # Triton's default "tf32" otherwise (it does not apply to 16-bit operands).
        prec = "ieee" if out == "fp32" else "tf32"
        for split in (1, 4):
            build(_linear._fused_linear_kernel,
                  dict(x_ptr="*" + out, w0_ptr="*" + out, tau_ptr="*" + st, coef_ptr="*fp32", scale_ptr="*fp32",
                       bias_ptr="*" + out, out_ptr="*" + (out if split == 1 else "fp32")),
                  dict(K=k, MODE=mode, HAS_SCALE=scaled, HAS_BIAS=True, SPLIT_K=split, UPCAST=False, PREC=prec,
                       BLOCK_M=16, BLOCK_O=64, BLOCK_K=64))
            build(_linear._fused_linear_dx_kernel,
                  dict(dy_ptr="*" + out, w0_ptr="*" + out, tau_ptr="*" + st, coef_ptr="*fp32", scale_ptr="*fp32",
                       out_ptr="*" + (out if split == 1 else "fp32")),
                  dict(K=k, MODE=mode, HAS_SCALE=scaled, SPLIT_K=split, UPCAST=False, PREC=prec,
                       BLOCK_M=16, BLOCK_I=64, BLOCK_K=64))
        build(_linear._linear_coef_grad_kernel,
              dict(x_ptr="*" + out, dy_ptr="*" + out, tau_ptr="*" + st, scale_ptr="*fp32", partial_ptr="*fp32"),
              dict(K=k, MODE=mode, HAS_SCALE=scaled, UPCAST=False, PREC=prec, BLOCK_M=32, BLOCK_O=64, BLOCK_I=128))
        count += 6
        print("ok", name, flush=True)
    for st, th, out in itertools.product(storages, computes, computes):
        scaled = st in ("i8", "fp8e4nv")
        for kmax, aligned in ((1, True), (1, False), (4, True)):
            build(_group._group_compose_kernel,
                  dict(table_ptr="*i64", tile_map_ptr="*i32", theta_any_ptr="*" + th, tau_any_ptr="*" + st,
                       outa_ptr="*" + out, outb_ptr="*" + th),
                  dict(KMAX=kmax, HAS_SCALE=scaled, BLOCK=4096, ALIGNED=aligned), num_warps=8)
            build(_group._group_partial_kernel,
                  dict(table_ptr="*i64", tile_map_ptr="*i32", theta_any_ptr="*" + th, tau_any_ptr="*" + st,
                       ga_ptr="*" + out, gb_ptr="*" + th, partial_ptr="*fp32"),
                  dict(KMAX=kmax, HAS_SCALE=scaled, BLOCK=4096, ALIGNED=aligned), num_warps=8)
            count += 2
        print("ok group", st, th, out, flush=True)
    for kmax, cols in ((1, 32), (4, 128)):
        build(_group._group_reduce_kernel, dict(table_ptr="*i64", partial_ptr="*fp32", out_ptr="*fp32"),
              dict(KMAX=kmax, COLS=cols, TILES=32))
        count += 1
    print(f"compiled {count} kernel specializations for {TARGET}")
    return 0


def ptxas_spills(kernel) -> int:
    """Bytes of register spill stores ptxas reports for a compiled kernel (its own ptxas, -v)."""
    import re
    import subprocess
    import tempfile

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        arch = f"sm_{TARGET.arch}a" if TARGET.arch == 90 else f"sm_{TARGET.arch}"
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-2000:]}")
    return sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))


def spills() -> int:
    """Every autotune config that survives pruning, in representative specializations, must
    compile without register spills on sm_90 (the launchers' configs, as the GPU would tune)."""
    bad = []
    checked = 0

    def pruned(launcher, consts):
        return launcher.early_config_prune(launcher.configs, {}, **consts)

    for st, out, (k, mode) in itertools.product(["bf16", "i8"], ["bf16", "fp32"], [(1, 0), (4, 2)]):
        scaled = st == "i8"
        prec = "ieee" if out == "fp32" else "tf32"
        base = dict(K=k, MODE=mode, HAS_SCALE=scaled, UPCAST=False, PREC=prec)
        for bm in (16, 64):
            consts = dict(base, HAS_BIAS=True, SPLIT_K=1, BLOCK_M=bm)
            for cfg in pruned(_linear._fused_launch, consts):
                c = dict(consts, **cfg.kwargs)
                kern = build(_linear._fused_linear_kernel,
                             dict(x_ptr="*" + out, w0_ptr="*" + out, tau_ptr="*" + st, coef_ptr="*fp32",
                                  scale_ptr="*fp32", bias_ptr="*" + out, out_ptr="*" + out), c,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                checked += 1
                if ptxas_spills(kern):
                    bad.append(("fused_linear", st, out, k, bm, cfg.kwargs, cfg.num_warps))
            consts = dict(base, SPLIT_K=1, BLOCK_M=bm)
            for cfg in pruned(_linear._fused_dx_launch, consts):
                c = dict(consts, **cfg.kwargs)
                kern = build(_linear._fused_linear_dx_kernel,
                             dict(dy_ptr="*" + out, w0_ptr="*" + out, tau_ptr="*" + st, coef_ptr="*fp32",
                                  scale_ptr="*fp32", out_ptr="*" + out), c,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                checked += 1
                if ptxas_spills(kern):
                    bad.append(("fused_linear_dx", st, out, k, bm, cfg.kwargs, cfg.num_warps))
        for m in (16, 64, 4096):
            bm, bo, bi = _linear._lcg_tiles(m)
            consts = dict(base, BLOCK_M=bm, BLOCK_O=bo, BLOCK_I=bi)
            for cfg in pruned(_linear._lcg_launch, consts):
                kern = build(_linear._linear_coef_grad_kernel,
                             dict(x_ptr="*" + out, dy_ptr="*" + out, tau_ptr="*" + st, scale_ptr="*fp32",
                                  partial_ptr="*fp32"), consts,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                checked += 1
                if ptxas_spills(kern):
                    bad.append(("linear_coef_grad", st, out, k, (bm, bo, bi), cfg.num_warps, cfg.num_stages))
        print("spill check", st, out, k, mode, "done", flush=True)
    for b in bad:
        print("SPILLS:", b)
    print(f"checked {checked} configs for spills: {len(bad)} spill")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(spills() if "--spills" in sys.argv else main())
