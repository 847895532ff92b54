"""Tier 1: graph building and shape checks, passes, plans and session errors (no model weights)."""

import time

import numpy as np
import pytest

from meganeura import CompileOptions, Graph, GraphError, SessionError, build_inference_session
from meganeura.models import smollm2
from meganeura.models.smolvlm2 import SmolVLM2Config, TextConfig, VisionConfig, build_graph
from meganeura.passes import optimize
from tiny_models import rel_err


# ---- graph ---------------------------------------------------------------------------------

def test_shape_errors_name_the_op_and_shapes():
    g = Graph()
    a, b = g.input("a", [4, 8]), g.input("b", [5, 8])
    with pytest.raises(GraphError, match=r"add: operands must have equal shapes \(got f32\[4, 8\], f32\[5, 8\]\)"):
        g.add(a, b)
    with pytest.raises(GraphError, match="linear: needs x"):
        g.linear(a, g.parameter("w", [3, 7]))
    with pytest.raises(GraphError, match="rope"):
        g.rope(a, g.input_u32("p", [3]), 4, 1e4)
    with pytest.raises(GraphError, match="attention: 4 heads not divisible by 3"):
        g.causal_attention(g.input("q", [2, 8]), g.input("k", [2, 6]), g.input("v", [2, 6]), 4, 3)
    with pytest.raises(GraphError, match="already declared"):
        g.input("a", [4, 9])


def test_introspection_lists_inputs_and_parameters():
    cfg = SmolVLM2Config.smolvlm2_500m()
    g = Graph()
    build_graph(g, cfg, 128)
    assert g.inputs == {
        "image_patches": ((1024, 768), "f32"),
        "vision_features_shuffled": ((64, 12288), "f32"),
        "combined_embeds": ((64 + 128, 960), "f32"),
        "token_ids": ((128,), "u32"),
    }
    p = g.parameters
    assert p["model.vision_model.encoder.layers.0.self_attn.q_proj.weight"].shape == (768, 768)
    assert p["model.vision_model.encoder.layers.11.layer_norm1.weight"].shape == (768,)
    assert p["model.vision_model.encoder.layers.3.mlp.fc1.weight"].shape == (3072, 768)
    assert p["model.vision_model.embeddings.patch_embedding.weight"].shape == (768, 3, 16, 16)
    assert p["model.connector.modality_projection.proj.weight"].shape == (960, 12288)
    assert p["model.text_model.layers.31.self_attn.k_proj.weight"].shape == (320, 960)
    assert p["lm_head.weight"].shape == (49280, 960)
    total = sum(int(np.prod(t.shape)) for t in p.values())
    assert 500e6 < total < 515e6  # ~507M published


def test_500m_preset_builds_and_plans_quickly():
    t = time.perf_counter()
    config = SmolVLM2Config.smolvlm2_500m()
    assert (config.num_vision_tokens, config.connector_input_dim, config.head_dim, config.kv_dim) == (64, 12288, 64, 320)
    g = Graph()
    logits = build_graph(g, config, 128)
    g.set_outputs([logits])
    session = build_inference_session(g)
    elapsed = time.perf_counter() - t
    print(session.plan.summary())
    print("passes:", session.report)
    assert logits.shape == (192, 49280)
    assert elapsed < 10
    assert len(session.plan.dispatches) > 0
    # liveness reuse: far fewer buffers than dispatches
    assert len(session.plan.buffers) < len(session.plan.dispatches) / 10


def test_from_hf_ignores_unknown_keys_and_reads_scale_factor():
    cfg = SmolVLM2Config.from_hf({
        "model_type": "smolvlm", "scale_factor": 4, "image_token_id": 49190, "some_new_key": 1,
        "vision_config": {"hidden_size": 768, "image_size": 512, "patch_size": 16, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu_pytorch_tanh",
                          "unknown": True},
        "text_config": {"vocab_size": 49280, "hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15,
                        "num_key_value_heads": 5, "intermediate_size": 2560, "rms_norm_eps": 1e-5,
                        "rope_theta": 100000.0, "max_position_embeddings": 8192, "architectures": ["VLlama"]},
    })
    assert cfg == SmolVLM2Config.smolvlm2_500m()
    with pytest.raises(ValueError, match="not a SmolVLM config"):
        SmolVLM2Config.from_hf({"model_type": "llama"})
    assert isinstance(cfg.vision, VisionConfig) and isinstance(cfg.text, TextConfig)


def test_smollm2_presets_and_from_hf():
    assert smollm2.smollm2_135m().kv_dim == 192
    assert smollm2.smollm2_360m().head_dim == 64
    assert smollm2.from_hf({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "intermediate_size": 16, "foo": 1}).num_key_value_heads == 2
    with pytest.raises(ValueError, match="not a Llama config"):
        smollm2.from_hf({"model_type": "gpt2"})


# ---- passes: each rule fires and the fused graph computes the same values --------------------

def _compare(build, feeds, rule):
    g = Graph()
    g.set_outputs([build(g)])
    _, report = optimize(g)
    assert report.fired[rule] >= 1, f"{rule} did not fire: {report}"
    outs = []
    for opt in (False, True):
        s = build_inference_session(g, CompileOptions(optimize=opt))
        for n, v in feeds.items():
            (s.set_parameter if n in s.plan.parameters else s.set_input)(n, v)
        s.run()
        outs.append(s.read_output())
    assert rel_err(outs[1], outs[0]) < 1e-6


rng = np.random.default_rng()


def _r(*s):
    return rng.standard_normal(s).astype(np.float32)


def test_rule_bias_into_linear():
    _compare(lambda g: g.bias_add(g.linear(g.input("x", [3, 4]), g.parameter("w", [5, 4])), g.parameter("b", [5])),
             {"x": _r(3, 4), "w": _r(5, 4), "b": _r(5)}, "fuse_bias_into_linear")


def test_rule_residual_into_linear():
    def build(g):
        x = g.input("x", [3, 4])
        return g.add(x, g.linear(x, g.parameter("w", [4, 4])))
    _compare(build, {"x": _r(3, 4), "w": _r(4, 4)}, "fuse_residual_into_linear")


def test_rule_gelu_into_linear():
    _compare(lambda g: g.gelu(g.linear(g.input("x", [3, 4]), g.parameter("w", [5, 4]), bias=g.parameter("b", [5]))),
             {"x": _r(3, 4), "w": _r(5, 4), "b": _r(5)}, "fuse_gelu_into_linear")


def test_rule_add_into_layer_norm_keeps_the_sum_for_its_other_readers():
    def build(g):
        x = g.add(g.input("a", [3, 8]), g.input("b", [3, 8]))  # a residual stream: normed and read again
        h = g.layer_norm(x, g.parameter("w", [8]), g.parameter("c", [8]), 1e-6)
        return g.add(x, g.linear(h, g.parameter("p", [8, 8])))
    _compare(build, {"a": _r(3, 8), "b": _r(3, 8), "w": _r(8), "c": _r(8), "p": _r(8, 8)}, "fuse_add_into_layer_norm")


def test_rule_swiglu():
    _compare(lambda g: g.mul(g.silu(g.input("a", [3, 4])), g.input("b", [3, 4])),
             {"a": _r(3, 4), "b": _r(3, 4)}, "fuse_swiglu")


def test_rule_merge_sibling_linears_with_and_without_bias():
    def build(g):
        x = g.input("x", [3, 4])
        q = g.linear(x, g.parameter("q", [6, 4]), bias=g.parameter("qb", [6]))
        k = g.linear(x, g.parameter("k", [2, 4]), bias=g.parameter("kb", [2]))
        gate, up = g.linear(x, g.parameter("g", [5, 4])), g.linear(x, g.parameter("u", [5, 4]))
        return g.concat([q, k, g.swiglu(gate, up)], axis=1)
    feeds = {"x": _r(3, 4), "q": _r(6, 4), "qb": _r(6), "k": _r(2, 4), "kb": _r(2), "g": _r(5, 4), "u": _r(5, 4)}
    _compare(build, feeds, "merge_sibling_linears")


def test_rule_rms_norm_into_linear():
    def build(g):
        x = g.input("x", [3, 8])
        return g.linear(g.rms_norm(x, g.parameter("g", [8]), 1e-5), g.parameter("w", [5, 8]), residual=g.input("r", [3, 5]))
    _compare(build, {"x": _r(3, 8), "g": _r(8), "w": _r(5, 8), "r": _r(3, 5)}, "fuse_rms_norm_into_linear")


def test_rule_swiglu_into_linear_over_a_merged_gate_up():
    def build(g):
        x = g.input("x", [3, 8])
        gate, up = g.linear(x, g.parameter("wg", [6, 8])), g.linear(x, g.parameter("wu", [6, 8]))
        return g.add(x, g.linear(g.mul(g.silu(gate), up), g.parameter("wd", [8, 6])))
    _compare(build, {"x": _r(3, 8), "wg": _r(6, 8), "wu": _r(6, 8), "wd": _r(8, 6)}, "fuse_swiglu_into_linear")


@pytest.mark.parametrize("mode", ["any", "decode"])
def test_rule_rope_into_cached_attention(mode):
    def build(g):
        pos, slots = g.input_u32("pos", [3]), g.input_u32("slots", [3])
        q = g.rope(g.input("q", [3, 4 * 8]), pos, 8, 10000.0)
        k = g.rope(g.input("k", [3, 2 * 8]), pos, 8, 10000.0)
        caches = [g.state(n, [7, 2, 16]) for n in ("kc", "vc")]
        table = g.input_u32("table", [3, 3])
        return g.cached_attention(q, k, g.input("v", [3, 16]), *caches, table, slots, pos, 4, 2, mode=mode)
    feeds = {"q": _r(3, 32), "k": _r(3, 16), "v": _r(3, 16), "pos": np.array([0, 5, 2], np.uint32),
             "slots": np.array([1, 0, 2], np.uint32), "table": np.array([[1, 2, 3], [4, 5, 6], [0, 0, 0]], np.uint32)}
    _compare(build, feeds, "fuse_rope_into_cached_attention")


def test_dead_code_keeps_declared_inputs():
    g = Graph()
    used = g.input("used", [2, 2])
    g.input("unused", [3])
    g.set_outputs([g.add(used, used)])
    s = build_inference_session(g)
    s.set_input("unused", np.zeros(3, np.float32))  # accepted although nothing reads it
    s.set_input("used", np.ones((2, 2), np.float32))
    s.run()
    assert np.array_equal(s.read_output(), np.full((2, 2), 2, np.float32))


# ---- session errors ----------------------------------------------------------------------------

def _tiny_session():
    g = Graph()
    x = g.input("x", [2, 3])
    g.set_outputs([g.linear(x, g.parameter("layer.weight", [4, 3]))])
    return build_inference_session(g)


def test_session_errors_name_the_problem():
    s = _tiny_session()
    with pytest.raises(SessionError, match=r"unknown parameter 'layer.weigth'; did you mean 'layer.weight'"):
        s.set_parameter("layer.weigth", np.zeros((4, 3)))
    with pytest.raises(SessionError, match=r"parameter 'layer.weight': expected shape \[4, 3\], got float64 array of shape \[3, 4\]"):
        s.set_parameter("layer.weight", np.zeros((3, 4)))
    with pytest.raises(SessionError, match="expected a floating-point array"):
        s.set_input("x", np.zeros((2, 3), np.int32))
    s.set_input("x", np.zeros((2, 3), np.float32))
    with pytest.raises(SessionError, match="1 parameter\\(s\\) never set: layer.weight"):
        s.run()
    with pytest.raises(SessionError, match="no outputs yet"):
        s.read_output()
    s.set_parameter("layer.weight", np.ones((4, 3), np.float32))
    s.run()
    with pytest.raises(SessionError, match="output index 1 out of range"):
        s.read_output(1)
    g = Graph()
    g.input_u32("ids", [2])
    g.set_outputs([g.embedding(g.leaf("ids"), g.parameter("t", [4, 2]))])
    s = build_inference_session(g)
    with pytest.raises(SessionError, match="values must fit in u32"):
        s.set_input("ids", np.array([-1, 2]))
    with pytest.raises(SessionError, match="no outputs"):
        build_inference_session(Graph())
    with pytest.raises(SessionError, match="unknown backend"):
        build_inference_session(g, CompileOptions(backend="cuda"))


def test_session_releases_merged_parts_once_their_constant_exists():
    """Foldable parameters go as soon as the last constant reading them is built: a layer's
    q and k are gone before the next layer's merged weight is made (peak memory at load)."""
    from meganeura.session import Session, Store, make_backend

    class Watched(Store):
        resident_when_read: list = []

        def parameter(self, name):
            Watched.resident_when_read.append((name, set(self.parameters)))
            return super().parameter(name)

    g = Graph()
    outs = []
    for layer in range(2):
        x = g.input(f"x{layer}", [2, 4])
        q, k = (g.linear(x, g.parameter(f"{layer}.{n}", [3, 4])) for n in "qk")
        outs.append(g.add(q, k))
    g.set_outputs([g.concat(outs, axis=1)])
    store = Watched(make_backend(CompileOptions()))
    s = Session(g, store=store, foldable={"0.q", "0.k", "1.q", "1.k"})
    for name in ("0.q", "0.k", "1.q", "1.k"):
        s.set_parameter(name, _r(3, 4))
    for layer in range(2):
        s.set_input(f"x{layer}", _r(2, 4))
    s.run()
    first_of_layer_1 = next(resident for name, resident in Watched.resident_when_read if name.startswith("1."))
    assert not first_of_layer_1 & {"0.q", "0.k"}
    assert not store.parameters  # all four live on in the merged constants only
    s.run()  # later runs use the constants; the released parts are not needed
    assert not store.parameters


def test_step_alias_and_plan_summary():
    s = _tiny_session()
    s.set_parameter("layer.weight", np.ones((4, 3), np.float32))
    s.set_input("x", np.ones((2, 3), np.float32))
    s.step()
    assert np.array_equal(s.read_output(), np.full((2, 4), 3, np.float32))
    text = str(s.plan)
    assert "1 dispatches" in text and "linear" in text
