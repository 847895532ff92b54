"""The common shape of a loaded checkpoint, whatever file format it came from.

Every reader (Hugging Face safetensors folder, GGUF file) produces a `Checkpoint`: a Hugging Face
style config dict plus a name -> array mapping that uses the Hugging Face parameter names. The
rest of the engine only ever sees this, so it never needs to know which format was on disk.

Tensors are lazy: a reader records each tensor's shape and dtype up front and only reads (and, for
bf16 or quantized data, converts) it when it is looked up. That keeps loading instant, lets
`check_tensors` validate a whole checkpoint without touching the data, and avoids holding two
copies of the weights while a backend copies them into its own layout.
"""

from __future__ import annotations

import mmap

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # tokenizers is a hard dependency, but only needed here for the annotation
    import tokenizers


class WeightsError(ValueError):
    """A checkpoint could not be found, read, or does not match what the model expects."""


@dataclass
class Checkpoint:
    config: dict  # Hugging Face style config.json dict (synthesized for GGUF)
    tensors: Mapping[str, np.ndarray]  # checkpoint names verbatim -> arrays (lazy where possible)
    source: str  # path it came from, for error messages
    tokenizer: "tokenizers.Tokenizer | None" = None
    chat_template: str | None = None
    generation: dict = field(default_factory=dict)  # bos/eos/pad token ids etc.
    folder: Path | None = None  # HF folder, so processors can read preprocessor_config.json etc.

    @property
    def config_name(self) -> str:
        """Where the config came from, for error messages."""
        return str(self.folder / "config.json") if self.folder else f"{self.source} (GGUF metadata)"


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]
    stored: str | None = None  # the file's storage type where it is not `dtype` ("Q4_1", "Q8_0", ...)
    blocks: Callable[[], tuple] | None = None  # the raw quantized blocks, for backends that keep them


class LazyTensors(Mapping):
    """A read-only name -> array mapping whose arrays are produced on lookup.

    Nothing is cached: each lookup reads (and converts, where needed) the tensor again, so a
    caller that wants to keep an array should keep the returned object. Zero-copy formats
    (f32/f16 safetensors, f32 GGUF) return read-only memory-mapped views, which cost nothing to
    produce again. `describe(name)` gives shape and dtype without reading anything.
    """

    def __init__(self, source: str):
        self._entries: dict[str, _Entry] = {}
        self.source = source
        self.mappings: list[mmap.mmap] = []  # the memory-mapped files the arrays come from

    def drop_pages(self) -> None:
        """Give the mapped files' resident pages back (once the weights are loaded they only
        count in RSS); a later read faults them in again from the file or the page cache."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # Windows: no madvise
            return
        for mapping in self.mappings:
            mapping.madvise(mmap.MADV_DONTNEED)

    def add(self, name: str, shape: tuple[int, ...], dtype: Any, load: Callable[[], np.ndarray],
            stored: str | None = None, blocks: Callable[[], tuple] | None = None) -> None:
        if name in self._entries:
            raise WeightsError(f"{self.source}: tensor {name!r} appears twice")
        self._entries[name] = _Entry(tuple(int(d) for d in shape), np.dtype(dtype), load, stored, blocks)

    def describe(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        entry = self._entries[name]
        return entry.shape, entry.dtype

    def stored(self, name: str) -> str:
        """How the file stores the tensor: a GGUF type name ("Q4_1", "F16") or a numpy dtype name."""
        entry = self._entries[name]
        return entry.stored or entry.dtype.name

    def blocks(self, name: str) -> tuple | None:
        """(type name, uint8 blocks [rows, bytes], shape) of a quantized tensor, rows in the order
        the model expects; None where the file holds plain numbers."""
        entry = self._entries[name]
        return entry.blocks() if entry.blocks else None

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        array = entry.load()
        # A reader bug or a truncated file would otherwise surface much later as a shape error
        # deep inside a matmul; catch it at the boundary where the tensor name is still known.
        if array.shape != entry.shape or array.dtype != entry.dtype:
            raise WeightsError(
                f"{self.source}: tensor {name!r} decoded to {array.dtype}{list(array.shape)}, "
                f"expected {entry.dtype}{list(entry.shape)}"
            )
        # NaN or infinite weights give empty or garbage answers and no error: refuse them. One
        # vectorised pass: a float64 sum is finite exactly when every f16/f32 value is.
        if array.dtype.kind == "f" and not np.isfinite(array.sum(dtype=np.float64)):
            bad = array.size - int(np.count_nonzero(np.isfinite(array)))
            raise WeightsError(f"{self.source}: tensor {name!r} has {bad} NaN or infinite values (of {array.size})")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def materialize(self, *, progress: bool = False) -> dict[str, np.ndarray]:
        """Read every tensor now (e.g. to time loading separately from the first forward)."""
        names = list(self._entries)
        if progress:
            from tqdm.auto import tqdm

            # disable=None: on a terminal only; into a log a bar writes carriage returns
            names = tqdm(names, desc=f"reading {Path(self.source).name}", unit="tensor", disable=None)
        return {name: self[name] for name in names}

    def __repr__(self) -> str:
        return f"LazyTensors({len(self)} tensors from {self.source})"


def shape_and_dtype(tensors: Mapping[str, np.ndarray], name: str) -> tuple[tuple[int, ...], np.dtype]:
    # Our own lazy mappings can answer without decoding; any other mapping has to hand over arrays.
    describe = getattr(tensors, "describe", None)
    if callable(describe):
        return describe(name)
    array = tensors[name]
    return tuple(array.shape), np.dtype(array.dtype)


def _dtype_matches(expected: str | None, found: np.dtype) -> bool:
    # "float" (or None/"any") lets a model accept f32, f16 and bf16-converted checkpoints alike;
    # anything else must match exactly.
    if expected in (None, "", "any"):
        return True
    if expected == "float":
        return np.issubdtype(found, np.floating)
    return np.dtype(expected) == found


def check_tensors(
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    tensors: Mapping[str, np.ndarray],
    source: str,
) -> None:
    """Compare a checkpoint's tensors with what a model expects, and report every problem at once.

    `expected` maps names to `(shape, dtype)`; dtype is a numpy dtype name, or "float" for any
    floating type, or None for any type. Raises `WeightsError` listing missing names, unexpected
    names and tensors of the wrong shape/dtype together (up to 8 of each), so one run shows the
    whole mismatch instead of the first symptom.
    """
    missing = sorted(name for name in expected if name not in tensors)
    unexpected = sorted(name for name in tensors if name not in expected)
    wrong = []
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            continue
        found_shape, found_dtype = shape_and_dtype(tensors, name)
        if tuple(found_shape) != tuple(shape) or not _dtype_matches(dtype, found_dtype):
            want = f"{dtype or 'any'}{list(shape)}"
            wrong.append(f"{name}: expected {want}, found {found_dtype}{list(found_shape)}")
    if not (missing or unexpected or wrong):
        return
    groups = []  # one line, as every error the CLI prints; a long list is cut short
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape/dtype", wrong)):
        if items:
            more = f" and {len(items) - 8} more" if len(items) > 8 else ""
            groups.append(f"{title} ({len(items)}): {', '.join(items[:8])}{more}")
    raise WeightsError(f"checkpoint {source} does not match the model: {'; '.join(groups)}")


def load_checkpoint(path_or_id: str | Path, *, progress: bool = True) -> Checkpoint:
    """Load a checkpoint from a local HF folder, a local .gguf file, an alias or a Hub id.

    Only a Hub id touches the network (and only when its files are not cached already).
    """
    # Imported here because the readers import this module for Checkpoint/WeightsError.
    from .resolve import resolve_model

    path = resolve_model(path_or_id, progress=progress)
    if path.is_file():
        from .gguf_file import load_gguf

        return load_gguf(path)
    from .safetensors_folder import load_safetensors_folder

    return load_safetensors_folder(path)
