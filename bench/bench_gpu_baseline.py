"""Baseline on a CUDA GPU: SmolVLM2-500M architecture with random weights, bf16, one image of
13 tiles (832 image tokens) + a short prompt. Checks meganeura against transformers on the
same inputs, then times vision, time to first token and decode, both engines, one card.

This is the starting point for the CUDA-backend issue: the torch backend here runs op by op
(no CUDA graphs, no fused kernels yet).

    python bench/bench_gpu_baseline.py [--decode 64]
"""

import argparse
import time

import numpy as np
import torch

from meganeura.models.smolvlm2 import NAMES, SmolVLM2Config
from meganeura.runtime import ModelSpec, Runtime
from meganeura.session import CompileOptions

parser = argparse.ArgumentParser()
parser.add_argument("--decode", type=int, default=64)
parser.add_argument("--tiles", type=int, default=13)
args = parser.parse_args()

from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration  # noqa: E402

torch.manual_seed(0)
hf_cfg = SmolVLMConfig(
    vision_config=dict(image_size=512, patch_size=16, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                       intermediate_size=3072, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    text_config=dict(model_type="llama", vocab_size=49280, hidden_size=960, intermediate_size=2560,
                     num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0,
                     max_position_embeddings=8192, rms_norm_eps=1e-5),
    scale_factor=4, image_token_id=49190, tie_word_embeddings=False)
hf = SmolVLMForConditionalGeneration(hf_cfg).eval()
with torch.no_grad():
    for p in hf.parameters():
        p.add_(torch.randn_like(p) * 0.02)
weights = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
hf = hf.to("cuda", torch.bfloat16)

cfg = SmolVLM2Config.from_hf(hf_cfg.to_dict())
assert cfg == SmolVLM2Config.smolvlm2_500m(), cfg
t0 = time.perf_counter()
rt = Runtime(ModelSpec(cfg.text, NAMES, cfg), CompileOptions(backend="torch", device="cuda", dtype="bfloat16"))
rt.load_weights(weights)
torch.cuda.synchronize()
startup = time.perf_counter() - t0

rng = np.random.default_rng(0)
pixels = rng.uniform(-1, 1, (args.tiles, 3, 512, 512)).astype(np.float32)
ids = np.concatenate([[1, 11126, 42], [49190] * (64 * args.tiles), rng.integers(100, 40000, 40)]).astype(np.int64)
n = len(ids)
image_rows = np.flatnonzero(ids == 49190)
rt.reserve(1, n + args.decode + 8)


def ours_ttft():
    feats = rt.encode_images(pixels)
    logits = rt.step(ids, np.arange(n), np.zeros(n), [n - 1], feats, image_rows)
    return logits


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


# ---- correctness: last-position logits, bf16 vs bf16 ----
ours_last, ours_ttft_s = timed(ours_ttft)
x_ids = torch.from_numpy(ids)[None].cuda()
x_pix = torch.from_numpy(pixels)[None].cuda().to(torch.bfloat16)
with torch.no_grad():
    ref, hf_ttft_s = timed(lambda: hf(input_ids=x_ids, pixel_values=x_pix, logits_to_keep=1).logits[0, -1])
ours_np, ref_np = rt.to_host(ours_last)[0], ref.float().cpu().numpy()
rel = float(np.abs(ours_np - ref_np).max() / np.abs(ref_np).max())
print(f"last-logit rel err vs transformers bf16: {rel:.3e}; argmax equal: {ours_np.argmax() == ref_np.argmax()}")

_, ours_vision_s = timed(lambda: rt.encode_images(pixels))
with torch.no_grad():
    _, hf_vision_s = timed(lambda: hf.model.get_image_features(x_pix))


# ---- decode at ~900 context ----
def ours_decode():
    ours_ttft()
    tok, t = 7, time.perf_counter()
    for i in range(args.decode):
        out = rt.step([tok], [n + i], [0], [0])
        tok = int(out[0].argmax())  # one small copy back per token, as generation does
    return (time.perf_counter() - t)


ours_decode()
ours_tps = args.decode / ours_decode()
with torch.no_grad():
    hf.generate(input_ids=x_ids, pixel_values=x_pix, max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    t = time.perf_counter()
    hf.generate(input_ids=x_ids, pixel_values=x_pix, max_new_tokens=args.decode + 1,
                min_new_tokens=args.decode + 1, do_sample=False)
    torch.cuda.synchronize()
    hf_tps = args.decode / (time.perf_counter() - t - hf_ttft_s)

print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
print(f"{args.tiles} tiles ({64 * args.tiles} image tokens) + {n - 64 * args.tiles} text tokens; bf16; "
      f"meganeura start-up (weights to GPU) {startup:.1f} s; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (both engines)")
print("| measure | transformers eager | meganeura (torch, op by op) | ratio |")
print("|---|---|---|---|")
print(f"| vision encoder | {hf_vision_s * 1e3:.1f} ms | {ours_vision_s * 1e3:.1f} ms | {hf_vision_s / ours_vision_s:.2f}x |")
print(f"| time to first token | {hf_ttft_s * 1e3:.1f} ms | {ours_ttft_s * 1e3:.1f} ms | {hf_ttft_s / ours_ttft_s:.2f}x |")
print(f"| decode tok/s (~{n} context) | {hf_tps:.0f} | {ours_tps:.0f} | {ours_tps / hf_tps:.2f}x |")
