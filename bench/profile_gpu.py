"""Where the GPU time goes: per-kernel totals (torch.profiler) for one vision run (13 tiles),
one prefill (~875 tokens) and one decode step, plus recorded-replay vs whole-step timings;
with --chunk, one chunk of a long prompt's chunked prefill (the "extend" attention over the
positions before it) beside decode steps of 8 and 16 rows; with --batch, one decode step of
that many rows at 900 tokens of context. SmolVLM2-500M shapes, random
weights, bf16. Guides the next optimization; see docs/perf.md.

    python bench/profile_gpu.py [--chunk | --batch ROWS]
"""

import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import gpu_timing  # bench/, beside this script
from meganeura.models.smolvlm2 import NAMES, SmolVLM2Config
from meganeura.engine.runner import ModelRunner, ModelSpec
from meganeura.session import CompileOptions

cfg = SmolVLM2Config.smolvlm2_500m()
spec = ModelSpec(cfg.text, NAMES, cfg)
rng = np.random.default_rng(0)
shapes = ModelRunner(spec).expected_parameters()
weights = {n: rng.standard_normal(t.shape, np.float32) * 0.02 for n, t in shapes.items()}
rt = ModelRunner(spec, CompileOptions(backend="torch", device="cuda", dtype="bfloat16"), cache_bytes=2**31)
rt.load_weights(weights)
slot = rt.cache.take(1024)
pixels = torch.from_numpy(rng.uniform(-1, 1, (13, 3, 512, 512)).astype(np.float32)).cuda()
ids = np.concatenate([[1, 2, 3], [49190] * 832, rng.integers(100, 40000, 40)])
n, image_rows = len(ids), np.flatnonzero(ids == 49190)


def prefill():
    return rt.prefill(ids, slot, rt.encode_images(pixels), image_rows)


def step(i):
    return rt.decode([5], [n + i], [slot]).argmax(-1).cpu()


def profiled(name, fn, reps=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    print(f"\n==== {name} (x{reps}) ====")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def wall(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps




def chunked_prefill(at: int = 3000, rows: int = 128) -> None:
    """A `rows`-token chunk at position `at` of a 6,000-token prompt, recorded and eager."""
    long = rt.cache.take(6144)
    prompt = rng.integers(100, 40000, 6000)
    rt.prefill(prompt[:at], long)
    chunk = lambda: rt.prefill(prompt[at:at + rows], long, start=at)  # noqa: E731
    print(f"chunk of {rows} at {at}: recorded wall {wall(chunk) * 1e3:.3f} ms")
    slots = [rt.cache.take(1024) for _ in range(16)]
    for n in (8, 16):
        print(f"decode {n} rows wall {wall(lambda: rt.decode([5] * n, [900] * n, slots[:n])) * 1e3:.3f} ms")
    s = next(v for k, v in rt._sessions.items() if k[4] == "extend")
    s.capture, s._replay = False, None  # eager: one entry per kernel
    print(f"chunk eager wall {wall(chunk) * 1e3:.3f} ms")
    profiled(f"chunk of {rows} at {at} (eager)", chunk, reps=3)


def batched_decode(rows: int = 32, context: int = 900) -> None:
    """One decode step of `rows` sequences at `context` tokens each: recorded, then eager."""
    slots = [rt.cache.take(context + 64) for _ in range(rows)]
    for slot in slots:
        rt.prefill(rng.integers(100, 40000, context), slot)
    batch = lambda: rt.decode([5] * rows, [context] * rows, slots)  # noqa: E731
    t = wall(batch, 50)
    print(f"decode {rows} x {context}: recorded wall {t * 1e3:.3f} ms ({rows / t:,.0f} tok/s)")
    s = next(v for k, v in rt._sessions.items() if k[4] == "decode" and k[1] == rows)
    s.capture, s._replay = False, None  # eager: one entry per kernel
    profiled(f"decode {rows} x {context} (eager)", batch, reps=3)


if "--chunk" in sys.argv:
    chunked_prefill()
    sys.exit()
if "--batch" in sys.argv:
    batched_decode(int(sys.argv[sys.argv.index("--batch") + 1]))
    sys.exit()
print(f"vision wall {wall(lambda: rt.encode_images(pixels)) * 1e3:.2f} ms; "
      f"prefill+vision wall {wall(prefill) * 1e3:.2f} ms")
prefill()
print(f"decode step wall {wall(lambda: step(0), 100) * 1e3:.3f} ms")
s = rt._sessions[("text", 1, 1, 0, "decode", None)]
print(f"decode replay only (GPU) {gpu_timing.stream_us(s._replay, 100) / 1e3:.3f} ms")
profiled("vision", lambda: rt.encode_images(pixels))
profiled("prefill (text part)", prefill)
s.capture = False  # eager decode: one entry per kernel
s._replay = None
profiled("decode step (eager)", lambda: step(0), reps=5)
