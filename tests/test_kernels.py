"""The Triton kernels against the numpy reference ops, on fresh random inputs.

On a CUDA machine they run compiled on the GPU; elsewhere in Triton's interpreter (set up in
conftest.py), which checks the same indexing, masking and math on the CPU."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from meganeura.backends import numpy_backend as ref  # noqa: E402
from meganeura.graph import Node  # noqa: E402
from tiny_models import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
rng = np.random.default_rng()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def dev(a, dtype=torch.float32):
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE, dtype)


def host(t):
    return t.float().cpu().numpy()


def node(op, **attrs):
    return Node(op, (), (), "f32", attrs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 960), (7, 64), (3, 100)])
def test_rms_norm(rows, n, dtype):
    from meganeura.kernels.rms_norm import rms_norm
    x = rng.standard_normal((rows, n + 5)).astype(np.float32)  # a row-strided view, as after a slice
    w = rng.standard_normal(n).astype(np.float32)
    xd = dev(x, dtype)[:, :n]
    out = rms_norm(xd, dev(w, dtype), 1e-5)
    expected = ref.op_rms_norm(node("rms_norm", eps=1e-5), host(xd), host(dev(w, dtype)))
    assert rel_err(host(out), expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 768), (13, 96), (5, 100)])
def test_add_layer_norm(rows, n, dtype):
    from meganeura.kernels.add_layer_norm import add_layer_norm
    x = dev(rng.standard_normal((rows, 2 * n)).astype(np.float32), dtype)[:, n:]  # a strided half, as fused
    r = dev(rng.standard_normal((rows, n)).astype(np.float32), dtype)
    w, b = dev(rng.standard_normal(n).astype(np.float32), dtype), dev(rng.standard_normal(n).astype(np.float32), dtype)
    out = add_layer_norm(x, r, w, b, 1e-6)
    expected = ref.op_add_layer_norm(node("add_layer_norm", eps=1e-6), host(x), host(r), host(w), host(b))
    assert out.shape == (rows, 2 * n)
    assert rel_err(host(out[:, :n]), expected[:, :n]) < TOL[dtype]
    assert rel_err(host(out[:, n:]), expected[:, n:]) < 2 * TOL[dtype]  # the norm of a rounded sum


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_on_halves_of_a_merged_projection(dtype):
    from meganeura.kernels.swiglu import swiglu
    merged = dev(rng.standard_normal((4, 2 * 1500)).astype(np.float32), dtype)
    gate, up = merged[:, :1500], merged[:, 1500:]
    out = swiglu(gate, up)
    g, u = host(gate), host(up)
    assert rel_err(host(out), g / (1 + np.exp(-g)) * u) < TOL[dtype]


PAGE = 16


def _paged_cache(slots, max_seq, width, dtype):
    """k and v caches as the KV cache lays them out (strided views of one [pages, layers, 2,
    page, width] storage, random values) and a block table giving each slot shuffled pages."""
    pages_per_slot = -(-max_seq // PAGE)
    storage = dev(rng.standard_normal((slots * pages_per_slot + 1, 2, 2, PAGE, width)).astype(np.float32), dtype)
    table = (1 + rng.permutation(slots * pages_per_slot)).reshape(slots, pages_per_slot)
    return storage[:, 1, 0], storage[:, 1, 1], table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,rows", [(15, 5, 5), (4, 4, 5), (8, 2, 5), (15, 5, 210)])
def test_rope_cache_write(heads, kv_heads, rows, dtype):
    """Few rows spread heads over programs; a prefill's many rows take a row's heads together."""
    from meganeura.kernels.rope_cache import rope_cache_write
    d, theta = 64, 100000.0
    qkv = dev(rng.standard_normal((rows, (heads + 2 * kv_heads) * d)).astype(np.float32), dtype)
    q, k, v = qkv[:, : heads * d], qkv[:, heads * d: (heads + kv_heads) * d], qkv[:, (heads + kv_heads) * d:]
    kc, vc, table = _paged_cache(3, 80, kv_heads * d, dtype)
    kc_before, vc_before = host(kc), host(vc)
    if rows == 5:
        slots, positions = np.array([2, 0, 1, 2, 0]), np.array([0, 79, 7, 8, 1])
    else:  # distinct (slot, position) pairs
        slots, positions = np.divmod(rng.permutation(3 * 80)[:rows], 80)
    inv_freq = dev(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    q_rot, k_rot = rope_cache_write(q, k, v, kc, vc, dev(table, torch.int64), dev(slots, torch.int64),
                                    dev(positions, torch.int64), inv_freq, heads, kv_heads, keys_out=True)
    assert rel_err(host(q_rot), ref.rotate(host(q), positions, d, theta)) < TOL[dtype]
    assert rel_err(host(k_rot), ref.rotate(host(k), positions, d, theta)) < TOL[dtype]
    expected_k, expected_v = kc_before.copy(), vc_before.copy()
    at = ref.cache_index(table, slots, positions, PAGE)
    expected_k[at] = ref.rotate(host(k), positions, d, theta)
    expected_v[at] = host(v)
    assert rel_err(host(kc), expected_k) < TOL[dtype]
    assert np.array_equal(host(vc), expected_v)  # v is copied, untouched elsewhere


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,splits", [(15, 5, None), (15, 5, 7), (4, 4, 1), (8, 2, 3)])
def test_decode_attention(heads, kv_heads, splits, dtype):
    from meganeura.kernels.decode_attention import decode_attention
    d, max_seq = 64, 300
    slots = np.array([3, 0, 2])
    positions = np.array([0, 299, 130])  # a first token, a full slot, one mid-way
    q = dev(rng.standard_normal((3, heads * d)).astype(np.float32), dtype)
    kc, vc, table = _paged_cache(4, max_seq, kv_heads * d, dtype)
    out = decode_attention(q, kc, vc, dev(table, torch.int64), dev(slots, torch.int64), dev(positions, torch.int64),
                           heads, kv_heads, splits=splits)
    # the reference writes k, v first: give it the values already in the cache at those rows
    kh, vh = host(kc), host(vc)
    at = ref.cache_index(table, slots, positions, PAGE)
    expected = ref.op_cached_attention(
        node("cached_attention", num_heads=heads, num_kv_heads=kv_heads, rope_theta=None, mode="decode"),
        host(q), kh[at], vh[at], kh, vh, table, slots, positions)
    assert rel_err(host(out), expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,start,n,splits", [(6, 2, 70, 40, None),
                                                           (4, 2, 250, 20, 5), (6, 3, 16, 3, 2)])
def test_extend_attention(heads, kv_heads, start, n, splits, dtype):
    """A chunk of n rows after `start` cached positions (a prefix, earlier chunks), padded as
    the runner pads (extra rows repeat the last position, in the dummy slot), against the
    reference's extend mode: each row sees keys 0..its position of the chunk's slot."""
    from meganeura.kernels.extend_attention import extend_attention
    d, max_seq, padded = 64, 300, -(-n // 16) * 16 + 16
    slot, dummy = 2, 3
    positions = np.concatenate([start + np.arange(n), np.full(padded - n, start + n - 1)])
    slots = np.concatenate([np.full(n, slot), np.full(padded - n, dummy)])
    q = rng.standard_normal((padded, heads * d)).astype(np.float32)
    q = dev(q[np.minimum(np.arange(padded), n - 1)], dtype)  # padding rows ask what the last row asks
    kc, vc, table = _paged_cache(4, max_seq, kv_heads * d, dtype)
    out = extend_attention(q, kc, vc, dev(table, torch.int64), dev(slots, torch.int64), dev(positions, torch.int64),
                           heads, kv_heads, splits=splits)
    kh, vh = host(kc), host(vc)
    at = ref.cache_index(table, slots[:n], positions[:n], PAGE)
    expected = ref.op_cached_attention(
        node("cached_attention", num_heads=heads, num_kv_heads=kv_heads, rope_theta=None, mode="extend"),
        host(q)[:n], kh[at], vh[at], kh, vh, table, slots[:n], positions[:n])
    assert rel_err(host(out)[:n], expected) < TOL[dtype]
    assert rel_err(host(out)[n:], np.repeat(expected[-1:], padded - n, axis=0)) < TOL[dtype]  # padding: the last row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 11])
@pytest.mark.parametrize("shape,norm,gated,residual,float_out", [
    ((100, 96), False, False, False, False), ((130, 64), True, False, False, True),
    ((70, 80), False, True, True, False), ((20, 300), True, False, True, False)])
def test_gemv(rows, shape, norm, gated, residual, float_out, dtype):
    from meganeura.kernels.gemv import gemv
    n, k = shape
    x = dev(rng.standard_normal((rows, 2 * k if gated else k)).astype(np.float32), dtype)
    w = dev(rng.standard_normal((n, k)).astype(np.float32), dtype)
    g = dev(rng.standard_normal(k).astype(np.float32), dtype) if norm else None
    r = dev(rng.standard_normal((rows, n)).astype(np.float32), dtype) if residual else None
    out = gemv(x, w, residual=r, norm=g, eps=1e-5, gated=gated, float_out=float_out)
    assert out.dtype == (torch.float32 if float_out else dtype)
    h = host(x)
    if gated:
        h = h[:, :k] / (1 + np.exp(-h[:, :k])) * h[:, k:]
    if norm:
        h = ref.op_rms_norm(node("rms_norm", eps=1e-5), h, host(g))
    expected = h @ host(w).T + (host(r) if residual else 0)
    assert rel_err(host(out), expected) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,norm,gated,residual,float_out", [
    ((130, 64), True, False, True, True), ((70, 80), False, True, True, False)])
def test_gemv_rows_are_computed_as_alone(shape, norm, gated, residual, float_out, dtype):
    """Row invariance: each row of a 13-row product (two programs of rows) is bit-identical to
    that row alone and to it inside a 3-row product."""
    from meganeura.kernels.gemv import gemv
    n, k = shape
    x = dev(rng.standard_normal((13, 2 * k if gated else k)).astype(np.float32), dtype)
    w = dev(rng.standard_normal((n, k)).astype(np.float32), dtype)
    g = dev(rng.standard_normal(k).astype(np.float32), dtype) if norm else None
    r = dev(rng.standard_normal((13, n)).astype(np.float32), dtype) if residual else None

    def product(rows):
        return host(gemv(x[rows], w, residual=r[rows] if residual else None, norm=g, eps=1e-5, gated=gated,
                         float_out=float_out))

    batch = product(slice(0, 13))
    assert np.array_equal(product(slice(9, 12)), batch[9:12])
    for i in (0, 5, 8, 12):
        assert np.array_equal(product(slice(i, i + 1))[0], batch[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_rows_are_computed_as_alone(dtype):
    """Row invariance: a row's attention does not depend on how many rows run beside it."""
    from meganeura.kernels.decode_attention import decode_attention
    heads, kv_heads, d = 15, 5, 64
    slots, positions = np.array([3, 0, 2, 1]), np.array([0, 299, 130, 64])
    q = dev(rng.standard_normal((4, heads * d)).astype(np.float32), dtype)
    kc, vc, table = _paged_cache(4, 300, kv_heads * d, dtype)
    table = dev(table, torch.int64)

    def attend(rows):
        return host(decode_attention(q[rows], kc, vc, table, dev(slots[rows], torch.int64),
                                     dev(positions[rows], torch.int64), heads, kv_heads))

    batch = attend(slice(0, 4))
    for i in range(4):
        assert np.array_equal(attend(slice(i, i + 1))[0], batch[i])
