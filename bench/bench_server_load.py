"""Load test of the server on loopback: C concurrent clients for D seconds (at most N requests),
mixing streaming and non-streaming requests, with images when the model reads them.

Each kind of request is first answered alone (greedy); under load every answer must equal its
solo answer, so a mixed-up or truncated answer is counted, as is any error.

    .venv/bin/python bench/bench_server_load.py --model smollm2-135m-instruct --clients 64 --duration 60
    .venv/bin/python bench/bench_server_load.py --model tiny-vlm      # a tiny random SmolVLM, with images
"""

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

import meganeura
from meganeura.server import ServerConfig, ServerThread, create_app

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Who wrote Hamlet?",
             "Write a haiku about the sea.", "Why is the sky blue?", "Give me a synonym for happy.",
             "What is the boiling point of water?", "Describe a cat in one sentence.", "Count from 1 to 5.",
             "What do bees make?", "Name a planet.", "What is a prime number?", "Say hello in Spanish.",
             "What is the largest ocean?", "What colour is grass?"]
MODEL = "bench"

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m-instruct", help="as for `meganeura serve`, or tiny-vlm")
parser.add_argument("--device", default="cpu")
parser.add_argument("--clients", type=int, default=64)
parser.add_argument("--duration", type=float, default=60.0, help="seconds of load; no request starts after it")
parser.add_argument("--max-requests", type=int, default=5000)
parser.add_argument("--max-batch", type=int, default=8)
parser.add_argument("--max-tokens", type=int, default=32, help="the largest max_tokens of a request kind")
args = parser.parse_args()


def load():
    if args.model != "tiny-vlm":
        return meganeura.load(args.model, device=args.device, progress=False)
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from tiny_models import write_tiny_smolvlm_folder
    folder = Path(tempfile.mkdtemp(prefix="tiny-vlm-"))
    write_tiny_smolvlm_folder(folder)
    return meganeura.load(str(folder), device=args.device, progress=False)


def photo(i: int) -> str:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_kinds(vision: bool) -> list[dict]:
    """One body per question (greedy, max_tokens from 8 to --max-tokens), images on every other one."""
    out = []
    for i, q in enumerate(QUESTIONS):
        content = q
        if vision and i % 2:
            content = [{"type": "image_url", "image_url": {"url": photo(i)}}, {"type": "text", "text": q}]
        out.append({"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
                    "max_tokens": 8 + (i * 7) % max(1, args.max_tokens - 7)})
    return out


async def send(client, body: dict, stream: bool) -> tuple[str, int, float | None]:
    """(answer, completion tokens, seconds to the first token or None)."""
    t0 = time.perf_counter()
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"], None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    pieces, tokens, first, done = [], 0, None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    pieces.append(choice["delta"]["content"])
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return "".join(pieces), tokens, first


async def load_test(url: str, kinds: list[dict], solo: list[str]) -> dict:
    stats = {"latency": [], "first_token": [], "tokens": 0, "requests": 0, "errors": [], "mismatches": 0}
    deadline = time.perf_counter() + args.duration
    issued = 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)

    async def client_loop(c: int, client) -> None:
        nonlocal issued
        rng = random.Random(c)
        while time.perf_counter() < deadline and issued < args.max_requests:
            issued += 1
            k = rng.randrange(len(kinds))
            stream = rng.random() < 0.5
            t0 = time.perf_counter()
            try:
                text, tokens, first = await send(client, kinds[k], stream)
            except Exception as e:  # counted, and the run goes on
                stats["errors"].append(f"{type(e).__name__}: {e}")
                continue
            stats["latency"].append(time.perf_counter() - t0)
            if first is not None:
                stats["first_token"].append(first)
            stats["requests"] += 1
            stats["tokens"] += tokens
            stats["mismatches"] += text != solo[k]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(args.clients)))
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def decode_batches(metrics: str) -> tuple[float, float]:
    """(sequences over all decode steps, decode steps) from /metrics."""
    values = dict(line.split() for line in metrics.splitlines()
                  if line.startswith(("meganeura_decode_batch_size_sum", "meganeura_decode_batch_size_count")))
    return float(values["meganeura_decode_batch_size_sum"]), float(values["meganeura_decode_batch_size_count"])


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    pipe = load()
    vision = pipe.spec.vlm is not None
    config = ServerConfig(model_id=MODEL, max_batch=args.max_batch, max_queue=args.clients,
                          max_context=min(1024, pipe.context_length))
    kinds = request_kinds(vision)
    with ServerThread(create_app(pipe, config)) as url:
        with httpx.Client(base_url=url, timeout=300) as client:
            t0 = time.perf_counter()
            solo = [client.post("/v1/chat/completions", json=k).json()["choices"][0]["message"]["content"]
                    for k in kinds]
            print(f"solo answers for {len(kinds)} request kinds in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            before = decode_batches(client.get("/metrics").text)
            stats = asyncio.run(load_test(url, kinds, solo))
            after = decode_batches(client.get("/metrics").text)
    batch_sum, batch_n = after[0] - before[0], after[1] - before[1]
    wall = stats["wall_s"]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": args.model, "device": args.device, "images": vision, "clients": args.clients,
        "max_batch": args.max_batch, "duration_s": round(wall, 1), "requests": stats["requests"],
        "requests_per_s": round(stats["requests"] / wall, 2), "tokens_per_s": round(stats["tokens"] / wall, 1),
        "latency_p50_s": round(percentile(stats["latency"], 0.5), 2),
        "latency_p99_s": round(percentile(stats["latency"], 0.99), 2),
        "first_token_p50_s": round(percentile(stats["first_token"], 0.5), 2),
        "mean_decode_batch": round(batch_sum / max(batch_n, 1), 2),
        "errors": len(stats["errors"]), "mismatched_answers": stats["mismatches"],
        "rss_after_gb": round(psutil.Process().memory_info().rss / 1e9, 2),
    }
    print(json.dumps(report, indent=1))
    for e in stats["errors"][:5]:
        print("error:", e, file=sys.stderr)
    sys.exit(1 if stats["errors"] or stats["mismatches"] else 0)


if __name__ == "__main__":
    main()
