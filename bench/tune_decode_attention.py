"""How many splits the decode attention kernel (kernels/decode_attention.py) should cut, by row
count: SmolVLM2-500M's heads (15 query, 5 key/value, 64 wide), bf16, one layer's paged cache
per call, 900 and 4,000 tokens of context, in GPU time per call (a CUDA graph of many calls
rotating through cache copies larger than L2, as a decode step reads each layer's once), with
the floor (the keys and values read once at the card's copy rate) and the default's choice.
Also checks every split count gives the default's result (to bf16 rounding).

    python bench/tune_decode_attention.py
"""

import torch

import gpu_timing  # bench/, beside this script
from meganeura.kernels.decode_attention import decode_attention, default_splits

HEADS, KV, D, PAGE = 15, 5, 64, 16
ROWS, CONTEXTS = (1, 8, 16, 32), (900, 4000)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 53)
CALLS = 32


def gpu_us(fn, copies: int) -> float:
    return gpu_timing.gpu_us(fn, copies, CALLS)


def copy_rate() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = gpu_us(lambda i: b.copy_(a), 1)
    return 2 * a.numel() / (us * 1e-6)


rate = copy_rate()
print(f"{torch.cuda.get_device_name()}: copy {rate / 1e12:.2f} TB/s")
for context in CONTEXTS:
    for rows in ROWS:
        pages_per_row = -(-(context + 1) // PAGE)
        copies = max(2, -(-200_000_000 // (2 * rows * pages_per_row * PAGE * KV * D * 2)))  # > L2 together
        caches = [(torch.randn(rows * pages_per_row + 1, PAGE, KV * D, device="cuda", dtype=torch.bfloat16),
                   torch.randn(rows * pages_per_row + 1, PAGE, KV * D, device="cuda", dtype=torch.bfloat16))
                  for _ in range(copies)]
        table = torch.arange(rows * pages_per_row, device="cuda").view(rows, pages_per_row)
        slots = torch.arange(rows, device="cuda")
        positions = torch.full((rows,), context, device="cuda")
        q = torch.randn(rows, HEADS * D, device="cuda", dtype=torch.bfloat16)
        floor_us = 2 * rows * (context + 1) * KV * D * 2 / rate * 1e6

        def run(i, splits=None):
            return decode_attention(q, *caches[i], table, slots, positions, HEADS, KV, splits=splits)
        reference = run(0).float()
        times = {}
        for splits in SPLITS:
            assert (run(0, splits).float() - reference).abs().max() < 2e-2 * reference.abs().max(), splits
            times[splits] = gpu_us(lambda i, s=splits: run(i, s), copies)
        chosen = default_splits(KV, pages_per_row * PAGE, 64, q.device, rows)
        best = min(times, key=times.get)
        print(f"{rows:2d} rows x {context} keys: floor {floor_us:5.1f} us; default ({chosen} splits) "
              f"{gpu_us(run, copies):6.1f} us; best {best} splits {times[best]:6.1f} us; "
              + ", ".join(f"{s}: {t:.1f}" for s, t in times.items()), flush=True)
