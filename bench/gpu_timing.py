"""GPU time per call of a small function, for the tuning scripts: `calls` calls recorded once
as a CUDA graph (launch overhead stays out of the figure) and replayed ten times. The function
gets each call's index, to rotate through `copies` of its data (together larger than L2, as a
decode step reads each weight or cache once)."""

import torch


def gpu_us(fn, copies: int, calls: int) -> float:
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (10 * calls) * 1e3
