"""The server against hostile and careless clients (issue 11), with the tiny random SmolVLM:
slow and private remote images, huge prompts, half-sent headers, absurd sizes, odd text,
unauthenticated probes, vague errors; and memory that comes back after hostile rounds."""

import asyncio
import json
import socket
import threading
import time

import httpx
import psutil
import pytest

import meganeura
from meganeura import cli
from meganeura.server import ServerConfig, create_app
from meganeura.server.fetch import RemoteFetcher
from meganeura.server.media import MediaError
from test_server_helpers import MODEL, data_url, metric, png_bytes, served, serving, user

SLOTS, CONTEXT = 2, 384
ROUNDS = 3
PHOTO = png_bytes(90, 60)


@pytest.fixture(scope="module")
def pipe(tiny_vlm_pipe):
    return tiny_vlm_pipe


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT) as url:
        yield url


def post(url, body, timeout=30):
    """json.dumps escapes what httpx's encoder cannot send (lone surrogates, NaN)."""
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=timeout,
                      headers={"content-type": "application/json"})


def ask(text, *images, **settings):
    return {"model": MODEL, "messages": [user(text, *images)], "max_tokens": 4, **settings}


def refused(r, status, *says):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert all(s in error["message"] for s in says), error
    return error


class Files:
    """A loopback HTTP server for remote-media tests: /photo.png, /trickle (a header, then one
    byte every 0.3 s), /to/<url> (a redirect), anything else 404. Counts the requests it got."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.hits = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            path = conn.recv(4096).split(b" ")[1].decode()
            self.hits += 1
            try:
                if path == "/photo.png":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PHOTO) + PHOTO)
                elif path == "/trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    for _ in range(60):  # 18 s at most
                        conn.sendall(b"x")
                        time.sleep(0.3)
                elif path.startswith("/to/"):
                    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % path[4:].encode())
                else:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def files():
    f = Files()
    yield f
    f.close()


# ---- remote media (issue item 2) ---------------------------------------------------------------
def test_a_trickling_host_is_cut_off_at_the_deadline_and_fetches_are_bounded(pipe, files):
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, allow_remote_media=True, allow_private_media_hosts=True,
                 remote_timeout_s=1.5, max_remote_fetches=1) as url:
        slow = {}

        def trickled():
            t0 = time.monotonic()
            slow["r"], slow["s"] = post(url, ask("hi", files.url + "/trickle")), time.monotonic() - t0
        thread = threading.Thread(target=trickled)
        thread.start()
        while files.hits == 0:
            time.sleep(0.02)
        t0 = time.monotonic()  # the only fetch slot is taken: another remote image is refused at once
        refused(post(url, ask("hi", files.url + "/photo.png")), 429, "fetching remote images")
        assert time.monotonic() - t0 < 1
        assert post(url, ask("hi", data_url(PHOTO))).status_code == 200  # data: URLs need no slot
        thread.join()
        refused(slow["r"], 400, "cannot fetch", "1.5 s")
        assert slow["s"] < 3  # not 0.3 s a byte for 100,000 bytes
        assert post(url, ask("hi", files.url + "/photo.png")).status_code == 200  # the slot came back


LOOPBACK_FORMS = ["http://127.0.0.1:{port}/photo.png", "http://2130706433:{port}/photo.png",
                  "http://0x7f000001:{port}/photo.png", "http://0177.0.0.1:{port}/photo.png",
                  "http://127.1:{port}/photo.png", "http://localhost:{port}/photo.png",
                  "http://[::1]:{port}/photo.png", "http://[::ffff:127.0.0.1]:{port}/photo.png",
                  "http://[::ffff:7f00:1]:{port}/photo.png", "http://0.0.0.0:{port}/photo.png",
                  "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x.png", "http://192.168.0.1/x.png",
                  "http://224.0.0.1/x.png", "http://[fe80::1]/x.png", "http://[fd00::1]/x.png",
                  "http://{port_of_files}/to/http://127.0.0.1:{port}/photo.png"]


def test_loopback_and_private_addresses_are_not_fetched(pipe, files):
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, allow_remote_media=True) as url:
        for form in LOOPBACK_FORMS:
            source = form.format(port=files.port, port_of_files=f"127.0.0.1:{files.port}")
            error = refused(post(url, ask("hi", source)), 400)
            assert error["code"] == "media_not_allowed", (source, error)
            assert "refusing" in error["message"] or "not a valid URL" in error["message"], (source, error)
    assert files.hits == 0


def test_every_redirect_hop_is_checked(files, monkeypatch):
    """The first hop's address is allowed here; the redirect to another loopback address is not."""
    monkeypatch.setattr("meganeura.server.fetch.public", lambda ip: ip == "127.0.0.1")
    fetcher = RemoteFetcher(allow=True)

    async def fetch(target):
        return await fetcher.fetch([files.url + "/to/" + target])
    assert asyncio.run(fetch(files.url + "/photo.png")) == {files.url + "/to/" + files.url + "/photo.png": PHOTO}
    with pytest.raises(MediaError, match="refusing '127.0.0.2'"):
        asyncio.run(fetch(f"http://127.0.0.2:{files.port}/photo.png"))
    with pytest.raises(MediaError, match="only http and https"):
        asyncio.run(fetch("ftp://127.0.0.1/etc/hostname"))


def test_odd_urls_are_media_errors():
    fetcher = RemoteFetcher(allow=True, allow_private=True, timeout_s=2)
    for url in ("http://münchen.invalid/x.png", "http://a..b/x.png", "http://[fe80::1%25eth0]/x.png", "http://:80/",
                "http://" + "a" * 300 + ".invalid/", "http://x.invalid:99999/", "http://[::1/"):
        with pytest.raises(MediaError, match="cannot fetch|not a valid URL|refusing"):
            asyncio.run(fetcher.fetch([url]))


def test_fetch_errors_do_not_tell_open_ports_from_closed(pipe, files):
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, allow_remote_media=True, allow_private_media_hosts=True,
                 remote_timeout_s=1) as url:
        messages = {refused(post(url, ask("hi", source)), 400)["message"].replace(source, "URL")
                    for source in (f"http://127.0.0.1:{closed_port}/x.png", files.url + "/missing.png",
                                   files.url + "/trickle")}
    assert len(messages) == 1 and "cannot fetch" in messages.pop()


# ---- huge prompts (item 3) ---------------------------------------------------------------------
def test_huge_prompts_are_refused_before_tokenizing(server):
    t0 = time.monotonic()
    r = post(server, ask("hello " * 2_000_000))  # 12 MB: seconds of tokenizing before
    refused(r, 400, "12000000 characters", f"context of {CONTEXT} tokens holds at most")
    assert time.monotonic() - t0 < 3
    assert post(server, ask("hi")).status_code == 200


# ---- slowloris (item 4) ------------------------------------------------------------------------
def test_half_sent_headers_are_closed_and_connections_are_capped(pipe):
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, header_timeout_s=1, max_connections=12) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        for s in slow:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            s.settimeout(5)
        # a kept-alive connection that starts a second request and stops half-way is closed too
        with socket.create_connection(("127.0.0.1", port)) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            with kept.makefile("rb") as answer:  # the whole response, so that nothing is left to read
                assert answer.readline().startswith(b"HTTP/1.1 200")
                headers = list(iter(answer.readline, b"\r\n"))
                answer.read(next(int(h.split(b":")[1]) for h in headers if h.lower().startswith(b"content-length:")))
            kept.sendall(b"GET /health HTTP/1.1\r\nHo")
            slow.append(kept)
            kept.settimeout(5)
            # beyond the cap, new connections are closed on arrival
            extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            for s in extra:
                s.settimeout(5)
                assert s.recv(1) == b""
                s.close()
            t0 = time.monotonic()
            assert all(s.recv(1) == b"" for s in slow)  # closed by the server
            assert time.monotonic() - t0 < 2
        for s in slow:
            s.close()
        # a body refused for its size (413) and then trickled on is cut off too
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{")
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
            t0 = time.monotonic()
            with pytest.raises(OSError):  # a broken pipe or a reset, once the server has closed it
                while time.monotonic() - t0 < 5:
                    s.sendall(b" ")
                    time.sleep(0.1)
            assert time.monotonic() - t0 < 2
        assert post(url, ask("hi")).status_code == 200


def test_a_trickled_body_gets_408_at_its_deadline(pipe):
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, body_timeout_s=1) as url:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            s.settimeout(5)
            t0 = time.monotonic()
            answer = b"".join(iter(lambda: s.recv(4096), b""))  # until the server closes
            assert time.monotonic() - t0 < 2.5
        assert answer.startswith(b"HTTP/1.1 408") and b'"code": "body_timeout"' in answer, answer
        assert post(url, ask("hi")).status_code == 200


# ---- absurd sizes (item 5) ---------------------------------------------------------------------
def test_sizes_are_bounded_by_the_runner_and_its_kv_cache(pipe, capsys):
    with pytest.raises(ValueError, match=r"--max-batch 100000: at most 256 sequences run at once"):
        create_app(pipe, ServerConfig(max_batch=100000))
    folder = str(pipe.checkpoint.folder)
    assert cli.main(["serve", "--model", folder, "--device", "cpu", "--max-batch", "100000"]) == 2
    assert "at most 256" in capsys.readouterr().err
    # a small KV cache bounds each request (a 400 naming the numbers), not the server's start
    small = meganeura.load(folder, device="cpu", progress=False, kv_cache_bytes=pipe.runner.bytes_per_token * 16 * 20)
    with serving(small, max_batch=64) as url:
        refused(post(url, ask("word " * 400)), 400, "context is 320")
        # three requests of ~230 tokens each, one cache of 320: they take turns, none is refused
        body = {**ask("word " * 200), "max_tokens": 24, "temperature": 0}
        alone = post(url, body).json()["choices"][0]["message"]["content"]
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(post(url, body, timeout=120))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in answers] == [200] * 3
        assert all(r.json()["choices"][0]["message"]["content"] == alone for r in answers)
        assert small.runner.cache.free_pages == small.runner.cache.layout.num_blocks - 1


# ---- no plain-text 500s (item 6) ---------------------------------------------------------------
def test_lone_surrogates_are_400s_naming_the_field(server):
    for body, field in (('"a\\ud800b"', "messages.0.content"),
                        ('[{"type": "text", "text": "\\udfff"}]', "messages.0.content.0.text")):
        raw = '{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (MODEL, body)
        refused(post(server, raw), 400, field, "surrogate")
    refused(post(server, ask("hi", stop=["\ud800"])), 400, "stop.0")


def test_unreadable_media_paths_are_400s(pipe, tmp_path):
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, media_root=str(tmp_path)) as url:
        for path in ("a" * 300 + ".png", "x/" * 3000 + "y.png", "bad\0name.png"):
            r = post(url, ask("hi", path))
            assert r.status_code == 400 and r.json()["error"]["message"].startswith("image 0:"), r.text


class _Broken:
    """The pipeline, but encoding fails the way a bug would."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def encode(self, messages):
        raise TypeError("a bug")


def test_a_bug_is_an_openai_style_json_500_and_counted(pipe):
    with serving(_Broken(pipe), max_batch=SLOTS, max_context=CONTEXT) as url:
        error = refused(post(url, ask("hi")), 500, "internal server error")
        assert error["type"] == "server_error"
        page = httpx.get(url + "/metrics").text
    assert metric(page, 'meganeura_requests_total{endpoint="/v1/chat/completions",code="500"}') == 1


# ---- the key guards everything but the page (item 7) ------------------------------------------
def test_api_key_guards_health_metrics_and_trailing_slashes(pipe):
    with serving(pipe, max_batch=SLOTS, max_context=CONTEXT, api_key="sesame") as url:
        for path in ("/health", "/metrics", "/v1/models"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.status_code)
        assert httpx.get(url + "/v1/models/").status_code == 404  # was a 307 to /v1/models before the key check
        key = {"Authorization": "Bearer sesame"}
        assert httpx.get(url + "/health", headers=key).json()["status"] == "ok"
        assert httpx.get(url + "/metrics", headers=key).status_code == 200
        assert httpx.get(url + "/v1/models/", headers=key).status_code == 404  # no redirect
        assert httpx.get(url + "/").status_code == 200  # the page holds no data


# ---- clear errors, strict types, sampling settings (item 8) -----------------------------------
def parts(*ps):
    return {"model": MODEL, "messages": [{"role": "user", "content": list(ps)}]}


TEXT = {"type": "text", "text": "hi"}


@pytest.mark.parametrize("body, says", [
    (parts(TEXT, {"type": "audio"}), "messages.0.content.1: unknown part type 'audio'; allowed: text, image_url"),
    (parts({"type": "video_url", "video_url": {"url": "x"}}), "video 0: local file paths are not allowed"),
    (parts({"type": "video", "video": "x", "max_frames": 0}), "messages.0.content.0.max_frames: Input should be"),
    (parts({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}),
     'messages.0.content.0.image_url: must be an object: {"url": '),
    (parts({"type": "image_url", "image_url": {"url": ""}}), "messages.0.content.0.image_url.url: String should"),
    (parts({"text": "hi"}), "messages.0.content.0: a part needs a 'type'"),
    (parts(), "messages.0.content: an empty list of parts"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages.0.content: must be a string or a list"),
    (b'{"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "NaN is not JSON (numbers must be finite)"),
    (b'{"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
     "temperature: must be a finite number"),
    (ask("hi", max_tokens=True), "max_tokens: Input should be a valid integer"),
    (ask("hi", max_tokens="5"), "max_tokens: Input should be a valid integer"),
    (ask("hi", stream="yes"), "stream: Input should be a valid boolean"),
    (ask("hi", temperature="0.5"), "temperature: Input should be a valid number"),
    (ask("hi", top_k=-1), "top_k: Input should be greater than or equal to 0"),
    (ask("hi", repetition_penalty=0), "repetition_penalty: Input should be greater than 0"),
])
def test_errors_say_what_and_where(server, body, says):
    refused(post(server, body), 400, says)


def test_sampling_settings_and_defaults_are_the_python_apis(pipe, server):
    messages = [user("Tell me about the sea.")]
    for settings in ({}, {"repetition_penalty": 1.5}, {"top_k": 1, "temperature": 1.5, "seed": 3}):
        r = post(server, {"model": MODEL, "messages": messages, "max_tokens": 12, **settings})
        expected = pipe.generate(messages, max_new_tokens=12, **settings).text  # the default: greedy
        assert r.json()["choices"][0]["message"]["content"] == expected, settings


# ---- memory after hostile rounds ---------------------------------------------------------------
def test_memory_comes_back_after_hostile_rounds(pipe):
    """Huge-but-allowed bodies, many images, long prompts refused by the bound: the server's
    RSS after round 3 stays within 10% of its RSS after round 1. (The server runs in its own
    process: the test process's heap carries every other test's models; without the prefix
    cache, whose pages and features are kept on purpose, up to their budgets: this is about leaks.)"""
    big_image = data_url(png_bytes(1000, 1000))  # ~3 MB of base64, 1 M pixels
    model = str(pipe.checkpoint.folder)  # the name `meganeura serve` serves it under
    hostile = [{**body, "model": model} for body in (ask("hello " * 4_000_000), ask("x" * 20_000_000),
               ask("describe", *[big_image] * 3), ask("word " * 300, *[data_url(PHOTO)] * 4))]
    rss, statuses = [], set()
    with served(pipe.checkpoint.folder, "--max-batch", str(SLOTS), "--max-context", str(CONTEXT), "--max-images", "4",
                "--max-body-mb", "64", "--no-prefix-cache") as (url, proc):
        server = psutil.Process(proc.pid)
        for _ in range(ROUNDS):
            threads = [threading.Thread(target=lambda b: statuses.add(post(url, b, timeout=60).status_code), args=(body,))
                       for body in hostile * 2]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            r = post(url, {**ask("hi"), "model": model})
            assert r.status_code == 200, r.text
            rss.append(server.memory_info().rss)
    print("RSS after each round (MB):", [r // 2**20 for r in rss], "statuses:", statuses)
    assert statuses == {200, 400}  # the long prompts refused, the images answered
    assert rss[2] <= rss[0] * 1.1, rss