"""Read a llama-architecture GGUF file (llama.cpp's format) as a Hugging Face style checkpoint.

Three things differ from a Hugging Face folder and are undone here:

* names: llama.cpp renames every tensor (`blk.3.attn_q.weight`); we map them back to the names
  transformers' LlamaForCausalLM uses, so the models code has a single naming scheme.
* data: tensors may be quantized (Q4_1, Q8_0, ...) and are dequantized to float32 on lookup.
* layout: llama.cpp's converter permutes the rows of the q and k projections (see
  `unpermute_rope_rows`), because its RoPE rotates adjacent pairs where transformers rotates
  the two halves of each head.

GGUF also has no config.json or tokenizer.json: both are rebuilt from the metadata.
"""

from __future__ import annotations

import mmap
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint, LazyTensors, WeightsError

# llama.cpp per-layer tensor names -> transformers' names (inside model.layers.{i}.)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp derives from the config (precomputed RoPE frequency factors); not weights.
_DERIVED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def hf_tensor_name(gguf_name: str) -> str | None:
    """The transformers name for a llama.cpp tensor name, or None if it has no counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    return None


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, giving the row order transformers expects.

    Transformers' RoPE (rotate_half) pairs dimension j of a head with dimension j + head_dim/2.
    llama.cpp's RoPE pairs dimensions 2j and 2j+1, so its converter reorders each head's rows
    from [x_0..x_{d/2-1}, y_0..y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...]. Reading the stored rows
    as (head, j, pair) and swapping the last two axes restores [x..., y...].

    `n_heads` is the number of heads *this* projection has: num_attention_heads for q and
    num_key_value_heads for k (the converter permutes k per kv head). Works for biases too.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise WeightsError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The forward transform llama.cpp's converter applies (inverse of `unpermute_rope_rows`).

    Exposed for tests and for writing GGUF files.
    """
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------------------------
# metadata


def _config_from_metadata(meta: dict[str, Any], tensor_names: set[str], source: str) -> dict:
    arch = meta.get("general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise WeightsError(f"{source}: GGUF metadata lacks {arch}.{key}, needed to build the config")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    # key_length is the explicit head size; older files only give the rotary dimension count,
    # which equals head_dim for llama (transformers reads it that way too). Without either, the
    # config derives it from the sizes, which it checks.
    head_dim = get("attention.key_length") or get("rope.dimension_count")
    vocab = get("vocab_size")
    if vocab is None:
        vocab = len(meta.get("tokenizer.ggml.tokens") or []) or None
    rope_theta = float(get("rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        # both spellings: transformers 4 configs use rope_theta, transformers 5 rope_parameters
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(get("context_length", 2048)),
        # llama.cpp writes no output.weight when the head shares the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
    }
    if vocab is not None:
        config["vocab_size"] = int(vocab)
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key.replace("padding_", "pad_")] = int(value)
    if get("rope.scaling.type") not in (None, "none"):
        warnings.warn(f"{source}: RoPE scaling metadata is not translated into the config", stacklevel=3)
    return config


def _generation_from_metadata(meta: dict[str, Any]) -> dict:
    renames = {"unknown": "unk", "padding": "pad", "seperator": "sep", "separator": "sep"}
    generation: dict = {}
    for key, value in meta.items():
        match = re.fullmatch(r"tokenizer\.ggml\.(\w+)_token_id", key)
        if match and value is not None:
            generation[f"{renames.get(match.group(1), match.group(1))}_token_id"] = int(value)
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in meta:
            generation[flag] = bool(meta[f"tokenizer.ggml.{flag}"])
    return generation


# --------------------------------------------------------------------------------------------
# tokenizer


def byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters, used by byte-level BPE vocabularies.

    Bytes that are visible Latin-1 characters stand for themselves; the other 68 (control
    characters, space, DEL, NBSP, soft hyphen, ...) are moved, in byte order, to U+0100 onwards,
    which is why a space shows up as 'Ġ' (U+0120) and a newline as 'Ċ' in such vocabularies.
    """
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in visible}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(0x100 + i) for i, b in enumerate(moved)})
    return table


# Pre-tokenizer split patterns for `tokenizer.ggml.pre` values whose merges were learned on a
# different split than GPT-2's. Llama 3's pattern (tiktoken cl100k style).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT}


def build_gguf_tokenizer(meta: dict[str, Any], source: str = "<gguf>", *, split_digits: bool = False):
    """A `tokenizers.Tokenizer` for a GGUF whose tokenizer.ggml.model is "gpt2" (byte-level BPE).

    By default it reproduces what transformers builds from the same file (GPT-2's ByteLevel
    pre-tokenizer for "smollm", "gpt2" and unknown `tokenizer.ggml.pre` values), so token ids
    match transformers exactly. `split_digits=True` instead isolates every digit before the
    GPT-2 split, as llama.cpp's "smollm" pre-tokenizer and SmolLM2's own tokenizer.json do; the
    two only disagree on runs of whitespace directly before a digit (see tests).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise WeightsError(f"{source}: tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [])
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise WeightsError(f"{source}: byte-level BPE tokenizer without tokenizer.ggml.merges")

    alphabet = byte_alphabet()
    spelled = set(alphabet.values())

    def in_alphabet(token: str) -> bool:
        return set(token) <= spelled

    # A vocabulary entry must be written in the byte alphabet for BPE to ever produce it. A few
    # GGUF files store some entries as raw text instead; re-spell those byte by byte.
    vocab = {}
    for index, token in enumerate(tokens):
        key = token if in_alphabet(token) else "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(key, index)
    merges = []
    for merge in merges_raw:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise WeightsError(f"{source}: malformed merge {merge!r}")
        merges.append((left, right))

    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
        )
    )
    pre = meta.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_SPLITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>, ...) must match whole in raw text and be
    # skippable on decode: add them as special tokens. One spelled outside the byte alphabet is
    # not a real vocabulary entry of a byte-level model (it was re-spelled above), and adding it
    # would append a new id past the embedding matrix, so it is left out.
    specials = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind_ in zip(tokens, types)
        if kind_ == _CONTROL and in_alphabet(tok)
    ]
    if specials:
        tokenizer.add_special_tokens(specials)
    # User-defined tokens also match whole (llama.cpp does so) but are ordinary text on decode.
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, kind_ in zip(tokens, types)
        if kind_ == _USER_DEFINED and tok in vocab
    ]
    if user:
        tokenizer.add_tokens(user)

    # BOS/EOS insertion, only where the file asks for it (SmolLM2 asks for neither).
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    bos = [tokens[bos_id]] if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None else []
    eos = [tokens[eos_id]] if meta.get("tokenizer.ggml.add_eos_token") and eos_id is not None else []
    if bos or eos:
        used = {tokens[i]: int(i) for i, on in ((bos_id, bos), (eos_id, eos)) if on}
        tokenizer.post_processor = processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
            special_tokens=list(used.items()),
        )
    return tokenizer


# --------------------------------------------------------------------------------------------
# tensors

# Float and integer storage types that need no dequantization: numpy dtype, and whether the
# values should be widened to float32 (as every float tensor we hand out is).
_PLAIN = {"F32": (np.float32, False), "F16": (np.float16, True), "F64": (np.float64, True),
          "I8": (np.int8, False), "I16": (np.int16, False), "I32": (np.int32, False), "I64": (np.int64, False)}


def _check_dequantizable(qtype, name: str, source: str) -> None:
    # Probe the dequantizer on one all-zero block, so an unsupported type fails at load time.
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError as exc:
        raise WeightsError(
            f"{source}: tensor {name!r} is stored as {qtype.name}, which the installed gguf package "
            f"cannot dequantize"
        ) from exc


def _tensor_loader(tensor, shape: tuple[int, ...], n_heads: int | None):
    from gguf.quants import dequantize

    qname = tensor.kind.name

    def load() -> np.ndarray:
        if qname in _PLAIN:
            dtype, widen = _PLAIN[qname]
            array = tensor.data.view(dtype).reshape(shape)
            if widen:
                array = array.astype(np.float32)
        else:
            array = dequantize(tensor.data, tensor.kind).reshape(shape)
            array = array.astype(np.float32, copy=False)
        if n_heads is not None:
            array = unpermute_rope_rows(array, n_heads)
        return array

    return load


def _blocks_loader(tensor, shape: tuple[int, ...], n_heads: int | None):
    """The tensor's quantized blocks (or float16 values), one row of them per weight row
    (permuted back like the values), for a backend that keeps weights compact."""
    def blocks() -> tuple:
        rows = tensor.data.reshape(shape[0], -1)
        if n_heads is not None:
            rows = unpermute_rope_rows(rows, n_heads)
        return tensor.kind.name, rows, shape
    return blocks


# GGUF value types (the format's numbering) -> numpy dtypes (little-endian); 8 and 9 are
# strings and arrays
_VALUE_DTYPES = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
                 12: "<f8"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # ggml's limit
_U64 = struct.Struct("<Q")


@dataclass
class GGUFTensor:
    name: str
    kind: Any          # gguf.GGMLQuantizationType
    shape: tuple       # numpy order (GGUF lists the fastest-varying dimension first)
    data: np.ndarray   # the stored bytes (uint8), a view of the file


class _Header:
    """A walk over a GGUF header: metadata and tensor infos. gguf.GGUFReader takes ~2 s over
    SmolLM2's 147k tokenizer strings (a numpy view per string); this reads each with one
    struct call and one slice. Malformed input raises ValueError (counts that run past the end
    of the file included, so a forged count cannot loop for ever)."""

    def __init__(self, buffer) -> None:
        self.buf, self.pos = memoryview(buffer), 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def count(self, item_bytes: int) -> int:
        n = self.take("<Q")
        if n * item_bytes > len(self.buf) - self.pos:
            raise ValueError(f"a count of {n} at byte {self.pos - 8} runs past the end of the file")
        return n

    def string(self) -> str:
        n = self.count(1)
        self.pos += n
        return str(self.buf[self.pos - n:self.pos], "utf-8")

    def strings(self, n: int) -> list[str]:
        """n strings in a row (a vocabulary: the loop is the hot part of reading a header)."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length_at = _U64.unpack_from
        for _ in range(n):
            (length,) = length_at(buf, pos)
            pos += 8
            if length > end - pos:
                raise ValueError(f"a string of {length} bytes at byte {pos - 8} runs past the end of the file")
            out.append(str(buf[pos:pos + length], "utf-8"))
            pos += length
        self.pos = pos
        return out

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item = self.take("<I")
            if item == _STRING:
                return self.strings(self.count(8))
            if item not in _VALUE_DTYPES:  # (arrays of arrays: no llama file has them)
                raise ValueError(f"unsupported array item type {item}")
            dtype = np.dtype(_VALUE_DTYPES[item])
            n = self.count(dtype.itemsize)
            self.pos += n * dtype.itemsize
            return np.frombuffer(self.buf, dtype, n, self.pos - n * dtype.itemsize).tolist()
        if kind not in _VALUE_DTYPES:
            raise ValueError(f"unknown value type {kind}")
        dtype = np.dtype(_VALUE_DTYPES[kind])
        self.pos += dtype.itemsize
        return np.frombuffer(self.buf, dtype, 1, self.pos - dtype.itemsize)[0].item()


def read_gguf(path: Path, mappings: list | None = None) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """The metadata and the tensors (views of the memory-mapped file) of a GGUF file; the
    mapping is appended to `mappings` (LazyTensors.drop_pages gives its pages back)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        if not f.seek(0, 2):
            raise ValueError("no GGUF magic: the file is empty")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the file object
    if mappings is not None:
        mappings.append(mapping)
    data = np.frombuffer(mapping, np.uint8)  # a plain read-only array over the mapping: cheap slices
    header = _Header(data)
    if bytes(header.buf[:4]) != b"GGUF":
        raise ValueError("no GGUF magic")
    header.pos = 4
    version = header.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (big-endian files read as a huge number) is not supported")
    tensor_count, kv_count = header.count(24), header.count(13)  # the least bytes a tensor info, a key/value takes
    meta: dict[str, Any] = {}
    for _ in range(kv_count):
        key = header.string()
        meta[key] = header.value(header.take("<I"))
    infos = []
    for _ in range(tensor_count):
        name = header.string()
        n_dims = header.take("<I")
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [header.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, GGMLQuantizationType(header.take("<I")), header.take("<Q")))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    start = -(-header.pos // alignment) * alignment
    tensors, end = [], start
    for name, dims, kind, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        count = int(np.prod(dims, dtype=object))  # Python ints: forged sizes cannot wrap
        if count % block:
            raise ValueError(f"tensor {name!r} has {count} values, not whole blocks of {block}")
        first = start + offset
        end = max(end, first + count // block * size)
        tensors.append(GGUFTensor(name, kind, tuple(reversed(dims)), data[first:first + count // block * size]))
    if end > len(data):
        raise WeightsError(f"{path}: truncated: expected {end - start} bytes of tensor data, "
                           f"the file has {max(0, len(data) - start)}")
    return meta, tensors


def load_gguf(path: str | Path) -> Checkpoint:
    """A `Checkpoint` for a llama-architecture GGUF file; tensors dequantize to float32 on lookup."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    mappings: list = []
    try:
        meta, gguf_tensors = read_gguf(path, mappings)
    except WeightsError:
        raise
    except Exception as exc:  # ValueError/struct.error/UnicodeDecodeError on bad files
        raise WeightsError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise WeightsError(
            f"{path}: GGUF architecture is {arch!r}; meganeura reads only 'llama' GGUF files "
            f"(SmolLM2 and other Llama-style decoders)"
        )
    names = {t.name for t in gguf_tensors}
    try:
        config = _config_from_metadata(meta, names, source)
    except (TypeError, ValueError) as exc:  # a size that is not a number
        raise WeightsError(f"{path}: bad GGUF metadata: {exc}") from None

    tensors = LazyTensors(source)
    tensors.mappings += mappings
    probed = set()
    for tensor in gguf_tensors:
        if tensor.name in _DERIVED:
            continue
        hf_name = hf_tensor_name(tensor.name)
        if hf_name is None:
            # Keep it under its GGUF name: check_tensors will then list it as unexpected.
            hf_name = tensor.name
        qname = tensor.kind.name
        if qname not in _PLAIN and tensor.kind not in probed:
            _check_dequantizable(tensor.kind, tensor.name, source)
            probed.add(tensor.kind)
        shape = tensor.shape
        n_heads = None
        if ".attn_q." in tensor.name:
            n_heads = config["num_attention_heads"]
        elif ".attn_k." in tensor.name:
            n_heads = config["num_key_value_heads"]
        dtype = _PLAIN[qname][0] if qname in _PLAIN and not _PLAIN[qname][1] else np.float32
        # raw rows for compact forms: quantized blocks, and float16 values (kept 16-bit)
        raw = qname not in _PLAIN or qname == "F16"
        blocks = _blocks_loader(tensor, shape, n_heads) if raw and len(shape) == 2 else None
        tensors.add(hf_name, shape, dtype, _tensor_loader(tensor, shape, n_heads), stored=qname, blocks=blocks)

    tokenizer = None
    if meta.get("tokenizer.ggml.model") == "gpt2" and "tokenizer.ggml.tokens" in meta:
        tokenizer = build_gguf_tokenizer(meta, source)
    elif "tokenizer.ggml.tokens" in meta:
        # The weights are still usable (e.g. with an external tokenizer); say why there is none.
        warnings.warn(
            f"{path}: tokenizer type {meta.get('tokenizer.ggml.model')!r} is not supported "
            f"(only byte-level BPE); Checkpoint.tokenizer is None",
            stacklevel=2,
        )
    return Checkpoint(
        config=config,
        tensors=tensors,
        source=source,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        generation=_generation_from_metadata(meta),
        folder=None,
    )
