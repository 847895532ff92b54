"""logprobs / top_logprobs in chat completions with the real SmolLM2-135M-Instruct (fp32 on the
CPU): OpenAI's shape, streamed or not, and values equal to the log-softmax of the model's
logits for the same tokens (a full-prompt prefill of the question plus the answer so far)."""

import httpx
import numpy as np
import openai
import pytest

import meganeura
from test_server_helpers import MODEL, serving, user

QUESTION = [user("What is the capital of France?")]
TOP, TOKENS = 5, 8


@pytest.fixture(scope="module")
def pipe():
    return meganeura.load("smollm2-135m-instruct", device="cpu", progress=False, quantize="none")  # fp32 values


def _reference(pipe, answer_ids) -> np.ndarray:
    """log-softmax rows [answer tokens, vocab]: row i is the distribution of answer token i."""
    ids = np.concatenate([pipe.encode(QUESTION).input_ids, answer_ids[:-1]])
    cache = pipe.runner.cache
    slot = cache.take(len(ids))
    try:
        logits = pipe.runner.to_host(pipe.runner.prefill(ids, slot, all_logits=True)).astype(np.float64)
    finally:
        cache.release(slot)
    rows = logits[-len(answer_ids):]
    rows -= rows.max(-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(-1, keepdims=True))


def test_logprobs_match_the_model_streamed_and_not(pipe):
    ref = pipe.generate(QUESTION, max_new_tokens=TOKENS)
    with serving(pipe, max_batch=2, max_context=1024) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=TOKENS, logprobs=True,
                                           top_logprobs=TOP)
        chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=TOKENS, logprobs=True,
                                                     top_logprobs=TOP, stream=True))
        plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=TOKENS, logprobs=True)
        off = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=TOKENS)
        bad = [httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, **extra})
               for extra in ({"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21})]
    assert r.choices[0].message.content == ref.text
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    expected = _reference(pipe, np.array(ref.token_ids))
    for entry, token, row in zip(content, ref.token_ids, expected):
        assert entry.token == pipe.tokenizer.decode([token], skip_special_tokens=False)
        assert bytes(entry.bytes) == entry.token.encode()
        assert abs(entry.logprob - row[token]) < 1e-4
        top = np.argsort(-row)[:TOP]
        assert [t.token for t in entry.top_logprobs] == [pipe.tokenizer.decode([int(i)]) for i in top]
        assert np.abs(np.array([t.logprob for t in entry.top_logprobs]) - row[top]).max() < 1e-4
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[]] * len(content)
    assert off.choices[0].logprobs is None
    assert [b.status_code for b in bad] == [400, 400]
    assert "top_logprobs needs logprobs: true" in bad[0].json()["error"]["message"]
    assert "top_logprobs" in bad[1].json()["error"]["message"]


PROMPT = "The capital of France is"


def _greedy_reference(pipe, prompt: str, tokens: int) -> list[tuple[int, np.ndarray]]:
    """(token, log-softmax row) of a greedy answer to a raw prompt, each from a full prefill of
    the prompt and the answer so far."""
    ids, out = pipe.tokenizer.encode(PROMPT, add_special_tokens=False).ids, []
    cache = pipe.runner.cache
    for _ in range(tokens):
        slot = cache.take(len(ids))
        try:
            row = pipe.runner.to_host(pipe.runner.prefill(np.array(ids), slot)).astype(np.float64).reshape(-1)
        finally:
            cache.release(slot)
        row -= row.max()
        row -= np.log(np.exp(row).sum())
        out.append((int(row.argmax()), row))
        ids.append(out[-1][0])
    return out


def test_legacy_completion_logprobs_match_the_model_streamed_and_not(pipe):
    """/v1/completions' integer logprobs (0-5): tokens, their log-probabilities, the top tokens
    by text (the chosen one always among them) and text offsets counted from the prompt's start."""
    with serving(pipe, max_batch=2, max_context=1024) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = dict(model=MODEL, prompt=PROMPT, max_tokens=TOKENS)
        r = client.completions.create(**ask, logprobs=5)
        chunks = list(client.completions.create(**ask, logprobs=5, stream=True))
        zero = client.completions.create(**ask, logprobs=0)
        off = client.completions.create(**ask)
        bad = [httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, **extra})
               for extra in ({"logprobs": 6}, {"logprobs": True}, {"logprobs": -1}, {"echo": True})]
    lp = r.choices[0].logprobs

    def text(token: int) -> str:  # as the server shows tokens: special ones too
        return pipe.tokenizer.decode([token], skip_special_tokens=False)
    reference = _greedy_reference(pipe, PROMPT, len(lp.tokens))
    assert len(lp.tokens) == TOKENS and "".join(lp.tokens) == r.choices[0].text
    for i, (token, row) in enumerate(reference):
        assert lp.tokens[i] == text(token)
        assert abs(lp.token_logprobs[i] - row[token]) < 1e-4
        top = np.argsort(-row)[:5]
        assert list(lp.top_logprobs[i]) == [text(int(t)) for t in top]
        assert np.abs(np.array(list(lp.top_logprobs[i].values())) - row[top]).max() < 1e-4
    assert lp.text_offset == [len(PROMPT) + len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for part in streamed for v in getattr(part, field)] == getattr(lp, field), field
    assert zero.choices[0].logprobs.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    assert off.choices[0].logprobs is None
    assert [b.status_code for b in bad] == [400] * 4
    assert [b.json()["error"]["message"].split(":")[0] for b in bad] == ["logprobs"] * 3 + ["echo"]
