"""The prefix cache and chunked prefill, SmolVLM2-500M shapes with random weights (built from
the config: nothing is downloaded).

1. Two-turn chat about a 13-tile photo (2048x1536), time to first token of each turn, with the
   prefix and vision-feature caches on and off: end to end (the messages: image preprocessing
   and hashing included) and in the engine (a preprocessed request: vision features, prefill,
   first token; what the server's engine thread does, the handlers preprocess). The variants
   alternate in rounds; each round uses a new photo, so its first turn misses. On CUDA a
   first round, not shown, records the shapes. CPU and CUDA.
2. CUDA only: 8 streams decode; a 6,000-token prompt arrives. The streams' inter-token
   latency (ITL) before it arrived (median) and while it is prefilled (max, p90), with
   chunked prefill and with the whole prompt in one step (what happened before chunking).

    python bench/bench_prefix_cache.py [--device cpu|cuda] [--rounds 2] [--skip-itl] [--chunk N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tokenizer of the tiny test models

import smolvlm2_shapes  # noqa: E402  (bench/, beside this script)
from meganeura.engine.runner import ModelRunner  # noqa: E402
from meganeura.engine.scheduler import Scheduler  # noqa: E402
from meganeura.generate import GenerationConfig, Prompt, drain, generate_stream  # noqa: E402
from meganeura.pipeline import Pipeline, compile_options, model_spec  # noqa: E402
from meganeura.weights import Checkpoint, load_checkpoint  # noqa: E402


def smolvlm2_500m_checkpoint() -> Checkpoint:
    """SmolVLM2-500M's architecture and preprocessing (the defaults), random weights, SmolLM2's
    vocabulary with SmolVLM's special tokens and SmolVLM's chat template."""
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from tiny_models import SMOLVLM_SPECIALS

    tokenizer = load_checkpoint("smollm2-135m-instruct", progress=False).tokenizer
    tokenizer.add_special_tokens(SMOLVLM_SPECIALS)
    end = tokenizer.token_to_id("<end_of_utterance>")
    config = SmolVLMConfig(
        vision_config=smolvlm2_shapes.VISION,
        text_config=smolvlm2_shapes.text_config(),
        scale_factor=4, image_token_id=tokenizer.token_to_id("<image>"), tie_word_embeddings=False).to_dict()
    rng = np.random.default_rng(0)
    shapes = ModelRunner(model_spec(config)).expected_parameters()
    tensors = {}
    for name, node in shapes.items():
        w = rng.standard_normal(node.shape, np.float32) * 0.02
        tensors[name] = w + 1 if "norm" in name and name.endswith("weight") else w
    return Checkpoint(config=config, tensors=tensors, source="random SmolVLM2-500M", tokenizer=tokenizer,
                      chat_template=DEFAULT_CHAT_TEMPLATE, generation={"eos_token_id": end})


def set_caches(pipe: Pipeline, on: bool, vision_cache) -> None:
    pipe.prefix_cache = on
    pipe.vision_cache = vision_cache if on else None


def ttft(pipe: Pipeline, messages) -> tuple[float, float, int]:
    """(end-to-end TTFT, engine TTFT, cached tokens). End to end: the messages to the first token
    (image preprocessing and hashing included). Engine: a request already preprocessed (what the
    server's engine thread does: vision features, prefill, first token)."""
    t = time.perf_counter()
    enc = pipe.encode(messages)
    t_engine = time.perf_counter()
    cfg = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    [r] = drain(generate_stream(pipe.runner, [pipe.prompt(enc)], cfg, pipe.eos_ids, pipe._decode,
                                prefix_cache=pipe.prefix_cache))
    end = time.perf_counter()
    return end - t, end - t_engine, r.cached_tokens


def two_turns(pipe: Pipeline, rounds: int, warm_up: bool) -> None:
    from PIL import Image

    vision_cache = pipe.vision_cache
    results = {True: [], False: []}
    for r in range(-1 if warm_up else 0, rounds):
        for on in (True, False):
            set_caches(pipe, on, vision_cache)
            photo = Image.fromarray(np.random.default_rng(100 + 2 * r + on).integers(0, 256, (1536, 2048, 3),
                                                                                     dtype=np.uint8))
            messages = [{"role": "user", "content": [{"type": "image", "image": photo},
                                                     {"type": "text", "text": "What is in this photo?"}]}]
            first = ttft(pipe, messages)
            messages += [{"role": "assistant", "content": [{"type": "text", "text": "A field of coloured noise."}]},
                         {"role": "user", "content": [{"type": "text", "text": "Which colour is most common?"}]}]
            second = ttft(pipe, messages)
            if r < 0:
                continue
            results[on].append((first, second))
            print(f"round {r} cache {'on ' if on else 'off'}: end to end turn 1 {first[0]:8.4f} s, turn 2 "
                  f"{second[0]:8.4f} s ({first[0] / second[0]:5.1f}x); engine turn 1 {first[1]:8.4f} s, turn 2 "
                  f"{second[1]:8.4f} s ({first[1] / second[1]:5.1f}x); {second[2]} prompt tokens cached", flush=True)
    set_caches(pipe, True, vision_cache)
    enc = pipe.encode(messages)
    print(f"turn 2 prompt: {len(enc.input_ids)} tokens, {len(enc.pixel_values)} tiles")
    for on in (True, False):
        for k, what in ((0, "end to end"), (1, "engine")):
            ratios = [a[k] / b[k] for a, b in results[on]]
            print(f"cache {'on ' if on else 'off'}, {what:>10}: turn-1/turn-2 TTFT {min(ratios):.1f}x..{max(ratios):.1f}x "
                  f"(median turn 1 {np.median([a[k] for a, _ in results[on]]):.4f} s, "
                  f"turn 2 {np.median([b[k] for _, b in results[on]]):.4f} s)")


def itl_under_long_prompt(pipe: Pipeline, chunk: int | None, long_tokens: int = 6000, streams: int = 8) -> None:
    """Inter-token latency of `streams` decoding sequences while a long prompt is prefilled."""
    import torch

    rt = pipe.runner
    rng = np.random.default_rng(0)
    cfg = GenerationConfig(max_new_tokens=min(1000, rt.max_seq - 200), ignore_eos=True)  # decoding all along

    def one(prefill_chunk: int, seed: int) -> tuple[float, float, float, int, str]:
        sched = Scheduler(rt, set(), lambda ids: "", width=16, prefix_cache=False, prefill_chunk=prefill_chunk)
        seqs = [sched.add(Prompt(rng.integers(100, 40000, 100 + i)), cfg) for i in range(streams)]
        stamps = {s: [] for s in seqs}

        labels = []  # what each step did for the long prompt: where the worst gap comes from

        def step():
            before = long is not None and long.prefilling
            sched.step()
            now = time.perf_counter()
            for s in seqs:
                if len(stamps[s]) < len(s.tokens):
                    stamps[s].append(now)
            labels.append((now, "its last chunk" if before and not long.prefilling else "a chunk" if before else "no chunk"))
        long = None
        for _ in range(40):  # all streams decoding, steady
            step()
        arrived = len(stamps[seqs[0]])
        long = sched.add(Prompt(np.random.default_rng(seed).integers(100, 40000, long_tokens)),
                         GenerationConfig(max_new_tokens=8, ignore_eos=True))
        while long.prefilling or not long.tokens:
            step()
        to_first = len(stamps[seqs[0]]) - arrived
        for _ in range(5):
            step()
        done = len(stamps[seqs[0]])
        before = np.concatenate([np.diff(stamps[s][5:arrived]) for s in seqs])
        during = np.concatenate([np.diff(stamps[s][arrived - 1:done]) for s in seqs])
        sched.cancel_all()
        torch.cuda.synchronize()
        times = np.array([t for t, _ in labels[39:]])  # from the last step before it arrived
        worst = int(np.argmax(np.diff(times))) + 1
        where = f"step {worst} after it arrived, {labels[39 + worst][1]}"
        return float(np.median(before)), float(during.max()), float(np.percentile(during, 90)), to_first, where

    chunks = [chunk] if chunk else sorted({64, rt.prefill_chunk, 256})
    chunks.append(10**6)
    print(f"ITL: {streams} streams decoding, a {long_tokens}-token prompt arrives; default chunk {rt.prefill_chunk}")
    for c in chunks:  # the first pass records every shape the measured ones use
        one(c, seed=1)
    for r in range(2):
        for c in chunks:
            med, worst, p90, steps, where = one(c, seed=2 + r)
            label = f"chunk {c}" if c < 10**6 else "whole prompt"
            print(f"round {r} {label:>13}: ITL median before {med * 1e3:6.2f} ms, during the {long_tokens}-token "
                  f"prefill max {worst * 1e3:7.2f} ms ({worst / med:5.2f}x), p90 {p90 * 1e3:6.2f} ms; "
                  f"{steps} steps until its first token; worst gap at {where}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-itl", action="store_true")
    parser.add_argument("--chunk", type=int, default=None,
                        help="measure only this prefill chunk (default: 64, the runner's default and 256)")
    args = parser.parse_args()
    options = compile_options(args.device)
    t = time.perf_counter()
    pipe = Pipeline(smolvlm2_500m_checkpoint(), options, progress=False)
    print(f"device {options.device} {options.dtype}; model ready in {time.perf_counter() - t:.1f} s", flush=True)
    cuda = options.device.startswith("cuda")
    import torch
    print("card:", torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads")
    two_turns(pipe, args.rounds, warm_up=cuda)
    if cuda and not args.skip_itl:
        itl_under_long_prompt(pipe, args.chunk)


if __name__ == "__main__":
    main()
