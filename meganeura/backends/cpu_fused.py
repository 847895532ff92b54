"""The fused CPU decode step: a whole decode step through every layer in compiled C (cpu_fused.c).

A layered one-row decode step with 4-bit weights is ~1,500 torch calls, each paying Python,
dispatch and an OpenMP region's start, and torch's int4 kernel alone took longer than llama.cpp's
whole token on an AVX2 CPU (docs/perf.md). Here the step is one call into C: its own products
over the weights' 4-bit and 8-bit codes or 16-bit floats, and RMSNorm, RoPE, the paged cache
write, attention and SwiGLU in loops between them, the threads meeting at 5 barriers a layer
(docs/design.md, "The fused CPU decode step"). Prefills multiply by the weights it reads in place,
through its C products (`CompactWeight.shared_product`), so torch never packs a second copy.

The C source is compiled once per machine with the system's C compiler (`cc -O3
-march=native -fopenmp`, ~1 s) into the user's cache directory; a later start only loads it.
Without a compiler, when compiling fails, or with MEGANEURA_CPU_FUSED=0, `fused_step` gives
None and the layered path runs. It applies to decode steps (any row count) of a Llama-style text
decoder on the CPU in float32 whose product weights are all int4, int8, bf16 or f16
(`cpu_weights.py`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cpu_weights import Bf16Weight, F16Weight, Int4Weight, Int8Weight, concat_rows
from .torch_backend import rope_tables

SOURCE = Path(__file__).with_name("cpu_fused.c")
FORMS = ("int4", "int8", "bf16", "f16")  # the weight forms the step reads
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared"]


class _Matrix(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("bits", ctypes.c_int64), ("f16", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [(n, _Matrix) for n in ("qkv", "o", "gate_up", "down")] + [
        (n, ctypes.c_void_p) for n in ("attn_norm", "mlp_norm", "k_cache", "v_cache")]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter",
                                             "page_size", "page_stride")] + [
        ("eps", ctypes.c_float), ("layer", ctypes.POINTER(_Layer)),
        ("head", _Matrix), ("final_norm", ctypes.c_void_p)]


def enabled() -> bool:
    return os.environ.get("MEGANEURA_CPU_FUSED", "1") != "0"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # RuntimeError: no home
    return Path(base) / "meganeura" / "cpu_fused"


def _machine() -> str:
    """What -march=native compiles for: the CPU's model and features (x86 and Arm names)."""
    fields = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    return "\n".join([platform.machine(), platform.processor(),
                      *sorted({line for line in info.splitlines() if line.startswith(fields)})])


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled step, built on first use and cached per source, compiler and CPU; None
    (with a warning) where it cannot be built. `import torch` has loaded torch's OpenMP
    runtime (libgomp.so.1) already, so the library's OpenMP threads are torch's."""
    if platform.system() != "Linux":
        return None
    try:
        lib = ctypes.CDLL(str(_built()))
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-300:]
        warnings.warn(f"the fused CPU decode step could not be built or loaded ({e}; {detail}): decoding takes "
                      "the layered path", RuntimeWarning, stacklevel=2)
        return None
    model, i64, ptr = ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_void_p
    lib.mg_decode.restype = None
    lib.mg_decode.argtypes = [model, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.mg_shared_floats.restype = lib.mg_work_floats.restype = lib.mg_product_floats.restype = i64
    lib.mg_shared_floats.argtypes = [model, i64]
    lib.mg_work_floats.argtypes = [model, i64, i64]
    lib.mg_product.restype = None
    lib.mg_product.argtypes = [ctypes.POINTER(_Matrix), i64, ptr, ptr, ctypes.c_int, ptr, ctypes.c_int]
    lib.mg_product_floats.argtypes = [ctypes.POINTER(_Matrix), i64]
    return lib


def _built() -> Path:
    """The compiled library's path, built first if the cache lacks it or holds a damaged copy:
    each build is written beside its SHA-256, and a file that does not match it (truncated,
    overwritten) is built again rather than loaded (loading a truncated library can crash)."""
    cc = shlex.split(os.environ.get("CC", "cc"))  # "ccache gcc", "gcc -std=gnu11"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(cc + FLAGS).encode(), _machine().encode()]))
    path = _cache_dir() / f"cpu_fused-{key.hexdigest()[:16]}.so"
    digest = path.with_suffix(".sha256")
    if path.exists() and digest.exists() and digest.read_text() == hashlib.sha256(path.read_bytes()).hexdigest():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # renamed in place: atomic for other processes
        out = Path(tmp) / path.name
        subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], check=True, capture_output=True,
                       timeout=120)
        (Path(tmp) / digest.name).write_text(hashlib.sha256(out.read_bytes()).hexdigest())
        out.replace(path)
        (Path(tmp) / digest.name).replace(digest)
    return path


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """Per-group numbers [n, groups] in bf16, laid out [n / 64, groups, 64] (n padded to 64):
    a block of 64 rows' numbers for one group are 8 rows a vector."""
    t = F.pad(t, (0, 0, 0, -len(t) % 64)).to(torch.bfloat16)
    return t.reshape(-1, 64, t.shape[1]).transpose(1, 2).contiguous()


def _matrix(w, keep: list) -> _Matrix | None:
    """A weight in the C step's form, or None for forms it does not read: the codes or 16-bit
    values themselves (shared), integer forms' scales and zeros rounded to bf16 as torch's int4
    kernel takes them. The tensors made are appended to `keep` (C holds only their addresses)."""
    if isinstance(w, (Bf16Weight, F16Weight)) and w.values is not None:
        keep.append(w.values)
        return _Matrix(w.values.data_ptr(), None, None, w.shape[0], w.shape[1], 16, int(isinstance(w, F16Weight)))
    codes = w.codes if isinstance(w, Int4Weight) else w.values if isinstance(w, Int8Weight) else None
    if codes is None or not codes.is_contiguous():
        return None
    scale, zero = _blocks(w.scales), None
    if isinstance(w, Int4Weight):  # (q - 8) * bf16(d) + bf16(m + 8d), as torch's int4 kernel
        zero = _blocks(w.mins + 8 * w.scales)
    keep += [codes, scale, zero]
    return _Matrix(codes.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(), w.shape[0],
                   w.shape[1], 4 if zero is not None else 8, 0)


class _Product:
    """x -> float32 x @ w.T through the compiled product: a weight's `shared_product` once the
    step reads it. Each row's result is the same whatever the row count (a prompt cut into
    chunks, or a cached prefix's remainder, gives the bits of the whole prompt's prefill)."""

    def __init__(self, lib, matrix: _Matrix, keep: list) -> None:
        self.lib, self.matrix, self.keep = lib, matrix, keep  # keep: the tensors matrix points into

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device="cpu", dtype=torch.float32).contiguous()
        rows, m = len(x), ctypes.byref(self.matrix)
        # scratch made per call: kept per weight, a long prompt's would stay (~40 MB a layer at 2k rows)
        work = _floats(self.lib.mg_product_floats(m, rows))
        out = _floats(rows, self.matrix.n)
        self.lib.mg_product(m, rows, x.data_ptr(), out.data_ptr(), 0, work.data_ptr(), torch.get_num_threads())
        return out


ROLES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


class FusedStep:
    """step(token_ids, positions, slots) -> float32 logits [rows, vocab]: one decode step, each
    row a sequence (its own slot), through the runner's weights and KV cache. Made from the
    store's weights while they hold their codes (`fused_step`); binds the KV cache (allocated
    after the weights) at its first step."""

    def __init__(self, lib, runner, weights) -> None:
        cfg, names, store = runner.spec.text, runner.spec.names, runner.store
        self.lib, self.runner, self.store, self.cfg = lib, runner, store, cfg
        names_of_norms = [names.layer(i) + n for i in range(cfg.num_hidden_layers)
                          for n in ("input_layernorm.weight", "post_attention_layernorm.weight")]
        norm = {n: store.parameter(n).float().contiguous() for n in names_of_norms + [names.model + "norm.weight"]}
        self._keep: list = list(norm.values())
        self.layers = (_Layer * cfg.num_hidden_layers)()
        bound = []
        for i in range(cfg.num_hidden_layers):
            p = names.layer(i)
            merged = {role: concat_rows([weights(p + part + ".weight") for part in parts]) if len(parts) > 1
                      else weights(p + parts[0] + ".weight") for role, parts in ROLES.items()}
            mats = {role: _matrix(w, self._keep) for role, w in merged.items()}
            if None in mats.values():
                raise ValueError("a product weight is not in a form the fused step reads")
            bound += [(merged[role], mats[role]) for role in ROLES]
            self.layers[i] = _Layer(**mats, attn_norm=norm[p + "input_layernorm.weight"].data_ptr(),
                                    mlp_norm=norm[p + "post_attention_layernorm.weight"].data_ptr())
        head_weight = weights(runner._product_weights[1])
        head = _matrix(head_weight, self._keep)
        if head is None:
            raise ValueError("the lm_head is not in a form the fused step reads")
        for w, matrix in bound + [(head_weight, head)]:  # never packed: the step reads their numbers
            w.shared_product = _Product(lib, matrix, self._keep)
        self.model = _Model(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                            cfg.head_dim, cfg.intermediate_size, 0, 0, cfg.rms_norm_eps, self.layers, head,
                            norm[names.model + "norm.weight"].data_ptr())
        self.embedding = names.model + "embed_tokens.weight"
        self._shared = self._work = _floats(0)  # scratch, grown to the widest step seen
        self.cache = None

    def _bind(self) -> None:
        cache, names = self.runner.cache, self.runner.spec.names
        for i in range(self.cfg.num_hidden_layers):
            k_cache, v_cache = (self.store.states[n] for n in cache.layout.state_names(names.layer(i)))
            if k_cache.stride()[1:] != (self.cfg.kv_dim, 1) or v_cache.stride() != k_cache.stride():
                raise ValueError("the KV cache's pages are not laid out as the fused step reads them")
            self.layers[i].k_cache, self.layers[i].v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        self.model.page_size, self.model.page_stride = cache.layout.block_size, k_cache.stride(0)
        # every position's RoPE cos and sin halves [max_seq, head_dim], as the layered path makes them
        d, positions = self.cfg.head_dim, torch.arange(cache.layout.max_seq, device="cpu")
        cos, sin = rope_tables(positions, d, self.cfg.rope_theta, torch.float32)
        self.rope = torch.cat([cos[:, 0, : d // 2], sin[:, 0, : d // 2]], dim=1)
        self.cache = cache

    def __call__(self, token_ids, positions, slots) -> torch.Tensor:
        if self.cache is None:
            self._bind()
        rows, threads = len(positions), torch.get_num_threads()
        # C reads them as packed int64: a strided or reversed view of the caller's becomes a copy
        pos, slot = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (positions, slots))
        model = ctypes.byref(self.model)
        shared = self.lib.mg_shared_floats(model, rows)
        work = threads * self.lib.mg_work_floats(model, rows, self.cache.layout.max_seq)
        if self._shared.numel() < shared:
            self._shared = _floats(shared)
        if self._work.numel() < work:
            self._work = _floats(work)
        x = self.store.parameter(self.embedding)[torch.as_tensor(token_ids, dtype=torch.int64, device="cpu")]
        x = x.float().contiguous()
        table = self.cache.device_table
        logits = _floats(rows, self.model.head.n)
        self.lib.mg_decode(model, rows, x.data_ptr(), pos.data_ptr(), slot.data_ptr(), table.data_ptr(),
                           table.stride(0), self.rope.data_ptr(), logits.data_ptr(), self._shared.data_ptr(),
                           self._work.data_ptr(), threads)
        return logits


def _floats(*shape: int) -> torch.Tensor:
    """What C writes: float32 in host memory, whatever torch's default dtype and device."""
    return torch.empty(shape, dtype=torch.float32, device="cpu")


def fused_step(runner) -> FusedStep | None:
    """The runner's fused decode step, or None where it does not apply: not the torch CPU
    backend in float32, a product weight (the lm_head included) not int4, int8, bf16 or f16, or no
    compiled library. Cheapest right after loading, while the store's weights hold their codes
    (the step shares them); later, weights already packed for torch are read again from their
    sources."""
    o, store = runner.options, runner.store
    if not (enabled() and o.backend == "torch" and o.device == "cpu" and o.dtype == "float32"):
        return None
    product_weights, _ = runner._product_weights
    if not product_weights or any(store.forms.get(n) not in FORMS for n in product_weights):
        return None
    lib = library()
    if lib is None:
        return None

    def weight(name: str):
        """The store's weight (made again if released or packed for torch), which the graphs
        read too: both merge the same parts, so they share the merged weight."""
        w = store.parameters.get(name)
        if w is None or getattr(w, "codes", getattr(w, "values", None)) is None:
            store.release([name])
            w = store.parameter(name)
        return w

    try:
        return FusedStep(lib, runner, weight)
    except (ValueError, TypeError):  # a form the step does not read; parts of a merge in two forms
        return None
