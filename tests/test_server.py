"""The server with a tiny random SmolVLM checkpoint: answers with images equal the pipeline's,
every limit is a clear 4xx JSON error, and the media policy lets a request open only what the
server was told to allow."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

import meganeura
from meganeura.server.config import request_context
from test_server_helpers import MODEL, data_url, flat_png, png_bytes, serving, sse, user
from tiny_models import write_tiny_smolvlm_folder

SLOTS, CONTEXT = 4, 384
PHOTO = png_bytes(90, 60)


@pytest.fixture(scope="module")
def pipe(tiny_vlm_pipe):
    return tiny_vlm_pipe


@pytest.fixture(scope="module")
def strict(pipe):
    """Default media policy, small limits."""
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, max_images=2, max_image_pixels=100_000,
                 max_body_bytes=200_000) as url:
        yield url


def post(url, body, **kwargs):
    kwargs = {"content": body} if isinstance(body, (bytes, str)) else {"json": body}
    return httpx.post(url + "/v1/chat/completions", timeout=60, **kwargs)


def answer(url, messages, **settings):
    r = post(url, {"model": MODEL, "messages": messages, "temperature": 0, **settings})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_openai_client_with_an_image_answers_like_the_pipeline(pipe, strict):
    messages = [user("What is in this picture?", data_url(PHOTO))]
    ref = pipe.generate(messages, max_new_tokens=12)
    client = openai.OpenAI(base_url=strict + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, len(ref.token_ids))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text


def test_batched_image_requests_equal_their_solo_answers(strict):
    asks = [([user(f"Describe picture {i}.", data_url(png_bytes(40 + 30 * i, 70, seed=i)))], 10 + 4 * i)
            for i in range(5)] + [([user("Just text, please.")], 20)]
    expected = [answer(strict, m, max_tokens=n) for m, n in asks]  # one at a time
    got = [None] * len(asks)

    def ask(i):
        messages, n = asks[i]
        if i % 2:
            body = {"model": MODEL, "messages": messages, "max_tokens": n, "temperature": 0, "stream": True}
            with httpx.stream("POST", strict + "/v1/chat/completions", json=body, timeout=60) as r:
                got[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in sse(r) if e["choices"])
        else:
            got[i] = answer(strict, messages, max_tokens=n)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


@pytest.mark.parametrize("stream", [False, True])
def test_answers_that_end_on_their_first_decode_step_keep_the_engine_running(pipe, strict, stream):
    """Regression: a 2-token answer (or a stop string met on the 2nd token) finishes in the
    same step as its prefill token; that stopped the engine for good (KeyError in _deliver)."""
    messages = [user("Say one thing.")]
    two = pipe.generate(messages, max_new_tokens=2)
    second = two.text[len(pipe.generate(messages, max_new_tokens=1).text):]
    asks = [dict(max_tokens=1), dict(max_tokens=2), dict(max_tokens=8, stop=[second])]
    assert second, "the 2nd token adds text (else the stop-string case tests nothing)"
    for settings in asks * 2:
        body = {"model": MODEL, "messages": messages, "temperature": 0, "stream": stream, **settings}
        if stream:
            with httpx.stream("POST", strict + "/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                text = "".join(e["choices"][0]["delta"].get("content", "") for e in sse(r) if e["choices"])
        else:
            r = post(strict, body)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["message"]["content"]
        expected = pipe.generate(messages, max_new_tokens=settings["max_tokens"], stop=settings.get("stop", ())).text
        assert text == expected, settings
        assert httpx.get(strict + "/health").json()["status"] == "ok"


BIG = data_url(flat_png(400, 400))  # 160,000 pixels (a few hundred bytes): above the strict server's 100,000


@pytest.mark.parametrize("body, status, code, says", [
    (b"{not json", 400, "invalid_json", "not valid JSON"),
    ({"model": MODEL}, 400, "invalid_request", "messages"),
    ({"model": MODEL, "messages": [user("hi")], "temperature": 7}, 400, "invalid_request", "temperature"),
    ({"model": MODEL, "messages": [user("hi")], "n": 2}, 400, "invalid_request", "n:"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "invalid_request",
     "messages.0.content"),
    ({"model": "gpt-4", "messages": [user("hi")]}, 404, "model_not_found", "serves 'test-model'"),
    ("x" * 200_001, 413, "body_too_large", "200000 bytes"),
    ({"model": MODEL, "messages": [user("hi", *[data_url(PHOTO)] * 3)]}, 400, "too_many_images", "at most 2"),
    ({"model": MODEL, "messages": [user("hi", BIG)]}, 400, "invalid_image", "pixels"),
    ({"model": MODEL, "messages": [user("hi", "data:image/png;base64,AAAA")]}, 400, "invalid_image", "image 0"),
    ({"model": MODEL, "messages": [user("word " * 400)]}, 400, "context_length_exceeded", "context is 384"),
    ({"model": MODEL, "messages": [user("hi")], "max_tokens": 380}, 400, "context_length_exceeded", "max_tokens"),
    ({"model": MODEL, "messages": [user("hi", "https://example.com/cat.png")]}, 400, "media_not_allowed",
     "--allow-remote-media"),
    ({"model": MODEL, "messages": [user("hi", "/etc/hostname")]}, 400, "media_not_allowed", "--media-root"),
    ({"model": MODEL, "messages": [user("hi", "file:///etc/hostname")]}, 400, "media_not_allowed", "data:"),
])
def test_limits_and_refusals_are_clear_json_errors(strict, body, status, code, says):
    r = post(strict, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and says in error["message"], error


def test_unknown_routes_are_json_errors(strict):
    r = httpx.get(strict + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(strict + "/v1/chat/completions").status_code == 405


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves the photo at /photo.png and redirects /sneaky to an ftp: URL (which urllib would follow)."""

    def do_GET(self):
        if self.path == "/sneaky":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/etc/hostname")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(PHOTO)

    def log_message(self, *args):
        pass


def test_remote_and_local_media_only_where_allowed(pipe, strict, tmp_path):
    expected = answer(strict, [user("What is this?", data_url(PHOTO))], max_tokens=8)
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "photo.png").write_bytes(PHOTO)
    (outside / "secret.png").write_bytes(PHOTO)
    os.symlink(outside / "secret.png", root / "link.png")
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, allow_remote_media=True,
                     allow_private_media_hosts=True, media_root=str(root)) as url:
            for source in (remote + "/photo.png", str(root / "photo.png"), "photo.png"):
                assert answer(url, [user("What is this?", source)], max_tokens=8) == expected
            for source, says in ((remote + "/sneaky", "only http and https"),
                                 ("../outside/secret.png", "'..' is not allowed"),
                                 (str(outside / "secret.png"), "outside the media root"),
                                 ("link.png", "outside the media root"),
                                 ("missing.png", "no such file")):
                r = post(url, {"model": MODEL, "messages": [user("What is this?", source)]})
                assert r.status_code == 400 and says in r.json()["error"]["message"], (source, r.text)
    finally:
        files.shutdown()


def test_health_and_page(strict):
    assert httpx.get(strict + "/health").json()["status"] == "ok"
    page = httpx.get(strict + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/v1/chat/completions" in page.text


def test_request_context_is_the_model_context_within_what_the_cache_holds(tmp_path):
    folder = tmp_path / "tiny"
    write_tiny_smolvlm_folder(folder)
    roomy = meganeura.load(str(folder), device="cpu", progress=False)
    assert request_context(roomy.runner, None) == 512  # the tiny model's context
    assert request_context(roomy.runner, 300) == 300
    with pytest.raises(ValueError, match="exceeds the 512 tokens"):
        request_context(roomy.runner, 600)
    per_token = roomy.runner.bytes_per_token
    small = meganeura.load(str(folder), device="cpu", progress=False, kv_cache_bytes=per_token * 16 * 20)
    assert small.runner.cache.capacity_tokens == 320 and request_context(small.runner, None) == 320
    with pytest.raises(ValueError, match="the KV cache holds 320"):
        request_context(small.runner, 400)


def test_cli_serve_listens_on_loopback_and_answers(pipe):
    with socket.socket() as s:  # a free port for the subprocess
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = pipe.checkpoint.folder
    proc = subprocess.Popen([sys.executable, "-m", "meganeura.cli", "serve", "--model", str(folder), "--device", "cpu",
                             "--port", str(port), "--max-batch", "2", "--max-context", "256", "--api-key", "k"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", headers={"Authorization": "Bearer k"}).status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"model": str(folder), "messages": [user("hi", data_url(PHOTO))], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "serving" in err and "2 sequences at once, 256 tokens each" in err
