"""Read a Hugging Face model folder: config.json, safetensors weights, tokenizer, chat template.

The safetensors files are parsed here directly rather than through `safetensors.safe_open`:
its numpy framework cannot produce bf16 and copies every tensor, while the format is simple
enough (an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
and byte range, then the raw little-endian data) that a memory map gives zero-copy views of
f32/f16 tensors and lets bf16 be widened to f32 only when a tensor is looked up.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, LazyTensors, WeightsError

# safetensors dtype tag -> numpy dtype of the stored data (always little-endian on disk).
_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",  # no numpy bf16: read the raw 16-bit patterns, widen to f32 on access
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}

_HEADER_LIMIT = 100 * 1024 * 1024  # the format caps headers at 100 MB; more means a corrupt file


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an f32: shifting the pattern up 16 bits is an exact conversion.
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read {what}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: {what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise WeightsError(f"{path}: {what} is nested too deeply to be a real one") from None


def _map_file(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise WeightsError(f"{path}: too small to be a safetensors file ({size} bytes)")
            # The map outlives the file object; the OS keeps the mapping valid after close.
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot open: {exc}") from exc


def add_safetensors_file(path: Path, tensors: LazyTensors, only: set[str] | None = None) -> list[str]:
    """Register every tensor of one .safetensors file (or just the names in `only`) in `tensors`.

    Returns the names added. The header is validated fully here, so a truncated or corrupt file
    fails at load time naming the file, not later at first use.
    """
    buf = _map_file(path)
    tensors.mappings.append(buf)
    (header_len,) = struct.unpack("<Q", buf[:8])
    if header_len > min(_HEADER_LIMIT, len(buf) - 8):
        raise WeightsError(f"{path}: corrupt safetensors file (header length {header_len} is impossible)")
    try:
        header = json.loads(bytes(buf[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: corrupt safetensors file (header is not JSON: {exc})") from exc
    except RecursionError:
        raise WeightsError(f"{path}: corrupt safetensors file (header JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    data_len = len(buf) - data_start
    added = []
    for name, info in header.items():
        if name == "__metadata__" or (only is not None and name not in only):
            continue
        try:
            tag, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not isinstance(tag, str) or not all(type(v) is int and v >= 0 for v in (*shape, begin, end)):
                raise ValueError("dtype must be a string, shape and offsets non-negative integers")
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: corrupt safetensors header entry for {name!r}: {info!r:.200}") from exc
        if tag not in _DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has dtype {tag!r:.20}, which meganeura cannot read")
        stored = np.dtype(_DTYPES[tag])
        count = math.prod(shape)  # Python ints: a forged shape cannot overflow to a small count
        if not (begin <= end <= data_len) or end - begin != count * stored.itemsize:
            raise WeightsError(
                f"{path}: corrupt or truncated safetensors file: tensor {name!r} "
                f"({tag}{list(shape)}) claims bytes {begin}..{end} of {data_len}"
            )

        def load(buf=buf, offset=data_start + begin, count=count, stored=stored, shape=shape, tag=tag):
            if count == 0:  # frombuffer rejects an offset at the very end of the buffer
                raw = np.zeros(shape, dtype=stored)
            else:
                raw = np.frombuffer(buf, dtype=stored, count=count, offset=offset).reshape(shape)
            return _bf16_to_f32(raw) if tag == "BF16" else raw

        tensors.add(name, shape, np.float32 if tag == "BF16" else stored, load, stored=tag)
        added.append(name)
    return added


def _load_weights(folder: Path) -> LazyTensors:
    tensors = LazyTensors(str(folder))
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        add_safetensors_file(single, tensors)
        return tensors
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: has no 'weight_map' naming the shard of each tensor")
        by_shard: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, set()).add(name)
        for shard, names in sorted(by_shard.items()):
            shard_path = folder / shard
            if not shard_path.is_file():
                raise WeightsError(f"{index}: names shard {shard}, which is missing from {folder}")
            found = set(add_safetensors_file(shard_path, tensors, only=names))
            if found != names:
                lost = ", ".join(sorted(names - found)[:10])
                raise WeightsError(f"{shard_path}: index says it holds tensors it does not have: {lost}")
        return tensors
    present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise WeightsError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (folder holds: {present})"
    )


def _load_tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for bad files
        raise WeightsError(f"{path}: cannot load tokenizer: {exc}") from exc


def _pick_template(value: Any) -> str | None:
    # tokenizer_config.json may hold several named templates: [{"name": ..., "template": ...}].
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _load_chat_template(folder: Path) -> str | None:
    # Newest convention first: transformers 5 writes chat_template.jinja, processors (SmolVLM)
    # ship chat_template.json, older tokenizers keep it inside tokenizer_config.json.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            data = _read_json(path, name)
            template = _pick_template(data.get("chat_template")) if isinstance(data, dict) else None
            if template:
                return template
    return None


def _special_id(tokenizer, value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if tokenizer is None or not isinstance(value, str):
        return None
    return tokenizer.token_to_id(value)


def _load_generation(folder: Path, config: dict, tokenizer) -> dict:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    generation: dict = {}
    # Multimodal configs (SmolVLM) often keep the ids in text_config; the top level wins.
    text_config = config.get("text_config")
    for source in (text_config if isinstance(text_config, dict) else {}, config):
        for key in keys:
            if source.get(key) is not None:
                generation[key] = source[key]
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        data = _read_json(gen_path, "generation config")
        if isinstance(data, dict):
            generation.update(
                (k, v) for k, v in data.items() if k not in ("transformers_version", "_from_model_config")
            )
    # Last resort: the special-token strings of tokenizer_config.json, looked up in the vocab.
    tok_config_path = folder / "tokenizer_config.json"
    if tokenizer is not None and tok_config_path.is_file():
        tok_config = _read_json(tok_config_path, "tokenizer config")
        if isinstance(tok_config, dict):
            for key in keys:
                token_id = _special_id(tokenizer, tok_config.get(key[: -len("_id")]))
                if generation.get(key) is None and token_id is not None:
                    generation[key] = token_id
    for key in ("bos_token_id", "eos_token_id"):
        value = generation.get(key)
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                         for i in (value if isinstance(value, list) else [value])):
            raise WeightsError(f"{folder}: {key} (config.json or generation_config.json) must be a token id or a "
                               f"list of them, got {value!r:.60}")
    return generation


def load_safetensors_folder(folder: str | Path) -> Checkpoint:
    """A `Checkpoint` for a Hugging Face model folder (config.json + safetensors)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no config.json, so it is not a Hugging Face model folder")
    config = _read_json(config_path, "config.json")
    if not isinstance(config, dict):
        raise WeightsError(f"{config_path}: config.json must hold a JSON object, found {type(config).__name__}")
    tensors = _load_weights(folder)
    tokenizer = _load_tokenizer(folder)
    return Checkpoint(
        config=config,
        tensors=tensors,
        source=str(folder),
        tokenizer=tokenizer,
        chat_template=_load_chat_template(folder),
        generation=_load_generation(folder, config, tokenizer),
        folder=folder,
    )
