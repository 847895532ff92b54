"""The floor of a persistent batch-1 decode kernel (issue 16), measured before writing one:
how fast resident programs (one or a few per multiprocessor) stream a decode step's weights,
and what a grid-wide barrier between the step's stages costs.

1. barrier: programs (one per SM, co-resident: a cooperative launch) meet at `rounds` grid
   barriers (an atomic counter each program bumps, then spins on) and nothing else: us per
   barrier.
2. stream: resident programs read SmolVLM2-500M's 32 layers of decode weights (q|k|v, o,
   gate|up, down: 19.7 MB a layer, bf16), each a one-row product x @ W^T split by output rows,
   with no barrier and with a barrier after every product (a layer's 4 stages; attention would
   be a fifth); with plain loads, then with TMA descriptors (bulk asynchronous copies,
   pipelined over a flat loop of tiles). Compared with the copy rate: the tok/s ceiling of one
   launch a token whose layers pay these barriers.

    python bench/megakernel_floor.py
"""

import torch
import triton
import triton.language as tl

import gpu_timing  # bench/, beside this script

HIDDEN, QKV, INTER, LAYERS = 960, 1600, 2560, 32
SHAPES = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]  # (N, K) a layer, in order
CONFIGS = [(16, 512, 8, 1), (8, 512, 4, 2), (8, 512, 4, 4), (4, 512, 2, 8)]  # (BN, BK, warps, programs an SM)
TMA_CONFIGS = [(16, 256, 4, 1, 4), (16, 256, 8, 1, 6), (8, 256, 4, 2, 4), (8, 256, 4, 4, 3), (4, 256, 2, 8, 3)]  # (BN, BK, warps, programs an SM, pipeline stages)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Every program's earlier writes visible to all after it: count in, spin until all are."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _barriers_kernel(counter_ptr, rounds, PROGRAMS: tl.constexpr):
    for r in range(rounds):
        _grid_barrier(counter_ptr, (r + 1) * PROGRAMS)


@triton.jit
def _product(w_ptr, x_ptr, out_ptr, N, K: tl.constexpr, PROGRAMS: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr):
    """out[n] = x . w[n] for this program's output tiles (tile t, t + PROGRAMS, ...)."""
    for t in range(tl.program_id(0), tl.cdiv(N, BN), PROGRAMS):
        n = t * BN + tl.arange(0, BN)
        acc = tl.zeros([BN, BK], tl.float32)  # reduced once a tile, not once a K block
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(out_ptr + n, tl.sum(acc, axis=1), mask=n < N)


@triton.jit
def _stage(w_ptr, x_ptr, out_ptr, counter_ptr, done, N: tl.constexpr, K: tl.constexpr, PROGRAMS: tl.constexpr,
           BARRIERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One product of a layer, after a grid barrier (BARRIERS)."""
    if BARRIERS:
        done += PROGRAMS
        _grid_barrier(counter_ptr, done)
    _product(w_ptr, x_ptr, out_ptr, N, K, PROGRAMS, BN, BK)
    return done


@triton.jit
def _stream_kernel(w0, w1, w2, w3, x_ptr, out_ptr, counter_ptr, layers, PROGRAMS: tl.constexpr,
                   BARRIERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr,
                   N2: tl.constexpr, K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr):
    """Every layer's four products in turn, each product's weights for all layers stored one
    layer after another (the input x stays put: only the weight traffic and barriers count)."""
    done = 0
    for layer in range(layers):
        done = _stage(w0 + layer * N0 * K0, x_ptr, out_ptr, counter_ptr, done, N0, K0, PROGRAMS, BARRIERS, BN, BK)
        done = _stage(w1 + layer * N1 * K1, x_ptr, out_ptr + 8192, counter_ptr, done, N1, K1, PROGRAMS, BARRIERS, BN,
                      BK)
        done = _stage(w2 + layer * N2 * K2, x_ptr, out_ptr + 16384, counter_ptr, done, N2, K2, PROGRAMS, BARRIERS, BN,
                      BK)
        done = _stage(w3 + layer * N3 * K3, x_ptr, out_ptr + 24576, counter_ptr, done, N3, K3, PROGRAMS, BARRIERS, BN,
                      BK)



@triton.jit
def _tma_product(desc, row0, x_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, PROGRAMS: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """As _product, through a TMA descriptor over [layers * N, K], as one flat loop over this
    program's (tile, K block) pairs, so the copy pipeline runs across tiles (K is a few blocks)."""
    KT: tl.constexpr = (K + BK - 1) // BK
    tiles = tl.cdiv(tl.cdiv(N, BN) - tl.program_id(0), PROGRAMS)
    acc = tl.zeros([BN, BK], tl.float32)  # reduced once a tile, not once a K block
    for j in tl.range(0, tiles * KT, num_stages=STAGES):
        t = tl.program_id(0) + (j // KT) * PROGRAMS
        k0 = (j % KT) * BK
        w = desc.load([row0 + t * BN, k0])
        k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        if j % KT == KT - 1:
            n = t * BN + tl.arange(0, BN)
            tl.store(out_ptr + n, tl.sum(acc, axis=1), mask=n < N)
            acc = tl.zeros([BN, BK], tl.float32)


@triton.jit
def _tma_stage(desc, row0, x_ptr, out_ptr, counter_ptr, done, N: tl.constexpr, K: tl.constexpr,
               PROGRAMS: tl.constexpr, BARRIERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               STAGES: tl.constexpr):
    """_stage through a TMA descriptor."""
    if BARRIERS:
        done += PROGRAMS
        _grid_barrier(counter_ptr, done)
    _tma_product(desc, row0, x_ptr, out_ptr, N, K, PROGRAMS, BN, BK, STAGES)
    return done


@triton.jit
def _stream_tma_kernel(d0, d1, d2, d3, x_ptr, out_ptr, counter_ptr, layers, PROGRAMS: tl.constexpr,
                       BARRIERS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                       N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr,
                       N2: tl.constexpr, K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr):
    """_stream_kernel with the weights read through TMA descriptors (asynchronous bulk copies)."""
    done = 0
    for layer in range(layers):
        done = _tma_stage(d0, layer * N0, x_ptr, out_ptr, counter_ptr, done, N0, K0, PROGRAMS, BARRIERS, BN, BK,
                          STAGES)
        done = _tma_stage(d1, layer * N1, x_ptr, out_ptr + 8192, counter_ptr, done, N1, K1, PROGRAMS, BARRIERS, BN,
                          BK, STAGES)
        done = _tma_stage(d2, layer * N2, x_ptr, out_ptr + 16384, counter_ptr, done, N2, K2, PROGRAMS, BARRIERS, BN,
                          BK, STAGES)
        done = _tma_stage(d3, layer * N3, x_ptr, out_ptr + 24576, counter_ptr, done, N3, K3, PROGRAMS, BARRIERS, BN,
                          BK, STAGES)


def _rates() -> tuple[float, float]:
    """Bytes per second of a 1 GiB device copy (read + write) and of torch's sum reading it."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy = 2 * a.numel() / (gpu_timing.gpu_us(lambda i: b.copy_(a), 1, 8) * 1e-6)
    values = a.view(torch.bfloat16).normal_()
    read = a.numel() / (gpu_timing.gpu_us(lambda i: values.sum(dtype=torch.float32), 1, 8) * 1e-6)
    return copy, read


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    copy_rate, read_rate = _rates()
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, copy {copy_rate / 1e12:.2f} TB/s (read + write), "
          f"torch's sum reads {read_rate / 1e12:.2f} TB/s")

    rounds = 1000

    def barriers(i):
        counter.zero_()
        _barriers_kernel[(sms,)](counter, rounds, PROGRAMS=sms, num_warps=4, launch_cooperative_grid=True)
    print(f"grid barrier: {gpu_timing.gpu_us(barriers, 1, 4) / rounds:.2f} us each ({sms} programs)", flush=True)

    weights = [torch.randn(LAYERS, n, k, device="cuda", dtype=torch.bfloat16) for n, k in SHAPES]
    x = torch.randn(INTER, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(32768 + sms, device="cuda", dtype=torch.float32)
    step_bytes = sum(w.numel() * 2 for w in weights)
    dims = {f"{dim}{i}": v for i, (n, k) in enumerate(SHAPES) for dim, v in (("N", n), ("K", k))}
    print(f"a step's weights: {step_bytes / 1e9:.3f} GB; floor at half the copy rate (reads only) "
          f"{step_bytes / (copy_rate / 2) * 1e6:.0f} us", flush=True)
    for bn, bk, warps, per_sm in CONFIGS:
        programs = per_sm * sms
        for name, barriers_on in (("no barrier", False), ("a barrier a product", True)):
            def step(i):
                counter.zero_()
                _stream_kernel[(programs,)](*weights, x, out, counter, LAYERS, PROGRAMS=programs, BARRIERS=barriers_on,
                                            BN=bn, BK=bk, num_warps=warps, launch_cooperative_grid=True, **dims)
            us = gpu_timing.gpu_us(step, 1, 4)
            print(f"BN {bn}, BK {bk}, {warps} warps, {per_sm} programs an SM, {name}: {us:.0f} us a step of "
                  f"{LAYERS} layers, {step_bytes / (us * 1e-6) / 1e12:.2f} TB/s, {1e6 / us:.0f} tok/s ceiling",
                  flush=True)
    from triton.tools.tensor_descriptor import TensorDescriptor
    flat = [w.view(-1, w.shape[-1]) for w in weights]
    for bn, bk, warps, per_sm, stages in TMA_CONFIGS:
        programs = per_sm * sms
        descs = [TensorDescriptor.from_tensor(f, [bn, bk]) for f in flat]
        for name, barriers_on in (("no barrier", False), ("a barrier a product", True)):
            def tma_step(i):
                counter.zero_()
                _stream_tma_kernel[(programs,)](*descs, x, out, counter, LAYERS, PROGRAMS=programs,
                                                BARRIERS=barriers_on, BN=bn, BK=bk, STAGES=stages, num_warps=warps,
                                                launch_cooperative_grid=True, **dims)
            try:
                us = gpu_timing.gpu_us(tma_step, 1, 4)
            except Exception as e:  # noqa: BLE001 - a config the card or Triton refuses: say so, go on
                print(f"TMA BN {bn}, BK {bk}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                break
            print(f"TMA BN {bn}, BK {bk}, {warps} warps, {per_sm} programs an SM, {stages} stages, {name}: {us:.0f} us "
                  f"a step, {step_bytes / (us * 1e-6) / 1e12:.2f} TB/s, {1e6 / us:.0f} tok/s ceiling", flush=True)


if __name__ == "__main__":
    main()
