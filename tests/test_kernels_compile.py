"""Every Triton kernel compiles for Hopper (sm_90), as the GPU runs them, on any machine:
Triton's interpreter (test_kernels.py) checks the math but not what only the compiler
rejects (loop-carried types, constexpr misuse, the programmatic-launch intrinsics).

The compiling runs in a child process: this suite's CPU runs set TRITON_INTERPRET=1, which
turns kernels into interpreted functions at import."""

import os
import subprocess
import sys

import pytest

FP32_POINTERS = {"m_ptr", "l_ptr", "acc_ptr", "inv_freq_ptr"}
INDEX_POINTERS = {"slots_ptr", "positions_ptr", "table_ptr"}
FLOATS = {"eps", "scale"}
GEMV = dict(K=960, NORM=False, GATED=False, RESIDUAL=False, BM=1, BN=2, BK=1024, PDL=True)
CASES = [  # (module, kernel, constants)
    ("gemv", "_gemv_kernel", {**GEMV, "NORM": True}),
    ("gemv", "_gemv_kernel", {**GEMV, "K": 2560, "GATED": True, "RESIDUAL": True}),
    ("gemv", "_gemv_kernel", {**GEMV, "BN": 8, "BK": 512, "BM": 4, "PDL": False}),
    ("gemv", "_gemv_kernel", {**GEMV, "K": 2560, "NORM": True, "BM": 8, "RESIDUAL": True}),
    ("rope_cache", "_rope_cache_kernel", dict(H=15, KV=5, D=64, HEADS=1, K_OUT=False, PAGE=16, PDL=True)),
    ("rope_cache", "_rope_cache_kernel", dict(H=15, KV=5, D=64, HEADS=20, K_OUT=True, PAGE=16, PDL=False)),
    ("decode_attention", "_split_kernel", dict(H=15, KV=5, G=3, GP=16, D=64, SPLITS=16, BLOCK=64, PAGE=16,
                                               PDL=True)),
    ("decode_attention", "_merge_kernel", dict(H=15, D=64, SPLITS=16, SP=16, BLOCK=64, PDL=True)),
    ("extend_attention", "_split_kernel", dict(H=15, G=3, D=64, SPLITS=8, BM=32, BLOCK=64, PAGE=16)),
    ("extend_attention", "_merge_kernel", dict(H=15, D=64, SPLITS=8, SP=8, BM=32, BLOCK=64)),
    ("add_layer_norm", "_add_layer_norm_kernel", dict(ROWS=4, BLOCK=1024)),
    ("rms_norm", "_rms_norm_kernel", dict(BLOCK=1024)),
    ("swiglu", "_swiglu_kernel", dict(BLOCK=1024)),
]


def _signature(kernel, dtype: str) -> dict:
    """Argument types from the names: activations in `dtype`, partial sums fp32, indices i64."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp32" if p.name in FP32_POINTERS else "*i64" if p.name in INDEX_POINTERS else f"*{dtype}"
        else:
            sig[p.name] = "fp32" if p.name in FLOATS else "i32"
    return sig


def compile_all() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for module, name, constants in CASES:
        kernel = getattr(importlib.import_module(f"meganeura.kernels.{module}"), name)
        for dtype in ("bf16", "fp32"):
            if name == "_split_kernel":
                constants = {**constants, "PRECISION": "tf32" if dtype == "bf16" else "ieee"}
            compiled = triton.compile(ASTSource(fn=kernel, signature=_signature(kernel, dtype), constexprs=constants),
                                      target=GPUTarget("cuda", 90, 32))
            assert ".target sm_90" in compiled.asm["ptx"], name
            print("compiled", name, dtype, flush=True)


def test_every_kernel_compiles_for_hopper():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("compiled") == 2 * len(CASES)


if __name__ == "__main__":
    compile_all()
