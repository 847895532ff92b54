"""The chat page in headless Chromium (Playwright) with a video: attach a clip, ask, and the
streamed answer equals the API's for the same video sent as a data: URL video_url part."""

import base64

import httpx
import pytest

import meganeura
from fixtures.synthetic_videos import make_sample
from fixtures.video_cases import load_reference, write_checkpoint
from test_server_helpers import CHROMIUM, MODEL, chat_page, serving

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytest.importorskip("av")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-smolvlm-video")
    write_checkpoint(folder, load_reference()[0]["settings"]["tiny"])
    return meganeura.load(str(folder), device="cpu", progress=False)


def test_chat_page_answers_about_an_attached_video(pipe, tmp_path):
    clip = make_sample("moving.mp4", tmp_path)
    with serving(pipe, max_batch=2) as url:
        with chat_page(url, MODEL) as page:
            page.set_input_files("#file", str(clip))
            page.wait_for_selector("#drop video")
            page.fill("#question", "What happens in this video?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.done", timeout=30_000)
            answer = page.locator(".msg.assistant span").inner_text()
            assert page.locator(".msg.user video").count() == 1  # the clip shows in the conversation
            assert page.locator(".error").count() == 0
        data = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
        content = [{"type": "video_url", "video_url": {"url": data}},
                   {"type": "text", "text": "What happens in this video?"}]
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": content}]})
    assert answer and answer == r.json()["choices"][0]["message"]["content"]
