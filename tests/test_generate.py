"""Tier 1: sampling and the streaming text assembler, without a model."""

import numpy as np
import pytest

from meganeura.engine.sampler import sample
from meganeura.generate import GenerationConfig, TextStream

# A byte-level "tokenizer": each token is one byte, so multi-byte characters arrive in pieces.
TEXT = "Café 🐍 naïve — done. STOP here"
BYTES = list(TEXT.encode())


def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_stream_never_splits_a_character_and_concatenates_to_the_text():
    stream = TextStream(decode, stop=())
    pieces = [stream.push(b) for b in BYTES] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == stream.text() == TEXT


def test_stop_string_is_cut_and_never_streamed():
    stream = TextStream(decode, stop=("STOP",))
    pieces = []
    for b in BYTES:
        pieces.append(stream.push(b))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    assert stream.stopped
    assert "".join(pieces) == stream.text() == "Café 🐍 naïve — done. "
    assert not any("S" in p for p in pieces)


def test_sampling():
    logits = np.array([0.0, 5.0, 1.0, 4.9], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, GenerationConfig(), rng, []) == 1
    # repetition penalty pushes a seen token below the runner-up
    assert sample(logits, GenerationConfig(repetition_penalty=1.5), rng, [1]) == 3
    # top_k=1 is greedy whatever the temperature; top_p keeps only the smallest sufficient set
    assert {sample(logits, GenerationConfig(temperature=2.0, top_k=1), rng, []) for _ in range(20)} == {1}
    picks = {sample(logits, GenerationConfig(temperature=1.0, top_p=0.5), rng, []) for _ in range(50)}
    assert picks == {1}
    with pytest.raises(ValueError, match="invalid sampling settings"):
        GenerationConfig(top_p=0)


@pytest.mark.parametrize("settings, says", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=float("inf")), "top_p must be a finite number"),
    (dict(temperature=True), "temperature must be a finite number"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(seed=-1), "seed=-1"),
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer"),
    (dict(stop=("",)), "stop must be non-empty strings"),
])
def test_settings_are_validated_once_with_the_field_named(settings, says):
    with pytest.raises(ValueError, match=says):
        GenerationConfig(**settings)


def test_prefill_rows_pad_little_and_bound_the_plan_shapes():
    from meganeura.engine.runner import prefill_rows
    rows = {n: prefill_rows(n) for n in range(1, 8193)}
    assert all(n <= r < n + max(8, n / 8) for n, r in rows.items())
    assert rows[38] == 40 and rows[875] == 896  # a short chat prompt; the 13-tile image prompt
    assert len(set(rows.values())) <= 64  # distinct shapes (compiled plans) up to 8,192 tokens
