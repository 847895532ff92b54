"""Constrained decoding: answers that must match a JSON schema, any JSON object, a regular
expression or one of a few strings, enforced token by token with llguidance (the optional
extra `meganeura[structured]`; docs/design.md says why this library).

- `constraint(...)` turns the user's request (OpenAI's `response_format`, or the `json_schema`,
  `regex`, `choice` shortcuts) into a checked `Constraint`, or raises ValueError naming the
  problem; it needs no tokenizer, so a server can refuse a bad schema before any model work.
- `Constraint.bind(grammar_tokenizer(...))` ties it to a model's vocabulary; `matcher()` then
  starts one sequence's grammar state (a `Matcher`), which the sampler keeps per sequence.
- A `Matcher` writes the tokens allowed next as a bitmask (32 tokens per int32 word), or
  checks one token against it more cheaply (`try_advance`); an end token is allowed only
  where the grammar accepts the text so far.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

INSTALL = "constrained decoding needs llguidance: pip install 'meganeura[structured]'"
# No free whitespace between JSON tokens: a small model may otherwise fill max_tokens with newlines.
JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError(INSTALL) from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """A checked grammar (llguidance's serialized form) and what it was made from."""

    kind: str                       # "json_schema", "json_object", "regex" or "choice"
    grammar: str = field(repr=False)
    tokenizer: object = field(default=None, compare=False, repr=False)  # an llguidance LLTokenizer

    def bind(self, tokenizer) -> Constraint:
        return replace(self, tokenizer=tokenizer)

    def matcher(self) -> Matcher:
        if self.tokenizer is None:
            raise ValueError("this constraint is not bound to a tokenizer (Constraint.bind)")
        return Matcher(_llguidance().LLMatcher(self.tokenizer, self.grammar, log_level=0),
                       frozenset(self.tokenizer.eos_tokens), token_bytes(self.tokenizer))


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, eos: frozenset[int], spellings: list[bytes]) -> None:
        self._m, self._eos, self._spellings = matcher, eos, spellings
        self._check()

    def fill_mask(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into row (int32 [words], C-contiguous): bit t % 32 of
        word t // 32 is set when token t may come next."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        self._check()

    def advance(self, token: int) -> None:
        self._m.consume_token(token)
        self._check()

    def try_advance(self, token: int) -> bool:
        """Move on by token if the mask would allow it (True); else stay (False). Costs tens of
        microseconds, less than a mask and its application: a greedy choice is checked first.
        Where the grammar forces bytes, its mask may leave out a token that spells a proper
        prefix of them (a non-canonical split) though llguidance would consume it: for such a
        token the mask decides. With that rule the check equalled the mask for every token in
        each of 2,027 states of random walks over 11 grammars (tests/test_grammar.py checks
        both kinds of token)."""
        if self._m.is_stopped():  # the grammar is complete: only an end token may follow (llguidance consumes none)
            return token in self._eos
        forced, spelled = bytes(self._m.compute_ff_bytes()), self._spellings[token]
        if len(spelled) < len(forced) and forced.startswith(spelled):
            mask = np.zeros(mask_words(len(self._spellings)), np.int32)
            self.fill_mask(mask)
            if not mask[token // 32] >> (token % 32) & 1:
                return False
            self.advance(token)
            return True
        taken = self._m.try_consume_tokens([token]) == 1
        self._check()
        return taken

    def _check(self) -> None:
        if self._m.is_error():  # only a bug or a grammar past llguidance's limits gets here
            raise RuntimeError(f"constrained decoding failed: {self._m.get_error()}")


_spellings: dict[int, tuple[object, list[bytes]]] = {}


def token_bytes(tokenizer) -> list[bytes]:
    """Each token's bytes, by id, for an llguidance tokenizer (made once per tokenizer: ~0.25 s)."""
    found = _spellings.get(id(tokenizer))
    if found is None or found[0] is not tokenizer:  # (kept beside its tokenizer, so an id is never reused)
        found = _spellings[id(tokenizer)] = (tokenizer, [tokenizer.decode_bytes([t])
                                                         for t in range(tokenizer.vocab_size)])
    return found[1]


def mask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def unpack(masks: np.ndarray, vocab: int) -> np.ndarray:
    """int32 bitmasks [rows, words] -> bool [rows, vocab]."""
    return np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)


def grammar_tokenizer(tokenizer, vocab_size: int, eos_ids):
    """An llguidance view of a `tokenizers.Tokenizer` (built once per model: ~0.2 s), whose
    end tokens are the model's."""
    return _llguidance().LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids))


def constraint(response_format=None, json_schema=None, regex=None, choice=None) -> Constraint | None:
    """The constraint a request asks for (None: free text). At most one of the four may be given.

    response_format: OpenAI's shape, {"type": "text"}, {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}};
    json_schema: a schema (a dict, or its JSON text); regex: the whole answer must match it;
    choice: the answer is one of these strings."""
    given = [name for name, v in (("response_format", response_format), ("json_schema", json_schema),
                                  ("regex", regex), ("choice", choice)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of response_format, json_schema, regex and choice, not {' and '.join(given)}")
    if response_format is not None:
        return _response_format(response_format)
    if json_schema is not None:
        return _schema(json_schema, "json_schema")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"regex must be a non-empty string, got {regex!r:.60}")
        return _checked("regex", _llguidance().LLMatcher.grammar_from_regex(regex), "regex")
    if choice is not None:
        if isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice \
                or not all(isinstance(c, str) and c for c in choice):
            raise ValueError(f"choice must be a list of non-empty strings, got {choice!r:.80}")
        lark = "start: " + " | ".join(json.dumps(c) for c in choice)
        return _checked("choice", _llguidance().LLMatcher.grammar_from_lark(lark), "choice")
    return None


def _response_format(fmt) -> Constraint | None:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise ValueError('response_format must be an object with a "type": "text", "json_object" or "json_schema"')
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _schema({"type": "object"}, "response_format", kind="json_object")
    if kind != "json_schema":
        raise ValueError(f'response_format.type must be "text", "json_object" or "json_schema", got {kind!r:.40}')
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise ValueError('response_format.json_schema must be an object with a "schema" (and a "name")')
    if not isinstance(spec.get("strict", False), bool):
        raise ValueError("response_format.json_schema.strict must be true or false")
    return _schema(spec["schema"], "response_format.json_schema.schema")


def _schema(schema, where: str, kind: str = "json_schema") -> Constraint:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON schema (an object), got {type(schema).__name__}")
    try:
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ValueError(f"{where} is not valid: {e}") from None
    return _checked(kind, grammar, where)


def _checked(kind: str, grammar: str, where: str) -> Constraint:
    problem = _llguidance().LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise ValueError(f"{where} is not valid: {' '.join(problem.split())}")  # one line: llguidance draws carets
    return Constraint(kind, grammar)
