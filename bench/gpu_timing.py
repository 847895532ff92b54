"""GPU time per call, for the bench scripts. `gpu_us`: `calls` calls of a small function
recorded once as a CUDA graph (launch overhead stays out of the figure) and replayed ten
times; the function gets each call's index, to rotate through `copies` of its data (together
larger than L2, as a decode step reads each weight or cache once). `stream_us`: between two
events around calls that only enqueue work (a recorded replay)."""

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
    return stream_us(graph.replay, 10) / calls


def stream_us(fn, reps: int) -> float:
    """GPU time per call of fn (which only enqueues work), between two events around `reps` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3
