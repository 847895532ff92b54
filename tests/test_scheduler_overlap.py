"""Overlapped decoding (the next step is sent before the host sees this step's tokens) gives
exactly the answers of step-by-step decoding: same tokens, same finish reasons, with early
stops, length limits, more prompts than slots, and seeded sampling. On CPU the device side
is simulated by a backend that claims device sampling (running the same device-side picker);
tests/test_gpu.py runs the real thing."""

import numpy as np
import torch

from meganeura.backends.torch_backend import TorchBackend
from meganeura.backends.torch_sampling import pick, settings
from meganeura.generate import GenerationConfig, Prompt, Scheduler
from meganeura.runtime import Runtime
from meganeura.session import CompileOptions
from tiny_models import llama_spec, state_dict, tiny_llama


class _Ready:
    def __init__(self, tokens):
        self.tokens = tokens

    def result(self):
        return self.tokens


class DeviceSampling(TorchBackend):
    """The torch CPU backend posing as one that picks tokens on the device."""

    samples_on_device = True
    device_fed_steps = 0

    def choose_later(self, logits, rows, into):
        into.copy_(pick(logits.float(), torch.from_numpy(settings(rows, logits.shape[1])), rows))
        return _Ready(into.numpy().copy())

    def write(self, dst, array, dtype):
        DeviceSampling.device_fed_steps += isinstance(array, torch.Tensor)
        super().write(dst, array, dtype)


def _runtime(model, device_sampling: bool) -> Runtime:
    rt = Runtime(llama_spec(model), CompileOptions(backend="torch"), num_slots=3)
    if device_sampling:
        rt.backend.__class__ = DeviceSampling
    rt.load_weights(state_dict(model))
    rt.reserve(3, 128)
    return rt


def _generate(rt, prompts, eos, limits, overlap=True, **sampling):
    results = []
    for limit in limits:
        sched = Scheduler(rt, eos, lambda ids: "", overlap=overlap)
        seqs = [sched.add(Prompt(p), GenerationConfig(max_new_tokens=limit, **sampling)) for p in prompts]
        while not sched.idle:
            moved = [seq for seq, _ in sched.step()]
            assert len(moved) == len(set(moved)), "one event per sequence and step"
        results += [(s.tokens, s.finish_reason) for s in seqs]
    return results


model = tiny_llama(seed=3)
rng = np.random.default_rng(0)
PROMPTS = [rng.integers(3, 290, n) for n in (5, 9, 3, 12, 7)]  # 5 prompts over 3 slots


def test_overlapped_greedy_decode_equals_step_by_step():
    plain = _runtime(model, device_sampling=False)
    free = _generate(plain, PROMPTS, set(), [12])
    eos = {free[1][0][4], free[3][0][2]}  # two sequences stop early, the others run to the limit
    expected = _generate(plain, PROMPTS, eos, [1, 2, 12])
    assert {reason for _, reason in expected} == {"stop", "length"}
    DeviceSampling.device_fed_steps = 0
    assert _generate(_runtime(model, device_sampling=True), PROMPTS, eos, [1, 2, 12]) == expected
    assert DeviceSampling.device_fed_steps >= 5  # the overlapped path did run (host-fed only after a pause)


def test_overlapped_seeded_sampling_equals_step_by_step():
    """Each sequence draws from its own generator once per step, overlapped or not."""
    rt = _runtime(model, device_sampling=True)
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    eos = {int(t) for t in _generate(rt, PROMPTS, set(), [12], overlap=False, **sampling)[0][0][3:4]}
    expected = _generate(rt, PROMPTS, eos, [12], overlap=False, **sampling)
    DeviceSampling.device_fed_steps = 0
    assert _generate(rt, PROMPTS, eos, [12], **sampling) == expected
    assert DeviceSampling.device_fed_steps >= 5
    assert len({tuple(t) for t, _ in expected}) == len(PROMPTS)  # sampled, not one repeated answer
