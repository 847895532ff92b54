"""Tier 3 for videos and several images: a tiny random SmolVLM checkpoint through load() ->
logits and greedy tokens against transformers' model on the same inputs, long prompts, and
the CLI as a user runs it. (The inputs themselves are checked against transformers'
processor in test_processing_video.py.)"""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import meganeura
from fixtures.synthetic_videos import make_sample
from fixtures.video_cases import load_reference, write_checkpoint
from meganeura.processing.video import VideoClip
from tiny_models import rel_err

pytest.importorskip("av")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-smolvlm-video")
    model = write_checkpoint(folder, load_reference()[0]["settings"]["tiny"])  # 8 frames at most, 64x64
    return folder, model


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return meganeura.load(str(checkpoint[0]), device="cpu", progress=False)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {name: make_sample(name, folder) for name in ("moving.mp4", "long.mkv")}


def _photo(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ask(*media, text="What happens?"):
    parts = [m if isinstance(m, dict) else {"type": "image", "image": m} for m in media]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _video(path, **options):
    return {"type": "video", "video": str(path), **options}


def _reference_logits(model, enc):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(enc["input_ids"])[None],
                     pixel_values=torch.from_numpy(enc["pixel_values"])[None],
                     pixel_attention_mask=torch.from_numpy(enc["pixel_attention_mask"])[None]).logits[0].numpy()


@pytest.mark.parametrize("name,frames", [("moving.mp4", 3), ("long.mkv", 8)])
def test_video_logits_match_transformers(checkpoint, pipe, samples, name, frames):
    messages = _ask(_video(samples[name]))
    enc = pipe.processor(messages)
    assert enc["pixel_values"].shape == (frames, 3, 64, 64)
    assert (enc["input_ids"] == checkpoint[1].config.image_token_id).sum() == frames * 16
    assert rel_err(pipe.logits(messages), _reference_logits(checkpoint[1], enc)) < 1e-4


def test_three_images_logits_match_transformers(checkpoint, pipe):
    messages = _ask(_photo(100, 70, 0), _photo(40, 130, 1), _photo(64, 64, 2), text="Compare the three.")
    enc = pipe.processor(messages)
    assert len(enc["pixel_values"]) == 5 + 3 + 5  # 2x2 tiles + global, 2x1 + global, 2x2 + global
    assert (enc["input_ids"] == checkpoint[1].config.image_token_id).sum() == 13 * 16
    assert rel_err(pipe.logits(messages), _reference_logits(checkpoint[1], enc)) < 1e-4


def test_images_and_video_in_prompt_order(checkpoint, pipe, samples):
    """transformers' processor cannot mix images and videos in one prompt (its video pixels
    overwrite the images'); we put tiles and frames in prompt order, as the model reads them."""
    first, second = _photo(100, 70, 3), _photo(50, 50, 4)
    messages = _ask(first, _video(samples["moving.mp4"]), second, text="And now?")
    enc = pipe.processor(messages)
    alone = [pipe.processor(_ask(m))["pixel_values"] for m in (first, _video(samples["moving.mp4"]), second)]
    np.testing.assert_array_equal(enc["pixel_values"], np.concatenate(alone))
    assert rel_err(pipe.logits(messages), _reference_logits(checkpoint[1], enc)) < 1e-4


def test_greedy_generate_with_video_equals_transformers(checkpoint, pipe, samples):
    _, model = checkpoint
    messages = _ask(_video(samples["moving.mp4"]))
    enc = pipe.processor(messages)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(enc["input_ids"])[None],
                             pixel_values=torch.from_numpy(enc["pixel_values"])[None],
                             pixel_attention_mask=torch.from_numpy(enc["pixel_attention_mask"])[None],
                             max_new_tokens=8, do_sample=False)
    eos = model.generation_config.eos_token_id
    expected = [t for t in out[0, len(enc["input_ids"]):].tolist() if t != eos]
    assert pipe.generate(messages, max_new_tokens=8).token_ids == expected


def test_too_long_is_refused_before_decoding_and_max_frames_fits(pipe, samples, monkeypatch):
    """40 frames of ~27 tokens overflow the tiny model's 512: a clear error, raised before
    any frame is decoded, names a frame count that fits; asking for it works."""
    with monkeypatch.context() as patch:
        patch.setattr(VideoClip, "frames", lambda self: pytest.fail("decoded a video for a prompt that cannot fit"))
        with pytest.raises(ValueError, match=r"context is 512; its 40 video frames take \d+ tokens") as error:
            pipe.processor(_ask(_video(samples["long.mkv"], max_frames=40)))
    fit = int(re.search(r"at most (\d+) frames per video", str(error.value)).group(1))
    enc = pipe.processor(_ask(_video(samples["long.mkv"], max_frames=fit)))
    assert len(enc["pixel_values"]) == fit and len(enc["input_ids"]) < 512


def test_cli_run_with_a_video(checkpoint, pipe, samples, tmp_path):
    command = [sys.executable, "-m", "meganeura.cli", "run", "--model", str(checkpoint[0]), "--max-new-tokens", "6"]
    out = subprocess.run(command + ["--video", str(samples["moving.mp4"]), "--max-frames", "2", "What happens?"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = pipe.generate(_ask(_video(samples["moving.mp4"], max_frames=2)), max_new_tokens=6).text
    assert out.stdout.strip() == expected.strip()

    missing = tmp_path / "clip.mp4"
    out = subprocess.run(command + ["--video", str(missing), "What happens?"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and f"error: {missing}: video file not found" in out.stderr
