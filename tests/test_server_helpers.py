"""Helpers shared by the server tests (this module holds no tests)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx

import numpy as np
from PIL import Image

from meganeura.server import ServerConfig, ServerThread, create_app

MODEL = "test-model"


@contextmanager
def serving(pipe, **settings):
    """A server for `pipe` on 127.0.0.1 and an ephemeral port; yields its base URL."""
    with ServerThread(create_app(pipe, ServerConfig(model_id=MODEL, **settings))) as url:
        yield url


@contextmanager
def served(folder, *flags: str):
    """`meganeura serve` for a checkpoint folder in a process of its own, on a free loopback
    port; yields (base URL, the process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "meganeura.cli", "serve", "--model", str(folder), "--device", "cpu",
                             "--port", str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def user(text: str, *image_urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}] if parts else text}


def sse(response) -> list[dict]:
    """The JSON events of a streamed httpx response, checking it ends with [DONE]."""
    events, done = [], False
    for line in response.iter_lines():
        if line.startswith("data: "):
            assert not done, "an event after [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[6:]))
    assert done, "the stream did not end with data: [DONE]"
    return events


def metric(text: str, name: str) -> float:
    """The value of one sample (name with its labels, as printed) in a Prometheus text page."""
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian: apt-get install -y chromium


@contextmanager
def chat_page(url: str, model: str, max_tokens: int = 12):
    """The server's chat page open in headless Chromium (Playwright), the model listed and the
    answer length set; the browser is closed afterwards."""
    from playwright import sync_api
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(url)
            sync_api.expect(page.locator("#model")).to_contain_text(model)
            page.fill("#max-tokens", str(max_tokens))
            yield page
        finally:
            browser.close()
