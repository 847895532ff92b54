"""meganeura vs transformers on one CUDA GPU, SmolVLM2-500M architecture with random weights.

One run checks correctness first (bf16 logits and greedy tokens against transformers bf16),
then times both engines on the same inputs and prints one table with ratios and the card:
vision encoder (13 tiles), time to first token (13 tiles + ~40 text tokens), decode tok/s at
~900 and ~4,000 tokens of context, batched decode (8 and 32 sequences of ~900), start-up and
peak memory for one sequence at 8,192 tokens (measured in a child process of its own).

    python bench/bench_gpu.py [--decode 64] [--no-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import numpy as np
import torch

import smolvlm2_shapes  # bench/, beside this script
from meganeura.engine.runner import ModelRunner, ModelSpec
from meganeura.engine.scheduler import Scheduler
from meganeura.generate import GenerationConfig, Prompt, drain, generate_stream
from meganeura.models.smolvlm2 import NAMES, SmolVLM2Config
from meganeura.session import CompileOptions

IMAGE = 49190


def hf_model():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    torch.manual_seed(0)
    cfg = SmolVLMConfig(
        vision_config=smolvlm2_shapes.VISION,
        text_config=smolvlm2_shapes.text_config(),
        scale_factor=4, image_token_id=IMAGE, tie_word_embeddings=False)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def ours(weights, cfg, cache_tokens=48 * 1024):
    """A runner whose KV cache holds `cache_tokens` (the batched rows need 32 x ~1,000)."""
    spec = ModelSpec(cfg.text, NAMES, cfg)
    options = CompileOptions(backend="torch", device="cuda", dtype="bfloat16")
    rt = ModelRunner(spec, options, cache_bytes=ModelRunner(spec, options).bytes_per_token * cache_tokens)
    rt.load_weights(weights)
    return rt


def timed(fn, reps=7):
    """Median wall time of fn() with the GPU drained: what a caller waits for."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def prefill(rt, ids, slot, feats=None, rows=None):
    return rt.prefill(ids, slot, feats, rows)


def decode_loop(rt, first, positions, slots, steps):
    """Greedy decode: argmax on the GPU, one small copy back per step -> tokens [steps, rows]."""
    toks = np.array(first)
    out = []
    for i in range(steps):
        logits = rt.decode(toks, np.asarray(positions) + i, slots)
        toks = logits.argmax(-1).cpu().numpy()
        out.append(toks)
    return np.array(out)


def scheduled_tps(rt, prompts, steps, feats=None, image_rows=None):
    """Decode tok/s as a user gets it: greedy generation through the Scheduler (overlapped
    decode), all prompts at once, timed from when their prefills and first step are done."""
    sched = Scheduler(rt, set(), lambda ids: "", width=len(prompts))
    cfg = GenerationConfig(max_new_tokens=steps + 1, ignore_eos=True)
    for p in prompts:
        sched.add(Prompt(np.asarray(p), feats, image_rows), cfg)
    sched.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    while not sched.idle:
        sched.step()
    return len(prompts) * (steps - 1) / (time.perf_counter() - t)


def hf_decode_loop(hf, ids, steps):
    """transformers eager: prefill then one forward per token with its dynamic cache."""
    from transformers import DynamicCache
    cache = DynamicCache()
    out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        out = hf(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tok.cpu()
    return time.perf_counter() - t


def memory_child() -> None:
    """One sequence at 8,192 tokens of context, nothing else on the GPU: peak allocated bytes."""
    cfg = SmolVLM2Config.smolvlm2_500m()
    rng = np.random.default_rng(0)
    shapes = ModelRunner(ModelSpec(cfg.text, NAMES, cfg)).expected_parameters()
    weights = {name: (rng.standard_normal(t.shape, np.float32) * 0.02) for name, t in shapes.items()}
    rt = ours(weights, cfg, 8192)
    ids = rng.integers(100, 40000, 8192 - 32)
    slot = rt.cache.take(8192)
    before = torch.cuda.memory_allocated()  # weights + cache: what the prefill adds goes on top
    first = int(prefill(rt, ids, slot).argmax())
    decode_loop(rt, [first], [len(ids)], [slot], 16)
    torch.cuda.synchronize()
    print(json.dumps({"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "before_prefill_gib": before / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--tiles", type=int, default=13)
    parser.add_argument("--no-compile", action="store_true", help="skip transformers' static cache + torch.compile")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child()

    rows: list[tuple[str, float | None, float | None, str]] = []  # measure, transformers, ours, unit
    notes: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}

    def report(name, theirs, mine, unit):
        rows.append((name, theirs, mine, unit))
        print(f"  {name}: transformers {theirs} / meganeura {mine} {unit}", flush=True)

    hf = hf_model()
    weights = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    hf32 = copy.deepcopy(hf).to("cuda")  # the fp32 reference: how far is each bf16 engine from it?
    hf = hf.to("cuda", torch.bfloat16)
    cfg = SmolVLM2Config.from_hf(hf.config.to_dict())
    assert cfg == SmolVLM2Config.smolvlm2_500m(), cfg

    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (args.tiles, 3, 512, 512)).astype(np.float32)).cuda()
    ids = np.concatenate([[1, 11126, 42], [IMAGE] * (64 * args.tiles), rng.integers(100, 40000, 40)]).astype(np.int64)
    n = len(ids)
    image_rows = np.flatnonzero(ids == IMAGE)
    x_ids, x_pix = torch.from_numpy(ids)[None].cuda(), pixels[None].to(torch.bfloat16)

    # ---- start-up: weights to GPU, plans, kernel compilation, recording (cold, this process) ----
    t0 = time.perf_counter()
    rt = ours(weights, cfg)
    slot = rt.cache.take(1024)  # the timed prefills' slot
    feats = rt.encode_images(pixels)
    first = int(prefill(rt, ids, slot, feats, image_rows).argmax())
    decode_loop(rt, [first], [n], [slot], 2)
    torch.cuda.synchronize()
    notes["startup_s"] = time.perf_counter() - t0
    print(f"start-up {notes['startup_s']:.2f} s", flush=True)

    # ---- correctness: bf16 logits and 64 greedy tokens against transformers bf16 ----
    with torch.no_grad():
        ref = hf(input_ids=x_ids, pixel_values=x_pix, logits_to_keep=1).logits[0, -1].float()
        mine = prefill(rt, ids, slot, rt.encode_images(pixels), image_rows)[0].float()
        notes["bf16_last_logit_rel_err"] = float((mine - ref).norm() / ref.norm())
        notes["bf16_last_logit_max_rel_err"] = float((mine - ref).abs().max() / ref.abs().max())
        torch.backends.cudnn.allow_tf32 = False
        ref32 = hf32(input_ids=x_ids, pixel_values=pixels[None], logits_to_keep=1).logits[0, -1].float()
        for who, value in (("meganeura_bf16", mine), ("transformers_bf16", ref)):
            notes[f"{who}_vs_fp32_max_rel_err"] = float((value - ref32).abs().max() / ref32.abs().max())
        del hf32
        text = rng.integers(100, 40000, 40)
        gen = hf.generate(input_ids=torch.from_numpy(text)[None].cuda(), max_new_tokens=64, min_new_tokens=64,
                          do_sample=False, output_scores=True, return_dict_in_generate=True)
        theirs = gen.sequences[0, len(text):].tolist()
        [result] = drain(generate_stream(rt, [Prompt(text)], GenerationConfig(max_new_tokens=64, ignore_eos=True),
                                         set(), lambda ids: ""))  # the overlapped decode users get
        mine_toks = result.token_ids
        diverge = next((i for i, (a, b) in enumerate(zip(theirs, mine_toks)) if a != b), None)
        notes["greedy_64_identical"] = diverge is None
        if diverge is not None:
            top2 = gen.scores[diverge][0].float().topk(2).values
            notes["greedy_first_divergence"] = {"step": diverge, "transformers_top1_top2_gap": float(top2[0] - top2[1])}
    print(f"correctness: {notes}", flush=True)

    # ---- vision and time to first token (pixels already on the GPU for both) ----
    with torch.no_grad():
        _, hf_vision = timed(lambda: hf.model.get_image_features(x_pix))
        _, hf_ttft = timed(lambda: hf(input_ids=x_ids, pixel_values=x_pix, logits_to_keep=1).logits)
    _, my_vision = timed(lambda: rt.encode_images(pixels))
    _, my_ttft = timed(lambda: prefill(rt, ids, slot, rt.encode_images(pixels), image_rows))
    rt.cache.release(slot)
    report(f"vision encoder, {args.tiles} tiles (ms)", hf_vision * 1e3, my_vision * 1e3, "ms")
    report(f"time to first token, {args.tiles} tiles + 40 tokens (ms)", hf_ttft * 1e3, my_ttft * 1e3, "ms")

    # ---- decode, batch 1: after the image prompt (~875), ~900 and ~4,000 text tokens ----
    with torch.no_grad():
        hf(input_ids=x_ids, pixel_values=x_pix, logits_to_keep=1)
        from transformers import DynamicCache
        cache = DynamicCache()
        out = hf(input_ids=x_ids, pixel_values=x_pix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.decode):
            out = hf(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tok.cpu()
        hf_img = args.decode / (time.perf_counter() - t)
    scheduled_tps(rt, [ids], 8, rt.encode_images(pixels), image_rows)
    report(f"decode tok/s after the image prompt ({n} context)", hf_img,
           scheduled_tps(rt, [ids], args.decode, rt.encode_images(pixels), image_rows), "tok/s")

    text900 = rng.integers(100, 40000, 900)
    with torch.no_grad():
        hf_900 = args.decode / hf_decode_loop(hf, torch.from_numpy(text900)[None].cuda(), args.decode)
    scheduled_tps(rt, [text900], 8)
    report("decode tok/s, 900 text tokens of context", hf_900, scheduled_tps(rt, [text900], args.decode), "tok/s")

    long_text = rng.integers(100, 40000, 4000)
    scheduled_tps(rt, [long_text], 8)
    with torch.no_grad():
        hf_long = args.decode / hf_decode_loop(hf, torch.from_numpy(long_text)[None].cuda(), args.decode)
    report("decode tok/s, 4,000 text tokens of context", hf_long, scheduled_tps(rt, [long_text], args.decode), "tok/s")

    # ---- batched decode: B sequences of ~900 tokens each ----
    for batch in (8, 32):
        prompts = [rng.integers(100, 40000, 900) for _ in range(batch)]
        scheduled_tps(rt, prompts, 4)  # record this bucket
        mine = scheduled_tps(rt, prompts, args.decode)
        with torch.no_grad():
            theirs = batch * args.decode / hf_decode_loop(hf, torch.from_numpy(np.stack(prompts)).cuda(), args.decode)
        report(f"batched decode tok/s, {batch} x 900", theirs, mine, "tok/s")

    # ---- transformers' best: a static cache, which its generate() compiles itself, text-only ~900 ----
    # (wrapping forward in torch.compile(mode="reduce-overhead") by hand failed under
    # transformers 5.17: "accessing tensor output of CUDAGraphs that has been overwritten")
    if not args.no_compile:
        try:
            hf.generation_config.cache_implementation = "static"
            x = torch.from_numpy(text900)[None].cuda()
            t = time.perf_counter()
            with torch.no_grad():
                for _ in range(2):
                    hf.generate(input_ids=x, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)
                notes["transformers_static_first_calls_s"] = time.perf_counter() - t
                _, short = timed(lambda: hf.generate(input_ids=x, max_new_tokens=2, min_new_tokens=2, do_sample=False), 3)
                _, full = timed(lambda: hf.generate(input_ids=x, max_new_tokens=args.decode + 2,
                                                     min_new_tokens=args.decode + 2, do_sample=False), 3)
            report("decode tok/s, 900 text tokens, transformers static cache (+ its compile)",
                   args.decode / (full - short), None, "tok/s")
        except Exception as e:  # noqa: BLE001 - report, keep the rest of the table
            notes["transformers_compile_error"] = f"{type(e).__name__}: {e}"[:300]

    # ---- peak memory, one sequence at 8,192 tokens, in a fresh process ----
    child = subprocess.run([sys.executable, __file__, "--memory-child"], capture_output=True, text=True)
    try:
        memory = json.loads(child.stdout.strip().splitlines()[-1])
        notes["peak_gib_8192"], notes["peak_gib_8192_before_prefill"] = memory["peak_gib"], memory["before_prefill_gib"]
    except (IndexError, ValueError):
        notes["peak_error"] = child.stderr[-500:]

    print(f"\ncard: {notes['card']}, torch {notes['torch']}; start-up {notes['startup_s']:.1f} s (cold); "
          f"peak GPU memory at 8,192 tokens: {notes.get('peak_gib_8192', float('nan')):.2f} GiB")
    print("| measure | transformers eager | meganeura | ratio |")
    print("|---|---|---|---|")
    for name, theirs, mine, unit in rows:
        if mine is None:
            print(f"| {name} | {theirs:.1f} | - | - |")
            continue
        ratio = theirs / mine if unit == "ms" else mine / theirs
        print(f"| {name} | {theirs:.1f} | {mine:.1f} | {ratio:.2f}x |")
    print(json.dumps(notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
