"""Continuous batching: sequences join between decode steps and leave when finished or
cancelled.

Each `step()` admits waiting sequences (a cache slot with pages for prompt + answer limit),
prefills at most `prefill_chunk` prompt tokens while other sequences decode (the oldest
unfinished prompts first, so a long prompt is prefilled over several steps and the others keep
moving; with nothing decoding, whole prompts), then runs one decode step for every sequence
whose prompt is done. A sequence that cannot get pages yet waits, in order; one that could
never fit was refused by `add`.

Prefix cache (unless `prefix_cache=False`): a prompt's full blocks are looked up in the KV
cache by their keys (kv_cache.block_hashes); the cached leading blocks are not prefilled
again, and once a prompt is prefilled its full blocks are kept for the prompts that follow.

Decode rows: a running sequence holds a *lane*, its row in the decode steps. Lanes are kept
dense (a sequence that leaves hands its lane to the one in the highest lane), so a step
computes lanes 0..running-1: one user of a wide server computes one row. The runner may pad
the row count (a GPU records one graph per power of two): padding lanes decode a dummy row in
the cache's dummy slot. The runner computes every row as it would alone (row-invariant
kernels), so no sequence's answer depends on what else runs.

With a sampler that `overlaps` (on a GPU), decoding is overlapped (unless `overlap=False`):
step k sends decode k, whose input tokens are decode k-1's device-side choices, before it
waits for decode k-1's tokens on the host, so the GPU never idles on the host's bookkeeping. A
sequence that stops (end token, stop string) at k-1 was computed once more at k; that row is
dropped. A grammar needs the token of k-1 to mask the choice of k: with a sampled constrained
sequence running, step k's choice is sent after k-1's tokens reached the host (decode k runs
meanwhile). A greedy constrained sequence speculates instead (engine/sampler.py): its choice
at k-1 is sent unmasked like a free one; if the grammar refuses it when it reaches the host,
the sampler gives the best allowed token, and that sequence's row in decode k (fed the refused
token) is dropped and sent again at the next step. A repetition penalty or logprobs need every
token on the host: while a sequence with one runs, steps go one by one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..generate import GenerationConfig, GenerationResult, Prompt, TextStream
from .kv_cache import CacheFull, block_hashes


class Sequence:
    """One answer being generated: its prompt, settings, cache slot, lane and text so far."""

    def __init__(self, prompt: Prompt, cfg: GenerationConfig, decode: Callable[[list[int]], str]) -> None:
        self.prompt, self.cfg = prompt, cfg
        self.stream = TextStream(decode, cfg.stop)
        self.slot: int | None = None            # its block-table row in the KV cache
        self.lane: int | None = None            # its row in the scheduler's decode steps
        self.position = len(prompt.token_ids)   # where the next token goes in the cache
        self.prefilled = 0                      # prompt positions whose keys and values are in the cache
        self.cached_tokens = 0                  # of those, how many came from the prefix cache
        self.prefix: list[bytes] = []           # the prefix-cache keys of its prompt's full blocks
        self.finish_reason: str | None = None   # "stop", "length", "cancelled" or "error"
        self.error: Exception | None = None
        self.decode_steps = 0                   # tokens that came from decode steps (the first comes from prefill)
        self.prefill_s = self.decode_s = 0.0
        self._prefill_start: float | None = None
        self._decode_start: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.stream.tokens

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt.token_ids)

    @property
    def cache_tokens(self) -> int:
        """Positions it may write: the prompt and every answer token but the last."""
        return len(self.prompt.token_ids) + self.cfg.max_new_tokens

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.stream.text(), token_ids=list(self.tokens), finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt.token_ids), cached_tokens=self.cached_tokens,
            timings={"prefill_s": self.prefill_s, "decode_s": self.decode_s, "new_tokens": len(self.tokens),
                     "tokens_per_s": self.decode_steps / self.decode_s if self.decode_steps else 0.0})


@dataclass
class _Launch:
    """A decode step sent to the device: its sequences (by lane) and their chosen tokens."""

    seqs: dict[int, Sequence]
    tokens: object            # .result() -> host tokens by lane (a device handle or a _Ready); None: not chosen yet
    choose: Callable[[], object] | None = None  # sends the choice (when tokens is None)
    firsts: list[tuple[Sequence, object]] = field(default_factory=list)  # first tokens chosen on the device before it


@dataclass
class _Ready:
    tokens: dict[int, int]
    refused: tuple = ()

    def result(self, rows=None) -> dict[int, int]:
        return self.tokens


class Scheduler:
    def __init__(self, runner, eos_ids: set[int], decode: Callable[[list[int]], str], width: int = 8,
                 sampler=None, overlap: bool = True, prefix_cache: bool = True,
                 prefill_chunk: int | None = None):
        if not 0 < width <= runner.max_slots:
            raise ValueError(f"a batch of {width} sequences: this runner runs 1 to {runner.max_slots} at once")
        self.prefill_chunk = runner.prefill_chunk if prefill_chunk is None else prefill_chunk
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {self.prefill_chunk}")
        self.prefix_cache = prefix_cache
        self.runner, self.cache, self.eos_ids, self.decode = runner, runner.cache, eos_ids, decode
        self.sampler = sampler or runner.backend.sampler()
        self.overlap = overlap and self.sampler.overlaps
        self.width = width
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}    # lane -> sequence
        self.prefilling: deque[Sequence] = deque()  # running sequences whose prompt is not all prefilled, oldest first
        self.last_decode_batch = 0                # sequences in the last decode step (for metrics)
        self.pending: _Launch | None = None       # an overlapped decode whose tokens are still on the device
        self._in_flight: dict[Sequence, int] = {}
        self._next_tokens = None                  # device, one per lane: each lane's next input token
        self._unchosen = False                    # the step just sent waits to choose (a grammar): lane writes wait too
        self._held: list[Callable[[], None]] = []  # next-token writes (lane moves, puts) held back meanwhile

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and self.pending is None

    @property
    def open_lanes(self) -> int:
        """Lanes that no running or waiting sequence will take."""
        return self.width - len(self.running) - len(self.waiting)

    def add(self, prompt: Prompt, cfg: GenerationConfig) -> Sequence:
        n = len(prompt.token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + cfg.max_new_tokens > self.runner.max_seq:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens {cfg.max_new_tokens} exceeds the "
                             f"context of {self.runner.max_seq} tokens")
        seq = Sequence(prompt, cfg, self.decode)
        self.cache.check_fits(seq.cache_tokens)
        if self.prefix_cache and (prompt.image_rows is None or prompt.image_keys is not None):
            seq.prefix = block_hashes(prompt.token_ids, self.cache.layout.block_size, prompt.image_rows,
                                      prompt.image_keys)
        if cfg.max_new_tokens == 0:
            seq.finish_reason = "length"
        else:
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence now; its lane and cache pages are free for the next step."""
        if seq.finish_reason is not None:
            return
        if seq.lane is None:
            self.waiting.remove(seq)
        else:
            self._release(seq)
        seq.finish_reason = "cancelled"

    def cancel_all(self) -> None:
        for seq in [*self.waiting, *self.running.values()]:
            self.cancel(seq)
        self.pending = None

    def step(self) -> list[tuple[Sequence, str]]:
        """Admit, then decode once. Returns (sequence, new text) for every sequence that moved,
        one pair per sequence (a prefill token and a decode token in the same step are joined);
        a sequence has finished when its `finish_reason` is set."""
        moved: dict[Sequence, str] = {}
        for seq, piece in self._step():
            moved[seq] = moved.get(seq, "") + piece
        return list(moved.items())

    def _step(self) -> list[tuple[Sequence, str]]:
        events = self._admit()
        overlap = self.overlap and not any(s.cfg.host_paced for s in self.running.values())
        prefilled, firsts = self._prefill(on_device=overlap and self.pending is not None)
        events += prefilled
        if not overlap and self.pending is not None:  # the host needs every token before the next step
            events += self._resolve(self.pending)
            self.pending = None
        launch = self._launch(overlap)
        if launch is not None:
            launch.firsts = firsts
        elif firsts:  # no decode step to read them with: read them now
            events += self._resolve(_Launch({}, _Ready({}), firsts=firsts))
        self.last_decode_batch = len(launch.seqs) if launch else 0
        if overlap and self.pending is not None:
            self._unchosen = launch is not None and launch.tokens is None
            events += self._resolve(self.pending, sent=launch)
            self._unchosen = False
        if launch is not None and launch.tokens is None:  # a grammar waited for the tokens just resolved
            launch.tokens = launch.choose()
            for write in self._held:  # lanes written meanwhile: after the choice wrote them
                write()
            self._held.clear()
        self.pending = launch if overlap else None
        if launch is not None and not overlap:
            events += self._resolve(launch)
        return events

    def _admit(self) -> list[tuple[Sequence, str]]:
        """Give waiting sequences a lane and cache pages (cached prefix pages included), in order."""
        events = []
        while self.waiting and len(self.running) < self.width:
            seq = self.waiting[0]
            # the last prompt token is always prefilled: its logits give the first answer token
            lookup = seq.prefix[:(len(seq.prompt.token_ids) - 1) // self.cache.layout.block_size]
            if not self.cache.can_take(seq.cache_tokens, lookup):
                if not self.running and self.pending is None:  # nothing here will free pages: someone else holds them
                    self.waiting.popleft()
                    seq.error = CacheFull(f"the KV cache has no room for {seq.cache_tokens} tokens: other "
                                          f"sequences hold it ({self.cache.free_pages} free pages of "
                                          f"{self.cache.layout.block_size} tokens)")
                    seq.finish_reason = "error"
                    events.append((seq, ""))
                    continue
                break  # waits, in order, for running sequences to give pages back
            self.waiting.popleft()
            if self.prefix_cache:
                seq.slot, seq.prefilled = self.cache.take_prefix(seq.cache_tokens, lookup)
            else:
                seq.slot = self.cache.take(seq.cache_tokens)
            seq.cached_tokens = seq.prefilled
            seq.lane = len(self.running)  # lanes stay dense: 0..running-1
            self.running[seq.lane] = seq
            self.prefilling.append(seq)
        return events

    def _prefill(self, on_device: bool) -> tuple[list[tuple[Sequence, str]], list[tuple[Sequence, object]]]:
        """Prefill up to `prefill_chunk` prompt tokens, oldest prompts first (every waiting token
        when no sequence is decoding: then nobody waits on the chunks); a prompt that is done
        gets its first token and its full blocks are kept in the prefix cache. `on_device`
        (decodes in flight): a free first token is chosen on the device and read with the next
        decode step's tokens, so the streams in flight never wait for the last chunk: returns
        (events, those first tokens' handles)."""
        decoding = any(not seq.prefilling for seq in self.running.values())
        events, firsts = [], []
        budget = self.prefill_chunk if decoding else self.runner.max_seq * len(self.prefilling)
        while self.prefilling and budget > 0:
            seq = self.prefilling[0]
            p = seq.prompt
            start = seq.prefilled
            end = min(len(p.token_ids), start + budget)
            if seq._prefill_start is None:
                seq._prefill_start = time.perf_counter()  # until its first token, steps between chunks included
            try:
                features = rows = None
                if p.image_rows is not None:
                    lo, hi = np.searchsorted(p.image_rows, [start, end])
                    if hi > lo:
                        features, rows = p.image_features[lo:hi], p.image_rows[lo:hi] - start
                logits = self.runner.prefill(p.token_ids[start:end], seq.slot, features, rows, start=start)
            except Exception as e:  # e.g. image features that don't fit: fail this sequence alone
                seq.error = e
                events.append((seq, self._finish(seq, "error")))
                continue
            budget -= end - start
            seq.prefilled = end
            if seq.prefilling:
                continue
            self.prefilling.popleft()
            if self.prefix_cache:
                self.cache.remember(seq.slot, seq.prefix)
            seq._decode_start = time.perf_counter()
            seq.prefill_s = seq._decode_start - seq._prefill_start
            if on_device and seq.cfg.constraint is None:
                into = self._next_tokens[seq.lane:seq.lane + 1]  # the next decode step's input for its lane
                firsts.append((seq, self.sampler.choose_later(logits, [seq], into, ring="first")))
                self._in_flight[seq] = 1
                continue
            [token] = self.sampler.choose(logits, [seq])
            if self._next_tokens is not None:  # the overlapped decode in flight did not have it
                self.sampler.put(self._next_tokens, seq.lane, token)
            events.append((seq, self._advance(seq, token)))
        return events, firsts

    def _launch(self, overlap: bool) -> _Launch | None:
        """Send one decode step for every running sequence that may still need a token."""
        seqs = {lane: seq for lane, seq in self.running.items()
                if not seq.prefilling and len(seq.tokens) + self._in_flight.get(seq, 0) < seq.cfg.max_new_tokens}
        if not seqs:
            return None
        lanes = range(self.runner.decode_rows(len(self.running)))
        positions = np.array([seqs[lane].position if lane in seqs else 0 for lane in lanes])
        slots = np.array([seqs[lane].slot if lane in seqs else self.cache.dummy_slot for lane in lanes])
        if self.pending is None:  # every input token is known on the host
            tokens = np.array([seqs[lane].tokens[-1] if lane in seqs else 0 for lane in lanes])
        else:  # the decode in flight chose them on the device
            tokens = self._next_tokens[:len(lanes)]
        logits = self.runner.decode(tokens, positions, slots)
        for seq in seqs.values():
            seq.position += 1
            self._in_flight[seq] = self._in_flight.get(seq, 0) + 1
        if overlap:
            if self._next_tokens is None:
                self._next_tokens = self.sampler.token_buffer(self.runner.decode_rows(self.width))
            rows = [seqs.get(lane) for lane in lanes]
            into = self._next_tokens[:len(lanes)]
            if any(self.sampler.waits_for_grammar(seq) for seq in rows):
                # chosen once the step in flight has moved the grammars on; who finished or was dropped by then
                # is a dummy row
                launch = _Launch(seqs, None)
                launch.choose = lambda: self.sampler.choose_later(logits, self._live_rows(launch, len(lanes)), into)
                return launch
            return _Launch(seqs, self.sampler.choose_later(logits, rows, into))
        rows = [row for row, lane in enumerate(lanes) if lane in seqs]
        picked = logits if len(rows) == len(lanes) else logits[rows]
        chosen = self.sampler.choose(picked, [seqs[lanes[row]] for row in rows])
        return _Launch(seqs, _Ready({lanes[row]: token for row, token in zip(rows, chosen)}))

    @staticmethod
    def _live_rows(launch: _Launch, rows: int) -> list:
        """A step's rows by lane: the sequences still waiting for its tokens, else None."""
        return [seq if seq is not None and seq.finish_reason is None else None
                for seq in (launch.seqs.get(lane) for lane in range(rows))]

    def _resolve(self, launch: _Launch, sent: _Launch | None = None) -> list[tuple[Sequence, str]]:
        """Wait for a decode step's tokens and move its sequences on (those that finished or
        were cancelled meanwhile are skipped: their row was a wasted guess). `sent`: the step
        sent after it, whose rows fed a token the grammar refused are dropped."""
        events = []
        for seq, first in launch.firsts:  # each sequence's first token comes before its decode token
            if seq.finish_reason is None:
                self._in_flight[seq] -= 1
                events.append((seq, self._advance(seq, int(first.result()[0]))))
        tokens = launch.tokens.result(self._live_rows(launch, max(launch.seqs, default=-1) + 1))
        refused = set(launch.tokens.refused)
        for lane, seq in launch.seqs.items():
            if seq.finish_reason is not None:
                continue
            self._in_flight[seq] -= 1
            seq.decode_steps += 1
            if lane in refused:
                self._redo(seq, int(tokens[lane]), sent)
            events.append((seq, self._advance(seq, int(tokens[lane]))))
        self._in_flight = {s: n for s, n in self._in_flight.items() if n and s.finish_reason is None}
        return events

    def _redo(self, seq: Sequence, token: int, sent: _Launch | None) -> None:
        """The grammar replaced seq's token: its row in the step sent since (fed the refused
        token) is dropped, its position goes back, and the next step feeds it `token`."""
        lane = next((lane for lane, s in sent.seqs.items() if s is seq), None) if sent is not None else None
        if lane is not None:
            del sent.seqs[lane]
            self._in_flight[seq] -= 1
            seq.position -= 1
        if self._next_tokens is not None:
            lane = seq.lane  # now: it may move before a held write runs
            self._write(lambda: self.sampler.put(self._next_tokens, lane, token))

    def _advance(self, seq: Sequence, token: int) -> str:
        if token in self.eos_ids and not seq.cfg.ignore_eos:
            return self._finish(seq, "stop")
        piece = seq.stream.push(token)
        if seq.stream.stopped:
            return piece + self._finish(seq, "stop")
        if len(seq.tokens) >= seq.cfg.max_new_tokens:
            return piece + self._finish(seq, "length")
        return piece

    def _finish(self, seq: Sequence, reason: str) -> str:
        seq.finish_reason = reason
        self._release(seq)
        if seq._decode_start is not None:
            seq.decode_s = time.perf_counter() - seq._decode_start
        return seq.stream.flush() if reason != "error" else ""

    def _release(self, seq: Sequence) -> None:
        if seq.prefilling:
            self.prefilling.remove(seq)
        last = self.running.pop(len(self.running) - 1)
        if last is not seq:  # the highest lane moves into the freed one: lanes stay dense
            last.lane = seq.lane
            self.running[seq.lane] = last
            if self._next_tokens is not None:  # its next input token moves with it, on the device
                src, dst = len(self.running), last.lane
                self._write(lambda: self.sampler.move(self._next_tokens, src, dst))
        self.cache.release(seq.slot)

    def _write(self, write: Callable[[], None]) -> None:
        """A write of lanes' next input tokens: now, or after the choice of the step just sent
        if it has not chosen yet (its choice writes every lane)."""
        if self._unchosen:
            self._held.append(write)
        else:
            write()
