"""Pick the skinny-product kernel's tiles: every (BN, BK, warps) for SmolVLM2-500M's decode
products, against cuBLAS, with weights rotated through more memory than L2 holds (as in a
real decode step, where every weight is read once per token).

    python bench/tune_gemv.py
"""

import itertools

import torch

from meganeura.kernels.gemv import gemv, tiles

SHAPES = {  # name: (N, K, fused prologue/epilogue)
    "q|k|v + norm": (1600, 960, "norm"),
    "o + residual": (960, 960, "residual"),
    "gate|up + norm": (5120, 960, "norm"),
    "down, gated + residual": (960, 2560, "gated"),
    "lm_head + norm": (49280, 960, "norm"),
}
COPIES = 12


def per_call_us(fn, reps=240):
    for i in range(COPIES):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        fn(i % COPIES)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


for rows in (1, 4):
    for name, (n, k, kind) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
        x = torch.randn(rows, 2 * k if kind == "gated" else k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        kw = {"norm": {"norm": g, "eps": 1e-5}, "residual": {"residual": r},
              "gated": {"gated": True, "residual": r}}[kind]
        xin = x[:, :k] if kind == "gated" else x
        cublas = per_call_us(lambda i: xin @ ws[i].T)
        floor = n * k * 2 / 3.0e12 * 1e6
        results = []
        for bn, bk, warps in itertools.product((2, 4, 8, 16, 32), (128, 256, 512, 1024), (4, 8)):
            if bn * bk > 16384:
                continue
            try:
                results.append((per_call_us(lambda i: gemv(x, ws[i], config=(bn, bk, warps), **kw)), bn, bk, warps))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is just skipped
                print("skip", bn, bk, warps, type(e).__name__)
        results.sort()
        default = per_call_us(lambda i: gemv(x, ws[i], **kw))
        best = results[0]
        print(f"rows={rows} {name:24s} N={n} K={k}: floor {floor:.1f} us, cuBLAS(plain) {cublas:.1f} us, "
              f"default {tiles(n, k)} {default:.1f} us, best (BN={best[1]}, BK={best[2]}, warps={best[3]}) "
              f"{best[0]:.1f} us; next {[(round(t, 1), b, kk, w) for t, b, kk, w in results[1:4]]}", flush=True)
