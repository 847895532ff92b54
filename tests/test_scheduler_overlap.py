"""Overlapped decoding (the next step is sent before the host sees this step's tokens) gives
exactly the answers of step-by-step decoding: same tokens, same finish reasons, with early
stops, length limits, more prompts than lanes, and seeded sampling. On CPU the device sampler
runs on CPU tensors (injected into the scheduler); tests/test_gpu.py runs the real thing."""

import numpy as np

from meganeura.backends.torch_sampling import DeviceSampler
from meganeura.engine.runner import ModelRunner
from meganeura.engine.scheduler import Scheduler
from meganeura.generate import GenerationConfig, Prompt
from meganeura.session import CompileOptions
from tiny_models import llama_spec, state_dict, tiny_llama


class CountingSampler(DeviceSampler):
    """The device sampler on CPU tensors, counting the steps fed with device-side tokens."""

    device_fed_steps = 0
    host_choices = 0  # choices the host waited for

    def choose_later(self, logits, rows, into, ring="decode"):
        CountingSampler.device_fed_steps += 1
        return super().choose_later(logits, rows, into, ring)

    def choose(self, logits, sequences):
        CountingSampler.host_choices += 1
        return super().choose(logits, sequences)


def _runner(model) -> ModelRunner:
    rt = ModelRunner(llama_spec(model), CompileOptions(backend="torch"))
    rt.load_weights(state_dict(model))
    return rt


def _generate(rt, prompts, eos, limits, overlap=True, device=False, prefill_chunk=None, **sampling):
    results = []
    for limit in limits:
        sampler = CountingSampler(rt.backend) if device else None
        sched = Scheduler(rt, eos, lambda ids: "", width=3, sampler=sampler, overlap=overlap,
                          prefill_chunk=prefill_chunk)
        seqs = [sched.add(Prompt(p), GenerationConfig(max_new_tokens=limit, **sampling)) for p in prompts]
        while not sched.idle:
            moved = [seq for seq, _ in sched.step()]
            assert len(moved) == len(set(moved)), "one event per sequence and step"
        results += [(s.tokens, s.finish_reason) for s in seqs]
    assert rt.cache.free_slots == rt.max_slots and rt.cache.free_pages == rt.cache.layout.num_blocks - 1
    return results


model = tiny_llama(seed=3)
rng = np.random.default_rng(0)
PROMPTS = [rng.integers(3, 290, n) for n in (5, 9, 3, 12, 7)]  # 5 prompts over 3 slots


def test_overlapped_greedy_decode_equals_step_by_step():
    plain = _runner(model)
    free = _generate(plain, PROMPTS, set(), [12])
    eos = {free[1][0][4], free[3][0][2]}  # two sequences stop early, the others run to the limit
    expected = _generate(plain, PROMPTS, eos, [1, 2, 12])
    assert {reason for _, reason in expected} == {"stop", "length"}
    CountingSampler.device_fed_steps = 0
    assert _generate(plain, PROMPTS, eos, [1, 2, 12], device=True) == expected
    assert CountingSampler.device_fed_steps >= 5  # the overlapped path did run


def test_overlapped_seeded_sampling_equals_step_by_step():
    """Each sequence draws from its own generator once per step, overlapped or not."""
    rt = _runner(model)
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    eos = {int(t) for t in _generate(rt, PROMPTS, set(), [12], overlap=False, device=True, **sampling)[0][0][3:4]}
    expected = _generate(rt, PROMPTS, eos, [12], overlap=False, device=True, **sampling)
    CountingSampler.device_fed_steps = 0
    assert _generate(rt, PROMPTS, eos, [12], device=True, **sampling) == expected
    assert CountingSampler.device_fed_steps >= 5
    assert len({tuple(t) for t, _ in expected}) > 1  # sampled, not one repeated answer


def test_a_prompt_that_joins_running_decodes_gets_its_first_token_on_the_device():
    """The step of a prompt's last chunk, with decodes in flight, does not wait for the device:
    its first token is chosen there and read with the next decode step's tokens (the streams'
    inter-token latency while a long prompt is prefilled). Answers equal step-by-step, seeded
    too, with the joining prompt's limit 1 (no decode row of its own) and 12."""
    rt = _runner(model)
    for sampling in ({}, dict(temperature=0.9, top_k=40, seed=5)):
        for limit in (1, 12):
            answers = []
            for overlap in (False, True):
                sched = Scheduler(rt, set(), lambda ids: "", width=3, sampler=CountingSampler(rt.backend),
                                  overlap=overlap, prefill_chunk=4)
                streams = [sched.add(Prompt(p), GenerationConfig(max_new_tokens=16, **sampling)) for p in PROMPTS[:2]]
                for _ in range(3):
                    sched.step()
                CountingSampler.host_choices = 0
                joining = sched.add(Prompt(PROMPTS[3]), GenerationConfig(max_new_tokens=limit, **sampling))
                while not sched.idle:
                    sched.step()
                answers.append([s.tokens for s in (*streams, joining)])
                assert CountingSampler.host_choices == 0 or not overlap  # the host waited for no choice
            assert answers[0] == answers[1]


def test_a_joining_prompts_first_token_survives_every_lane_and_ending():
    """A prompt joins (its first token chosen on the device) after a lone sequence stopped (EOS)
    with its wasted decode step still in flight, in lane 0 with a one-row decode next (its
    token's landing buffer must not be the decode's), or beside others; it may have a limit of
    1 (no decode step follows: read at once), or be cancelled while its first token is on the
    device. Every answer equals step-by-step, greedy and seeded."""
    rt = _runner(model)
    stop = _generate(rt, PROMPTS[:1], set(), [6])[0][0][1]  # PROMPTS[0]'s second greedy token
    for sampling in ({}, dict(temperature=0.9, top_k=40, seed=5)):
        for width, first_limit, join, limit, eos, cancel in [
                (1, 6, 1, 5, {stop}, False), (1, 6, 3, 5, {stop}, False), (1, 2, 2, 3, set(), False),
                (2, 6, 1, 5, {stop}, False), (2, 2, 2, 1, set(), False), (2, 3, 2, 1, set(), False),
                (2, 6, 2, 5, set(), True), (3, 6, 3, 2, {stop}, True)]:
            answers = []
            for overlap in (False, True):
                sched = Scheduler(rt, eos, lambda ids: "", width=width, sampler=CountingSampler(rt.backend),
                                  overlap=overlap, prefill_chunk=4)
                first = sched.add(Prompt(PROMPTS[0]), GenerationConfig(max_new_tokens=first_limit, **sampling))
                for _ in range(join):
                    sched.step()
                joining = [sched.add(Prompt(p), GenerationConfig(max_new_tokens=limit, **sampling))
                           for p in PROMPTS[3:5]]
                sched.step()
                if cancel:
                    sched.cancel(joining[0])
                while not sched.idle:
                    sched.step()
                answers.append([(s.tokens, s.finish_reason) for s in (first, *joining)])
                assert rt.cache.free_slots == rt.max_slots
            where = (sampling, width, first_limit, join, limit, eos, cancel)
            if cancel:  # the cancelled one stops where it stood; the others are unchanged
                answers = [[a for i, a in enumerate(run) if i != 1] for run in answers]
            assert answers[0] == answers[1], where


def test_decode_steps_compute_the_running_sequences_only():
    """Lanes stay dense as sequences leave (the highest lane takes the freed one, with its next
    token on the device), so each step computes one row per running sequence: a lone user of
    a wide scheduler computes one row. Answers equal each prompt's solo answer."""
    rt = _runner(model)
    limits = [3, 9, 5, 12, 2]  # sequences leave from the middle lanes first
    solo = [_generate(rt, [p], set(), [n])[0][0] for p, n in zip(PROMPTS, limits)]
    rows_per_step = []
    decode = rt.decode

    def counting(tokens, positions, slots):
        rows_per_step.append(len(positions))
        return decode(tokens, positions, slots)

    rt.decode = counting
    for device in (False, True):
        rows_per_step.clear()
        sched = Scheduler(rt, set(), lambda ids: "", width=8, sampler=CountingSampler(rt.backend) if device else None)
        seqs = [sched.add(Prompt(p), GenerationConfig(max_new_tokens=n)) for p, n in zip(PROMPTS, limits)]
        while not sched.idle:
            sched.step()
            assert sorted(sched.running) == list(range(len(sched.running)))
            assert all(seq.lane == lane for lane, seq in sched.running.items())
        assert [s.tokens for s in seqs] == solo
        assert rows_per_step[0] == 5 and rows_per_step[-1] == 1 and sorted(rows_per_step, reverse=True) == rows_per_step
