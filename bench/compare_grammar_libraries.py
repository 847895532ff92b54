"""xgrammar vs llguidance on SmolLM2's tokenizer: tokenizer setup, compile time per schema,
mask time per token, and whether a walk through random allowed tokens that ends (the end
token allowed and drawn within MAX_STEPS) gives text that parses and validates (the numbers
behind the choice of llguidance, docs/design.md).

    pip install llguidance xgrammar jsonschema   # xgrammar for this comparison only
    .venv/bin/python bench/compare_grammar_libraries.py

The walk picks, at each step, a random allowed token (a fixed seed, the same walk for both
libraries is not possible: their masks may differ), so it exercises many grammar states."""

from __future__ import annotations

import json
import statistics
import time

import jsonschema
import numpy as np

from meganeura.weights import load_checkpoint

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "integer"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
             "required": ["color"], "additionalProperties": False},
    "bounded": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                "score": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["age", "score"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 8}},
                 "required": ["a"], "additionalProperties": False},
}
WALKS, MAX_STEPS = 20, 60


def allowed(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walks(schema: dict, start, tok, eos: int, vocab: int, stats: dict) -> None:
    """WALKS random walks through the tokens a library allows. start() -> a fresh walker with
    done() -> nothing can follow, fill() (the mask: timed) -> its bitmask [words] int32,
    ends() -> may the text end here, take(token)."""
    rng = np.random.default_rng(0)
    for _ in range(WALKS):
        walker, out = start(), []
        for _ in range(MAX_STEPS):
            if walker.done():
                stats["finished"] += 1
                stats["valid"] += _valid(tok.decode(out), schema)
                break
            t = time.perf_counter()
            bitmask = walker.fill()
            stats["mask_s"].append(time.perf_counter() - t)
            choices = allowed(bitmask, vocab)
            token = int(rng.choice(choices)) if len(choices) > 1 or eos not in choices else eos
            if token == eos and walker.ends():
                stats["finished"] += 1
                stats["valid"] += _valid(tok.decode(out), schema)
                break
            if token != eos:
                walker.take(token)
                out.append(token)


def run_llguidance(tok, eos: int, vocab: int) -> dict:
    import llguidance

    class Walker:
        def __init__(self, grammar):
            self.m, self.mask = llguidance.LLMatcher(lltok, grammar), np.zeros((vocab + 31) // 32, np.int32)

        def done(self):
            return self.m.is_stopped()  # nothing can follow: only the end token is left

        def fill(self):
            self.m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
            return self.mask

        def ends(self):
            return self.m.is_accepting()

        def take(self, token):
            self.m.consume_token(token)

    t = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=eos)
    stats = {"setup_s": time.perf_counter() - t, "compile_s": [], "mask_s": [], "valid": 0, "finished": 0}
    for schema in SCHEMAS.values():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        t = time.perf_counter()
        llguidance.LLMatcher(lltok, grammar)
        stats["compile_s"].append(time.perf_counter() - t)
        walks(schema, lambda: Walker(grammar), tok, eos, vocab, stats)
    return stats


def run_xgrammar(tok, eos: int, vocab: int) -> dict:
    import transformers
    import xgrammar as xgr

    class Walker:
        def __init__(self, compiled):
            self.m, self.mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab)

        def done(self):
            return False  # it says so through the end token only

        def fill(self):
            self.m.fill_next_token_bitmask(self.mask)
            return self.mask[0].numpy()

        def ends(self):
            return self.m.accept_token(eos)

        def take(self, token):
            self.m.accept_token(token)

    t = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    stats = {"setup_s": time.perf_counter() - t, "compile_s": [], "mask_s": [], "valid": 0, "finished": 0}
    for schema in SCHEMAS.values():
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        stats["compile_s"].append(time.perf_counter() - t)
        walks(schema, lambda: Walker(compiled), tok, eos, vocab, stats)
    return stats


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def main() -> None:
    ckpt = load_checkpoint("smollm2-135m-instruct", progress=False)
    tok = ckpt.tokenizer
    eos = tok.token_to_id("<|im_end|>")
    vocab = int(ckpt.config["vocab_size"])
    for name, run in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar)):
        r = run(tok, eos, vocab)
        mask_us = np.array(r["mask_s"]) * 1e6
        print(f"{name:10s} tokenizer setup {r['setup_s'] * 1e3:7.1f} ms | compile per schema "
              f"{', '.join(f'{c * 1e3:.1f}' for c in r['compile_s'])} ms | mask per token median "
              f"{statistics.median(mask_us):.0f} us, p99 {np.percentile(mask_us, 99):.0f} us, max "
              f"{mask_us.max():.0f} us | finished walks {r['finished']}/{WALKS * len(SCHEMAS)}, valid {r['valid']}/{r['finished']}")


if __name__ == "__main__":
    main()
