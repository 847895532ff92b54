"""The KV cache: the only owner of cache memory.

Layout (the one place it is written down): keys and values live in fixed-size pages of
`block_size` tokens. One allocation holds every page as [blocks, layers, 2 (k, v), block_size,
kv_dim], so a page's keys and values for all layers are contiguous and a freed page can be
handed back to the OS in one piece. Each layer's graph state is a strided view
[blocks, block_size, kv_dim] of it. A sequence lives in a *slot*: a row of the block table
[slots, max_blocks] that lists its pages in order; token t of slot s is row t % block_size of
page table[s, t // block_size]. Page 0 is scratch: unused table entries point there, so rows
that write nothing real (a prefill's padding past its pages; the rows of idle lanes in a
padded decode step, which use the last slot, never handed out) land where nobody reads.

Memory is allocated once, from a byte budget, and never re-allocated: compiled plans and
recorded CUDA graphs keep pointing at it. Pages are handed out per sequence for its prompt
plus its answer limit when it starts (so a running sequence never runs out), and returned
when it ends. On the CPU the allocation is lazy (pages untouched by a write cost no RAM)
and returned pages are given back to the OS, so memory held follows tokens in use.

Prefix cache: a full page of a prompt can be kept after its sequence ends, under the key of
everything up to its end (`block_hashes`: a hash chain over token ids and, at image
positions, the hash of the pixels they came from). A sequence whose prompt starts with the
same keys gets those pages in its table, shared (reference-counted) and read-only: it writes
only past them. Unused cached pages count as free; they are reused, least recently used
first, only when no never-cached page is left, and pages in use are never taken.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import heapq
import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

BLOCK_SIZE = 16          # tokens per page
CPU_BUDGET = 2 * 2**30   # bytes of address space; RAM is taken only by pages in use
CPU_CACHED_BYTES = 256 * 2**20  # host RAM kept for prefixes no sequence holds (beyond it: given back)
GPU_FRACTION = 0.2       # of the device memory free after the weights


class CacheFull(ValueError):
    """A request needs more KV cache than this cache has in all; the message says the numbers."""


@dataclass(frozen=True)
class CacheLayout:
    """The shapes a model's graphs are compiled for."""

    layers: int
    kv_dim: int
    num_blocks: int          # pages, page 0 (scratch) included
    slots: int               # block-table rows: sequences that can hold pages at once
    max_blocks: int          # table columns: pages of the longest sequence (the model's context)
    block_size: int = BLOCK_SIZE

    @property
    def max_seq(self) -> int:
        return self.max_blocks * self.block_size

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_blocks, self.block_size, self.kv_dim)

    @classmethod
    def contiguous(cls, layers: int, kv_dim: int, slots: int, max_seq: int) -> "CacheLayout":
        """One page of max_seq tokens per slot (slot s owns page s + 1): the unpaged cache of a
        fixed batch, for hand-written generation loops (examples/smolvlm2.py)."""
        return cls(layers, kv_dim, num_blocks=slots + 1, slots=slots, max_blocks=1, block_size=max_seq)

    def contiguous_table(self) -> np.ndarray:
        """The block table of a `contiguous` layout."""
        return np.arange(1, self.slots + 1, dtype=np.int64)[:, None]

    @staticmethod
    def state_names(prefix: str) -> tuple[str, str]:
        """The graph state names of one layer's keys and values (prefix: the layer's parameter prefix)."""
        return prefix + "k_cache", prefix + "v_cache"


def cache_index(block_table, slots, positions, page_size: int):
    """(page, row in page) of each (slot, position): where the layout keeps that token. Works
    on numpy arrays and torch tensors alike, broadcasting slots against positions."""
    return block_table[slots, positions // page_size], positions % page_size


def block_hashes(token_ids, block_size: int, image_rows=None, image_keys=None) -> list[bytes]:
    """The prefix-cache key of each full block of a prompt: block b's key hashes block b-1's key,
    its token ids and, for each image position in it, `image_keys[i]` (the content hash of the
    pixels that image row came from; never a file name or URL). Equal keys mean equal prefixes."""
    ids = np.asarray(token_ids, dtype="<i8")
    rows = np.asarray(image_rows if image_rows is not None else [], dtype=np.int64)
    keys, key = [], b""
    for start in range(0, len(ids) - block_size + 1, block_size):
        h = hashlib.blake2b(key, digest_size=16)
        h.update(ids[start:start + block_size].tobytes())
        for i in range(*np.searchsorted(rows, [start, start + block_size])):
            h.update(image_keys[i])
        key = h.digest()
        keys.append(key)
    return keys


def bytes_per_token(layers: int, kv_dim: int, itemsize: int) -> int:
    return 2 * layers * kv_dim * itemsize


class KVCache:
    """Pages and block tables of one model's cache on one backend.

    `states` maps graph state names to the backend views the plans read and write; `table` is
    the host copy of the block table and `device_table` the backend array every plan reads."""

    def __init__(self, backend, layout: CacheLayout, state_prefixes: list[str],
                 max_unused_pages: int | None = None) -> None:
        """max_unused_pages: at most this many cached pages that no sequence holds are kept
        (least recently used given back first: on the host their RAM goes back to the OS);
        None: as many as the budget holds (device memory is allocated once anyway)."""
        if layout.num_blocks < 2:
            raise CacheFull("the KV-cache budget holds no page: give it more bytes")
        self.backend, self.layout = backend, layout
        shape = (layout.num_blocks, layout.layers, 2, layout.block_size, layout.kv_dim)
        self.storage = backend.cache_storage(shape)
        self.states = {}
        for i, prefix in enumerate(state_prefixes):
            k_name, v_name = CacheLayout.state_names(prefix)
            self.states[k_name], self.states[v_name] = self.storage[:, i, 0], self.storage[:, i, 1]
        self.table = np.zeros((layout.slots, layout.max_blocks), np.int64)
        self.device_table = backend.from_host(self.table, "u32")
        self._free_pages = list(range(1, layout.num_blocks))  # a heap: low pages first keeps memory compact
        self.dummy_slot = layout.slots - 1   # never handed out: its table row is all scratch
        self._free_slots = list(range(layout.slots - 1))
        self._pages: dict[int, list[int]] = {}   # slot -> its pages, in order
        self._refs: dict[int, int] = {}          # page -> slots that hold it (pages in use only)
        self._index: dict[bytes, int] = {}       # prefix key -> cached page (in use or not)
        self._key_of: dict[int, bytes] = {}      # cached page -> its key
        self._unused: OrderedDict[bytes, int] = OrderedDict()  # cached pages no slot holds, oldest use first
        self.max_unused_pages = max_unused_pages
        self.lookups = self.hits = self.hit_tokens = self.evictions = 0   # prefix-cache counters

    # ---- capacity -------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can hold (all pages but the scratch one, or the context)."""
        return min((self.layout.num_blocks - 1) * self.layout.block_size, self.layout.max_seq)

    @property
    def free_pages(self) -> int:
        """Pages no sequence holds (cached ones included: they are given up when needed)."""
        return len(self._free_pages) + len(self._unused)

    @property
    def cached_pages(self) -> int:
        """Pages that hold a prefix for reuse, in use or not."""
        return len(self._index)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.layout.block_size)

    def check_fits(self, tokens: int) -> None:
        """Raise CacheFull if a sequence of `tokens` could never fit, even in an empty cache."""
        if tokens > self.capacity_tokens:
            raise CacheFull(f"{tokens} tokens (prompt + answer limit) need {self.pages_for(tokens)} KV-cache pages "
                            f"of {self.layout.block_size} tokens; this cache holds {self.capacity_tokens} tokens "
                            f"({self.layout.num_blocks - 1} pages): ask for fewer tokens or a larger kv_cache_bytes")

    def can_take(self, tokens: int, prefix: list[bytes] = ()) -> bool:
        hit = self._matched(prefix)
        revived = sum(1 for page in hit if page not in self._refs)  # unused cached pages it would hold
        return bool(self._free_slots) and self.pages_for(tokens) - len(hit) <= self.free_pages - revived

    def _matched(self, prefix: list[bytes]) -> list[int]:
        """The cached pages of the longest run of leading keys in `prefix`."""
        pages = []
        for key in prefix:
            page = self._index.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    # ---- slots ----------------------------------------------------------------------------
    def take(self, tokens: int) -> int:
        """A slot with pages for `tokens` tokens (positions 0..tokens-1)."""
        return self._take(tokens, [])

    def take_prefix(self, tokens: int, prefix: list[bytes]) -> tuple[int, int]:
        """`take`, reusing cached pages: `prefix` lists the keys of leading full blocks (from
        `block_hashes`); the cached pages of the longest matching run lead the slot's table.
        Returns (slot, cached tokens): positions 0..cached tokens-1 already hold their keys and values."""
        hit = len(self._matched(prefix))
        slot = self._take(tokens, prefix[:hit])
        self.lookups += 1
        self.hits += bool(hit)
        self.hit_tokens += hit * self.layout.block_size
        return slot, hit * self.layout.block_size

    def _take(self, tokens: int, hit_keys: list[bytes]) -> int:
        self.check_fits(tokens)
        if not self.can_take(tokens, hit_keys):
            raise CacheFull(f"the KV cache has no room now for {tokens} tokens ({self.free_pages} free pages, "
                            f"{len(self._free_slots)} free slots): wait for running sequences to finish")
        hit = [self._index[key] for key in hit_keys]
        for page in hit:
            self._unused.pop(self._key_of[page], None)
            self._refs[page] = self._refs.get(page, 0) + 1
        slot = heapq.heappop(self._free_slots)
        pages = hit + [self._fresh_page() for _ in range(self.pages_for(tokens) - len(hit))]
        self._pages[slot] = pages
        self.table[slot, :len(pages)] = pages
        self.backend.write(self.device_table[slot], self.table[slot], "u32")
        return slot

    def _fresh_page(self) -> int:
        """A never-cached free page, or else the least recently used unused cached one."""
        if self._free_pages:
            page = heapq.heappop(self._free_pages)
        else:
            key, page = self._unused.popitem(last=False)
            del self._index[key], self._key_of[page]
            self.evictions += 1
        self._refs[page] = 1
        return page

    def remember(self, slot: int, prefix: list[bytes]) -> None:
        """Keep the slot's leading pages for reuse under `prefix` (their keys); their keys and values
        must be written. A key already cached elsewhere keeps its page."""
        for page, key in zip(self._pages[slot], prefix):
            if key not in self._index and page not in self._key_of:
                self._index[key], self._key_of[page] = page, key

    def release(self, slot: int) -> None:
        """Return a slot and its pages; its table row points at scratch again. A cached page no
        other slot holds stays cached, as the most recently used."""
        pages = self._pages.pop(slot)
        self.table[slot] = 0
        self.backend.write(self.device_table[slot], self.table[slot], "u32")
        heapq.heappush(self._free_slots, slot)
        forgotten = []
        for page in reversed(pages):  # a prefix's later blocks become older: evicted before the blocks they extend
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            del self._refs[page]
            if page in self._key_of:
                self._unused[self._key_of[page]] = page
            else:
                heapq.heappush(self._free_pages, page)
                forgotten.append(page)
        while self.max_unused_pages is not None and len(self._unused) > self.max_unused_pages:
            key, page = self._unused.popitem(last=False)
            del self._index[key], self._key_of[page]
            self.evictions += 1
            heapq.heappush(self._free_pages, page)
            forgotten.append(page)
        self.backend.forget_pages(self.storage, forgotten)

    def slot_tokens(self, slot: int) -> int:
        """How many positions a slot's pages cover."""
        return len(self._pages.get(slot, ())) * self.layout.block_size


def default_budget(backend, per_token: int, context: int) -> int:
    """Bytes for the cache when the user sets none: on a GPU a fraction of free memory, on
    the CPU address space that costs RAM only as it is used; never more than 64 sequences
    at the full context."""
    useful = 64 * context * per_token
    free = backend.free_memory()
    budget = CPU_BUDGET if free is None else int(free * GPU_FRACTION)
    return min(budget, useful)


def unused_page_limit(backend, page_bytes: int) -> int | None:
    """How many cached pages no sequence holds a cache keeps: in host memory (a budget of
    address space, RAM used only by pages written) CPU_CACHED_BYTES of them, so a server's
    RAM follows the tokens in use plus that; on a device, all the budget holds."""
    return CPU_CACHED_BYTES // page_bytes if backend.free_memory() is None else None


def release_pages(array_ptr: int, page_bytes: int, pages: list[int]) -> None:
    """Hand whole OS pages inside the given cache pages back to the OS (Linux madvise
    DONTNEED): they read as zeros when next touched. Elsewhere a no-op."""
    madvise = _linux_madvise()
    if madvise is None:
        return
    os_page = 4096
    for page in pages:
        start = array_ptr + page * page_bytes
        lo = -(-start // os_page) * os_page
        hi = (start + page_bytes) // os_page * os_page
        if hi > lo:
            madvise(lo, hi - lo, 4)  # MADV_DONTNEED


@functools.cache
def _linux_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn
