"""Constraints (engine/grammar.py): request shapes and their errors, and masks applied by the
host and device samplers (the device one on the CPU here), on SmolLM2's real vocabulary."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")
torch = pytest.importorskip("torch")

from meganeura.backends.numpy_backend import NumpyBackend  # noqa: E402
from meganeura.backends.torch_backend import TorchBackend  # noqa: E402
from meganeura.backends.torch_sampling import DeviceSampler  # noqa: E402
from meganeura.engine.grammar import constraint, grammar_tokenizer  # noqa: E402
from meganeura.engine.sampler import HostSampler  # noqa: E402
from meganeura.generate import GenerationConfig, Prompt  # noqa: E402
from meganeura.session import CompileOptions  # noqa: E402
from meganeura.weights import load_checkpoint  # noqa: E402

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def vocab():
    ckpt = load_checkpoint("smollm2-135m-instruct", progress=False)
    tok = ckpt.tokenizer
    eos = tok.token_to_id(EOS)
    return tok, eos, int(ckpt.config["vocab_size"]), grammar_tokenizer(tok, int(ckpt.config["vocab_size"]), {eos})


class Seq:
    def __init__(self, cfg):
        self.cfg, self.prompt, self.tokens = cfg, Prompt(np.array([1], dtype=np.int64)), []


@pytest.mark.parametrize("kwargs, kind", [
    ({"response_format": {"type": "json_object"}}, "json_object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"},
                                                                 "strict": True}}}, "json_schema"),
    ({"json_schema": '{"type": "array"}'}, "json_schema"),
    ({"regex": "[a-z]+"}, "regex"),
    ({"choice": ["yes", "no"]}, "choice"),
])
def test_request_shapes(kwargs, kind):
    assert constraint(**kwargs).kind == kind


def test_ignore_eos_cannot_go_with_a_constraint():
    with pytest.raises(ValueError, match="ignore_eos cannot go with a constraint"):
        GenerationConfig(ignore_eos=True, constraint=constraint(regex="a+"))


def test_text_format_and_nothing_are_free():
    assert constraint(response_format={"type": "text"}) is None and constraint() is None


@pytest.mark.parametrize("kwargs, words", [
    ({"json_schema": {"type": "foo"}}, "json_schema is not valid: Invalid type: foo"),
    ({"json_schema": {"$ref": "#/nope"}}, "'/nope' does not exist"),
    ({"json_schema": "{not json"}, "json_schema: not valid JSON"),
    ({"json_schema": [1]}, "must be a JSON schema (an object), got list"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "Unsatisfiable schema: minimum (5)"),
    ({"json_schema": False}, "must be a JSON schema (an object), got bool"),
    ({"regex": "a(b"}, "regex is not valid"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"choice": []}, "choice must be a list of non-empty strings"),
    ({"choice": "yes"}, "choice must be a list of non-empty strings"),
    ({"response_format": {"type": "xml"}}, 'response_format.type must be "text", "json_object" or "json_schema"'),
    ({"response_format": {"type": "json_schema"}}, 'response_format.json_schema must be an object with a "schema"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema is not valid: Invalid type: bogus"),
    ({"response_format": "json"}, "response_format must be an object"),
    ({"regex": "a", "choice": ["a"]}, "give one of response_format, json_schema, regex and choice, not regex and choice"),
])
def test_bad_constraints_name_the_problem(kwargs, words):
    with pytest.raises(ValueError) as e:
        constraint(**kwargs)
    assert words in str(e.value)


def _walk(sampler, logits_of, seqs, steps, eos):
    """Choose tokens step by step (stopping a row at its end token); returns each row's tokens."""
    out = [[] for _ in seqs]
    for _ in range(steps):
        live = [i for i, o in enumerate(out) if not o or o[-1] != eos]
        if not live:
            break
        tokens = sampler.choose(logits_of(len(live)), [seqs[i] for i in live])
        for i, t in zip(live, tokens):
            out[i].append(t)
    return out


@pytest.mark.parametrize("make", [lambda: HostSampler(NumpyBackend(CompileOptions(backend="numpy"))),
                                  lambda: DeviceSampler(TorchBackend(CompileOptions(backend="torch", device="cpu")))],
                         ids=["host", "device"])
def test_masks_hold_on_random_logits_in_a_mixed_batch(vocab, make):
    """Random logits: only the grammar keeps the constrained rows on track; the free rows
    in the same batch are untouched (their tokens are the unmasked choice)."""
    tok, eos, n, lltok = vocab
    sampler = make()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}},
              "required": ["ok", "n"], "additionalProperties": False}
    c = constraint(json_schema=schema).bind(lltok)
    seqs = [Seq(GenerationConfig()), Seq(GenerationConfig(constraint=c)),
            Seq(GenerationConfig(constraint=c, temperature=1.0, seed=5)), Seq(GenerationConfig(temperature=1.0, seed=5))]
    rng = np.random.default_rng(0)
    seen = []

    def logits_of(rows):
        x = rng.standard_normal((rows, n)).astype(np.float32) * 3
        seen.append(x)
        return x if isinstance(sampler, HostSampler) else torch.from_numpy(x)
    out = _walk(sampler, logits_of, seqs, 40, eos)
    for tokens in (out[1], out[2]):
        assert tokens[-1] == eos
        assert json.loads(tok.decode(tokens[:-1])) in [{"ok": b, "n": v} for b in (True, False) for v in (1, 22, 333)]
    assert out[0] == [int(np.argmax(x[0])) for x in seen]  # the free greedy row (first of every step): plain argmax


def test_device_and_host_masks_agree_greedily(vocab):
    tok, eos, n, lltok = vocab
    c = constraint(regex=r"[0-9]{2,4}(-[a-z]{1,3})?").bind(lltok)
    logits = np.random.default_rng(1).standard_normal((30, n)).astype(np.float32)
    walks = []
    for sampler in (HostSampler(NumpyBackend(CompileOptions(backend="numpy"))), DeviceSampler(TorchBackend(CompileOptions(backend="torch", device="cpu")))):
        rows = iter(logits)
        on_device = isinstance(sampler, DeviceSampler)

        def logits_of(_, rows=rows, on_device=on_device):
            row = next(rows)[None].copy()
            return torch.from_numpy(row) if on_device else row
        [tokens] = _walk(sampler, logits_of, [Seq(GenerationConfig(constraint=c))], 30, eos)
        walks.append(tokens)
        assert tokens[-1] == eos
    assert walks[0] == walks[1]
    text = tok.decode(walks[0][:-1])
    assert re.fullmatch(r"[0-9]{2,4}(-[a-z]{1,3})?", text)


def test_choice_is_one_of_the_strings(vocab):
    tok, eos, n, lltok = vocab
    c = constraint(choice=["alpha", "beta gamma"]).bind(lltok)
    sampler = HostSampler(NumpyBackend(CompileOptions(backend="numpy")))
    for seed in range(5):
        rng = np.random.default_rng(seed)
        [tokens] = _walk(sampler, lambda r: rng.standard_normal((r, n)).astype(np.float32),
                         [Seq(GenerationConfig(constraint=c, temperature=1.0, seed=seed))], 20, eos)
        assert tokens[-1] == eos and tok.decode(tokens[:-1]) in ("alpha", "beta gamma")


def test_greedy_check_first_equals_the_masked_choice(vocab):
    """The host sampler checks a greedy row's best token before masking (settle_greedy): on
    logits whose best token is allowed every other step, each choice equals the masked
    argmax of an independent matcher, refusals and acceptances both happen, and the row ends
    with the end token once the grammar is complete (llguidance's matcher is then stopped)."""
    from meganeura.engine.grammar import mask_words, unpack
    tok, eos, n, lltok = vocab
    c = constraint(regex=r"[a-z]{1,6}(, [0-9]{1,2}){0,3}").bind(lltok)
    sampler, seq, witness = HostSampler(NumpyBackend(CompileOptions(backend="numpy"))), \
        Seq(GenerationConfig(constraint=c)), c.matcher()
    rng = np.random.default_rng(3)
    refused = taken = 0
    answer = []
    for step in range(40):
        mask = np.zeros((1, mask_words(n)), np.int32)
        witness.fill_mask(mask[0])
        allowed = np.flatnonzero(unpack(mask, n)[0])
        x = rng.standard_normal((1, n)).astype(np.float32)
        if step % 2:  # lift an allowed token (the end token only if nothing else is) to the top
            x[0, rng.choice(allowed[allowed != eos] if len(allowed) > 1 else allowed)] = x.max() + 1
        expected = int(allowed[np.argmax(x[0, allowed])])
        taken += int(np.argmax(x[0])) == expected
        refused += int(np.argmax(x[0])) != expected
        [token] = sampler.choose(x, [seq])
        assert token == expected
        if token == eos:
            break
        witness.advance(token)
        answer.append(token)
    assert token == eos and refused and taken
    assert re.fullmatch(r"[a-z]{1,6}(, [0-9]{1,2}){0,3}", tok.decode(answer))


def test_check_first_keeps_forced_bytes_canonical(vocab):
    """Where the grammar forces bytes (after '{"c' of a schema with one key: '":"'), its mask
    allows only their canonical token, though a shorter token spelling a prefix of them would
    be consumed: a best token of that kind is refused, and the choice is the masked one."""
    from meganeura.engine.grammar import mask_words, unpack
    tok, eos, n, lltok = vocab
    c = constraint(json_schema={"type": "object", "properties": {"c": {"enum": ["red", "green"]}},
                                "required": ["c"], "additionalProperties": False}).bind(lltok)
    sampler, seq, witness = HostSampler(NumpyBackend(CompileOptions(backend="numpy"))), \
        Seq(GenerationConfig(constraint=c)), c.matcher()
    for t in tok.encode('{"c', add_special_tokens=False).ids:
        x = np.zeros((1, n), np.float32)
        x[0, t] = 1
        assert sampler.choose(x, [seq]) == [t]
        witness.advance(t)
    mask = np.zeros((1, mask_words(n)), np.int32)
    witness.fill_mask(mask[0])
    allowed = np.flatnonzero(unpack(mask, n)[0])
    spelled = [t for t in range(n) if t not in set(allowed) and witness._m.validate_tokens([t]) == 1]
    assert spelled, "the grammar should accept a non-canonical spelling of its forced bytes here"
    x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    x[0, spelled[0]] = 10.0
    assert sampler.choose(x, [seq]) == [int(allowed[np.argmax(x[0, allowed])])]


def test_try_advance_agrees_with_the_mask(vocab):
    """Matcher.try_advance (the check a greedy row makes instead of a mask) says yes exactly
    for the tokens the mask allows, along random walks through JSON, regex and choice
    grammars: for allowed tokens, random ones, and spellings of a prefix of forced bytes."""
    from meganeura.engine.grammar import Matcher, mask_words, token_bytes, unpack
    tok, eos, n, lltok = vocab
    spellings = token_bytes(lltok)
    rng = np.random.default_rng(7)
    for c in (constraint(json_schema={"type": "object", "properties": {"name": {"type": "string"},
                                                                       "n": {"type": "array", "items": {"type": "integer"}}},
                                      "required": ["name", "n"]}),
              constraint(regex=r"[a-z]{2,5}(, [0-9]{1,2})*"), constraint(choice=["yes", "yesterday", "no"])):
        matcher = c.bind(lltok).matcher()
        for _ in range(12):
            mask = np.zeros((1, mask_words(n)), np.int32)
            matcher.fill_mask(mask[0])
            allowed = unpack(mask, n)[0]
            if matcher._m.is_stopped():
                break
            forced = bytes(matcher._m.compute_ff_bytes())
            prefixes = [t for t in range(n) if len(spellings[t]) < len(forced) and forced.startswith(spellings[t])]
            for t in {*np.flatnonzero(allowed)[:40].tolist(), *rng.integers(0, n, 150).tolist(), *prefixes}:
                probe = Matcher(matcher._m.deep_copy(), frozenset({eos}), spellings)
                assert probe.try_advance(int(t)) == bool(allowed[t]), (c.kind, forced, spellings[t])
            matcher.advance(int(rng.choice(np.flatnonzero(allowed))))
