"""Long seeded random sequences of calls, as users make them, on one pipeline and on one
server (the tiny random SmolVLM with a 2,600-token context, CPU): single and batched calls of
1..33 conversations, streams abandoned part-way, logits, prompts of 1..2,000 tokens with 0..3
images, greedy and seeded sampling. Every answer equals the solo answer of a pipeline that
never did anything else, and the KV cache is whole again after every call. The pipeline soak
runs twice: with the CPU's host sampler, and with the GPU's device sampler on CPU tensors
(tokens fed back to the next step before the host reads them, first tokens of joining
prompts chosen there too), so the GPU's scheduling is soaked here as well."""

import random
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

import meganeura
from meganeura.backends.torch_sampling import DeviceSampler
from test_server_helpers import MODEL, data_url, serving, sse
from tiny_models import write_tiny_smolvlm_folder

CAP = 16          # the longest answer asked for
WORDS = ["apple", "river", "quantum", "blue", "seven", "mountain", "code", "zebra", "light", "story"]


def _conversation(rng: random.Random, images: list) -> list:
    words = int(rng.choice([1, 2, 5, 12, 40, 150, 600, 1900]) * rng.uniform(0.5, 1.0)) or 1
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    parts = [{"type": "image", "image": rng.choice(images)} for _ in range(rng.choice([0, 0, 0, 1, 2, 3]))]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-soak")
    write_tiny_smolvlm_folder(folder, context=2600)
    rng = random.Random(1234)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (rng.randint(20, 150), rng.randint(20, 150), 3),
                                                                dtype=np.uint8)) for i in range(4)]
    pool = [_conversation(rng, images) for _ in range(36)]
    pipe = meganeura.load(str(folder), device="cpu", progress=False)
    fresh = meganeura.load(str(folder), device="cpu", progress=False)  # only ever asked one thing at a time
    return folder, pool, pipe, fresh


class Solo:
    """Answers of the fresh pipeline, one conversation at a time, computed once per settings."""

    def __init__(self, fresh):
        self.fresh, self.memo = fresh, {}

    def result(self, conversation, **sampling):
        key = (id(conversation), tuple(sorted(sampling.items())))
        if key not in self.memo:
            self.memo[key] = self.fresh.generate(conversation, max_new_tokens=CAP, **sampling)
        return self.memo[key]

    def expect(self, conversation, limit: int, **sampling) -> tuple[list[int], str]:
        """(tokens, finish reason) of a call with max_new_tokens=limit, from the CAP-long answer."""
        full = self.result(conversation, **sampling)
        if full.finish_reason == "stop" and len(full.token_ids) < limit:
            return full.token_ids, "stop"
        return full.token_ids[:limit], "length"


def _cache_whole(pipe) -> None:
    cache = pipe.runner.cache
    assert cache.free_pages == cache.layout.num_blocks - 1 and cache.free_slots == pipe.runner.max_slots


class CountingSampler(DeviceSampler):
    overlapped = 0  # choices left on the device for the next step

    def choose_later(self, logits, rows, into, ring="decode"):
        CountingSampler.overlapped += 1
        return super().choose_later(logits, rows, into, ring)


def _device_sampled(pipe):
    """The pipeline with the GPU's overlapped sampler, on its CPU tensors."""
    backend = pipe.runner.backend
    backend.sampler = lambda: CountingSampler(backend)
    return pipe


@pytest.mark.parametrize("sampler", ["host", "device"])
def test_pipeline_soak_every_answer_equals_its_solo_answer(world, sampler):
    folder, pool, pipe, fresh = world
    CountingSampler.overlapped = 0
    if sampler == "device":
        pipe, fresh = (_device_sampled(meganeura.load(str(folder), device="cpu", progress=False)) for _ in range(2))
    solo, rng = Solo(fresh), random.Random(7)
    kinds = {}
    for call in range(200):
        kind = rng.choice(["batch", "batch", "single", "stream", "logits", "sampled"])
        limit = rng.randint(1, CAP)
        if call == 0:
            kind = "batch"  # the widest batch first, then anything
        kinds[kind] = kinds.get(kind, 0) + 1
        where = f"call {call} ({kind}, max_new_tokens={limit})"
        if kind == "batch":
            size = 33 if call == 0 else rng.choice([1, 2, 3, 5, 8, 13])
            convs = [rng.choice(pool) for _ in range(size)]
            got = pipe.generate(convs, max_new_tokens=limit)
            assert [(r.token_ids, r.finish_reason) for r in got] == [solo.expect(c, limit) for c in convs], where
        elif kind == "single":
            conv = rng.choice(pool)
            r = pipe.generate(conv, max_new_tokens=limit)
            assert (r.token_ids, r.finish_reason) == solo.expect(conv, limit), where
        elif kind == "stream":
            conv = rng.choice(pool)
            keep = rng.choice([0, 1, 3, None])  # pieces read before walking away; None: all of it
            pieces = []
            for piece in pipe.stream(conv, max_new_tokens=limit):
                pieces.append(piece)
                if keep is not None and len(pieces) >= keep:
                    break
            expected_text = fresh.tokenizer.decode(solo.expect(conv, limit)[0], skip_special_tokens=True)
            text = "".join(pieces)
            assert expected_text.startswith(text) and (keep is not None or text == expected_text), where
        elif kind == "logits":
            conv = rng.choice(pool)
            assert np.array_equal(pipe.logits(conv), fresh.logits(conv)), where
        else:  # seeded sampling is per sequence, so batch-invariant too
            convs = [rng.choice(pool) for _ in range(rng.choice([1, 4]))]
            sampling = dict(temperature=0.9, top_k=50, top_p=0.95, seed=rng.choice([1, 2]))
            got = pipe.generate(convs, max_new_tokens=limit, **sampling)
            assert [(r.token_ids, r.finish_reason) for r in got] == [solo.expect(c, limit, **sampling)
                                                                     for c in convs], where
        _cache_whole(pipe)
    assert min(kinds.values()) >= 15, kinds
    assert (CountingSampler.overlapped > 1000) == (sampler == "device"), CountingSampler.overlapped


def _ask(url, conversation, limit, stream, disconnect_after=None):
    """The server's answer text (None if this client walked away)."""
    body = {"model": MODEL, "messages": conversation, "max_tokens": limit, "temperature": 0, "stream": stream}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        if disconnect_after is not None:
            for i, _ in enumerate(r.iter_lines()):
                if i >= disconnect_after:
                    return None  # closing the response drops the connection mid-stream
        return "".join(e["choices"][0]["delta"].get("content", "") for e in sse(r) if e["choices"])


def _as_openai(conversation) -> list:
    """The same conversation with its images as data: URLs."""
    parts = []
    for p in conversation[0]["content"]:
        if p["type"] == "text":
            parts.append(p)
        else:
            import io
            buf = io.BytesIO()
            p["image"].save(buf, "PNG")
            parts.append({"type": "image_url", "image_url": {"url": data_url(buf.getvalue())}})
    return [{"role": "user", "content": parts}]


def test_server_soak_32_clients_with_disconnects(world):
    _, pool, pipe, fresh = world
    solo = Solo(fresh)
    short = [c for c in pool if sum(len(p.get("text", "")) for p in c[0]["content"]) < 2000][:12]
    wire = {id(c): _as_openai(c) for c in short}
    failures, answered = [], [0]
    process = psutil.Process()

    def client(seed: int, url: str, rounds: int):
        rng = random.Random(seed)
        for _ in range(rounds):
            conv, limit = rng.choice(short), rng.randint(1, CAP)
            stream = rng.random() < 0.5
            leave = rng.choice([None, None, 0, 2, 5]) if stream else None
            try:
                text = _ask(url, wire[id(conv)], limit, stream, leave)
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                failures.append(f"client {seed}: {type(e).__name__}: {e}")
                continue
            if text is None:
                continue
            expected = fresh.tokenizer.decode(solo.expect(conv, limit)[0], skip_special_tokens=True)
            if text != expected:
                failures.append(f"client {seed}: {text!r} != {expected!r}")
            answered[0] += 1

    for conv in short:  # solo answers first, outside the timed load
        solo.result(conv)
    with serving(pipe, max_batch=8, max_context=2600) as url:
        def load(rounds, seed0):
            threads = [threading.Thread(target=client, args=(seed0 + i, url, rounds)) for i in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=600)
        load(1, 0)  # warm-up: plans for every shape this load meets
        baseline = process.memory_info().rss
        start = time.monotonic()
        load(3, 100)
        deadline = time.monotonic() + 30
        while pipe.runner.cache.free_pages < pipe.runner.cache.layout.num_blocks - 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # disconnected requests are dropped at the engine's next step
        after = process.memory_info().rss
        assert httpx.get(url + "/health").json()["status"] == "ok"
    assert not failures, failures[:5]
    assert answered[0] >= 32 * 3 // 2, answered
    _cache_whole(pipe)
    assert after < baseline * 1.1 + 50 * 2**20, (baseline / 2**20, after / 2**20, time.monotonic() - start)
