"""The server's constrained answers with the real SmolLM2-135M-Instruct, through the openai
client: response_format (json_object, json_schema), vLLM's guided_* extras, streamed or not,
equal to pipe.generate with the same constraint; bad schemas and regexes are 400s naming them."""

import json
import re

import httpx
import numpy as np
import openai
import pytest

pytest.importorskip("llguidance")

import meganeura  # noqa: E402
from meganeura.generate import GenerationConfig, Prompt  # noqa: E402
from test_server_helpers import MODEL, serving, user

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["city", "rank"], "additionalProperties": False}
QUESTION = [user("Name a big city and rank it from 1 to 5, as JSON.")]


@pytest.fixture(scope="module")
def pipe():
    return meganeura.load("smollm2-135m-instruct", device="cpu", progress=False)


@pytest.fixture(scope="module")
def url(pipe):
    with serving(pipe, max_batch=4, max_context=1024) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_json_schema_streamed_and_not_equals_the_pipeline(pipe, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    ref = pipe.generate(QUESTION, response_format=fmt, max_new_tokens=30)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, response_format=fmt)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == "stop"
    data = json.loads(ref.text)
    assert set(data) == {"city", "rank"} and 1 <= data["rank"] <= 5
    chunks = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, response_format=fmt,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text


@pytest.mark.parametrize("extra, pipe_settings", [
    ({"response_format": {"type": "json_object"}}, {"response_format": {"type": "json_object"}}),
    ({"guided_json": SCHEMA}, {"json_schema": SCHEMA}),
    ({"guided_regex": "(yes|no), [0-9]{1,2}"}, {"regex": "(yes|no), [0-9]{1,2}"}),
    ({"guided_choice": ["Paris", "Rome", "Berlin"]}, {"choice": ["Paris", "Rome", "Berlin"]}),
])
def test_every_constraint_field_equals_the_pipeline(pipe, client, extra, pipe_settings):
    ref = pipe.generate(QUESTION, max_new_tokens=16, **pipe_settings)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, extra_body=extra)
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish_reason


@pytest.mark.parametrize("extra, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wrong"}}}},
     "response_format.json_schema.schema is not valid: Invalid type: wrong"),
    ({"response_format": {"type": "yaml"}}, 'response_format.type must be "text", "json_object" or "json_schema"'),
    ({"guided_regex": "a(b"}, "guided_regex: regex is not valid"),
    ({"guided_json": "{oops"}, "guided_json: json_schema: not valid JSON"),
    ({"guided_choice": []}, "guided_choice: choice must be a list of non-empty strings"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "give one of guided_regex, guided_choice, not several"),
    ({"guided_regex": "a+", "ignore_eos": True}, "ignore_eos cannot go with guided_regex"),
])
def test_bad_constraints_are_400s_naming_the_problem(url, extra, says):
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_ignore_eos_answers_run_to_max_tokens(pipe, client):
    ref = pipe.generate(QUESTION, max_new_tokens=40, ignore_eos=True)
    for extra in ({"ignore_eos": True}, {"ignore_eos": True, "response_format": {"type": "text"}}):  # no grammar
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, extra_body=extra)
        assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content == ref.text


def test_raw_completions_streamed_and_not(pipe, client, url):
    """/v1/completions: the prompt's tokens as they are (no chat template), through the openai client."""
    prompt = "The capital of France is"
    ids = pipe.tokenizer.encode(prompt, add_special_tokens=False).ids
    sched = pipe.scheduler(width=1)
    seq = sched.add(Prompt(np.array(ids)), GenerationConfig(max_new_tokens=12, stop=("\n",)))
    while not sched.idle:
        sched.step()
    ref = seq.result()
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stop=["\n"])
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    chunks = list(client.completions.create(model=MODEL, prompt=[prompt], max_tokens=12, stop=["\n"], stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    default = client.completions.create(model=MODEL, prompt=prompt, temperature=0.8, seed=1)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens
    regex = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                      extra_body={"guided_regex": " [A-Z][a-z]+"})
    assert re.fullmatch(" [A-Z][a-z]+", regex.choices[0].text)
    for body, says in (({"prompt": ""}, "the prompt is empty"), ({"prompt": ["a", "b"]}, "give one prompt"),
                       ({}, "prompt: Field required"), ({"prompt": "x", "max_tokens": 0}, "max_tokens")):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, **body})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
