"""Video decoding, sampling, pixels and prompts, checked against transformers.

The reference is transformers' SmolVLMProcessor + SmolVLMVideoProcessor (torchvision
backend, torchcodec decoding). That needs torchvision, which this venv cannot have, so its
outputs on the synthetic videos are fixtures made by tests/fixtures/make_video_reference.py;
the parts of the reference that run without torchvision (frame sampling, config parsing,
the chat template) are compared live.
"""

from __future__ import annotations

import base64
import os
import re
import wave

import numpy as np
import pytest
from PIL import Image

from fixtures.synthetic_videos import SAMPLES, frame, make_sample, write_video
from fixtures.video_cases import load_reference, real_messages, video_parts, write_checkpoint
from meganeura.processing import video
from meganeura.processing.prompt import (
    VideoSource,
    expand_video_tokens,
    normalize_messages,
    number_words,
    render_chat,
    video_prompt,
)
from meganeura.processing.video import (
    VideoClip,
    VideoError,
    VideoProcessorConfig,
    open_video,
    preprocess_video,
    probe_video,
    video_config_dict,
)

av = pytest.importorskip("av")
REF, ARRAYS = load_reference()

# The template published with SmolVLM2 has no video branch (transformers swaps in its own
# DEFAULT_CHAT_TEMPLATE for video conversations); this is that template without one.
NO_VIDEO_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    for name in SAMPLES:
        make_sample(name, folder)
    return folder


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """A pipeline per settings of the reference (tiny checkpoint, processor files swapped)."""
    import meganeura

    out, first = {}, None
    for name, settings in REF["settings"].items():
        folder = tmp_path_factory.mktemp(f"checkpoint-{name}")
        write_checkpoint(folder, settings, context=8192, model_from=first)
        first = first or folder
        out[name] = meganeura.load(str(folder), device="cpu", progress=False)
    return out


# --------------------------------------------------------------------------------------
# Against the reference fixtures
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REF["cases"]))
def test_processor_matches_transformers(name, pipes, samples):
    case = REF["cases"][name]
    pipe = pipes[case["settings"]]
    options = {"max_frames": case["max_frames"]} if "max_frames" in case else {}
    messages = real_messages(case["messages"], samples, **options)
    enc = pipe.processor(messages)

    assert render_chat(pipe.checkpoint.chat_template, messages) == case["template_text"]
    assert pipe.tokenizer.decode(enc["input_ids"].tolist(), skip_special_tokens=False) == case["prompt"]
    np.testing.assert_array_equal(enc["input_ids"], ARRAYS[f"{name}.ids"])

    first = 0  # the frames of video j follow those of the videos before it
    for j, (part, ref) in enumerate(zip(video_parts(messages), case["videos"])):
        clip = open_video(part["video"], pipe.video_config, max_frames=part.get("max_frames"))
        assert clip.indices.tolist() == ref["indices"]
        if clip.info is not None:
            assert (clip.info.frames, clip.info.fps, clip.info.duration) == pytest.approx(
                (ref["total_frames"], ref["fps"], ref["duration"]), rel=1e-12)
            assert clip.timestamps == pytest.approx(ref["timestamps"], rel=1e-12)
        if ref["stored_frames"]:
            expected = (ARRAYS[f"{name}.{j}"].astype(np.float32) - 127.5) / 127.5
            ours = enc["pixel_values"][[first + k for k in ref["stored_frames"]]]
            assert ours.shape == expected.shape
            assert np.abs(ours - expected).max() <= 1e-5
        first += len(ref["indices"])
    assert len(enc["pixel_values"]) == first and enc["pixel_attention_mask"].all()


def test_number_words_match_num2words():
    for n, words in REF["number_words"].items():
        assert number_words(int(n)) == words
    with pytest.raises(ValueError):
        number_words(1_000_000)


def test_pillow_fallback_is_close(samples, monkeypatch):
    """Without torch's uint8 LANCZOS, Pillow resizes: within 2 levels of the reference."""
    case = REF["cases"]["long"]
    config = VideoProcessorConfig.from_dict(REF["settings"]["tiny"]["preprocessor_config"])
    monkeypatch.setattr(video, "_torch_interpolate", lambda: None)
    ours = np.stack(preprocess_video(open_video(samples / "long.mkv", config), config))
    expected = (ARRAYS["long.0"].astype(np.float32) - 127.5) / 127.5
    assert len(ours) == len(case["videos"][0]["indices"])
    assert 0 < np.abs(ours - expected).max() <= 2 / 127.5 + 1e-6


# --------------------------------------------------------------------------------------
# Against transformers, live (no torchvision needed)
# --------------------------------------------------------------------------------------


def _reference_video_processor(**config):
    from transformers.models.smolvlm.video_processing_smolvlm import (
        SmolVLMVideoProcessor,
    )

    return SmolVLMVideoProcessor(**config)


def test_sampling_matches_transformers():
    from transformers.video_utils import VideoMetadata

    reference = _reference_video_processor()
    checked = 0
    for frames in (1, 2, 3, 10, 29, 30, 31, 59, 60, 61, 64, 65, 66, 100, 130, 131, 999, 1300, 5000):
        for rate in (0.5, 1, 7.5, 10, 23.976, 25, 29.97, 60, 120):
            info = video.VideoInfo(frames=frames, fps=rate, duration=frames / rate, width=1, height=1)
            meta = VideoMetadata(total_num_frames=frames, fps=rate, duration=frames / rate)
            for target in (0.5, 1, 2):
                for max_frames in (1, 8, 64):
                    expected = reference.sample_frames(meta, num_frames=max_frames, fps=target)
                    assert video.sample_frame_indices(info, max_frames, target).tolist() == expected.tolist()
                    checked += 1
    assert checked > 1000


@pytest.mark.parametrize("config", [
    REF["settings"]["published"]["preprocessor_config"],
    {"video_sampling": {"fps": 2, "max_frames": 16, "video_size": {"longest_edge": 384}},
     "max_image_size": {"longest_edge": 384}},
    {"size": {"longest_edge": 1536}, "num_frames": 12, "fps": 3, "max_image_size": {"longest_edge": 384},
     "resample": 3, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]},
])
def test_config_matches_transformers(config):
    import copy

    ours = VideoProcessorConfig.from_dict(config)
    ref = _reference_video_processor(**copy.deepcopy(config))  # it edits video_sampling in place
    size = ref.size if isinstance(ref.size, dict) else {"longest_edge": ref.size.longest_edge}
    assert (ours.fps, ours.max_frames, ours.longest_edge) == (ref.fps, ref.num_frames, size["longest_edge"])
    assert ours.image.max_image_size == ref.max_image_size["longest_edge"]
    assert (ours.image.resample, ours.image.image_mean, ours.image.image_std) == (
        ref.resample, tuple(ref.image_mean), tuple(ref.image_std))


def test_config_sources_and_defaults():
    nested = {"video_processor": {"num_frames": 4}}
    assert video_config_dict(nested, {"num_frames": 5}, {"num_frames": 6}) == {"num_frames": 4}
    assert video_config_dict({"image_seq_len": 64}, {"num_frames": 5}, {"num_frames": 6}) == {"num_frames": 5}
    assert video_config_dict({}, {}, {"num_frames": 6}) == {"num_frames": 6}
    default = VideoProcessorConfig.from_dict({})  # SmolVLM2-500M-Video-Instruct's values
    assert (default.fps, default.max_frames, default.longest_edge, default.image.max_image_size) == (1, 64, 2048, 512)
    with pytest.raises(ValueError, match="resample 2 is not supported"):
        VideoProcessorConfig.from_dict({"resample": 2})
    with pytest.raises(ValueError, match="fps > 0"):
        VideoProcessorConfig.from_dict({"video_sampling": {"fps": 0, "max_frames": 8}})


def test_video_conversations_render_like_transformers():
    """Video parts become a <video> text placeholder: the checkpoint's own template (with or
    without a video branch) gives what transformers' DEFAULT_CHAT_TEMPLATE gives."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = [
        [{"role": "user", "content": [{"type": "video", "path": "a.mp4"}, {"type": "text", "text": "What?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "video", "video": "a.mp4"},
                                      {"type": "text", "text": "Same?"}]},
         {"role": "assistant", "content": "Yes."},
         {"role": "user", "content": [{"type": "text", "text": "Then"}, {"type": "video", "url": "b.mkv"}]}],
    ]
    for messages in conversations:
        (theirs,), _ = render_jinja_template([messages], chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
        assert render_chat(NO_VIDEO_TEMPLATE, messages) == theirs
        assert render_chat(DEFAULT_CHAT_TEMPLATE, messages) == theirs


# --------------------------------------------------------------------------------------
# Messages and prompt text
# --------------------------------------------------------------------------------------


def test_video_parts_in_messages():
    frames = [Image.new("RGB", (4, 4))] * 2
    messages = [{"role": "user", "content": [
        {"type": "video", "video": "a.mp4", "max_frames": 8},
        {"type": "video_url", "video_url": {"url": "b.mkv"}},
        {"type": "video", "path": "c.mov", "fps": 2},
        {"type": "video", "video": frames},
        {"type": "image", "image": "x.png"},
    ]}]
    shaped, sources = normalize_messages(messages)
    assert [p.get("text") for p in shaped[0]["content"]] == ["<video>"] * 4 + [None]
    assert sources == [VideoSource("a.mp4", 8), VideoSource("b.mkv"), VideoSource("c.mov", fps=2),
                       VideoSource(frames), "x.png"]
    for part, problem in [({"max_frames": 0}, "'max_frames' must be a positive integer"),
                          ({"max_frames": 2.5}, "'max_frames' must be a positive integer"),
                          ({"fps": -1}, "'fps' must be a positive number")]:
        with pytest.raises(ValueError, match=problem):
            normalize_messages([{"role": "user", "content": [{"type": "video", "video": "a.mp4", **part}]}])
    with pytest.raises(ValueError, match="'video_url' part needs video_url.url"):
        normalize_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}])
    with pytest.raises(ValueError, match="cannot place images or videos"):
        normalize_messages([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}], "string")


def test_video_prompt_text():
    text = video_prompt([0.0, 59.9, 61.0, 3725.0], 3726.4, 1, image_token="<i>", fake_token="<f>", global_token="<g>")
    assert text == (
        "You are provided the following series of four frames from a 1:02:06 [H:MM:SS] video.\n"
        "\nFrame from 00:00:<f><g><i><f>\nFrame from 00:59:<f><g><i><f>\nFrame from 01:01:<f><g><i><f>"
        "\nFrame from 62:05:<f><g><i><f>\n\n")
    assert video_prompt([0.0, 2.5], None, 1).startswith("You are provided the following series of two frames "
                                                        "from a 0:00:02 [H:MM:SS]")
    with pytest.raises(ValueError, match="has 1 <video> placeholder.* but 2 video"):
        expand_video_tokens("a<video>b", [([0.0], 1.0), ([0.0], 1.0)])


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _decode_all(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.mark.parametrize("name", ["gop.mp4", "gop.ts", "raw.h264"])
def test_seeking_decodes_the_same_frames(tmp_path, name):
    """H.264 with B-frames and a short group of pictures: jumping to keyframes gives the
    frames a full decode gives (raw streams have no timestamps and are decoded in order)."""
    path = write_video(tmp_path / name, 60, 64, 48, rate=10, codec="libx264", gop=7)
    info = probe_video(path)
    assert (info.pts is None) == (name == "raw.h264")
    indices = np.array([0, 6, 7, 8, 23, 24, 41, 59])
    clip = VideoClip(path, indices, [], None, info)
    everything = _decode_all(path)
    for i, ours in zip(indices, clip.frames(), strict=True):
        np.testing.assert_array_equal(ours, everything[i])


def test_display_rotation_turns_frames_upright(samples):
    """As torchcodec does (checked against it by the "rotated" reference case)."""
    clip = open_video(samples / "rotated.mp4", max_frames=64, fps=100)
    frames = list(clip.frames())
    assert len(frames) == SAMPLES["rotated.mp4"]["frames"]
    for i, f in zip(clip.indices, frames):
        np.testing.assert_array_equal(f, np.rot90(frame(i, 40, 30)))


def test_lists_of_frames(samples):
    pictures = [frame(i, 20, 10) for i in range(5)]
    clip = open_video(pictures, fps=2, max_frames=3)
    assert clip.indices.tolist() == [0, 2, 4] and clip.timestamps == [0.0, 1.0, 2.0] and clip.duration is None
    assert [f.tolist() for f in clip.frames()] == [pictures[i].tolist() for i in (0, 2, 4)]
    as_array = open_video(np.stack(pictures))  # [frames, H, W, 3]: all of them, at 24 fps
    assert as_array.indices.tolist() == list(range(5)) and as_array.timestamps[1] == pytest.approx(1 / 24)


def _bad_sources(folder):
    """name -> (source, options, expected message) for inputs that must fail cleanly."""
    (folder / "dir").mkdir()
    os.mkfifo(folder / "fifo")  # reading it would block forever
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("just some text\n" * 20)
    (folder / "noise.mkv").write_bytes(np.random.default_rng(0).bytes(4000))
    Image.new("RGB", (8, 8)).save(folder / "still.png")
    with wave.open(str(folder / "sound.wav"), "wb") as sound:
        sound.setnchannels(1), sound.setsampwidth(2), sound.setframerate(8000)
        sound.writeframes(bytes(1600))
    for name in ("nothing.avi", "nothing.mp4"):  # a video stream without frames
        with av.open(str(folder / name), "w") as container:
            stream = container.add_stream("ffv1" if name.endswith("avi") else "libx264", rate=10)
            stream.width, stream.height = 16, 16
            stream.pix_fmt = "bgr0" if name.endswith("avi") else "yuv420p"
            container.start_encoding()
    whole = write_video(folder / "whole.mp4", 30, 64, 48, rate=10, codec="libx264")
    data = whole.read_bytes()
    with av.open(str(folder / "faststart.mp4"), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        noise = np.random.default_rng(1)
        for _ in range(30):
            picture = noise.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    faststart = (folder / "faststart.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(faststart[: len(faststart) * 6 // 10])  # index intact, data cut
    (folder / "no_index.mp4").write_bytes(data[: len(data) // 2])  # index (at the end) cut off
    return {
        "missing": (folder / "missing.mp4", {}, "missing.mp4: video file not found"),
        "folder": (folder / "dir", {}, "dir: not a regular file"),
        "fifo": (folder / "fifo", {}, "fifo: not a regular file"),
        "empty": (folder / "empty.mp4", {}, "empty.mp4: empty file"),
        "text": (folder / "notes.mp4", {}, "notes.mp4: not a video file FFmpeg can read"),
        "noise": (folder / "noise.mkv", {}, "noise.mkv: not a video file FFmpeg can read"),
        "image": (folder / "still.png", {}, r"still.png: a still image \(png_pipe\), not a video"),
        "audio": (folder / "sound.wav", {}, "sound.wav: has no video stream"),
        "no frames": (folder / "nothing.avi", {}, "nothing.avi: the video stream has no frames"),
        "no frames, no stream": (folder / "nothing.mp4", {}, "nothing.mp4: has no video stream"),
        "ends early": (folder / "truncated.mp4", {}, "truncated.mp4: the video stream ends early: the header "
                                                     "promises 30 frames, the file holds"),
        "no index": (folder / "no_index.mp4", {}, "no_index.mp4: not a video file FFmpeg can read"),
        "huge frames": (whole, {"max_pixels": 1000}, "frames are 64x48 = 3072 pixels, above the limit of 1000"),
        "url": ("https://example.com/a.mp4", {}, "remote URLs are not allowed"),
        "type": (3, {}, "unsupported video source type int"),
        "no list frames": ([], {}, "needs at least one frame"),
        "bad list frame": ([frame(0, 4, 4), "nope.png"], {}, "<frames> frame 1: nope.png: image file not found"),
        "max_frames": (whole, {"max_frames": 0}, "max_frames must be at least 1"),
    }


def test_bad_videos_fail_clearly(tmp_path):
    for name, (source, options, message) in _bad_sources(tmp_path).items():
        with pytest.raises(VideoError, match=message):
            clip = open_video(source, **options)
            list(clip.frames())
            pytest.fail(f"{name}: no error")


# --------------------------------------------------------------------------------------
# Videos in memory (uploads) and the limits on reading one
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["moving.mp4", "odd.mkv", "tall.mov", "long.mkv"])
def test_bytes_and_data_urls_read_as_the_file_does(samples, name):
    """long.mkv is sampled by seeking, which the in-memory reader must support too."""
    path = samples / name
    data = path.read_bytes()
    by_path = open_video(path, max_frames=8)
    url = "data:video/x-matroska;base64," + base64.b64encode(data).decode()
    for source in (data, video.VideoBytes(data, "upload"), url):
        clip = open_video(source, max_frames=8)
        assert clip.indices.tolist() == by_path.indices.tolist() and clip.timestamps == by_path.timestamps
        for ours, theirs in zip(clip.frames(), by_path.frames(), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_limits_on_videos_in_memory(samples, tmp_path):
    moving = (samples / "moving.mp4").read_bytes()
    raw = write_video(tmp_path / "raw.h264", 10, 64, 48, rate=10, codec="libx264").read_bytes()
    cases = {
        "a raw stream is no container": (raw, {}, "upload: not a video file FFmpeg can read as MP4/MOV"),
        "a PNG": (png := (tmp_path / "p.png"), {}, "not a video file FFmpeg can read as"),
        "empty": (b"", {}, "upload: empty file"),
        "unknown codec": ((samples / "odd.mkv").read_bytes().replace(b"V_FFV1", b"V_QQQQ"), {},
                          "upload: the video stream's codec is not one FFmpeg can decode"),
        "bad base64": ("data:video/mp4;base64,@@@", {}, "invalid base64 payload"),
        "no comma": ("data:video/mp4;base64", {}, "malformed data URL"),
        "too many frames": (moving, {"max_stream_frames": 50}, "upload: more than 50 frames, the limit"),
        "too slow": (moving, {"time_limit_s": 1e-9}, "upload: not read within the time limit of 1e-09 s"),
    }
    Image.new("RGB", (8, 8)).save(png)
    for name, (source, options, message) in cases.items():
        if isinstance(source, video.Path):
            source = source.read_bytes()
        if isinstance(source, bytes):
            source = video.VideoBytes(source, "upload")
        with pytest.raises(VideoError, match=re.escape(message)):
            list(open_video(source, max_frames=20, fps=100, **options).frames())
            pytest.fail(f"{name}: no error")


def test_frames_larger_than_the_header_said_are_refused_as_decoded(tmp_path):
    """An H.264 stream may change its frame size after the header the limit was checked on."""
    small = write_video(tmp_path / "small.h264", 10, 64, 48, rate=10, codec="libx264").read_bytes()
    big = write_video(tmp_path / "big.h264", 10, 128, 96, rate=10, codec="libx264").read_bytes()
    (tmp_path / "grows.h264").write_bytes(small + big)
    clip = open_video(tmp_path / "grows.h264", max_frames=20, fps=100, max_pixels=64 * 48)
    with pytest.raises(VideoError, match="grows.h264: frames are 128x96 = 12288 pixels, above the limit of 3072"):
        list(clip.frames())
