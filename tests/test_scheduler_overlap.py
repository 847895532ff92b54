"""Overlapped decoding (the next step is sent before the host sees this step's tokens) gives
exactly the answers of step-by-step decoding: same tokens, same finish reasons, with early
stops, length limits and more prompts than slots. On CPU the device side is simulated by a
backend that claims device sampling; tests/test_gpu.py runs the real thing."""

import numpy as np
import torch

from meganeura.backends.torch_backend import TorchBackend
from meganeura.generate import GenerationConfig, Prompt, drain, generate_stream
from meganeura.runtime import Runtime
from meganeura.session import CompileOptions
from tiny_models import llama_spec, state_dict, tiny_llama


class _Ready:
    def __init__(self, tokens):
        self.tokens = tokens

    def result(self):
        return self.tokens


class DeviceSampling(TorchBackend):
    """The torch CPU backend posing as one that picks greedy tokens on the device."""

    samples_on_device = True
    device_fed_steps = 0

    def choose_greedy_later(self, logits, into):
        into.copy_(logits.argmax(-1))
        return _Ready(into.numpy().copy())

    def write(self, dst, array, dtype):
        DeviceSampling.device_fed_steps += isinstance(array, torch.Tensor)
        super().write(dst, array, dtype)


def _runtime(model, overlap: bool) -> Runtime:
    rt = Runtime(llama_spec(model), CompileOptions(backend="torch"), num_slots=3)
    if overlap:
        rt.backend.__class__ = DeviceSampling
    rt.load_weights(state_dict(model))
    rt.reserve(3, 128)
    return rt


def _generate(rt, prompts, eos, limits):
    results = []
    for limit in limits:
        cfg = GenerationConfig(max_new_tokens=limit)
        results += drain(generate_stream(rt, [Prompt(p) for p in prompts], cfg, eos, lambda ids: ""))
    return [(r.token_ids, r.finish_reason) for r in results]


def test_overlapped_decode_equals_step_by_step():
    model = tiny_llama(seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 290, n) for n in (5, 9, 3, 12, 7)]  # 5 prompts over 3 slots
    plain = _runtime(model, overlap=False)
    free = _generate(plain, prompts, set(), [12])
    eos = {free[1][0][4], free[3][0][2]}  # two sequences stop early, the others run to the limit
    expected = _generate(plain, prompts, eos, [1, 2, 12])
    assert {reason for _, reason in expected} == {"stop", "length"}
    DeviceSampling.device_fed_steps = 0
    assert _generate(_runtime(model, overlap=True), prompts, eos, [1, 2, 12]) == expected
    assert DeviceSampling.device_fed_steps >= 5  # the overlapped path did run (host-fed only after a pause)
