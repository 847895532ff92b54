"""Constrained decoding on the real SmolLM2-135M-Instruct: 50 prompts x 5 schemas always give
text that parses and validates, greedy and sampled, streamed and not; a constrained request
gives the same text alone as in a batch."""

import json
import time

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import meganeura  # noqa: E402
from meganeura.generate import GenerationConfig, Prompt  # noqa: E402

NAME = {"type": "string", "pattern": "^[A-Za-z]{1,6}$"}
# Short answers (about 5 to 15 tokens), so that the 250 generations stay quick on a CPU.
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "p": {"type": "object", "properties": {"n": NAME, "k": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n", "k"], "additionalProperties": False}},
        "required": ["p"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1,
              "maxItems": 3},
    "enum": {"type": "object", "properties": {"c": {"enum": ["red", "green", "blue"]}, "s": {"enum": ["S", "M", "L"]}},
             "required": ["c", "s"], "additionalProperties": False},
    "bounded": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 18, "maximum": 65},
                                                "f": {"type": "integer", "minimum": -3, "maximum": 40}},
                "required": ["a", "f"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                 "t": NAME, "d": {"type": "boolean"}},
                 "required": ["id"], "additionalProperties": False},
}
TOPICS = ["a cat", "a city", "a car", "a book", "a song", "a tree", "a chef", "a river", "a robot", "a cake"]
# Raw prompts of a few tokens (no chat template: its ~20 tokens a prompt would be most of the
# test's work): the grammar, not the prompt, is what is tested.
TEXTS = [f"{verb} {topic} in JSON:" for verb in ("Describe", "Rate", "Count", "Invent", "Sort") for topic in TOPICS]
MESSAGES = [[{"role": "user", "content": t}] for t in TEXTS[:3]]  # chat requests: the pipeline API
LIMIT = 32  # tokens: every schema above completes well within it


def sampled(i: int) -> dict:
    return {"temperature": 0.9, "top_p": 0.95, "seed": i} if i % 2 else {}


@pytest.fixture(scope="module")
def pipe():
    return meganeura.load("smollm2-135m-instruct", device="cpu", progress=False)


def _check(schema, result):
    assert result.finish_reason == "stop", result
    jsonschema.validate(json.loads(result.text), schema)


def _run(pipe, texts, cfgs):
    """Answers of raw prompts decoded together: (sequences, each one's streamed text)."""
    batch = pipe.scheduler(width=len(texts))
    seqs = [batch.add(Prompt(np.array(pipe.tokenizer.encode(t, add_special_tokens=False).ids)), cfg)
            for t, cfg in zip(texts, cfgs)]
    pieces = {seq: "" for seq in seqs}
    while not batch.idle:
        for seq, piece in batch.step():
            pieces[seq] += piece
    return seqs, [pieces[seq] for seq in seqs]


@pytest.mark.parametrize("name", SCHEMAS)
def test_fifty_prompts_parse_and_validate(pipe, name):
    """50 prompts, every other one sampled (each with its own seed), as one batch: each answer's
    streamed pieces and its final text are the same JSON, valid for the schema. One answer,
    decoded alone, is the same text."""
    schema = SCHEMAS[name]
    grammar = pipe.constraint(json_schema=schema)
    cfgs = [GenerationConfig(max_new_tokens=LIMIT, constraint=grammar, **sampled(i)) for i in range(len(TEXTS))]
    t0 = time.perf_counter()
    seqs, streamed = _run(pipe, TEXTS, cfgs)
    for seq, text in zip(seqs, streamed):
        result = seq.result()
        assert result.finish_reason == "stop", result
        assert text == result.text
        jsonschema.validate(json.loads(result.text), schema)
    assert len({s.result().text for s in seqs[1::2]}) > 1  # the sampled half did sample
    alone = 7 if name in ("nested", "enum", "optional") else 8  # sampled for three schemas, greedy for two
    [single], _ = _run(pipe, [TEXTS[alone]], [cfgs[alone]])
    assert single.tokens == seqs[alone].tokens
    print(f"{name}: 50 answers ({sum(len(s.tokens) for s in seqs)} tokens) + 1 alone in "
          f"{time.perf_counter() - t0:.1f} s")


def test_pipeline_api_streamed_and_not(pipe):
    """pipe.generate and pipe.stream with json_schema= on a chat message: the same valid JSON."""
    messages = [{"role": "user", "content": "Describe a cat as JSON."}]
    result = pipe.generate(messages, json_schema=SCHEMAS["nested"], max_new_tokens=LIMIT)
    jsonschema.validate(json.loads(result.text), SCHEMAS["nested"])
    assert "".join(pipe.stream(messages, json_schema=SCHEMAS["nested"], max_new_tokens=LIMIT)) == result.text


def test_alone_equals_batched_beside_free_requests(pipe):
    """A constrained request's text does not depend on what shares its batch (here free ones)."""
    regex = r"(yes|no), [0-9]{1,3}"
    alone = pipe.generate(MESSAGES[1], regex=regex, max_new_tokens=12)
    rows = [MESSAGES[0], MESSAGES[1], MESSAGES[2]]
    batch = pipe.scheduler(width=3)
    free = [batch.add(pipe.prompt(pipe.encode(p)), cfg) for p, cfg in zip(
        rows, [GenerationConfig(max_new_tokens=12),
               GenerationConfig(max_new_tokens=12, constraint=pipe.constraint(regex=regex)),
               GenerationConfig(max_new_tokens=12, temperature=1.0, seed=2)])]
    while not batch.idle:
        batch.step()
    assert free[1].result().text == alone.text
    assert free[0].result().text == pipe.generate(MESSAGES[0], max_new_tokens=12).text


def test_choice_and_the_length_cut(pipe):
    r = pipe.generate(MESSAGES[0], choice=["positive", "negative", "neutral"], max_new_tokens=8)
    assert r.text in ("positive", "negative", "neutral") and r.finish_reason == "stop"
    cut = pipe.generate(MESSAGES[0], json_schema=SCHEMAS["nested"], max_new_tokens=4)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4  # the text is then a prefix that may not parse


def test_bad_schema_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="json_schema is not valid: Invalid type: nope"):
        pipe.generate(MESSAGES[0], json_schema={"type": "nope"})


def test_cli_constraints(tmp_path, capsys):
    from meganeura.cli import main as cli_main

    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(SCHEMAS["bounded"]))
    base = ["run", "--model", "smollm2-135m-instruct", "--device", "cpu", "--max-new-tokens", str(LIMIT)]
    assert cli_main(base + ["--json-schema", str(schema), "Describe a chef."]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS["bounded"])
    assert cli_main(base + ["--choice", "tea", "--choice", "coffee", "Tea or coffee?"]) == 0
    assert capsys.readouterr().out.strip() in ("tea", "coffee")
    schema.write_text('{"type": "nope"}')
    for flags, says in ((["--json-schema", str(schema)], f"error: {schema}: json_schema is not valid: Invalid type: nope"),
                        (["--json-schema", str(tmp_path / "missing.json")], "JSON schema file not found"),
                        (["--regex", "a(b"], "error: --regex: regex is not valid"),
                        (["--regex", "a", "--choice", "a"], "error: give one of --json-schema, --regex and --choice")):
        assert cli_main(base + flags + ["hi"]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


class _Overlapping:
    """The GPU's device sampler, run on CPU tensors: the scheduler overlaps with it."""

    def __init__(self, backend):
        from meganeura.backends.torch_sampling import DeviceSampler

        from meganeura.engine.sampler import Grammars

        class CountingGrammars(Grammars):
            settled = refused = 0  # greedy rows chosen without a mask, and of those, refused

            def settle_greedy(self, seq, logits, best=None):
                token, refused = super().settle_greedy(seq, logits, best)
                CountingGrammars.settled += 1
                CountingGrammars.refused += refused
                return token, refused

        class Counting(DeviceSampler):
            masked_later = 0

            def __init__(self, backend):
                super().__init__(backend)
                self.grammars = CountingGrammars()

            def choose_later(self, logits, rows, into, ring="decode"):
                Counting.masked_later += any(s is not None and s.cfg.constraint is not None for s in rows)
                return super().choose_later(logits, rows, into, ring)
        self.sampler, self.counting, self.grammars = Counting(backend), Counting, CountingGrammars


def test_overlapped_constrained_decode_equals_step_by_step(pipe):
    """On a GPU a constrained step's choice is sent after the previous step's tokens reach the
    host (the grammar needs them), while the next decode already runs; lanes that move as
    sequences finish move after that choice. Same answers as step by step, with free and
    constrained rows of different lengths finishing at different times. Greedy constrained
    rows speculate: the grammar refuses some of their unmasked choices, whose next step is
    dropped and sent again, and the answers stay those of the masked choice."""
    from meganeura.engine.scheduler import Scheduler
    cfgs = [GenerationConfig(max_new_tokens=LIMIT, constraint=pipe.constraint(json_schema=SCHEMAS["array"])),
            GenerationConfig(max_new_tokens=3),
            GenerationConfig(max_new_tokens=LIMIT, constraint=pipe.constraint(json_schema=SCHEMAS["enum"]),
                             temperature=0.9, seed=4),
            GenerationConfig(max_new_tokens=7, temperature=0.8, seed=1),
            GenerationConfig(max_new_tokens=LIMIT, constraint=pipe.constraint(regex=r"[a-z]{2,9}"))]
    answers = []
    for overlap in (False, True):
        made = _Overlapping(pipe.runner.backend)
        sched = Scheduler(pipe.runner, pipe.eos_ids, pipe._decode, 3, made.sampler, overlap=overlap)
        seqs = [sched.add(Prompt(np.array(pipe.tokenizer.encode(t, add_special_tokens=False).ids)), cfg)
                for t, cfg in zip(TEXTS[5:10], cfgs)]
        while not sched.idle:
            sched.step()
            assert sorted(sched.running) == list(range(len(sched.running)))
        answers.append([(s.tokens, s.finish_reason) for s in seqs])
        assert (made.counting.masked_later > 5) == overlap
        if overlap:
            assert 0 < made.grammars.refused < made.grammars.settled  # some speculation refused, some taken
    assert answers[0] == answers[1]
    assert [reason for _, reason in answers[1]] == ["stop", "length", "stop", "length", "stop"]
    jsonschema.validate(json.loads(pipe.tokenizer.decode(answers[1][0][0])), SCHEMAS["array"])  # the end token is not kept


def test_overlapped_constrained_random_mixes_equal_step_by_step(pipe):
    """Seeded random batches (widths, limits, greedy and sampled, free and constrained rows
    of every kind) give the same answers overlapped as step by step: refused speculations,
    lanes moving as rows finish, and choices that wait for a grammar, in any order."""
    import random

    from meganeura.engine.scheduler import Scheduler
    kinds = [dict(json_schema=SCHEMAS[name]) for name in SCHEMAS]
    kinds += [dict(regex=r"[a-z]{2,9}( [0-9]+)?"), dict(choice=["yes", "no", "maybe so"])]
    refused = 0
    for seed in range(3):
        rng = random.Random(seed)
        cfgs = []
        for i in range(rng.randint(3, 6)):
            extra = {"temperature": 0.8, "seed": i} if rng.random() < 0.3 else {}
            if rng.random() < 0.7:
                extra["constraint"] = pipe.constraint(**rng.choice(kinds))
            cfgs.append(GenerationConfig(max_new_tokens=rng.choice([1, 2, 5, LIMIT]), **extra))
        texts, width = rng.sample(TEXTS, len(cfgs)), rng.randint(2, 4)
        answers = []
        for overlap in (False, True):
            made = _Overlapping(pipe.runner.backend)
            sched = Scheduler(pipe.runner, pipe.eos_ids, pipe._decode, width, made.sampler, overlap=overlap)
            seqs = [sched.add(Prompt(np.array(pipe.tokenizer.encode(t, add_special_tokens=False).ids)), cfg)
                    for t, cfg in zip(texts, cfgs)]
            while not sched.idle:
                sched.step()
            answers.append([(s.tokens, s.finish_reason) for s in seqs])
            refused += made.grammars.refused
        assert answers[0] == answers[1], f"seed {seed}"
    assert refused > 0


def test_greedy_check_first_answers_equal_masked_answers(pipe, monkeypatch):
    """The host sampler checks a greedy row's best token before masking: 50 greedy answers per
    schema equal those of masks alone (forced bytes, like '":"' after a key, keep their
    canonical token: a shorter spelling the grammar would consume is refused)."""
    import meganeura.engine.sampler as sampler_module
    for name in ("enum", "nested"):
        cfgs = [GenerationConfig(max_new_tokens=LIMIT, constraint=pipe.constraint(json_schema=SCHEMAS[name]))] * 50
        checked = [s.tokens for s in _run(pipe, TEXTS, cfgs)[0]]
        with monkeypatch.context() as m:
            m.setattr(sampler_module, "greedy_constrained", lambda seq: False)
            masked = [s.tokens for s in _run(pipe, TEXTS, cfgs)[0]]
        assert checked == masked, name
