"""The compiled CPU decode step (backends/cpu_fused.py) against the layered torch path it
replaces and a float32 model of the same weights: a tiny Llama in int4 (tied head), int8, bf16
and f16, three sequences over paged caches; each row's logits do not depend on the batch;
prefills multiply by the step's weights in place (no packed copy); the real SmolLM2 Q4_1 file
gives the same greedy answers with the step on and off."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import meganeura
from meganeura.backends import cpu_fused
from meganeura.backends.cpu_weights import CompactWeight, make_weight
from meganeura.engine.runner import ModelRunner
from meganeura.session import CompileOptions
from tiny_models import llama_spec, rel_err, state_dict, tiny_llama

pytestmark = pytest.mark.skipif(cpu_fused.library() is None, reason="no C compiler here: the layered path runs")


def test_without_a_compiler_the_layered_step_runs_and_a_built_step_loads_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    cpu_fused.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert cpu_fused.library() is None
        rt = _runner(tiny_llama(), "int4")
        assert rt._fused_step() is None
        slot = rt.cache.take(4)
        rt.prefill([1, 2, 3], slot)
        assert np.isfinite(rt.to_host(rt.decode([4], [3], [slot]))).all()
    finally:
        monkeypatch.undo()
        cpu_fused.library.cache_clear()
    assert cpu_fused.library() is not None  # the machine's build, made before this test
    cpu_fused.library.cache_clear()
    start = time.perf_counter()
    assert cpu_fused.library() is not None
    assert time.perf_counter() - start < 0.5  # a start-up only loads it


def test_damaged_builds_and_odd_settings_rebuild_or_fall_back(tmp_path, monkeypatch):
    """A truncated library in the cache is built again (loading it would crash the process); a
    CC with arguments works; a compiler's non-UTF-8 complaint and a missing home folder give
    the layered path with a warning, not an error."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        built = cpu_fused._built()  # built, not loaded: this process must never have mapped it
        size = built.stat().st_size
        built.write_bytes(built.read_bytes()[:4096])
        cpu_fused.library.cache_clear()
        assert cpu_fused.library() is not None and built.stat().st_size == size

        monkeypatch.setenv("CC", "cc -std=gnu11")
        cpu_fused.library.cache_clear()
        assert cpu_fused.library() is not None

        complaint = tmp_path / "cc.sh"
        complaint.write_bytes(b"#!/bin/sh\nprintf 'erreur: \\351chec\\n' >&2\nexit 1\n")  # Latin-1 bytes
        complaint.chmod(0o755)
        monkeypatch.setenv("CC", str(complaint))
        cpu_fused.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert cpu_fused.library() is None

        monkeypatch.setenv("CC", "cc")
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
        cpu_fused.library.cache_clear()
        with pytest.warns(RuntimeWarning, match="no home"):
            assert cpu_fused.library() is None
    finally:
        monkeypatch.undo()
        cpu_fused.library.cache_clear()


def test_default_dtype_and_strided_indices_leave_the_logits_alone():
    """C writes float32 and reads packed int64 whatever the caller's defaults and views."""
    rt = _runner(tiny_llama(), "int4")
    step = rt._fused_step()
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 300, n) for n in (5, 20)]
    slots = [rt.cache.take(len(p) + 1) for p in prompts]
    for p, s in zip(prompts, slots):
        rt.prefill(p[:-1], s)
    tokens, positions = [int(p[-1]) for p in prompts], np.array([len(p) - 1 for p in prompts])
    expected = step(tokens, positions, slots).clone()
    for dtype in (torch.bfloat16, torch.float64):
        torch.set_default_dtype(dtype)
        try:
            assert np.array_equal(step(tokens, positions, slots).numpy(), expected.numpy())
        finally:
            torch.set_default_dtype(torch.float32)
    junk = np.full(2, 10**8)
    strided = np.stack([positions, junk], 1)[:, 0], np.stack([np.array(slots), junk], 1)[:, 0]
    assert np.array_equal(step(tokens, *strided).numpy(), expected.numpy())
    assert np.array_equal(step(tokens[::-1], positions[::-1], slots[::-1]).numpy(), expected.numpy()[::-1])


def _runner(model, quantize: str) -> ModelRunner:
    rt = ModelRunner(llama_spec(model), CompileOptions(backend="torch", quantize=quantize))
    tied = model.config.tie_word_embeddings  # the table is the head (and an int8 weight kept for lookups)
    rt.load_weights({n: w for n, w in state_dict(model).items() if not (tied and n == "lm_head.weight")})
    return rt


def _decode(rt, prompts, steps: int) -> list[np.ndarray]:
    """Prefill each prompt but its last `steps` tokens in its own slot, then decode those
    (every runner the same tokens: a tiny random model's near-ties would fork greedy answers),
    all rows in each step: each step's logits [rows, vocab]."""
    slots = [rt.cache.take(len(p)) for p in prompts]
    for p, s in zip(prompts, slots):
        rt.prefill(p[:-steps], s)
    return [rt.to_host(rt.decode([int(p[i - steps]) for p in prompts], [len(p) + i - steps for p in prompts], slots))
            for i in range(steps)]


@pytest.mark.parametrize("quantize,tie", [("int4", True), ("int8", False), ("bf16", False), ("f16", True)])
def test_fused_step_matches_layered_step_and_float_model(quantize, tie, monkeypatch):
    model = tiny_llama(tie=tie)
    fused = _runner(model, quantize)
    assert fused._fused_step() is not None
    monkeypatch.setenv("MEGANEURA_CPU_FUSED", "0")
    layered = _runner(model, quantize)
    assert layered._fused_step() is None
    reference = _runner(model, "none")
    for name in fused.store.forms:  # the float model multiplies by the very values the forms hold
        w = layered.store._upload(name, layered.store.sources[name]())
        reference.store.set_parameter(name, w.effective().numpy())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 300, n) for n in (11, 23, 46)]  # 1, 2 and 3 pages of 16 tokens
    ours, theirs, ref = (_decode(rt, prompts, 6) for rt in (fused, layered, reference))
    for a, b, r in zip(ours, theirs, ref):
        if quantize == "f16":  # float32 inputs times exact weights, in prefills and steps alike
            assert rel_err(a, r) < 1e-5 and rel_err(b, r) < 1e-5
            continue
        # both round product inputs to bf16 (ours then holds them as 16-bit integers per group)
        # and 4-bit outputs to bf16; int8's layered product rounds two halves to bf16 apiece;
        # bf16: the prefills' products round their inputs to bf16, the steps' do not
        assert rel_err(a, r) < 1e-2 and rel_err(a, b) < 1e-2
        assert rel_err(a, r) < 2 * rel_err(b, r) + 1e-3


@pytest.mark.parametrize("quantize", ["int4", "int8", "bf16", "f16"])
def test_prefills_multiply_by_the_steps_weights_in_place(quantize):
    """The step reads the forms' own numbers; prefills' products go through the same weights
    (merged q|k|v and gate|up included), so torch never packs a second copy of them."""
    rt = _runner(tiny_llama(), quantize)
    step = rt._fused_step()
    slot = rt.cache.take(40)
    for reload in (False, True):  # a parameter set again: a new step, the graphs' merges made again
        if reload:
            norm = "model.norm.weight"
            rt.store.set_parameter(norm, rt.store.sources[norm]())
            assert rt._fused_step() is not step
        rt.prefill(np.arange(1, 30), slot)
        merged = [c for c in rt.store.constants.values() if isinstance(c, CompactWeight)]
        weights = merged + [w for w in rt.store.parameters.values() if isinstance(w, CompactWeight)]
        assert len(merged) == 2 * 2  # q|k|v, gate|up in each of 2 layers
        for w in weights:
            assert w.shared_product is not None and getattr(w, "_packed", None) is None
            assert getattr(w, "codes", getattr(w, "values", None)) is not None


@pytest.mark.parametrize("form", ["int4", "int8", "bf16", "f16"])
def test_prefill_products_match_float_products_at_every_row_count(form):
    """`mg_product` (prefills' products; the integer forms' turned path) against float64
    products of the values the form multiplies by; each row's bits the same whatever rows
    share the call (the same prompt prefilled whole, in chunks, or after a cached prefix)."""
    rng = np.random.default_rng(3)
    w = make_weight(torch.from_numpy(rng.standard_normal((200, 160)).astype(np.float32) * 0.05), form)
    keep = []
    product = cpu_fused._Product(cpu_fused.library(), cpu_fused._matrix(w, keep), keep)
    x = torch.from_numpy(rng.standard_normal((40, 160)).astype(np.float32))
    # integer forms round their inputs to bf16 (then exact), 4-bit outputs to bf16 too
    inputs = x.bfloat16().double() if form in ("int4", "int8") else x.double()
    ref = (inputs @ w.effective().double().T).float()
    bound = 2**-8 if form == "int4" else 1e-5
    whole = product(x)
    assert (whole - ref).abs().max() <= bound * ref.abs().max()
    for start, stop in ((0, 1), (3, 8), (8, 24), (24, 40), (5, 38)):  # a prompt's chunks, a cached prefix's rest
        assert torch.equal(product(x[start:stop]), whole[start:stop])


def test_each_rows_logits_do_not_depend_on_the_batch():
    rt = _runner(tiny_llama(), "int4")
    step = rt._fused_step()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 300, n) for n in (3, 16, 33, 50, 7)]  # 5 rows: the products take 4 at a time
    slots = [rt.cache.take(len(p) + 1) for p in prompts]
    for p, s in zip(prompts, slots):
        rt.prefill(p[:-1], s)
    tokens, positions = [int(p[-1]) for p in prompts], [len(p) - 1 for p in prompts]
    together = step(tokens, positions, slots).clone()  # (rerunning a row rewrites the same cache entry)
    for i in range(len(prompts)):
        alone = step(tokens[i:i + 1], positions[i:i + 1], slots[i:i + 1])
        assert np.array_equal(alone[0].numpy(), together[i].numpy())


def _greedy(rt, ids, new: int) -> list[int]:
    slot = rt.cache.take(len(ids) + new)
    try:
        out = [int(rt.to_host(rt.prefill(ids, slot))[-1].argmax())]
        for i in range(new - 1):
            out.append(int(rt.to_host(rt.decode(out[-1:], [len(ids) + i], [slot]))[0].argmax()))
        return out
    finally:
        rt.cache.release(slot)


def test_real_smollm2_greedy_answers_equal_the_layered_path(monkeypatch):
    """The demo question and bench/bench_cpu.py's prompt (docs/design.md's first 128 tokens)."""
    pipe = meganeura.load("smollm2-135m-instruct", device="cpu", progress=False)
    rt = pipe.runner
    assert rt._fused_step() is not None
    doc = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    prompts = [pipe.tokenizer.encode(doc, add_special_tokens=False).ids[:128],
               pipe.prompt(pipe.encode([{"role": "user", "content": "What is the capital of France?"}])).token_ids]
    fused = [_greedy(rt, ids, 64) for ids in prompts]
    monkeypatch.setenv("MEGANEURA_CPU_FUSED", "0")
    assert rt._make_fused_step() is None
    rt._fused = (rt.store.version, None)
    assert [_greedy(rt, ids, 64) for ids in prompts] == fused
