"""Runtime: one model's weights, KV cache and compiled plans on one backend.

The vision graph, the prefill graphs and the decode graphs are separate plans compiled on
demand per static shape and sharing one `Store` (weights once, one KV cache). Outputs stay
on the backend between stages: vision features go into the prefill without a host copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .graph import Graph
from .models import llama
from .models.smolvlm2 import SmolVLM2Config, build_vision_graph, vision_inputs
from .session import CompileOptions, Session, Store, make_backend
from .weights import check_tensors


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
                 num_slots: int = 1) -> None:
        self.spec = spec
        self.options = options or CompileOptions()
        self.max_seq = max_seq or 256  # grown on demand by reserve()
        self.num_slots = num_slots
        self.store = Store(make_backend(self.options))
        self.backend = self.store.backend
        self._sessions: dict[tuple, Session] = {}

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
            self.store.set_parameter(name, tensors[name])

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
        self.store.states.clear()

    # ---- sessions ---------------------------------------------------------------------
    def build_text_graph(self, g: Graph, rows: int, logit_rows: int, image_tokens: int):
        return llama.build_text_step(g, self.spec.text, self.spec.names, rows, self.num_slots, self.max_seq,
                                     logit_rows, image_tokens)

    def _session(self, key: tuple, build) -> Session:
        s = self._sessions.get(key)
        if s is None:
            g = Graph()
            g.set_outputs([build(g)])
            s = self._sessions[key] = Session(g, self.options, self.store)
        return s

    # ---- running ----------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray | None = None):
        """Images [n, 3, H, W] -> features [n * tokens, text_hidden] (backend-resident).

        The mask path (padding, bucketed position ids) runs only when some pixel is padding."""
        vlm = self.spec.vlm
        if vlm is None:
            raise ValueError("this model has no vision encoder: it takes text only")
        n, _, h, w = pixel_values.shape
        padded = pixel_attention_mask is not None and not bool(np.all(pixel_attention_mask))
        per_image = (h // vlm.vision.patch_size) * (w // vlm.vision.patch_size)
        s = self._session(("vision", n, per_image, padded),
                          lambda g: build_vision_graph(g, vlm, n, per_image, padded))
        for name, value in vision_inputs(vlm, pixel_values, pixel_attention_mask if padded else None).items():
            s.set_input(name, value)
        s.run()
        return s.output()

    def step(self, token_ids, positions, slots, logit_rows, image_features=None, image_rows=None):
        """One prefill or decode step (see `llama.build_text_step`) -> logits [len(logit_rows), vocab]."""
        rows, k = len(token_ids), len(logit_rows)
        m = 0 if image_features is None else int(image_features.shape[0])
        s = self._session(("text", rows, k, m), lambda g: self.build_text_graph(g, rows, k, m))
        s.set_input("token_ids", np.asarray(token_ids, dtype=np.uint32))
        s.set_input("positions", np.asarray(positions, dtype=np.uint32))
        s.set_input("slots", np.asarray(slots, dtype=np.uint32))
        s.set_input("logit_rows", np.asarray(logit_rows, dtype=np.uint32))
        if m:
            s.set_input("image_features", image_features)
            s.set_input("image_rows", np.asarray(image_rows, dtype=np.uint32))
        s.run()
        return s.output()

    def to_host(self, value) -> np.ndarray:
        return self.backend.to_host(value)


__all__ = ["Runtime", "ModelSpec"]
