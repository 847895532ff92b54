"""Pick the skinny-product kernel's tiles: every (BN, BK, warps) for SmolVLM2-500M's decode
products, against cuBLAS (plain product, no fusions), timed on the GPU alone: a CUDA graph of
many calls rotating through more weight copies than L2 holds, as in a decode step where every
weight is read once per token.

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
COPIES, CALLS = 12, 48


def gpu_us(fn) -> float:
    """GPU time per call: CALLS calls recorded once as a graph, replayed."""
    for i in range(COPIES):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(i % COPIES)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (10 * CALLS) * 1e3


for rows in (1,):
    for name, (n, k, kind) in SHAPES.items():
        copies = COPIES if n * k < 20_000_000 else 3  # lm_head alone is 95 MB, over L2 already
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(rows, 2 * k if kind == "gated" else k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        kw = {"norm": {"norm": g, "eps": 1e-5}, "residual": {"residual": r},
              "gated": {"gated": True, "residual": r}}[kind]
        xin = x[:, :k].contiguous()
        cublas = gpu_us(lambda i: xin @ ws[i % copies].T)
        floor = n * k * 2 / 3.0e12 * 1e6
        results = []
        if n > 8192:
            continue  # lm_head: within 12% of its floor already (docs/perf.md)
        for bn, bk, warps, stages in itertools.product((1, 2, 4), (512, 1024), (4, 8), (1, 2, 4)):
            if rows * bn * bk > 8192 or bn * bk < 256:
                continue
            try:
                t = gpu_us(lambda i: gemv(x, ws[i % copies], config=(bn, bk, warps, stages), **kw))
                results.append((round(t, 2), bn, bk, warps, stages))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print("skip", bn, bk, warps, type(e).__name__, flush=True)
        results.sort()
        default = gpu_us(lambda i: gemv(x, ws[i % copies], **kw))
        print(f"rows={rows} {name:24s} N={n} K={k}: floor {floor:.1f} us, cuBLAS plain {cublas:.1f} us, "
              f"default {tiles(n, k)} {default:.1f} us, best {results[:4]}", flush=True)
