"""Runtime: one model's weights, KV cache and compiled plans on one backend.

The vision graph, the prefill graphs and the decode graphs are separate plans compiled on
demand per static shape and sharing one `Store` (weights once, one KV cache). Outputs stay
on the backend between stages: vision features go into the prefill without a host copy.

On CUDA each decode step, prefill and vision run is a recorded CUDA graph: the batch is padded up to a bucket size
(1, 2, 4, 8, ... num_slots) with copies of its last row (they write the same cache entry
with the same values, and their logits are dropped), so a handful of recordings serve
every batch. A step's logits stay valid until the next step; vision features are copies.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .graph import Graph
from .models import llama
from .models.smolvlm2 import SmolVLM2Config, build_vision_graph, vision_inputs
from .passes import optimize
from .plan import build_plan
from .session import CompileOptions, Session, Store, make_backend
from .weights import check_tensors

PREFILL_ROWS = 64  # recorded prefills pad the prompt to a multiple of this many rows


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about an architecture."""

    text: llama.TextConfig
    names: llama.DecoderNames
    vlm: SmolVLM2Config | None = None   # None for text-only models

    @property
    def image_token_id(self) -> int | None:
        return self.vlm.image_token_id if self.vlm else None


class Runtime:
    def __init__(self, spec: ModelSpec, options: CompileOptions | None = None, max_seq: int | None = None,
                 num_slots: int = 1, vision_batch: int = 16) -> None:
        self.spec = spec
        self.options = options or CompileOptions()
        self.max_seq = max_seq or 256  # grown on demand by reserve()
        self.num_slots = num_slots
        self.vision_batch = vision_batch  # images per vision run: bounds the encoder's activations
        self.store = Store(make_backend(self.options))
        self.backend = self.store.backend
        self.record = getattr(self.backend, "can_capture", False)
        self._sessions: dict[tuple, Session] = {}
        self._packed: dict[Session, object] = {}  # a text session's packed index inputs

    # ---- weights ----------------------------------------------------------------------
    def expected_parameters(self) -> dict:
        """Every parameter the model's graphs declare (names and types), from the graphs."""
        g = Graph()
        self.build_text_graph(g, rows=1, logit_rows=1, image_tokens=1 if self.spec.vlm else 0)
        if self.spec.vlm:
            build_vision_graph(g, self.spec.vlm, images=1)
        return g.parameters

    def load_weights(self, tensors: Mapping, source: str = "checkpoint", progress=None) -> None:
        expected = self.expected_parameters()
        check_tensors({n: (t.shape, "float") for n, t in expected.items()}, tensors, source)
        names = progress(list(expected)) if progress else expected
        for name in names:
            self.store.set_parameter(name, tensors[name], reload=lambda name=name: tensors[name])

    def reserve(self, slots: int, tokens: int) -> None:
        """Make the KV cache hold `slots` sequences of `tokens` tokens. Growing it recompiles the
        text plans and starts an empty cache; it grows in steps of 256 tokens, never past the
        model's context."""
        limit = self.spec.text.max_position_embeddings
        if tokens > limit:
            raise ValueError(f"{tokens} tokens exceed the model's context of {limit}")
        if slots <= self.num_slots and tokens <= self.max_seq:
            return
        self.num_slots = max(slots, self.num_slots)
        self.max_seq = min(limit, max(self.max_seq, -(-tokens // 256) * 256))
        self._sessions = {k: s for k, s in self._sessions.items() if k[0] != "text"}
        self._packed.clear()
        self.store.states.clear()

    # ---- sessions ---------------------------------------------------------------------
    def build_text_graph(self, g: Graph, rows: int, logit_rows: int, image_tokens: int, mode: str = "any"):
        return llama.build_text_step(g, self.spec.text, self.spec.names, rows, self.num_slots, self.max_seq,
                                     logit_rows, image_tokens, mode)

    def _session(self, key: tuple, build, record: bool = False) -> Session:
        s = self._sessions.get(key)
        if s is None:
            g = Graph()
            g.set_outputs([build(g)])
            s = self._sessions[key] = Session(g, self.options, self.store, capture=record, foldable=self._foldable)
        return s

    @functools.cached_property
    def _foldable(self) -> set[str]:
        """Parameters no plan of this model reads directly (only through prepared constants)."""
        graphs = []
        for build in (lambda g: self.build_text_graph(g, 1, 1, 1 if self.spec.vlm else 0, "decode"),
                      *((lambda g, pad=pad: build_vision_graph(g, self.spec.vlm, 1, None, pad)) for pad in
                        ((False, True) if self.spec.vlm else ()))):
            g = Graph()
            g.set_outputs([build(g)])
            graphs.append(build_plan(optimize(g, self.options.optimize)[0]))
        direct = {i.name for plan in graphs for d in plan.dispatches for i in d.node.inputs if i.op == "parameter"}
        return {n for plan in graphs for n in plan.parameters} - direct

    def _bucket(self, rows: int) -> int:
        size = 1
        while size < rows:
            size *= 2
        return min(size, self.num_slots)

    # ---- running ----------------------------------------------------------------------
    def encode_images(self, pixel_values, pixel_attention_mask: np.ndarray | None = None):
        """Images [n, 3, H, W] (host array or backend tensor) -> features [n * tokens, text_hidden]
        (backend-resident), encoded `vision_batch` images at a time.

        The mask path (padding, bucketed position ids) runs only when some pixel is padding."""
        vlm = self.spec.vlm
        if vlm is None:
            raise ValueError("this model has no vision encoder: it takes text only")
        n, _, h, w = pixel_values.shape
        padded = pixel_attention_mask is not None and not bool(np.all(pixel_attention_mask))
        parts = []
        for start in range(0, n, self.vision_batch):
            count = min(self.vision_batch, n - start)
            s = self._session(("vision", count, h, w, padded), lambda g: build_vision_graph(g, vlm, count, (h, w), padded),
                              self.record)
            mask = pixel_attention_mask[start:start + count] if padded else None
            for name, value in vision_inputs(vlm, pixel_values[start:start + count], mask).items():
                s.set_input(name, value)
            s.run()
            # a recording's output is overwritten by its next replay (and may share memory with
            # other recordings' scratch): features outlive this call, so they get their own copy
            parts.append(self.backend.copy(s.output()) if s.capture else s.output())
        return parts[0] if len(parts) == 1 else self.backend.concat(parts)

    def step(self, token_ids, positions, slots, logit_rows, image_features=None, image_rows=None):
        """One prefill or decode step (see `llama.build_text_step`) -> logits [len(logit_rows), vocab].

        A prefill is one sequence's rows at positions 0..n-1; a decode is one row per sequence,
        each in its own slot, with every row's logits; anything else runs the general path.
        Token ids may be a backend array (tokens a previous step chose on the device: trusted
        to be in the vocabulary); a decode step then reads them without a trip to the host."""
        on_device = getattr(self.backend, "owns", lambda _: False)(token_ids)
        positions, slots = (np.asarray(a, dtype=np.int64) for a in (positions, slots))
        if not on_device:
            token_ids = np.asarray(token_ids, dtype=np.int64)
        self._check_indices(None if on_device else token_ids, positions, slots, logit_rows, image_rows,
                            rows=len(token_ids))
        rows, k = len(token_ids), len(logit_rows)
        m = 0 if image_features is None else int(image_features.shape[0])
        if len(np.unique(slots)) == rows and k == rows and np.array_equal(logit_rows, np.arange(rows)) and not m:
            return self._decode(token_ids, positions, slots)
        if on_device:  # other steps pad and pack on the host
            token_ids = self.backend.to_host(token_ids).astype(np.int64)
        mode = "prefill" if (slots == slots[0]).all() and np.array_equal(positions, np.arange(rows)) else "any"
        record = self.record and mode == "prefill"
        if record:  # pad to a multiple of PREFILL_ROWS: one recording serves many prompt lengths
            rows = min(-(-rows // PREFILL_ROWS) * PREFILL_ROWS, self.max_seq)
            token_ids = np.pad(token_ids, (0, rows - len(token_ids)))
            positions, slots = np.arange(rows), np.full(rows, slots[0])
        s = self._session(("text", rows, k, m, mode), lambda g: self.build_text_graph(g, rows, k, m, mode), record)
        self._feed(s, token_ids, positions, slots, logit_rows)
        if m:
            s.set_input("image_features", image_features)
            s.set_input("image_rows", np.asarray(image_rows, dtype=np.uint32))
        s.run()
        return s.output()

    def _check_indices(self, token_ids, positions, slots, logit_rows, image_rows=None, rows=None) -> None:
        """Out-of-range indices would read or write outside a GPU buffer: refuse them here.
        (Token ids already on the device came from a choice over the vocabulary.)"""
        rows = len(token_ids) if rows is None else rows
        if not len(positions) == len(slots) == rows:
            raise ValueError(f"step: {rows} token ids but {len(positions)} positions and {len(slots)} slots")
        for what, values, limit in (("token id", np.asarray([] if token_ids is None else token_ids),
                                     self.spec.text.vocab_size),
                                    ("position", positions, self.max_seq), ("slot", slots, self.num_slots),
                                    ("logit row", np.asarray(logit_rows), rows),
                                    ("image row", np.asarray(image_rows if image_rows is not None else []), rows)):
            if len(values) and (values.min() < 0 or values.max() >= limit):
                bad = values[(values < 0) | (values >= limit)][0]
                hint = " (reserve() a larger cache)" if what in ("position", "slot") else ""
                raise ValueError(f"step: {what} {bad} is outside [0, {limit}){hint}")

    def _decode(self, token_ids, positions, slots):
        rows = len(token_ids)
        size = self._bucket(rows) if self.record else rows
        if size > rows:  # padding rows repeat the last row
            positions, slots = (np.pad(a, (0, size - rows), mode="edge") for a in (positions, slots))
            token_ids = (np.pad(token_ids, (0, size - rows), mode="edge") if isinstance(token_ids, np.ndarray)
                         else self.backend.concat([token_ids] + [token_ids[-1:]] * (size - rows)))
        s = self._session(("text", size, size, 0, "decode"),
                          lambda g: self.build_text_graph(g, size, size, 0, "decode"), record=self.record)
        self._feed(s, token_ids, positions, slots, np.arange(size))
        s.run()
        out = s.output()
        return out[:rows] if size > rows else out

    def _feed(self, s: Session, token_ids, positions, slots, logit_rows) -> None:
        """The four index inputs travel as one packed array: one host-to-device copy a step
        (device-side token ids are copied in on the device)."""
        rows = len(positions)
        on_device = not isinstance(token_ids, np.ndarray)
        host = np.concatenate([np.zeros(rows) if on_device else token_ids, positions, slots, logit_rows]).astype(np.int64)
        if s not in self._packed:
            packed = self._packed[s] = self.backend.from_host(host, "u32")
            start = 0
            for name, count in (("token_ids", rows), ("positions", rows), ("slots", rows),
                                ("logit_rows", len(logit_rows))):
                s.bind_input(name, packed[start:start + count])
                start += count
        elif on_device:
            self.backend.write(self._packed[s][rows:], host[rows:], "u32")
        else:
            self.backend.write(self._packed[s], host, "u32")
        if on_device:
            self.backend.write(self._packed[s][:rows], token_ids, "u32")

    def to_host(self, value) -> np.ndarray:
        return self.backend.to_host(value)


__all__ = ["Runtime", "ModelSpec"]
