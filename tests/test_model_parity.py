"""Tier 3: model parity with transformers on tiny random checkpoints, fp32 on CPU, both backends."""

import numpy as np
import pytest
import torch

from meganeura import CompileOptions, Graph, build_inference_session
from meganeura.models import smollm2
from meganeura.models.smolvlm2 import (SmolVLM2Config, build_graph, build_vision_encoder, connector)
from meganeura.engine.runner import ModelRunner
from meganeura.weights import WeightsError
from tiny_models import (IMAGE_TOKEN, llama_spec, rel_err, smolvlm_spec, state_dict, tiny_llama, tiny_smolvlm)

BACKENDS = ["numpy", "torch"]
TOL = 1e-4


@pytest.fixture(scope="module")
def vlm():
    return tiny_smolvlm()


@pytest.fixture(scope="module")
def lm():
    return tiny_llama()


def _session(graph_fn, weights, backend):
    g = Graph()
    g.set_outputs([graph_fn(g)])
    s = build_inference_session(g, CompileOptions(backend=backend))
    for name in s.plan.parameters:
        s.set_parameter(name, weights[name])
    return s


def _pixels(n, size, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_encoder_matches_transformers(vlm, backend):
    cfg = SmolVLM2Config.from_hf(vlm.config.to_dict())
    pixels = _pixels(1, cfg.vision.image_size)
    s = _session(lambda g: build_vision_encoder(g, cfg.vision, cfg.num_patches), state_dict(vlm), backend)
    from meganeura.models.siglip import patchify
    s.set_input("image_patches", patchify(pixels, cfg.vision.patch_size))
    s.run()
    with torch.no_grad():
        ref = vlm.model.vision_model(torch.from_numpy(pixels)).last_hidden_state[0].numpy()
    assert rel_err(s.read_output(), ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_connector_matches_transformers(vlm, backend):
    cfg = SmolVLM2Config.from_hf(vlm.config.to_dict())
    hidden = np.random.default_rng(1).standard_normal((2, cfg.num_patches, cfg.vision.hidden_size)).astype(np.float32)

    def graph(g):
        x = g.input("hidden", [2 * cfg.num_patches, cfg.vision.hidden_size])
        return connector(g, cfg, g.pixel_shuffle(x, 2, cfg.scale_factor))

    s = _session(graph, state_dict(vlm), backend)
    s.set_input("hidden", hidden.reshape(-1, cfg.vision.hidden_size))
    s.run()
    with torch.no_grad():
        ref = vlm.model.connector(torch.from_numpy(hidden)).reshape(-1, cfg.text.hidden_size).numpy()
    assert rel_err(s.read_output(), ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_graph_with_padding_matches_transformers(vlm, backend):
    """Images smaller than the padded size: masked attention and bucketed position ids."""
    cfg = SmolVLM2Config.from_hf(vlm.config.to_dict())
    size = cfg.vision.image_size
    pixels = _pixels(3, size, seed=2)
    mask = np.zeros((3, size, size), np.int64)
    mask[0] = 1                      # full image
    mask[1, :40, :56] = 1            # smaller, non-square valid region
    mask[2, :size, :24] = 1          # a tall strip
    pixels *= mask[:, None]
    rt = ModelRunner(smolvlm_spec(vlm), CompileOptions(backend=backend))
    rt.load_weights(state_dict(vlm))
    out = rt.to_host(rt.encode_images(pixels, mask))
    with torch.no_grad():
        ref = vlm.model.get_image_features(torch.from_numpy(pixels)[None], torch.from_numpy(mask)[None])
    ref = torch.cat(list(ref.pooler_output)).numpy()
    assert rel_err(out, ref) < TOL


def _vlm_prompt(cfg, images, text_before=5, text_after=7, seed=3):
    rng = np.random.default_rng(seed)
    ids = list(rng.integers(0, 200, text_before))
    for _ in range(images):
        ids += [IMAGE_TOKEN] * cfg.num_vision_tokens + list(rng.integers(0, 200, 2))
    return np.array(ids + list(rng.integers(0, 200, text_after)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_smolvlm_prefill_and_decode_match_transformers(vlm, backend):
    """Image features merged into the prompt in the graph; prefill logits of every row, then
    token-by-token decode through the KV cache, against one full transformers forward."""
    cfg = SmolVLM2Config.from_hf(vlm.config.to_dict())
    pixels = _pixels(2, cfg.vision.image_size, seed=4)
    ids = _vlm_prompt(cfg, images=2)
    extra = np.array([7, 42, 199, 3])
    with torch.no_grad():
        full = torch.from_numpy(np.concatenate([ids, extra]))[None]
        ref = vlm(input_ids=full, pixel_values=torch.from_numpy(pixels)[None]).logits[0].numpy()

    rt = ModelRunner(smolvlm_spec(vlm), CompileOptions(backend=backend))
    rt.load_weights(state_dict(vlm))
    features = rt.encode_images(pixels)
    n = len(ids)
    image_rows = np.flatnonzero(ids == IMAGE_TOKEN)
    slot = rt.cache.take(n + len(extra))
    logits = rt.to_host(rt.prefill(ids, slot, features, image_rows, all_logits=True))
    assert rel_err(logits, ref[:n]) < TOL
    for i, tok in enumerate(extra):
        step = rt.to_host(rt.decode([tok], [n + i], [slot]))
        assert rel_err(step[0], ref[n + i]) < TOL, f"decode step {i}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_graph_matches_transformers_text_forward(vlm, backend):
    """build_graph: logits of a causal forward over combined embeddings (image tokens first)."""
    cfg = SmolVLM2Config.from_hf(vlm.config.to_dict())
    text_len = 9
    rng = np.random.default_rng(5)
    embeds = rng.standard_normal((cfg.num_vision_tokens + text_len, cfg.text.hidden_size)).astype(np.float32)
    s = _session(lambda g: build_graph(g, cfg, text_len), state_dict(vlm), backend)
    assert set(s.plan.inputs) == {"image_patches", "vision_features_shuffled", "combined_embeds", "token_ids"}
    s.set_input("combined_embeds", embeds)
    s.set_input("token_ids", np.zeros(text_len, np.uint32))  # declared, unused by logits: still accepted
    s.run()
    with torch.no_grad():
        ref = vlm(inputs_embeds=torch.from_numpy(embeds)[None]).logits[0].numpy()
    assert rel_err(s.read_output(), ref) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", [False, True])
def test_llama_forward_and_cached_decode_match_transformers(backend, tie):
    model = tiny_llama(tie=tie, seed=6)
    weights = state_dict(model)
    if tie:
        weights.pop("lm_head.weight")
    cfg = smollm2.from_hf(model.config.to_dict())
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, 20)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)[None]).logits[0].numpy()

    s = _session(lambda g: smollm2.build_graph(g, cfg, 20), weights, backend)
    s.set_input("token_ids", ids.astype(np.uint32))
    s.run()
    assert rel_err(s.read_output(), ref) < TOL

    rt = ModelRunner(llama_spec(model), CompileOptions(backend=backend))
    rt.load_weights(weights)
    slot = rt.cache.take(20)
    last = rt.to_host(rt.prefill(ids[:12], slot))
    assert rel_err(last[0], ref[11]) < TOL
    for p in range(12, 20):
        step = rt.to_host(rt.decode(ids[p:p + 1], [p], [slot]))
        assert rel_err(step[0], ref[p]) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_decode_equals_single_sequences(lm, backend):
    """Two sequences in two cache slots decoded in one step give each one's own logits; the
    first one's pages are not in order (a page freed by a third sequence is reused)."""
    rt = ModelRunner(llama_spec(lm), CompileOptions(backend=backend))
    rt.load_weights(state_dict(lm))
    a, b = np.arange(5, 45), np.arange(100, 106)
    with torch.no_grad():
        ref_a = lm(torch.from_numpy(a)[None]).logits[0, -1].numpy()
        ref_b = lm(torch.from_numpy(b)[None]).logits[0, -1].numpy()
    gap = rt.cache.take(20)
    sb = rt.cache.take(len(b))
    rt.cache.release(gap)
    sa = rt.cache.take(len(a))  # pages 1, 2, then 4 after b's page 3
    assert list(rt.cache.table[sa, :3]) == [1, 2, 4]
    rt.prefill(a[:-1], sa)
    rt.prefill(b[:-1], sb)
    both = rt.to_host(rt.decode([a[-1], b[-1]], [len(a) - 1, len(b) - 1], [sa, sb]))
    assert rel_err(both[0], ref_a) < TOL and rel_err(both[1], ref_b) < TOL


def test_checkpoint_mismatch_lists_names(vlm):
    rt = ModelRunner(smolvlm_spec(vlm))
    weights = state_dict(vlm)
    weights.pop("model.connector.modality_projection.proj.weight")
    weights["model.extra.weight"] = np.zeros(3, np.float32)
    weights["lm_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightsError) as e:
        rt.load_weights(weights, source="tiny.safetensors")
    msg = str(e.value)
    for part in ("tiny.safetensors", "missing (1): model.connector.modality_projection.proj.weight",
                 "unexpected (1): model.extra.weight", "lm_head.weight: expected float[300, 64], found float32[3, 3]"):
        assert part in msg


def test_runner_refuses_out_of_range_indices(lm):
    rt = ModelRunner(llama_spec(lm), CompileOptions(backend="numpy"))
    rt.load_weights(state_dict(lm))
    slot = rt.cache.take(20)  # two pages of 16 tokens
    with pytest.raises(ValueError, match=r"token id 300 is outside \[0, 300\)"):
        rt.prefill([1, 300], slot)
    with pytest.raises(ValueError, match=r"position 32 is outside slot 0's 32 tokens"):
        rt.decode([1], [32], [slot])
    with pytest.raises(ValueError, match=r"slot 1's 0 tokens"):  # a slot that holds no pages
        rt.decode([1], [0], [1])
    with pytest.raises(ValueError, match=r"2 tokens, 1 positions and 2 slots"):
        rt.decode([1, 2], [0], [0, 1])
    with pytest.raises(ValueError, match=r"prefill: 40 tokens, but slot 0 holds 32"):
        rt.prefill(np.ones(40), slot)


def test_runner_releases_only_weights_that_live_on_inside_merged_constants(vlm):
    rt = ModelRunner(smolvlm_spec(vlm), CompileOptions(backend="numpy"))
    weights = state_dict(vlm)
    rt.load_weights(weights)
    rt.prefill([1, 2, 3], rt.cache.take(3))
    released = set(rt.store.sources) - set(rt.store.parameters)
    merged = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    assert released and all("text_model" in n and any(m in n for m in merged) for n in released)
    name = sorted(released)[0]
    assert np.array_equal(rt.store.parameter(name), weights[name])  # uploaded again from its source if needed
