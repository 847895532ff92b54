"""The chat page in headless Chromium (Debian's `chromium`, driven by Playwright): attach an
image, ask, watch the answer stream in, ask a follow-up; the answers must equal the API's
for the same conversation. Saves a screenshot (its path is printed)."""

import httpx
import pytest

from test_server_helpers import CHROMIUM, MODEL, chat_page, data_url, png_bytes, serving, user

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def pipe(tiny_vlm_pipe):
    return tiny_vlm_pipe


def test_chat_page_streams_an_answer_about_a_dropped_image(pipe, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(90, 60))
    with serving(pipe, max_batch=2, max_context=512) as url:
        with chat_page(url, "test-model") as page:
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#drop img")
            page.fill("#question", "What is in this picture?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant.done", timeout=30_000)
            page.fill("#question", "Tell me more.")
            page.keyboard.press("Enter")  # Enter sends too
            sync_api.expect(page.locator(".msg.assistant.done")).to_have_count(2, timeout=30_000)
            answers = page.locator(".msg.assistant span").all_inner_texts()
            stats = page.inner_text("#stats")
            assert page.locator(".msg.user img").count() == 1  # the image shows in the conversation
            assert page.locator(".error").count() == 0
            shot = tmp_path / "chat-page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

        def api(messages):
            r = httpx.post(url + "/v1/chat/completions", timeout=60,
                           json={"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0})
            return r.json()["choices"][0]["message"]["content"]
        first = [user("What is in this picture?", data_url(photo.read_bytes()))]
        expected = [api(first)]
        expected.append(api(first + [{"role": "assistant", "content": expected[0]}, user("Tell me more.")]))
    assert answers == expected and all(answers)
    assert "tokens/s" in stats
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
