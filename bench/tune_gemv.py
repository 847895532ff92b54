"""Pick the skinny-product kernel's tiles (kernels/gemv.py): tile configs for SmolVLM2-500M's
decode products at 1 to 32 rows, bf16, against cuBLAS (plain product, no fusions), in GPU
time per call: a CUDA graph of many calls rotating through more weight copies than L2 holds,
as in a decode step where every weight is read once per token. One config serves every row
count (row invariance), so pick per shape for the row counts that run here (1..INVARIANT_ROWS).
Also checks that a row's result is the same alone and in a batch of 32.

    python bench/tune_gemv.py
"""

import json

import torch

import gpu_timing  # bench/, beside this script
from meganeura.kernels.gemv import gemv, tiles

SHAPES = {  # name: (N, K, fused prologue/epilogue)
    "q|k|v + norm": (1600, 960, "norm"),
    "o + residual": (960, 960, "residual"),
    "gate|up + norm": (5120, 960, "norm"),
    "down, gated + residual": (960, 2560, "gated"),
    "lm_head + norm": (49280, 960, "norm"),
}
CONFIGS = [(2, 1024, 1, 2), (2, 1024, 2, 2), (2, 1024, 4, 2), (2, 1024, 8, 2), (4, 512, 1, 2), (8, 256, 1, 2),
           (8, 512, 1, 3), (8, 512, 2, 3), (4, 256, 1, 3), (16, 128, 1, 3)]
ROWS = (1, 4, 8, 16, 32)
COPIES, CALLS = 12, 48


def gpu_us(fn) -> float:
    return gpu_timing.gpu_us(fn, COPIES, CALLS)


results = {}
for name, (n, k, kind) in SHAPES.items():
    copies = COPIES if n * k < 20_000_000 else 3  # lm_head alone is 95 MB, over L2 already
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    g = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    for rows in ROWS:
        x = torch.randn(rows, 2 * k if kind == "gated" else k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        kw = {"norm": {"norm": g, "eps": 1e-5}, "residual": {"residual": r},
              "gated": {"gated": True, "residual": r}}[kind]
        kw["float_out"] = name.startswith("lm_head")
        xin = x[:, :k].contiguous()
        row = {"cublas": gpu_us(lambda i: xin @ ws[i % copies].T),
               "default": gpu_us(lambda i: gemv(x, ws[i % copies], **kw))}
        for c in CONFIGS:
            row[str(c)] = gpu_us(lambda i: gemv(x, ws[i % copies], config=c, **kw))
        if rows == 32:
            alone = {**kw, **({"residual": r[20:21]} if "residual" in kw else {})}
            row["row_invariant"] = bool(torch.equal(gemv(x[20:21], ws[0], **alone)[0], gemv(x, ws[0], **kw)[20]))
        results[f"{name} x{rows}"] = row
        best = min((v, key) for key, v in row.items() if key.startswith("("))
        print(f"{name:24s} rows {rows:2d}: cuBLAS {row['cublas']:6.2f} us, default {tiles(n, k)} "
              f"{row['default']:6.2f} us, best {best[1]} {best[0]:6.2f} us", flush=True)
print(json.dumps(results))
