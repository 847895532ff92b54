"""Tier 2: every op on the torch backend against the numpy reference, on fresh random inputs."""

import numpy as np
import pytest

from meganeura import CompileOptions, Graph, build_inference_session
from tiny_models import rel_err

rng = np.random.default_rng()  # fresh inputs every run: parity must not depend on a lucky seed


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def u32(high, *shape):
    return rng.integers(0, high, shape).astype(np.uint32)


def _run(build, feeds, backend):
    g = Graph()
    out = build(g)
    g.set_outputs([out])
    s = build_inference_session(g, CompileOptions(backend=backend, optimize=False))
    for name, value in feeds.items():
        (s.set_parameter if name.startswith("w.") else s.set_input)(name, value)
    s.run()
    return s.read_output()


def _leaf(g, name, value):
    if name.startswith("w."):
        return g.parameter(name, value.shape)
    if value.dtype == np.uint32:
        return g.input_u32(name, value.shape)
    return g.input(name, value.shape)


CASES = {
    "linear": (lambda g, a, w: g.linear(a, w), {"a": f32(5, 8), "w.w": f32(6, 8)}),
    "linear_bias_residual": (lambda g, a, w, b, r: g.linear(a, w, bias=b, residual=r),
                             {"a": f32(5, 8), "w.w": f32(6, 8), "w.b": f32(6), "r": f32(5, 6)}),
    "linear_bias_gelu": (lambda g, a, w, b: g.linear(a, w, bias=b, gelu=True),
                         {"a": f32(5, 8), "w.w": f32(6, 8), "w.b": f32(6)}),
    "matmul": (lambda g, a, b: g.matmul(a, b), {"a": f32(4, 7), "b": f32(7, 3)}),
    "add": (lambda g, a, b: g.add(a, b), {"a": f32(4, 5), "b": f32(4, 5)}),
    "mul": (lambda g, a, b: g.mul(a, b), {"a": f32(4, 5), "b": f32(4, 5)}),
    "bias_add": (lambda g, a, b: g.bias_add(a, b), {"a": f32(4, 5), "w.b": f32(5)}),
    "gelu": (lambda g, a: g.gelu(a), {"a": f32(6, 9) * 3}),
    "silu": (lambda g, a: g.silu(a), {"a": f32(6, 9) * 3}),
    "swiglu": (lambda g, a, b: g.swiglu(a, b), {"a": f32(6, 9), "b": f32(6, 9)}),
    "layer_norm": (lambda g, x, w, b: g.layer_norm(x, w, b, 1e-6), {"x": f32(5, 16) + 2, "w.w": f32(16), "w.b": f32(16)}),
    "add_layer_norm": (lambda g, x, r, w, b: g.add_layer_norm(x, r, w, b, 1e-6),
                       {"x": f32(5, 16) + 2, "r": f32(5, 16), "w.w": f32(16), "w.b": f32(16)}),
    "rms_norm": (lambda g, x, w: g.rms_norm(x, w, 1e-5), {"x": f32(5, 16), "w.w": f32(16)}),
    "rope": (lambda g, x, p: g.rope(x, p, 8, 10000.0), {"x": f32(6, 24), "p": u32(500, 6)}),
    "rope_implicit_positions": (lambda g, x: g.rope(x, None, 8, 100000.0), {"x": f32(6, 24)}),
    "causal_attention_gqa": (lambda g, q, k, v: g.causal_attention(q, k, v, 4, 2),
                             {"q": f32(7, 32), "k": f32(7, 16), "v": f32(7, 16)}),
    "full_attention_blocks_masked": (
        lambda g, q, k, v, m: g.full_attention(q, k, v, 2, block=4, key_mask=m),
        {"q": f32(8, 16), "k": f32(8, 16), "v": f32(8, 16), "m": np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)}),
    "embedding": (lambda g, i, t: g.embedding(i, t), {"i": u32(10, 7), "w.t": f32(10, 4)}),
    "scatter_rows": (lambda g, b, i, s: g.scatter_rows(b, i, s),
                     {"b": f32(6, 4), "i": np.array([4, 1], np.uint32), "s": f32(2, 4)}),
    "reshape": (lambda g, x: g.reshape(x, [3, 8]), {"x": f32(6, 4)}),
    "concat": (lambda g, a, b: g.concat([a, b], axis=1), {"a": f32(3, 2), "b": f32(3, 5)}),
    "slice": (lambda g, x: g.slice(x, 1, 2, 5), {"x": f32(3, 7)}),
    "pixel_shuffle": (lambda g, x: g.pixel_shuffle(x, 2, 2), {"x": f32(2 * 16, 3)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_matches_numpy(case):
    build, feeds = CASES[case]

    def graph(g):
        return build(g, *[_leaf(g, n, v) for n, v in feeds.items()])

    ref = _run(graph, feeds, "numpy")
    out = _run(graph, feeds, "torch")
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_cached_attention_writes_then_reads():
    """A prefill into slot 1 (pages 3, 1, 2 of 2 tokens: out of order) and a decode row agree
    between backends, and match plain causal attention."""
    q, k, v = f32(5, 16), f32(5, 8), f32(5, 8)

    def graph(g):
        kc, vc = g.state("k", [4, 2, 8]), g.state("v", [4, 2, 8])
        return g.cached_attention(_leaf(g, "q", q), _leaf(g, "k_new", k), _leaf(g, "v_new", v), kc, vc,
                                  g.input_u32("table", [2, 3]), g.input_u32("slots", [5]),
                                  g.input_u32("positions", [5]), 2, 1)

    feeds = {"q": q, "k_new": k, "v_new": v, "table": np.array([[0, 0, 0], [3, 1, 2]], np.uint32),
             "slots": np.ones(5, np.uint32), "positions": np.arange(5, dtype=np.uint32)}
    ref = _run(lambda g: g.causal_attention(_leaf(g, "q", q), _leaf(g, "k", k), _leaf(g, "v", v), 2, 1),
               {"q": q, "k": k, "v": v}, "numpy")
    for backend in ("numpy", "torch"):
        assert rel_err(_run(graph, feeds, backend), ref) < 1e-5


def test_pixel_shuffle_layout():
    """Output row (r, c) holds the s x s block at (r*s.., c*s..) flattened as [dy][dx][d]."""
    side, s, d = 4, 2, 3
    x = np.arange(side * side * d, dtype=np.float32).reshape(side * side, d)
    out = _run(lambda g: g.pixel_shuffle(_leaf(g, "x", x), 1, s), {"x": x}, "numpy")
    grid = x.reshape(side, side, d)
    expected_first = np.concatenate([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]])
    assert np.array_equal(out[0], expected_first)
    assert np.array_equal(out[1], np.concatenate([grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3]]))


def test_masked_cache_attention_fallback_matches_the_reference():
    """The recordable decode path for head sizes the Triton kernel does not take (e.g. 48)."""
    torch = pytest.importorskip("torch")
    from meganeura.backends import numpy_backend as ref
    from meganeura.backends.torch_backend import attend_cache_masked
    from meganeura.graph import Node
    heads, kv, d = 6, 2, 48
    kc, vc, q = f32(7, 4, kv * d), f32(7, 4, kv * d), f32(3, heads * d)
    table = np.array([[1, 2, 3, 0, 0], [6, 0, 0, 0, 0], [5, 4, 0, 0, 0]])  # slots of 12, 1 and 8 tokens
    slots, positions = np.array([0, 1, 2]), np.array([11, 0, 7])
    out = attend_cache_masked(*(torch.from_numpy(a) for a in (q, kc, vc, table, slots, positions)), heads, kv)
    node = Node("cached_attention", (), (), "f32", dict(num_heads=heads, num_kv_heads=kv, rope_theta=None, mode="decode"))
    at = ref.cache_index(table, slots, positions, 4)
    expected = ref.op_cached_attention(node, q, kc[at], vc[at], kc.copy(), vc.copy(), table, slots, positions)
    assert rel_err(out.numpy(), expected) < 1e-5


@pytest.mark.parametrize("one_storage", [True, False])
def test_cpu_decode_attention_shares_its_step_index_across_layers_and_steps(one_storage):
    """The CPU path makes RoPE tables and cache coordinates once per step (the first layer) and
    reuses them while the index inputs are unchanged: two layers of one step, then a step whose
    inputs were rewritten in place (as the runner does), each against the numpy reference.
    one_storage: the KV cache's layout (pages x layers x k|v in one tensor: keys and values
    gathered at once) and q, k, v sliced from one q|k|v product (q and k rotated at once), or
    separate tensors."""
    torch = pytest.importorskip("torch")
    from meganeura.backends import numpy_backend as ref
    from meganeura.backends import torch_backend
    from meganeura.graph import Node
    heads, kv, d, page = 6, 2, 32, 4
    node = Node("cached_attention", (), (), "f32", dict(num_heads=heads, num_kv_heads=kv, rope_theta=1e4, mode="decode"))
    table = np.array([[1, 2, 3, 0, 0], [6, 0, 0, 0, 0], [5, 4, 7, 0, 0]])
    table_t = torch.from_numpy(table)
    index = torch.from_numpy(np.array([[0, 1, 2], [10, 2, 9]]))  # slots, positions: bound views of one array
    slots_t, positions_t = index[0], index[1]
    caches = [(f32(8, page, kv * d), f32(8, page, kv * d)) for _ in range(2)]  # two layers
    for slots, positions in [([0, 1, 2], [10, 2, 9]), ([2, 0, 1], [10, 11, 3])]:
        index.copy_(torch.tensor([slots, positions]))
        for kc, vc in caches:
            q, k, v = f32(3, heads * d), f32(3, kv * d), f32(3, kv * d)
            expected = ref.op_cached_attention(node, q, k, v, kc, vc, table, np.array(slots), np.array(positions))
            if one_storage:
                storage = torch.from_numpy(np.stack([kc, vc], axis=1)[:, None].repeat(3, axis=1))
                tc, tv = storage[:, 1, 0], storage[:, 1, 1]  # [pages, layers, k|v, page, KV*d]
            else:
                tc, tv = torch.from_numpy(kc.copy()), torch.from_numpy(vc.copy())
            qkv = [torch.from_numpy(a) for a in (q, k, v)]
            if one_storage:
                qkv = torch.cat(qkv, dim=1).split([heads * d, kv * d, kv * d], dim=1)
            out = torch_backend.op_cached_attention(node, *qkv, tc, tv, table_t, slots_t, positions_t)
            assert rel_err(out.numpy(), expected) < 1e-5
            assert rel_err(tc.numpy(), kc) < 1e-6 and rel_err(tv.numpy(), vc) < 1e-6  # (the reference wrote kc, vc)
            kc[:], vc[:] = tc.numpy(), tv.numpy()


def test_cpu_rms_norm_is_the_three_step_formula_bit_for_bit():
    """The one-op float32 RMSNorm equals transformers' x * rsqrt(mean(x^2) + eps), times w."""
    torch = pytest.importorskip("torch")
    from meganeura.backends.torch_backend import rms_norm
    x, w = torch.from_numpy(f32(7, 576)), torch.from_numpy(f32(576))
    formula = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(rms_norm(x, w, 1e-5), formula)
