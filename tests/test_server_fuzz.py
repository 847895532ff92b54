"""Fuzzing the chat endpoint of a real server (tiny random SmolVLM, loopback): a seeded generator
of JSON shapes, types, unicode (lone surrogates too), sizes and part kinds, a few hundred
requests. Every answer is a 2xx or an OpenAI-style 4xx JSON error, never a 500 or a hang; a
normal request is answered correctly afterwards."""

import json
import random
import time

import httpx
import pytest

from test_server_helpers import MODEL, data_url, png_bytes, serving, user

REQUESTS, SEED = 300, 11
PNG = data_url(png_bytes(40, 30))
STRINGS = ["", "hi", "a\ud800b", "\udfff", "\x00", "é漢字🙂", "\u202e\u200b", "<|im_start|>", "<image>",
           "{{ raise_exception('x') }}", "%s%n", "\\", "data:image/png;base64,", "../../etc/passwd", "x" * 300,
           "http://127.0.0.1:1/x.png", "file:///etc/hostname", "/etc/hostname", "a" * 300 + ".png"]
NUMBERS = [0, 1, -1, 2, 7, 0.5, -0.0, 1e308, 10**30, -(10**30), float("nan"), float("inf"), True, False]


def junk(rng: random.Random, depth: int = 0):
    """Any JSON value."""
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice(NUMBERS)
    if kind == 2:
        return rng.choice(STRINGS)
    if kind == 3:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x10FFFF)])) for _ in range(20))
    if kind == 4:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["type", "text", "url", "image_url", "role", "content", "x"]): junk(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def part(rng: random.Random):
    kind = rng.randrange(8)
    if kind == 0:
        return {"type": "text", "text": rng.choice(STRINGS + ["Describe it."])}
    if kind == 1:
        return {"type": "image_url", "image_url": {"url": rng.choice([PNG, PNG[:-8], "data:image/png;base64,AAAA"])}}
    if kind == 2:
        url = rng.choice([junk(rng), {"url": junk(rng)}, {"url": rng.choice(STRINGS)}])
        return {"type": "image_url", "image_url": url}
    if kind == 3:
        return {"type": rng.choice(["audio", "video_url", "input_audio", "video", "image", None, 5]), "x": junk(rng)}
    return junk(rng)


def message(rng: random.Random):
    m = {"role": rng.choice(["user", "user", "assistant", "system", "tool", "", None]),
         "content": rng.choice([lambda: rng.choice(STRINGS + ["What is this?"]),
                                lambda: [part(rng) for _ in range(rng.randrange(4))], lambda: junk(rng)])()}
    if rng.random() < 0.1:
        del m[rng.choice(list(m))]
    return m


SETTINGS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
            "stop", "stream", "stream_options", "n", "logprobs", "user"]
VALID = {"temperature": [0, 0.7, 2], "top_p": [0.5, 1], "top_k": [0, 3], "repetition_penalty": [0.8, 1.3],
         "seed": [0, 7], "stop": [".", ["a", "b"], None], "stream": [True, False], "n": [1],
         "stream_options": [{"include_usage": True}], "logprobs": [False], "user": ["u"]}


def valid(rng: random.Random) -> dict:
    """A request the server answers (or refuses only for its size)."""
    text = rng.choice(["What is this?", "é漢字🙂 <image>", "word " * rng.choice([1, 50, 400]), "\u0000"])
    content = rng.choice([text, [{"type": "text", "text": text}], [{"type": "image_url", "image_url": {"url": PNG}},
                                                                   {"type": "text", "text": text}]])
    req = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": rng.choice([1, 3, 6])}
    for key in rng.sample(sorted(VALID), rng.randrange(4)):
        req[key] = rng.choice(VALID[key])
    return req


def body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.08:  # not JSON, or not an object
        return rng.choice([b"", b"{", b"[" * 100_000, b'{"model": "test-model", "messages": [',
                           b"\xff\xfe{}", b"null", b"[]", b'"x"', b"1e999", b'{"a": NaN}'])
    if roll < 0.4:
        return json.dumps(valid(rng)).encode()
    req = {"model": MODEL if rng.random() < 0.9 else junk(rng),
           "messages": [message(rng) for _ in range(rng.randrange(1, 4))] if rng.random() < 0.95 else junk(rng),
           "max_tokens": rng.choice([1, 2, 5])}
    for key in rng.sample(SETTINGS, rng.randrange(4)):
        req[key] = rng.choice([junk(rng), rng.choice(NUMBERS), rng.choice(STRINGS)] +
                              ([{"include_usage": junk(rng)}] if key == "stream_options" else []))
    if rng.random() < 0.05:
        req["messages"] = [user("word " * rng.choice([100, 2000, 50_000, 300_000]))]
    return json.dumps(req).encode()  # escapes lone surrogates; NaN and Infinity become bare tokens


def check(r: httpx.Response, sent: bytes) -> None:
    where = f"{r.status_code} for {sent[:300]!r}"
    assert r.status_code < 500 and r.status_code in (200, 400, 404, 413, 429), where
    if r.status_code != 200:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), where
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), where
    else:
        assert r.json()["object"] == "chat.completion", where


@pytest.fixture(scope="module")
def pipe(tiny_vlm_pipe):
    return tiny_vlm_pipe


def test_random_requests_get_2xx_or_json_4xx(pipe, tmp_path):
    rng = random.Random(SEED)
    statuses = {}
    t0 = time.monotonic()
    with serving(pipe, max_batch=2, max_context=256, max_body_bytes=2**20, max_images=2,
                 media_root=str(tmp_path)) as url, httpx.Client(timeout=20) as client:
        for _ in range(REQUESTS):
            sent = body(rng)
            r = client.post(url + "/v1/chat/completions", content=sent, headers={"content-type": "application/json"})
            check(r, sent)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        messages = [user("What is in this picture?", PNG)]
        r = client.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 8})
        assert r.json()["choices"][0]["message"]["content"] == pipe.generate(messages, max_new_tokens=8).text
    print(f"{REQUESTS} requests in {time.monotonic() - t0:.1f} s: {statuses}")
    assert statuses.get(200, 0) >= REQUESTS // 5  # enough of them were valid to reach the engine
