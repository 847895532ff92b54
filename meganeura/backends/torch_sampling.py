"""Choosing next tokens on the GPU: greedy, temperature, top-k, top-p and repetition
penalty, vectorized over a step's rows, with one small copy of token ids back to the host
(instead of a logits row of vocabulary size per sequence).

Same rules as `engine.sampler.sample` (the host reference); the random stream differs (each
sequence draws from its own torch generator, seeded from its settings), so seeded sampling is
reproducible per device, not across devices. Greedy choices are identical.

`choose` waits for its tokens; `choose_later` leaves them on the device for the next step
(the overlapped decode) with its settings uploaded without waiting.

Constrained sequences (a grammar: engine/grammar.py): their masks are computed on the host
while the device still runs the decode step that made the logits, unpacked there into flags of
the forbidden tokens (one vocab-sized bool row each: one upload and one fill on the device,
fewer launches than unpacking bits there), and applied before the choice. `choose_later` takes
them too: the overlapped scheduler sends decode k, then waits for step k-1's tokens (which move
the grammars on), then asks for step k's choice, so the grammar's host work overlaps the
device's decode. Greedy constrained rows are not masked in `choose_later` (they speculate:
engine/sampler.py): their unmasked choice feeds the next step like a free row's, and their
logits land on the host beside the tokens; when the grammar refuses the token, `result()`
replaces it with the best allowed one and names the row in `refused`, whose next step (sent
with the refused token) the scheduler drops and sends again.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..engine.grammar import unpack
from ..engine.sampler import Grammars, Logprobs, history


def samples(seq) -> bool:
    return seq is not None and not seq.cfg.greedy


def settings(rows, vocab: int) -> np.ndarray:
    """[3, rows] float32: temperature (0: greedy), top_k (vocab: off), top_p (inf: off, so
    top_p = 1 cuts nothing); rows[i] is row i's sequence or None (a greedy dummy)."""
    out = np.array([[0.0], [vocab], [np.inf]], np.float32).repeat(len(rows), axis=1)
    for i, seq in enumerate(rows):
        if samples(seq):
            c = seq.cfg
            out[:, i] = c.temperature, min(c.top_k or vocab, vocab), c.top_p if c.top_p < 1.0 else np.inf
    return out


def forbidden(masks, rows: int, vocab: int) -> np.ndarray:
    """Grammars' masks ((constrained rows, bitmasks): Grammars.masks) -> bool [rows, vocab],
    True where a token is forbidden."""
    constrained, bits = masks
    out = np.zeros((rows, vocab), bool)
    out[constrained] = ~unpack(bits, vocab)
    return out


class _HostTokens:
    """Token ids on their way to the host: result() waits for their copy only, and moves the
    grammars of the constrained rows on (settling the speculating ones: `refused` lists the
    rows whose token the grammar refused and result() replaced)."""

    def __init__(self, tokens, done, grammars: Grammars, rows, speculating=(), logits=None) -> None:
        self.tokens, self.done, self.grammars, self.rows = tokens, done, grammars, rows
        self.speculating, self.logits = speculating, logits  # rows chosen unmasked; the step's logits, on the host
        self.refused: list[int] = []

    def result(self, rows=None) -> np.ndarray:
        """rows: the sequences still waiting for these tokens, by row (None: a row nobody
        reads any more, whose grammar must not move); by default those chosen for."""
        self.done.synchronize()
        tokens = self.tokens.numpy().copy()
        rows = self.rows if rows is None else rows
        for i in self.speculating:
            if i < len(rows) and rows[i] is not None:
                tokens[i], refused = self.grammars.settle_greedy(rows[i], self.logits[i].numpy(), int(tokens[i]))
                if refused:
                    self.refused.append(i)
        self.grammars.advance([None if i in self.speculating else seq for i, seq in enumerate(rows)], tokens)
        return tokens


class DeviceSampler:
    overlaps = True

    def __init__(self, backend) -> None:
        self.backend = backend
        self._generators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._buffers: dict[tuple, tuple] = {}  # overlapped decode: device settings, pinned landing buffers
        self.grammars = Grammars()
        self.logprobs = Logprobs()

    def generator(self, seq, device: torch.device) -> torch.Generator:
        gen = self._generators.get(seq)
        if gen is None:
            gen = self._generators[seq] = torch.Generator(device=device)
            gen.manual_seed(int(np.random.default_rng(seq.cfg.seed).integers(2**62)))
        return gen

    def pick(self, x: torch.Tensor, setting: torch.Tensor, rows) -> torch.Tensor:
        """Tokens [rows] (device) from fp32 logits x [rows, vocab] and `settings` on the device;
        nothing here waits for the GPU."""
        greedy = x.argmax(-1)
        if not any(samples(s) for s in rows):
            return greedy
        temperature, top_k, top_p = setting[0], setting[1].long(), setting[2]
        scaled = x / torch.where(temperature > 0, temperature, 1.0)[:, None]
        ordered, order = scaled.sort(dim=-1, descending=True)
        kth = ordered.gather(1, top_k[:, None] - 1)
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th value stay, as on the host
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the better tokens: keep the smallest set reaching top_p
        probs = probs.masked_fill(before >= top_p[:, None], 0.0)
        # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i / sum(p)
        noise = torch.stack([
            torch.empty(x.shape[1], device=x.device).exponential_(generator=self.generator(s, x.device))
            if samples(s) else torch.ones(x.shape[1], device=x.device) for s in rows])
        picked = order.gather(1, (probs / noise).argmax(-1, keepdim=True))[:, 0]
        return torch.where(temperature > 0, picked, greedy)

    def choose(self, logits: torch.Tensor, sequences) -> list[int]:
        """logits [rows, vocab] (one row per sequence, in order) -> the next token of each."""
        masks = self.grammars.masks(sequences, logits.shape[1])  # on the host, while the device computes logits
        wanted = self.logprobs.wanted(sequences)
        if masks is None and not wanted and all(s.cfg.greedy and not s.cfg.penalizes for s in sequences):
            return logits.argmax(-1).tolist()
        x = logits.float()
        if wanted:  # of the raw logits, before anything below changes them
            lp = x[wanted].log_softmax(-1)
            k = max(sequences[i].cfg.logprobs for i in wanted)
            top_values, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        if masks is not None:
            x = x.masked_fill(torch.from_numpy(forbidden(masks, len(sequences), x.shape[1])).to(x.device),
                              float("-inf"))
        for i, seq in enumerate(sequences):
            if seq.cfg.penalizes:
                seen = torch.tensor(sorted(set(history(seq))), device=x.device)
                v = x[i, seen]
                x[i, seen] = torch.where(v > 0, v / seq.cfg.repetition_penalty, v * seq.cfg.repetition_penalty)
        setting = torch.from_numpy(settings(sequences, x.shape[1])).to(x.device)
        tokens = self.pick(x, setting, sequences).tolist()
        self.grammars.advance(sequences, tokens)
        if wanted:
            chosen = lp.gather(1, torch.tensor([tokens[i] for i in wanted], device=lp.device)[:, None])[:, 0]
            for i, value, ids, values in zip(wanted, chosen.tolist(), top_ids.tolist(), top_values.tolist()):
                k = sequences[i].cfg.logprobs
                self.logprobs.record(sequences[i], tokens[i], {tokens[i]: value, **dict(zip(ids[:k], values[:k]))},
                                     ids[:k])
        return tokens

    def waits_for_grammar(self, seq) -> bool:
        """Whether seq's overlapped choice needs its mask, so the tokens before it on the host."""
        return seq is not None and seq.cfg.constraint is not None and not self.grammars.speculates(seq)

    def token_buffer(self, rows: int) -> torch.Tensor:
        """A device buffer of next input tokens, one per row (what choose_later writes)."""
        return self.backend.from_host(np.zeros(rows), "u32")

    def put(self, buffer: torch.Tensor, row: int, token: int) -> None:
        """Set one row's next token from the host (a sequence that joined after the step went out)."""
        self.backend.write(buffer[row:row + 1], [token], "u32")

    def move(self, buffer: torch.Tensor, src: int, dst: int) -> None:
        """Copy one row's next token to another row, in stream order (after the step that chose it)."""
        buffer[dst:dst + 1].copy_(buffer[src:src + 1])

    def choose_later(self, logits: torch.Tensor, rows, into: torch.Tensor, ring: str = "decode"):
        """The next token of each row (rows[i]: its sequence, or None for a dummy row, chosen
        greedily) into the device buffer `into` (the next step's input tokens), without
        waiting for the GPU: settings and grammar masks go up through pinned memory and the
        tokens come back the same way. Returns a handle whose result() waits for that copy
        only (and moves the rows' grammars on). No repetition penalty or logprobs here: they
        need the host's view of every token so far. Each `ring` of callers has its own two
        landing buffers per `into`: a first token chosen into lane 0 is read a step later,
        with two decode steps' copies sent meanwhile into the same one-row slice."""
        key = (into.data_ptr(), into.shape[0], ring)
        vocab = logits.shape[1]
        if key not in self._buffers:  # two landing buffers in turn: one is read while the next copy lands
            pinned = into.is_cuda
            self._buffers[key] = (torch.zeros((3, len(rows)), device=into.device),
                                  torch.zeros((len(rows), vocab), dtype=torch.bool, device=into.device),
                                  [torch.empty(into.shape, dtype=into.dtype, pin_memory=pinned) for _ in range(2)],
                                  [None, None])  # logits landing, made when a row first speculates
        setting, flags, landing, logits_landing = self._buffers[key]
        x = logits
        speculating = {i for i, s in enumerate(rows) if self.grammars.speculates(s)}
        masks = self.grammars.masks([None if i in speculating else s for i, s in enumerate(rows)], vocab)
        if masks is not None:  # every row's flags go up (none set if free): one staging shape, one fill
            self.backend.write(flags, forbidden(masks, len(rows), vocab), "bool")
            x = logits.masked_fill(flags, float("-inf"))
        if any(samples(s) for s in rows):
            self.backend.write(setting, settings(rows, vocab), "f32")
            into.copy_(self.pick(x.float(), setting, rows))
        else:
            into.copy_(x.argmax(-1))
        landing.reverse()
        landing[0].copy_(into, non_blocking=into.is_cuda)
        host_logits = None
        if speculating:  # read on the host only if the grammar refuses a token
            logits_landing.reverse()
            if logits_landing[0] is None:
                logits_landing[0] = torch.empty(logits.shape, dtype=torch.float32, pin_memory=into.is_cuda)
            host_logits = logits_landing[0]
            host_logits.copy_(logits, non_blocking=into.is_cuda)
        if not into.is_cuda:  # a CPU stand-in (tests): the copy is already done
            return _HostTokens(landing[0], _Done(), self.grammars, rows, speculating, host_logits)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(into.device))
        return _HostTokens(landing[0], done, self.grammars, rows, speculating, host_logits)


class _Done:
    def synchronize(self) -> None:
        pass
