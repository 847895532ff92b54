"""Device-side token choice against the host reference `engine.sampler.sample`."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from meganeura.backends.torch_backend import TorchBackend  # noqa: E402
from meganeura.backends.torch_sampling import DeviceSampler  # noqa: E402
from meganeura.engine.sampler import sample  # noqa: E402
from meganeura.generate import GenerationConfig, Prompt  # noqa: E402
from meganeura.session import CompileOptions  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


SAMPLER = DeviceSampler(TorchBackend(CompileOptions(backend="torch", device=DEVICE)))
choose = SAMPLER.choose


class Seq:
    def __init__(self, cfg, history=()):
        self.cfg, self.rng = cfg, np.random.default_rng(cfg.seed)
        self.prompt = Prompt(np.array(history[:2], dtype=np.int64))
        self.tokens = list(history[2:])


def test_greedy_and_penalty_match_the_host_reference():
    logits = np.random.default_rng(11).standard_normal((3, 500)).astype(np.float32)
    logits[2, 17] = 5.0  # top_k=1 samples among every token tied at the top: a bf16 tie would draw
    top = [int(np.argmax(row)) for row in logits]
    seqs = [Seq(GenerationConfig()), Seq(GenerationConfig(repetition_penalty=1.3), history=[top[1], 3, 9]),
            Seq(GenerationConfig(temperature=0.7, top_k=1))]
    got = choose(torch.from_numpy(logits).to(DEVICE, torch.bfloat16), seqs)
    rounded = torch.from_numpy(logits).to(torch.bfloat16).float().numpy()  # what the device sees
    expected = [sample(row, s.cfg, s.rng, list(s.prompt.token_ids) + s.tokens) for row, s in zip(rounded, seqs)]
    assert got == expected


def test_sampling_follows_temperature_top_k_and_top_p():
    """Frequencies over many draws: top-k and top-p cut the tail exactly; the kept tokens
    appear in proportion to their renormalized probabilities."""
    logits = torch.tensor([[3.0, 2.0, 1.5, 1.0, 0.0, -1.0]], device=DEVICE)
    cfg = GenerationConfig(temperature=0.8, top_k=4, top_p=0.9, seed=7)
    seq = Seq(cfg)
    draws = np.array([choose(logits, [seq])[0] for _ in range(3000)])
    p = np.exp(np.array([3.0, 2.0, 1.5, 1.0]) / 0.8)
    p /= p.sum()
    keep = np.flatnonzero(np.cumsum(p) - p < 0.9)  # the smallest set reaching 0.9
    q = np.zeros(6)
    q[keep] = p[keep] / p[keep].sum()
    freq = np.bincount(draws, minlength=6) / len(draws)
    assert set(np.flatnonzero(freq)) <= set(keep)
    assert np.abs(freq - q).max() < 0.04


def test_seeded_sampling_repeats():
    logits = torch.randn(1, 300, device=DEVICE)
    runs = [[choose(logits, [s])[0] for _ in range(20)] for s in (Seq(GenerationConfig(temperature=1.0, seed=3)),
                                                                   Seq(GenerationConfig(temperature=1.0, seed=3)))]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_top_k_keeps_every_token_tied_with_the_kth_and_top_p_one_cuts_nothing():
    logits = torch.tensor([[2.0, 2.0, 1.0, -30.0]], device=DEVICE)
    seq = Seq(GenerationConfig(temperature=1.0, top_k=1, seed=1))
    draws = {choose(logits, [seq])[0] for _ in range(200)}
    assert draws == {0, 1}  # the host sampler keeps both tied tokens too
    tail = Seq(GenerationConfig(temperature=1.0, top_p=1.0, seed=2))
    flat = torch.zeros(1, 50, device=DEVICE)  # float32 cumsum may reach 1 early: top_p=1 must not cut
    assert len({choose(flat, [tail])[0] for _ in range(400)}) > 40


def test_logprobs_match_the_host_sampler():
    """The device records the same log-probabilities (of the raw logits) and top tokens as the host."""
    from meganeura.backends.numpy_backend import NumpyBackend
    from meganeura.engine.sampler import HostSampler

    logits = np.random.default_rng(4).standard_normal((3, 400)).astype(np.float32)
    cfgs = [GenerationConfig(logprobs=3), GenerationConfig(), GenerationConfig(logprobs=0, temperature=0.5, seed=1)]
    host = HostSampler(NumpyBackend(CompileOptions(backend="numpy")))
    device = DeviceSampler(TorchBackend(CompileOptions(backend="torch", device="cpu")))
    seqs = {s: [Seq(c) for c in cfgs] for s in (host, device)}
    host.choose(logits, seqs[host])
    device.choose(torch.from_numpy(logits), seqs[device])
    for a, b in zip(seqs[host], seqs[device]):
        ha, db = host.logprobs.of(a), device.logprobs.of(b)
        assert len(ha) == len(db) == (a.cfg.logprobs is not None)
        for x, y in zip(ha, db):
            assert [i for i, _ in x.top] == [i for i, _ in y.top] and len(x.top) == a.cfg.logprobs
            if x.token == y.token:  # the sampled row may draw another token (another random stream)
                assert abs(x.logprob - y.logprob) < 1e-5
            assert np.allclose([v for _, v in x.top], [v for _, v in y.top], atol=1e-5)
    row = logits[0].astype(np.float64)
    expected = row - row.max() - np.log(np.exp(row - row.max()).sum())
    assert abs(host.logprobs.of(seqs[host][0])[0].logprob - expected.max()) < 1e-9  # greedy: the top token's
