"""Tier 3 end to end: a tiny random SmolVLM checkpoint folder through load() -> logits and
greedy generation, against transformers on the same inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

import meganeura
from tiny_models import rel_err, write_tiny_smolvlm_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-smolvlm")
    model = write_tiny_smolvlm_folder(folder)
    return folder, model


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return meganeura.load(str(checkpoint[0]), device="cpu", progress=False)


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _messages(*images, text="What is in this picture?"):
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": text}]}]


def _reference(model, enc):
    kwargs = {"input_ids": torch.from_numpy(enc["input_ids"])[None]}
    if "pixel_values" in enc:
        kwargs["pixel_values"] = torch.from_numpy(enc["pixel_values"])[None]
        kwargs["pixel_attention_mask"] = torch.from_numpy(np.asarray(enc["pixel_attention_mask"]))[None]
    return kwargs


@pytest.mark.parametrize("images", [(), ((100, 70),), ((100, 70), (40, 130))])
def test_logits_match_transformers(checkpoint, pipe, images):
    _, model = checkpoint
    messages = _messages(*(_photo(w, h, i) for i, (w, h) in enumerate(images)))
    enc = pipe.processor(messages)
    assert (enc["input_ids"] == model.config.image_token_id).sum() == 16 * (
        0 if not images else len(enc["pixel_values"]))
    with torch.no_grad():
        ref = model(**_reference(model, enc)).logits[0].numpy()
    assert rel_err(pipe.logits(messages), ref) < 1e-4


def test_greedy_generate_equals_transformers(checkpoint, pipe):
    _, model = checkpoint
    messages = _messages(_photo(90, 60))
    enc = pipe.processor(messages)
    with torch.no_grad():
        out = model.generate(**_reference(model, enc), max_new_tokens=10, do_sample=False)
    ref = out[0, len(enc["input_ids"]):].tolist()
    res = pipe.generate(messages, max_new_tokens=10)
    eos = model.generation_config.eos_token_id
    assert res.token_ids == [t for t in ref if t != eos]
    assert "".join(pipe.stream(messages, max_new_tokens=10)) == res.text


def test_image_inputs_and_errors(pipe, tmp_path):
    png = tmp_path / "photo.png"
    _photo(64, 64).save(png)
    for source in (str(png), png.read_bytes(), np.asarray(Image.open(png))):
        assert pipe.processor(_messages(source))["pixel_values"].shape[1:] == (3, 64, 64)
    with pytest.raises(ValueError, match="missing.png"):
        pipe.generate(_messages(str(tmp_path / "missing.png")))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        pipe.generate(_messages(str(tmp_path / "empty.png")))
    with pytest.raises(ValueError, match="unsupported content part type 'audio'"):
        pipe.generate([{"role": "user", "content": [{"type": "audio"}]}])


def test_example_walkthrough_answers_like_the_pipeline(checkpoint, pipe, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    png = tmp_path / "photo.png"
    _photo(90, 60).save(png)
    example = Path(__file__).parent.parent / "examples" / "smolvlm2.py"
    out = subprocess.run([sys.executable, str(example), "--model", str(checkpoint[0]), "--image", str(png),
                          "--max-new-tokens", "8", "What is this?"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = pipe.generate(_messages(str(png), text="What is this?"), max_new_tokens=8).text
    assert out.stdout.strip() == expected.strip()
