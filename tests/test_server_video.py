"""Videos over HTTP with a tiny random SmolVLM checkpoint: `video_url` and `video` parts (data
URLs, files under --media-root, remote URLs) answer through the openai client as `pipe.generate` does
with the same video, streamed or not; bad videos are 400s naming the problem; random and
truncated video bytes never give a 500."""

import base64
import functools
import http.server
import threading

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meganeura
from fixtures.synthetic_videos import make_sample, write_video
from fixtures.video_cases import load_reference, write_checkpoint
from meganeura.server import ServerConfig, ServerThread, create_app
from test_server_helpers import MODEL, png_bytes, serving

pytest.importorskip("av")
TOKENS = 8


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-smolvlm-video")
    write_checkpoint(folder, load_reference()[0]["settings"]["tiny"])  # at most 8 frames of 64x64, 16 tokens each
    return meganeura.load(str(folder), device="cpu", progress=False)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The media root: moving.mp4 (3 s at 25 fps, H.264: 3 frames sampled) and long.mkv
    (130 s: 8 frames, found by seeking), plus files too big for the limits below."""
    root = tmp_path_factory.mktemp("media")
    for name in ("moving.mp4", "long.mkv"):
        make_sample(name, root)
    write_video(root / "wide.mkv", 3, 300, 210, rate=10)
    write_video(root / "many.mkv", 1001, 8, 8, rate=50)
    (root / "big.mp4").write_bytes(bytes(300_000))
    return root


def video_url(data: bytes, kind: str = "video/mp4") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def ask(part: dict, text: str = "What happens?") -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def remote(media):
    """The media folder over loopback HTTP (for --allow-remote-media with private hosts allowed)."""
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(media)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{files.server_address[1]}"
    files.shutdown()


def test_video_requests_answer_like_the_pipeline(pipe, media, remote):
    client_parts = {
        "remote URL": {"type": "video_url", "video_url": {"url": remote + "/moving.mp4"}},
        "data URL": {"type": "video_url", "video_url": {"url": video_url((media / "moving.mp4").read_bytes())}},
        "media-root file": {"type": "video_url", "video_url": {"url": "moving.mp4"}},
        "video part": {"type": "video", "video": "moving.mp4"},
    }
    expected = pipe.generate(ask({"type": "video", "video": str(media / "moving.mp4")}), max_new_tokens=TOKENS)
    seeking = pipe.generate(ask({"type": "video", "video": str(media / "long.mkv")}), max_new_tokens=TOKENS)
    fewer = pipe.generate(ask({"type": "video", "video": str(media / "long.mkv"), "max_frames": 3}),
                          max_new_tokens=TOKENS)
    assert fewer.prompt_tokens < seeking.prompt_tokens  # 3 frames, not 8
    with serving(pipe, max_batch=2, media_root=str(media), allow_remote_media=True,
                 allow_private_media_hosts=True) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def answer(part, stream=False, **extra):
            r = client.chat.completions.create(model=MODEL, messages=ask(part), max_tokens=TOKENS, temperature=0,
                                               stream=stream, extra_body=extra or None)
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            return r.choices[0].message.content, r.usage.prompt_tokens

        for name, part in client_parts.items():
            assert answer(part) == (expected.text, expected.prompt_tokens), name
            assert answer(part, stream=True) == expected.text, name
        long = {"type": "video_url", "video_url": {"url": "long.mkv"}}
        assert answer(long) == (seeking.text, seeking.prompt_tokens)
        assert answer({**long, "max_frames": 3}) == (fewer.text, fewer.prompt_tokens)   # on the part
        assert answer(long, max_frames=3) == (fewer.text, fewer.prompt_tokens)          # on the request


def _truncated(media) -> bytes:
    data = (media / "moving.mp4").read_bytes()
    return data[: len(data) // 2]


BAD = {  # name -> (the video part's URL, or a part; the error's code; words the message must hold)
    "noise": (video_url(bytes(range(256)) * 8), "invalid_video", "video 0: not a video file FFmpeg can read"),
    "text": (video_url(b"just some text\n" * 50), "invalid_video", "video 0: not a video file FFmpeg can read"),
    "a PNG": (video_url(png_bytes(20, 20), "image/png"), "invalid_video", "video 0: not a video file FFmpeg can read"),
    "empty": ("data:video/mp4;base64,", "invalid_video", "video 0: empty file"),
    "bad base64": ("data:video/mp4;base64,%%%", "invalid_video", "video 0: invalid base64 payload"),
    "truncated": (_truncated, "invalid_video", "video 0: not a video file FFmpeg can read"),
    "unknown codec": (lambda media: (media / "long.mkv").read_bytes().replace(b"V_FFV1", b"V_QQQQ"),
                      "invalid_video", "video 0: the video stream's codec is not one FFmpeg can decode"),
    "too many frames in the file": ("many.mkv", "invalid_video", "video 0: more than 1000 frames, the limit"),
    "frames too large": ("wide.mkv", "invalid_video", "video 0: frames are 300x210 = 63000 pixels, above the "
                                                      "limit of 60000"),
    "file too large": ("big.mp4", "media_not_allowed", "video 0: big.mp4: larger than the limit of 200000 bytes"),
    "max_frames above the server's": ({"type": "video", "video": "moving.mp4", "max_frames": 5}, "too_many_frames",
                                      "max_frames 5: this server samples at most 4 frames from a video"),
    "outside the root": ("../outside.mp4", "media_not_allowed", "'..' is not allowed"),
    "missing": ("missing.mp4", "media_not_allowed", "video 0: missing.mp4: no such file under the media root"),
    "remote": ("https://example.com/clip.mp4", "media_not_allowed", "--allow-remote-media"),
    "not an object": ({"type": "video_url", "video_url": "moving.mp4"}, "invalid_request",
                      'video_url: must be an object: {"url": "data:video/mp4;base64,..."}'),
}


@pytest.fixture(scope="module")
def strict(pipe, media):
    with serving(pipe, max_batch=2, media_root=str(media), max_videos=1, max_video_frames=4,
                 max_video_stream_frames=1000, max_image_pixels=60_000, max_media_bytes=200_000,
                 max_body_bytes=2_000_000) as url:
        yield url


def post(url, messages, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": messages, "max_tokens": 2, **extra})


@pytest.mark.parametrize("name", BAD)
def test_bad_videos_are_400s_naming_the_problem(strict, media, name):
    source, code, says = BAD[name]
    if callable(source):
        source = video_url(source(media))
    part = source if isinstance(source, dict) else {"type": "video_url", "video_url": {"url": source}}
    r = post(strict, ask(part))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and says in error["message"], error


def test_video_limits_per_request_and_in_time(pipe, strict, media):
    two = {"role": "user", "content": [{"type": "video", "video": "moving.mp4"}] * 2}
    r = post(strict, [two])
    assert r.status_code == 400
    assert "2 videos in the request; this server takes at most 1" in r.json()["error"]["message"]
    assert post(strict, ask({"type": "video", "video": "moving.mp4"}), max_frames=9).json()["error"]["code"] == \
        "too_many_frames"
    with serving(pipe, max_batch=1, media_root=str(media), video_timeout_s=1e-6) as url:
        r = post(url, ask({"type": "video", "video": "moving.mp4"}))
    assert r.status_code == 400 and "video 0: not read within the time limit of 1e-06 s" in r.json()["error"]["message"]
    assert post(strict, ask({"type": "video", "video": "moving.mp4"})).status_code == 200  # still serving


@pytest.fixture(scope="module")
def clip(media) -> bytes:
    return (media / "moving.mp4").read_bytes()


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_and_damaged_video_bytes_never_give_a_500(strict, clip, data):
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped"]))
    if kind == "random":
        body = data.draw(st.binary(max_size=4000))
    elif kind == "truncated":
        body = clip[:data.draw(st.integers(0, len(clip)))]
    else:  # a few bytes changed anywhere, the container's index included
        body = bytearray(clip)
        for at, value in data.draw(st.lists(st.tuples(st.integers(0, len(clip) - 1), st.integers(0, 255)),
                                            min_size=1, max_size=8)):
            body[at] = value
        body = bytes(body)
    r = post(strict, ask({"type": "video_url", "video_url": {"url": video_url(body)}}))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["message"].startswith("video 0: "), r.text


def test_requests_holding_videos_are_bounded_and_give_their_slots_back(pipe, media):
    """Each request with videos holds a slot from reading them until the engine has their
    features (the frames are big); answered, refused or failed, it gives the slot back."""
    app = create_app(pipe, ServerConfig(model_id=MODEL, max_batch=2, media_root=str(media), max_video_requests=2))
    video = ask({"type": "video", "video": "moving.mp4"})
    with ServerThread(app) as url:
        for part in ({"type": "video", "video": "missing.mp4"}, {"type": "video", "video": "big.mp4"}):
            assert post(url, ask(part)).status_code == 400
        for _ in range(3):  # more than the slots, one after another
            assert post(url, video).status_code == 200
        held = [app.state.video_slots.acquire(blocking=False) for _ in range(2)]
        try:
            r = post(url, video)
            assert r.status_code == 429 and r.json()["error"]["code"] == "videos_busy"
            assert post(url, [{"role": "user", "content": "no video"}]).status_code == 200  # text is not held up
        finally:
            for _ in held:
                app.state.video_slots.release()
        assert post(url, video).status_code == 200
