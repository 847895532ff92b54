"""Checkpoint loading: Hugging Face safetensors folders, GGUF files, aliases and Hub ids.

    ckpt = load_checkpoint("smollm2-135m-instruct")   # or a folder, a .gguf, "owner/name"
    check_tensors(expected_shapes, ckpt.tensors, ckpt.source)
"""

from .checkpoint import Checkpoint, LazyTensors, WeightsError, check_tensors, load_checkpoint, shape_and_dtype
from .gguf_file import build_gguf_tokenizer, hf_tensor_name, load_gguf, permute_rope_rows, unpermute_rope_rows
from .resolve import ALIASES, resolve_model
from .safetensors_folder import load_safetensors_folder

__all__ = [
    "ALIASES",
    "Checkpoint",
    "LazyTensors",
    "WeightsError",
    "build_gguf_tokenizer",
    "check_tensors",
    "hf_tensor_name",
    "load_checkpoint",
    "load_gguf",
    "load_safetensors_folder",
    "permute_rope_rows",
    "resolve_model",
    "shape_and_dtype",
    "unpermute_rope_rows",
]
