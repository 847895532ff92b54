"""ModelRunner: one model's weights, KV cache and compiled plans on one backend, behind three
calls: `encode_images`, `prefill` (one sequence's prompt) and `decode` (one token for each of
several sequences).

The vision graph, the prefill graphs and the decode graphs are separate plans compiled on
demand per static shape and sharing one `Store` (weights once) and one `KVCache` (allocated
once, so nothing a plan or a recording points at ever moves). Outputs stay on the backend
between stages: vision features go into the prefill without a host copy.

Row padding, the one policy (`prefill_rows`, `decode_rows`):
- a prefill runs its prompt padded to a few shapes (each new shape costs a plan build; on a
  GPU, a recording); padding rows write past the sequence's pages, into the scratch page;
- a decode computes the rows it is given (the scheduler's running sequences); on a backend
  that records (CUDA) the row count is padded to a power of two, so a handful of recordings
  serve every batch. Every row's arithmetic is the same whatever else runs: on CUDA the decode
  products, attention and the rest are row-invariant kernels (kernels/gemv.py,
  kernels/decode_attention.py; cuBLAS would pick its kernel by row count); on the CPU the
  products run in pairs of rows (graphs built batch-invariant), the shape whose per-row
  results do not depend on the other rows (measured: one-row products take another kernel,
  and wider ones vary with the row count), and with int4/int8 weights the whole step runs as
  one compiled C call (backends/cpu_fused.py) whose rows never see each other. Padding rows
  repeat the last row: they write the same cache entry with the same values.
A step's logits stay valid until the next step; vision features are copies.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..graph import Graph
from ..models import llama
from ..models.smolvlm2 import SmolVLM2Config, build_vision_graph, vision_inputs
from ..passes import optimize
from ..plan import build_plan
from ..session import CompileOptions, Session, Store, make_backend
from ..weights import check_tensors
from .kv_cache import BLOCK_SIZE, CacheLayout, KVCache, bytes_per_token, default_budget, unused_page_limit

PREFILL_ROWS = 64  # recorded prefills pad the prompt to a multiple of this many rows
PREFILL_CHUNK = {"cpu": 256, "cuda": 128}  # prompt tokens per scheduler step while others decode
SPAN_TOKENS = 1024  # recorded chunk prefills: one recording per this many positions of context
MAX_SLOTS = 256    # sequences that can hold cache pages at once (block-table rows)


@dataclass(frozen=True)
class ModelSpec:
    """What the runner needs to know about an architecture."""

    text: llama.TextConfig
    names: llama.DecoderNames
    vlm: SmolVLM2Config | None = None   # None for text-only models

    @property
    def image_token_id(self) -> int | None:
        return self.vlm.image_token_id if self.vlm else None


def prefill_rows(n: int) -> int:
    """A prompt of n tokens runs as this many rows (unrecorded backends): a multiple of 8, or
    of 1/16 of n's power of two when that is larger. At most ~12% padding, and ~8 plan shapes
    per doubling of the prompt length (each new shape costs a plan build, ~0.3 s on the CPU)."""
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def fused_library_built() -> bool:
    """Is the compiled CPU decode step here (built now if needed)? 16-bit forms are only fast in it."""
    from ..backends.cpu_fused import enabled, library
    return enabled() and library() is not None


class ModelRunner:
    def __init__(self, spec: ModelSpec, options: CompileOptions | None = None, cache_bytes: int | None = None,
                 max_seq: int | None = None, max_slots: int = MAX_SLOTS, vision_batch: int = 16) -> None:
        self.spec = spec
        self.options = options or CompileOptions()
        context = spec.text.max_position_embeddings
        self.max_seq = min(max_seq or context, context)
        self.max_slots = max_slots
        self.cache_bytes = cache_bytes        # None: the backend's default budget, taken at first use
        self.vision_batch = vision_batch      # images per vision run: bounds the encoder's activations
        self.store = Store(make_backend(self.options))
        self.backend = self.store.backend
        self.records = self.backend.can_capture
        self._sessions: dict[tuple, Session] = {}
        self._packed: dict[Session, object] = {}  # a text session's packed index inputs
        self._fused = (None, None)  # (store version, the compiled CPU decode step or None)
        self.weight_form, self.weight_form_reason = "none", "no weights loaded"  # set by load_weights

    # ---- weights ----------------------------------------------------------------------
    def expected_parameters(self) -> dict:
        """Every parameter the model's graphs declare (names and types), from the graphs."""
        g = Graph()
        self.build_text_graph(g, rows=1, logit_rows=1, image_tokens=1 if self.spec.vlm else 0,
                              layout=self._declaring)
        if self.spec.vlm:
            build_vision_graph(g, self.spec.vlm, images=1)
        return g.parameters

    def load_weights(self, tensors: Mapping, source: str = "checkpoint", progress=None) -> None:
        """The checkpoint's tensors into the store; the text decoder's product weights in the
        compact forms `weight_forms` picks, read from a GGUF's blocks directly where the form
        holds them exactly."""
        expected = self.expected_parameters()
        check_tensors({n: (t.shape, "float") for n, t in expected.items()}, tensors, source)
        forms = self.weight_forms(tensors)
        if forms:
            from ..backends.cpu_weights import fits, reads_blocks
            forms = {n: f for n, f in forms.items() if fits(f, expected[n].shape)}
        stored = getattr(tensors, "stored", None)
        # a mapped file's pages count in RSS once read: given back tensor by tensor, the peak holds
        # one tensor's pages beside the weights made so far, not the whole file's (F16: 0.27 GB)
        drop_pages = getattr(tensors, "drop_pages", lambda: None)
        names = progress(list(expected)) if progress else expected
        for name in names:
            form = forms.get(name)
            if form and stored and reads_blocks(stored(name), form):
                read = lambda name=name: tensors.blocks(name) or tensors[name]  # noqa: E731  (a folder: no blocks)
            else:
                read = lambda name=name: tensors[name]  # noqa: E731
            try:
                self.store.set_parameter(name, read(), reload=read, form=form)
            except ValueError as e:  # a value a form cannot hold (float16's range)
                raise ValueError(f"{source}: tensor {name!r}: {e}") from None
            drop_pages()
            if form and name in self._lookup_tables:  # a tied head: rows are looked up too
                self.store.parameters[name].lookups = True
        self._fused_step()  # made now, while the weights hold their codes
        counts = {f: sum(1 for g in forms.values() if g == f) for f in sorted(set(forms.values()))}
        self.weight_form = max(counts, key=counts.get) if counts else "none"
        if len(counts) > 1:
            self.weight_form_reason += "; " + ", ".join(f"{n} weights {f}" for f, n in counts.items())

    @functools.cached_property
    def _text_declaration(self) -> Graph:
        """A one-row text graph, unoptimized: which parameters are products, lookups, merges."""
        g = Graph()
        self.build_text_graph(g, rows=1, logit_rows=1, image_tokens=0, layout=self._declaring)
        return g

    @functools.cached_property
    def _product_weights(self) -> tuple[set[str], str]:
        """The text decoder's parameters that are the weight of a product (linear), and the
        lm_head's (the embedding table when tied)."""
        g = self._text_declaration
        linears = [n for n in g.nodes if n.op == "linear" and n.inputs[1].op == "parameter"]
        head = next(n.inputs[1].name for n in linears if n.attrs["float_out"])
        return {n.inputs[1].name for n in linears}, head

    @functools.cached_property
    def _lookup_tables(self) -> set[str]:
        g = self._text_declaration
        return {n.inputs[1].name for n in g.nodes if n.op == "embedding" and n.inputs[1].op == "parameter"}

    def weight_forms(self, tensors: Mapping) -> dict[str, str]:
        """name -> compact form of each product weight kept compact. `options.quantize`:
        "int8", "f16" or "bf16" all of them; "int4" all but the lm_head, which stays int8 (as
        llama.cpp's 4-bit files keep theirs at 6-8 bits: 4-bit logits cost ~10x the KL
        divergence); "auto", on the torch CPU backend, each tensor's own precision (GGUF Q4_x ->
        int4, Q5_x..Q8_0 -> int8, F16 -> f16 and BF16 -> bf16 where the compiled decode step
        reads them, float32 -> none). With dtype bfloat16 on a CPU that multiplies bf16
        natively, the weights left float are packed for its bf16 products, whatever `quantize`
        says ("bf16": a layout, not a rounding beyond the dtype's; dtype float32 keeps torch's
        own products)."""
        asked = self.options.quantize
        weights, head = self._product_weights
        if asked in ("int8", "int4", "f16", "bf16"):
            self.weight_form_reason = "asked for" + ("; the lm_head int8" if asked == "int4" else "")
            return {n: "int8" if n == head and asked == "int4" else asked for n in weights}
        on_cpu = self.options.backend == "torch" and self.options.device.startswith("cpu")
        forms = {}
        if asked == "none":
            self.weight_form_reason = "asked for"
        elif not on_cpu:
            self.weight_form_reason = f"compact forms run on the CPU ({self.options.backend} on {self.options.device})"
        else:
            stored = getattr(tensors, "stored", None)
            for name in weights:
                kind = stored(name) if stored else None
                bits = re.match(r"I?Q(\d)", kind or "")
                if bits:
                    forms[name] = "int4" if int(bits.group(1)) <= 4 else "int8"
                elif kind in ("F16", "BF16") and self.options.dtype == "float32" and fused_library_built():
                    forms[name] = kind.lower()
            forms = self._one_form_a_merge(forms)
            kinds = sorted({stored(n) for n in weights}) if stored else ["unknown types"]
            self.weight_form_reason = f"auto: the checkpoint's own precision ({', '.join(kinds)})"
        if on_cpu and self.options.dtype == "bfloat16":
            from ..backends.cpu_weights import bf16_products
            packed = [n for n in weights if n not in forms] if bf16_products() else []
            forms.update({n: "bf16" for n in packed})
            if packed:
                self.weight_form_reason += "; float weights packed for the CPU's bf16 products"
        return forms

    @functools.cached_property
    def _merges(self) -> list[list[str]]:
        """Product weights the graph passes merge into one product: linears reading the same
        input (q|k|v, gate|up; passes/fusions.py, merge_sibling_linears)."""
        siblings: dict = {}
        for n in self._text_declaration.nodes:
            if n.op == "linear" and n.inputs[1].op == "parameter":
                siblings.setdefault(n.inputs[0], []).append(n.inputs[1].name)
        return [names for names in siblings.values() if len(names) > 1]

    def _one_form_a_merge(self, forms: dict[str, str]) -> dict[str, str]:
        """Parts of one merged product in one form (a file may store q and k 4-bit, v 8-bit, as
        Q4_K_M files do): integer forms widen to int8; any other mix stays float."""
        forms = dict(forms)
        for names in self._merges:
            found = {forms.get(n) for n in names}
            if len(found) > 1:
                unified = "int8" if found <= {"int4", "int8"} else None
                for n in names:
                    if unified:
                        forms[n] = unified
                    else:
                        forms.pop(n, None)
        return forms

    # ---- the KV cache -----------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        t = self.spec.text
        return bytes_per_token(t.num_hidden_layers, t.kv_dim, 4 if self.options.dtype == "float32" else 2)

    @property
    def _declaring(self) -> CacheLayout:
        """A one-token cache: enough for graphs built only to declare their parameters."""
        return CacheLayout.contiguous(1, self.spec.text.kv_dim, slots=1, max_seq=1)

    @functools.cached_property
    def cache(self) -> KVCache:
        """Allocated on first use (after the weights, so a GPU budget sees what they left)."""
        t = self.spec.text
        budget = self.cache_bytes or default_budget(self.backend, self.bytes_per_token, self.max_seq)
        pages = budget // (self.bytes_per_token * BLOCK_SIZE) + 1  # + the scratch page
        layout = CacheLayout(t.num_hidden_layers, t.kv_dim, pages, self.max_slots + 1, -(-self.max_seq // BLOCK_SIZE))
        cache = KVCache(self.backend, layout, [self.spec.names.layer(i) for i in range(t.num_hidden_layers)],
                        unused_page_limit(self.backend, self.bytes_per_token * BLOCK_SIZE))
        self.store.states.update(cache.states)
        return cache

    # ---- plans ------------------------------------------------------------------------
    def build_text_graph(self, g: Graph, rows: int, logit_rows: int, image_tokens: int, mode: str = "any",
                         layout: CacheLayout | None = None):
        return llama.build_text_step(g, self.spec.text, self.spec.names, rows, layout or self.cache.layout,
                                     logit_rows, image_tokens, mode)

    def _session(self, key: tuple, build, record: bool = False, batch_invariant: bool = False) -> Session:
        s = self._sessions.get(key)
        if s is None:
            g = Graph(batch_invariant)
            g.set_outputs([build(g)])
            s = self._sessions[key] = Session(g, self.options, self.store, capture=record, foldable=self._foldable)
        return s

    def _text_session(self, rows: int, logit_rows: int, image_tokens: int, mode: str, record: bool,
                      span_blocks: int | None = None) -> Session:
        """span_blocks: the plan sees only the block table's first columns (a recorded chunk
        prefill attends over every position they cover: fewer columns, less work)."""
        key = ("text", rows, logit_rows, image_tokens, mode, span_blocks)
        fresh = key not in self._sessions
        layout = self.cache.layout if span_blocks is None else replace(self.cache.layout, max_blocks=span_blocks)
        s = self._session(key, lambda g: self.build_text_graph(g, rows, logit_rows, image_tokens, mode, layout),
                          record, batch_invariant=mode == "decode")
        if fresh:  # every text plan reads the cache's one block table in place
            s.bind_input("block_table", self.cache.device_table[:, :layout.max_blocks])
        return s

    @functools.cached_property
    def _foldable(self) -> set[str]:
        """Parameters no plan of this model reads directly (only through prepared constants)."""
        graphs = []
        for build in (lambda g: self.build_text_graph(g, 1, 1, 1 if self.spec.vlm else 0, "decode", self._declaring),
                      *((lambda g, pad=pad: build_vision_graph(g, self.spec.vlm, 1, None, pad)) for pad in
                        ((False, True) if self.spec.vlm else ()))):
            g = Graph()
            g.set_outputs([build(g)])
            graphs.append(build_plan(optimize(g, self.options.optimize)[0]))
        direct = {i.name for plan in graphs for d in plan.dispatches for i in d.node.inputs if i.op == "parameter"}
        return {n for plan in graphs for n in plan.parameters} - direct

    # ---- row policy -------------------------------------------------------------------
    def prefill_rows(self, n: int) -> int:
        rows = -(-n // PREFILL_ROWS) * PREFILL_ROWS if self.records else prefill_rows(n)
        return min(rows, self.max_seq)

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens the scheduler prefills per step: large enough that the products stay
        efficient, small enough that decoding sequences keep moving between chunks."""
        return PREFILL_CHUNK["cuda" if self.records else "cpu"]

    def decode_rows(self, rows: int) -> int:
        if not self.records:
            return rows  # the products run in pairs (batch-invariant graphs): no padding rows
        size = 1
        while size < rows:
            size *= 2
        return size

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
            s = self._session(("vision", count, h, w, padded),
                              lambda g: build_vision_graph(g, vlm, count, (h, w), padded), self.records)
            mask = pixel_attention_mask[start:start + count] if padded else None
            for name, value in vision_inputs(vlm, pixel_values[start:start + count], mask).items():
                s.set_input(name, value)
            s.run()
            # a recording's output is overwritten by its next replay (and may share memory with
            # other recordings' scratch): features outlive this call, so they get their own copy
            parts.append(self.backend.copy(s.output()) if s.capture else s.output())
        return parts[0] if len(parts) == 1 else self.backend.concat(parts)

    def prefill(self, token_ids, slot: int, image_features=None, image_rows=None, all_logits: bool = False,
                start: int = 0):
        """A prompt, or a chunk of one, at positions start..start+n-1 of `slot` (whose pages must
        cover them; positions 0..start-1 must already hold the sequence: a cached prefix or
        earlier chunks) -> float32 logits of its last row [1, vocab], or of every row [n, vocab]
        with all_logits. image_rows index the rows of this call (0..n-1)."""
        token_ids = np.asarray(token_ids, dtype=np.int64)
        n = len(token_ids)
        if not (0 < n and 0 <= start and start + n <= self.cache.slot_tokens(slot)):
            at = f" from position {start}" if start else ""
            raise ValueError(f"prefill: {n} tokens{at}, but slot {slot} holds {self.cache.slot_tokens(slot)}")
        self._check_ids(token_ids, image_rows, n)
        rows = self.prefill_rows(n)
        logit_rows = np.arange(n) if all_logits else np.array([n - 1])
        m = 0 if image_features is None else int(image_features.shape[0])
        record = self.records and not all_logits
        span = None  # a recorded chunk attends over the positions before it, in spans of SPAN_TOKENS
        if start and record:
            span = min(-(-(start + n) // SPAN_TOKENS) * SPAN_TOKENS // BLOCK_SIZE, self.cache.layout.max_blocks)
        s = self._text_session(rows, len(logit_rows), rows if m else 0, "extend" if start else "prefill", record,
                               span)
        positions, slots = start + np.arange(rows), np.full(rows, slot)
        if start:  # padding rows write the scratch page: past the chunk may be another's (shared) page
            positions[n:], slots[n:] = start + n - 1, self.cache.dummy_slot
        self._feed(s, np.pad(token_ids, (0, rows - n)), positions, slots, logit_rows)
        if m:  # padded to one row per prompt row (fewer plan shapes): repeats write the same row again
            repeat = np.minimum(np.arange(rows), m - 1)
            s.set_input("image_features", image_features[repeat])
            s.set_input("image_rows", np.asarray(image_rows, dtype=np.uint32)[repeat])
        s.run()
        return s.output()

    def decode(self, token_ids, positions, slots):
        """One token for each row: token_ids[i] at positions[i] of slots[i] (each row its own
        slot) -> float32 logits [rows, vocab]. token_ids may be a backend array (tokens a
        previous step chose on the device: trusted to be in the vocabulary), read in place."""
        on_device = self.backend.owns(token_ids)
        positions, slots = (np.asarray(a, dtype=np.int64) for a in (positions, slots))
        rows = len(positions)
        if not on_device:
            token_ids = np.asarray(token_ids, dtype=np.int64)
            self._check_ids(token_ids, None, rows)
        live = slots[slots != self.cache.dummy_slot]  # idle lanes' rows all use the dummy slot
        if len(token_ids) != rows or len(slots) != rows or len(np.unique(live)) != len(live):
            raise ValueError(f"decode: {len(token_ids)} tokens, {rows} positions and {len(slots)} slots; "
                             "one row per slot")
        for pos, slot in zip(positions, slots):  # a position past a slot's pages would write another's
            limit = self.max_seq if slot == self.cache.dummy_slot else self.cache.slot_tokens(slot)
            if not 0 <= pos < limit:
                raise ValueError(f"decode: position {pos} is outside slot {slot}'s {limit} tokens")
        fused = self._fused_step()  # (on the CPU, tokens a sampler left on the backend are CPU tensors)
        if fused is not None:
            return fused(token_ids, positions, slots)
        size = self.decode_rows(rows)
        if size > rows:  # padding rows repeat the last row
            positions, slots = (np.pad(a, (0, size - rows), mode="edge") for a in (positions, slots))
            token_ids = (np.pad(token_ids, (0, size - rows), mode="edge") if not on_device
                         else self.backend.concat([token_ids] + [token_ids[-1:]] * (size - rows)))
        s = self._text_session(size, size, 0, "decode", self.records)
        self._feed(s, token_ids, positions, slots, np.arange(size))
        s.run()
        out = s.output()
        return out[:rows] if size > rows else out

    def _make_fused_step(self):
        if self.options.backend != "torch" or self.options.device != "cpu":
            return None
        from ..backends.cpu_fused import fused_step
        return fused_step(self)

    def _fused_step(self):
        """The compiled CPU decode step (backends/cpu_fused.py) for compact weights, made when
        the weights are loaded (again if they change); None where it does not apply."""
        if self._fused[0] != self.store.version:
            self._fused = (self.store.version, self._make_fused_step())
        return self._fused[1]

    def _check_ids(self, token_ids, image_rows, rows: int) -> None:
        """Out-of-range ids would read outside a GPU buffer: refuse them here."""
        for what, values, limit in (("token id", token_ids, self.spec.text.vocab_size),
                                    ("image row", np.asarray(image_rows if image_rows is not None else []), rows)):
            if len(values) and (values.min() < 0 or values.max() >= limit):
                bad = values[(values < 0) | (values >= limit)][0]
                raise ValueError(f"{what} {bad} is outside [0, {limit})")

    def _feed(self, s: Session, token_ids, positions, slots, logit_rows) -> None:
        """The four index inputs travel as one packed array: one host-to-device copy a step
        (device-side token ids are copied in on the device)."""
        rows = len(positions)
        on_device = not isinstance(token_ids, np.ndarray)
        tokens = np.zeros(rows) if on_device else token_ids
        host = np.concatenate([tokens, positions, slots, logit_rows]).astype(np.int64)
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


__all__ = ["ModelRunner", "ModelSpec", "prefill_rows"]
