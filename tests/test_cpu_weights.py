"""Compact CPU weight forms (backends/cpu_weights.py): each product against a float32 product of
the very weights the form multiplies by, GGUF blocks read exactly, the form a checkpoint gets."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from meganeura.backends.cpu_weights import (Bf16Weight, F16Weight, Int4Weight, Int8Weight, bf16_products, concat_rows,
                                             from_gguf_blocks, make_weight)

SHAPES = [(64, 96), (300, 64), (192, 576)]  # 300 rows: int4pack's multiple of 16 is padded
# bf16: packed for oneDNN's bf16 products, on CPUs that have them (this project's CI machine does)
FORMS = ["int4", "int8", "f16", pytest.param("bf16", marks=pytest.mark.skipif(not bf16_products(),
                                                                               reason="no bf16 products on this CPU"))]


def _weight(shape, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.05)


def _rows(k, n=2, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32))


def _reference(x, w_effective):
    """What the kernels compute: bf16 rows times the form's weight, accumulated in float32, out in bf16."""
    return (x.bfloat16().double() @ w_effective.double().T).float()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_product_matches_float_product_of_its_weights(form, shape):
    w = make_weight(_weight(shape), form)
    x = _rows(shape[1])
    ref = _reference(x, w.effective())  # (packing for products drops the form's own numbers)
    out = w.product(x, torch.float32)
    # the output is rounded to bfloat16 (int8: two outputs, each rounded), plus float32
    # accumulation order (bf16: the weights are bf16-rounded floats, effective() holds them)
    assert out.shape == (2, shape[0])
    assert (out - ref).abs().max() <= 2**-7 * ref.abs().max() + 1e-5


@pytest.mark.parametrize("form,steps", [("int4", 15), ("int8", 254)])
def test_quantizing_floats_errs_at_most_half_a_step(form, steps):
    """A group's 32 values span `steps` steps: max - min over 15 (int4), 2 max|w| over 254 (int8)."""
    w = _weight((64, 128))
    q = make_weight(w, form)
    g = w.reshape(64, 4, 32)
    span = g.amax(-1) - g.amin(-1) if form == "int4" else 2 * g.abs().amax(-1)
    step = (span / steps).repeat_interleave(32, 1)
    assert ((q.dequantize() - w).abs() <= step / 2 * 1.0001 + 1e-9).all()
    # the values the product multiplies by: scale and zero rounded to bfloat16 (2^-8 relative)
    assert (q.effective() - q.dequantize()).abs().max() <= 2**-8 * w.abs().max()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_4bit_blocks_are_read_exactly(kind):
    qtype = GGMLQuantizationType[kind]
    w = _weight((64, 128)).numpy()
    blocks = quantize(w, qtype)
    exact = dequantize(blocks, qtype).reshape(64, 128)
    weight = from_gguf_blocks(kind, blocks.reshape(64, -1), (64, 128), "int4")
    assert isinstance(weight, Int4Weight)
    assert torch.equal(weight.dequantize(), torch.from_numpy(exact))  # lookups: the file's values
    assert torch.equal(weight[torch.tensor([3, 7])], torch.from_numpy(exact[[3, 7]]))
    # products: scale d and zero m + 8d in bfloat16; the gap to the file's values is stated as
    # at most 2^-8 of each group's largest |d * q| plus |m + 8d|
    x = _rows(128)
    effective, scales = weight.effective(), weight.scales
    assert (effective - torch.from_numpy(exact)).abs().max() <= 2**-8 * 16 * scales.abs().max()
    out = weight.product(x, torch.float32)
    assert (out - _reference(x, effective)).abs().max() <= 2**-8 * out.abs().max() + 1e-5


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_gguf_16bit_tensors_are_read_exactly(kind):
    w = _weight((64, 96)).numpy()
    blocks = quantize(w, GGMLQuantizationType[kind]) if kind == "BF16" else w.astype(np.float16)
    exact = torch.from_numpy(dequantize(blocks, GGMLQuantizationType[kind]).reshape(64, 96))
    weight = from_gguf_blocks(kind, blocks.view(np.uint8).reshape(64, -1), (64, 96), kind.lower())
    assert isinstance(weight, F16Weight if kind == "F16" else Bf16Weight)
    assert torch.equal(weight.effective(), exact) and weight.values.data_ptr() != blocks.ctypes.data  # a copy


def test_gguf_q8_0_blocks_are_read_exactly():
    w = _weight((64, 128)).numpy()
    blocks = quantize(w, GGMLQuantizationType.Q8_0)
    exact = torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q8_0).reshape(64, 128))
    weight = from_gguf_blocks("Q8_0", blocks.reshape(64, -1), (64, 128), "int8")
    assert isinstance(weight, Int8Weight)
    assert torch.equal(weight.dequantize(), exact)
    # products: the two nibble products multiply by bf16(d) * q, each output rounded to bf16
    x = _rows(128)
    effective = weight.effective()
    assert (effective - exact).abs().max() <= 2**-8 * exact.abs().max()  # bf16: 8 significant bits
    out = weight.product(x, torch.float32)
    assert (out - _reference(x, effective)).abs().max() <= 2**-7 * out.abs().max() + 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_merged_weights_equal_the_parts(form):
    parts = [make_weight(_weight((n, 64), seed=n), form) for n in (64, 32, 32)]
    merged = concat_rows(parts)
    assert concat_rows(parts) is merged and concat_rows(parts[:2]) is not merged  # the same parts: the same weight
    x = _rows(64)
    out = merged.product(x, torch.float32)
    assert torch.equal(out, torch.cat([p.product(x, torch.float32) for p in parts], dim=1))


@pytest.mark.parametrize("form", FORMS)
def test_a_rows_result_does_not_depend_on_the_row_count(form):
    """Decode graphs are batch invariant: compact products run all rows at once (no pairs) because
    each row's result has the same bits whatever else is in the batch."""
    w = make_weight(_weight((192, 576)), form)
    x = _rows(576, n=40)
    alone = torch.cat([w.product(x[i:i + 1], torch.float32, invariant=True) for i in range(40)])
    for m in (2, 3, 8, 17, 40):
        assert torch.equal(w.product(x[:m], torch.float32, invariant=True), alone[:m])


@pytest.mark.parametrize("form, numbers", [("int4", "codes"), ("int8", "values"), ("bf16", "values")])
def test_packing_drops_the_forms_numbers_unless_rows_are_looked_up(form, numbers):
    if form == "bf16" and not bf16_products():
        pytest.skip("no bf16 products on this CPU")
    table, plain = (make_weight(_weight((64, 64)), form) for _ in range(2))
    table.lookups = True
    rows = table[torch.tensor([1, 2])]
    for w in (table, plain):
        w.product(_rows(64), torch.float32)
    assert torch.equal(table[torch.tensor([1, 2])], rows) and getattr(plain, numbers) is None


@pytest.mark.parametrize("form, fields", [("int4", ("codes", "scales", "mins")), ("int8", ("values", "scales"))])
def test_quantizing_in_row_chunks_gives_each_row_as_alone(form, fields):
    """Float weights are quantized 4,096 rows at a time (bounded temporaries): a weight spanning
    three chunks gets, row for row, the numbers its rows get when quantized on their own."""
    w = _weight((9000, 64))
    whole = make_weight(w, form)
    for rows in (slice(0, 10), slice(4090, 4100), slice(8990, 9000)):
        alone = make_weight(w[rows], form)
        assert all(torch.equal(getattr(whole, f)[rows], getattr(alone, f)) for f in fields)


def test_float16_refuses_weights_beyond_its_range():
    w = _weight((4, 32))
    w[1, 3] = 7e4
    with pytest.raises(ValueError, match="float16 holds magnitudes up to 65504.*bf16"):
        make_weight(w, "f16")


def test_float16_fallback_pairs_rows_only_where_asked(monkeypatch):
    """Without the compiled step, f16 products of a decode graph (invariant) run two rows at a
    time (each widening the weight); a prefill's run all rows in one product (pairs were ~10x
    slower there)."""
    w = make_weight(_weight((96, 64)), "f16")
    x = _rows(64, n=33)
    calls = []
    whole = w._widened
    monkeypatch.setattr(w, "_widened", lambda rows: calls.append(len(rows)) or whole(rows))
    paired = w.product(x, invariant=True)
    assert calls == [2] * 17
    calls.clear()
    assert torch.allclose(w.product(x), paired, rtol=1e-5, atol=1e-6) and calls == [33]
