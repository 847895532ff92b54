"""The user-facing API: `load(model)` -> a Pipeline that turns chat messages into answers.

    pipe = meganeura.load("HuggingFaceTB/SmolVLM2-500M-Video-Instruct")
    pipe.generate(messages).text
    for piece in pipe.stream(messages): print(piece, end="")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Mapping

import numpy as np

from .engine.grammar import Constraint, constraint, grammar_tokenizer
from .engine.feature_cache import PREPARED_BYTES, FeatureCache, Prepared, image_key, tile_keys
from .engine.kv_cache import CacheLayout
from .engine.runner import ModelRunner, ModelSpec
from .engine.scheduler import Scheduler
from .generate import GenerationConfig, GenerationResult, Prompt, drain, generate_stream
from .graph import Graph
from .models import smollm2
from .models.llama import build_text_step
from .models.siglip import PREFIX as VISION_PREFIX
from .models.smolvlm2 import NAMES as VLM_NAMES
from .models.smolvlm2 import SmolVLM2Config, build_vision_graph
from .processing.image import ImageProcessorConfig, load_image, preprocess_images
from .processing.prompt import (END_OF_UTTERANCE, VideoSource, expand_image_tokens, expand_video_tokens,
                                normalize_messages, render_chat, video_prompt)
from .processing.video import (VideoClip, VideoError, VideoProcessorConfig, open_video, preprocess_video,
                               video_config_dict)
from .session import CompileOptions
from .weights import Checkpoint, LazyTensors, load_checkpoint, shape_and_dtype

DEFAULT_MODEL = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
CONSTRAINT_KEYS = ("response_format", "json_schema", "regex", "choice")  # generate/stream settings (engine/grammar.py)


def model_spec(config: dict, tensors: Mapping | None = None, where: str = "config.json") -> ModelSpec:
    """The architecture a config describes, checked. With the checkpoint's `tensors`, the config
    is also checked against their shapes, before any graph is built from it: a config that claims
    a million layers would otherwise build (and run out of memory on) a million-layer graph.
    `where` names the config in errors."""
    try:
        kind = config.get("model_type")
        if kind in ("smolvlm", "idefics3"):
            vlm = SmolVLM2Config.from_hf(config)
            spec = ModelSpec(text=vlm.text, names=VLM_NAMES, vlm=vlm)
        elif kind == "llama":
            spec = ModelSpec(text=smollm2.from_hf(config), names=smollm2.NAMES)
        else:
            raise ValueError(f"model_type {kind!r:.40} is not supported (SmolVLM/SmolVLM2 and Llama/SmolLM2 are)")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if tensors is not None:
        _check_sizes(spec, tensors, where)
    return spec


def _check_sizes(spec: ModelSpec, tensors: Mapping, where: str) -> None:
    stacks = [("num_hidden_layers", spec.text.num_hidden_layers, spec.names.model + "layers.")]
    if spec.vlm:
        stacks.append(("vision_config.num_hidden_layers", spec.vlm.vision.num_hidden_layers,
                       VISION_PREFIX + "encoder.layers."))
    for key, claimed, prefix in stacks:
        found = len({name[len(prefix):].split(".")[0] for name in tensors if name.startswith(prefix)})
        if claimed != found:
            raise ValueError(f"{where} says {key} {claimed} but the checkpoint has tensors for {found} layers")
    # Every width shows in one layer of each stack: compare the parameters of a one-layer graph.
    text = dataclasses.replace(spec.text, num_hidden_layers=1)
    g = Graph()
    build_text_step(g, text, spec.names, rows=1, cache=CacheLayout.contiguous(1, text.kv_dim, slots=1, max_seq=1),
                    logit_rows=1, image_tokens=1 if spec.vlm else 0)
    sizes = {k: getattr(spec.text, k) for k in ("vocab_size", "hidden_size", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size")}
    if spec.vlm:
        vision = dataclasses.replace(spec.vlm.vision, num_hidden_layers=1)
        build_vision_graph(g, dataclasses.replace(spec.vlm, vision=vision, text=text), images=1)
        sizes.update({f"vision_config.{k}": getattr(vision, k) for k in
                      ("hidden_size", "intermediate_size", "image_size", "patch_size")},
                     scale_factor=spec.vlm.scale_factor)
    for name, t in g.parameters.items():
        found = tuple(shape_and_dtype(tensors, name)[0]) if name in tensors else t.shape  # missing: said later
        if found != t.shape:
            settings = ", ".join(f"{k} {v}" for k, v in sizes.items())
            raise ValueError(f"{where} does not match the checkpoint: {name} is {list(found)} there, but the "
                             f"config ({settings}) needs {list(t.shape)}")


DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "int8", "int4", "f16", "bf16")
COMPACT = ("int8", "int4", "f16", "bf16")  # the forms asked for by name: CPU only, with torch


def compile_options(device: str = "auto", dtype: str = "auto", quantize: str = "auto") -> CompileOptions:
    """Pick the backend: torch when installed (CUDA when present), else the numpy reference.
    A device that is not there is an error now, not a torch error at the first weight.
    quantize: the text decoder's product weights, kept int8, int4, f16 or bf16 on the CPU; "auto"
    keeps the checkpoint's own precision there (ModelRunner.weight_forms)."""
    if not DEVICES.fullmatch(device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    try:
        import torch
    except ImportError:
        if device not in ("auto", "cpu"):
            raise ValueError(f"device {device} needs torch: pip install 'meganeura[torch]'") from None
        if quantize in COMPACT:
            raise ValueError(f"quantize {quantize} needs torch: pip install 'meganeura[torch]'") from None
        return CompileOptions(backend="numpy", quantize="none")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA GPU is available (torch.cuda.is_available() is False)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {device}: there are {torch.cuda.device_count()} CUDA GPUs")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if quantize in COMPACT and device.startswith("cuda"):
        raise ValueError(f"quantize {quantize}: compact weights run on the CPU only (device {device})")
    return CompileOptions(backend="torch", device=device, dtype=dtype, quantize=quantize)


def _json(folder: Path | None, name: str) -> dict:
    if folder is None or not (folder / name).is_file():
        return {}
    try:
        data = json.loads((folder / name).read_text())
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{folder / name}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{folder / name}: must hold a JSON object, found {type(data).__name__}")
    return data


@dataclass
class Encoded:
    """A conversation made ready for the model."""

    input_ids: np.ndarray                 # int64 [seq]
    pixel_values: np.ndarray | None       # float32 [tiles, 3, H, W]
    pixel_attention_mask: np.ndarray | None
    tile_keys: list[bytes] | None = None  # content hash of each tile (feature_cache.tile_keys), when caching

    def as_dict(self) -> dict:
        out = {"input_ids": self.input_ids}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
            out["pixel_attention_mask"] = self.pixel_attention_mask
        return out


class Pipeline:
    def __init__(self, checkpoint: Checkpoint, options: CompileOptions, progress: bool = True,
                 kv_cache_bytes: int | None = None, prefix_cache: bool = True) -> None:
        if checkpoint.tokenizer is None:
            raise ValueError(f"{checkpoint.source}: no tokenizer (tokenizer.json) found beside the weights")
        if not checkpoint.chat_template:
            raise ValueError(f"{checkpoint.source}: no chat template found (chat_template.json/.jinja, "
                             "tokenizer_config.json or GGUF metadata)")
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        self.spec = model_spec(checkpoint.config, checkpoint.tensors, checkpoint.config_name)
        vocab = self.spec.text.vocab_size
        if self.tokenizer.get_vocab_size() > vocab:  # its ids past the embedding table would fail mid-run
            raise ValueError(f"{checkpoint.source}: the tokenizer has {self.tokenizer.get_vocab_size()} tokens but "
                             f"the model's vocab_size is {vocab}")
        self.eos_ids = self._eos_ids()
        # Processor settings before the weights: a bad file fails in a moment, not after loading.
        folder, vlm = checkpoint.folder, self.spec.vlm
        preprocessor = _json(folder, "preprocessor_config.json")
        try:
            self.image_config = ImageProcessorConfig.from_dict(preprocessor)
            if min(self.image_config.longest_edge, self.image_config.max_image_size) < 1:
                raise ValueError("size and max_image_size must be positive")
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{folder / 'preprocessor_config.json'}: {e}") from None
        # The processor's count stands (a pipeline may only preprocess); a model that makes another
        # number of features per image says so at its first image.
        seq_len = _json(folder, "processor_config.json").get("image_seq_len", vlm.num_vision_tokens if vlm else 0)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 <= seq_len <= 2**20:
            raise ValueError(f"{folder / 'processor_config.json'}: image_seq_len must be an integer from 0 to "
                             f"{2**20}, got {seq_len!r:.30}")
        self.image_seq_len = seq_len
        self.runner = ModelRunner(self.spec, options, cache_bytes=kv_cache_bytes)
        self.prefix_cache = prefix_cache  # reuse cached prompt prefixes and vision features
        self.vision_cache = FeatureCache() if self.prefix_cache and vlm else None
        self._prepared = FeatureCache(PREPARED_BYTES)  # preprocessed images by pixel content (with the caches)
        self._prepared_lock = threading.Lock()         # encode runs in the server's worker threads
        self.runner.load_weights(checkpoint.tensors, checkpoint.source, progress=_bar(progress, "loading weights"))
        if isinstance(checkpoint.tensors, LazyTensors):  # the weights are ours now: the file's pages can go
            checkpoint.tensors.drop_pages()

    @property
    def context_length(self) -> int:
        return self.spec.text.max_position_embeddings

    @functools.cached_property
    def video_config(self) -> VideoProcessorConfig:
        """The checkpoint's video settings, read on first use (a bad one then fails videos only)."""
        folder = self.checkpoint.folder
        return VideoProcessorConfig.from_dict(video_config_dict(
            _json(folder, "processor_config.json"), _json(folder, "video_preprocessor_config.json"),
            _json(folder, "preprocessor_config.json")))

    def _eos_ids(self) -> set[int]:
        eos = self.checkpoint.generation.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if not all(0 <= i < self.spec.text.vocab_size for i in ids):  # the readers checked they are ints
            raise ValueError(f"{self.checkpoint.source}: eos_token_id {eos} is not below vocab_size "
                             f"{self.spec.text.vocab_size}")
        end = self.tokenizer.token_to_id(END_OF_UTTERANCE)
        if self.spec.vlm and end is not None:
            ids.add(end)  # SmolVLM2 ends an assistant turn with <end_of_utterance>
        return ids

    # ---- preprocessing ---------------------------------------------------------------------
    def _special(self, key: str) -> str:
        token_id = self.checkpoint.generation.get(key)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        return self.tokenizer.id_to_token(token_id) if token_id is not None else ""

    def encode(self, messages) -> Encoded:
        shaped, sources = normalize_messages(messages)
        if sources and not self.spec.vlm:
            raise ValueError("this model reads text only: remove the image and video parts")
        # Errors name the file, before any model work; videos are probed and sampled, not decoded yet.
        media = [self._open_video(s) if isinstance(s, VideoSource) else load_image(s) for s in sources]
        images = [m for m in media if not isinstance(m, VideoClip)]
        videos = [m for m in media if isinstance(m, VideoClip)]
        text = render_chat(self.checkpoint.chat_template, messages, add_generation_prompt=True,
                           bos_token=self._special("bos_token_id"), eos_token=self._special("eos_token_id"))
        pixel_values = mask = batch = image_keys = None
        if images:
            batch, image_keys = self._preprocess(images)
            text = expand_image_tokens(text, batch["image_grids"][0], self.image_seq_len)
            pixel_values = batch["pixel_values"][0]
            mask = batch.get("pixel_attention_mask")
            mask = mask[0] if mask is not None else None
        if videos:  # after the images: a video's text holds <image> tokens of its own
            text = expand_video_tokens(text, [(v.timestamps, v.duration) for v in videos], self.image_seq_len)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (from JSON "\ud800"): the tokenizer would raise TypeError
            raise ValueError(f"the messages contain a lone surrogate {e.object[e.start:e.end]!r}: not text") from None
        ids = np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        if len(ids) >= self.context_length:
            raise ValueError(self._too_long(len(ids), videos))
        if videos:
            pixel_values, mask = self._media_pixels(media, pixel_values, mask, batch)
        # hashed here, off the engine thread (the server encodes in worker threads; hashlib lets go of the GIL)
        keys = image_keys
        if videos and self.vision_cache is not None:
            keys = tile_keys(pixel_values, mask)
        return Encoded(ids, pixel_values, mask, keys)

    def _preprocess(self, images: list) -> tuple[dict, list[bytes] | None]:
        """preprocess_images for one conversation's images and, with the caches on, their tile
        keys: kept by the decoded pixels' hash (a chat resends its photo every turn)."""
        if self.vision_cache is None:
            return preprocess_images([images], self.image_config), None
        key = image_key(images)
        with self._prepared_lock:
            found = self._prepared.get(key)
        if found is None:
            batch = preprocess_images([images], self.image_config)
            for value in batch.values():  # shared by every call that sends these images
                if isinstance(value, np.ndarray):
                    value.flags.writeable = False
            mask = batch.get("pixel_attention_mask")
            found = Prepared(batch, tile_keys(batch["pixel_values"][0], None if mask is None else mask[0]))
            with self._prepared_lock:
                self._prepared.put(key, found)
        return found.batch, found.keys

    def _open_video(self, part: VideoSource) -> VideoClip:
        if part.source is None:
            raise VideoError("a video part has no source: give it a 'video', 'url' or 'path'")
        if isinstance(part.source, VideoClip):  # opened already (the server does, with its limits)
            return part.source
        return open_video(part.source, self.video_config, max_frames=part.max_frames, fps=part.fps)

    def _too_long(self, length: int, videos: list[VideoClip]) -> str:
        """The error for a prompt over the context, with a frame count that would fit."""
        problem = f"the prompt is {length} tokens long; the model's context is {self.context_length}"
        if not videos:
            return problem
        frames = sum(len(v.timestamps) for v in videos)
        video_tokens = sum(len(self.tokenizer.encode(video_prompt(v.timestamps, v.duration, self.image_seq_len),
                                                     add_special_tokens=False).ids) for v in videos)
        room = self.context_length - 1 - (length - video_tokens)
        fit = room // math.ceil(video_tokens / frames) // len(videos)
        if fit < 1:
            return f"{problem}, and the text alone leaves no room for the {frames} video frames"
        return (f"{problem}; its {frames} video frames take {video_tokens} tokens. Sample fewer: at most {fit} "
                f"frames per video fit (the video part's \"max_frames\", or --max-frames {fit} in the CLI)")

    def _media_pixels(self, media, image_tiles, image_mask, batch) -> tuple[np.ndarray, np.ndarray]:
        """Image tiles and video frames in prompt order, padded to one size: [n, 3, H, W] and
        a bool mask [n, H, W] that is True on real pixels."""
        items, at = [], 0  # (pixels [3, h, w], mask [h, w] or None) per tile or frame
        grids = iter(batch["image_grids"][0] if batch else ())
        for m in media:
            if isinstance(m, VideoClip):
                items += [(frame, None) for frame in preprocess_video(m, self.video_config)]
                continue
            rows, cols = next(grids)
            count = rows * cols + 1 if rows else 1
            items += [(image_tiles[k], None if image_mask is None else image_mask[k]) for k in range(at, at + count)]
            at += count
        height = max(p.shape[1] for p, _ in items)
        width = max(p.shape[2] for p, _ in items)
        pixels = np.zeros((len(items), 3, height, width), np.float32)
        mask = np.zeros((len(items), height, width), bool)
        for k, (p, m) in enumerate(items):
            pixels[k, :, :p.shape[1], :p.shape[2]] = p
            mask[k, :p.shape[1], :p.shape[2]] = True if m is None else m
        return pixels, mask

    def processor(self, messages) -> dict:
        """input_ids int64 [seq], pixel_values float32 [tiles and frames, 3, H, W], pixel_attention_mask."""
        return self.encode(messages).as_dict()

    def prompt(self, enc: Encoded) -> Prompt:
        """Token ids plus image features: runs the vision encoder, so call it from the one thread
        that uses the runner."""
        if enc.pixel_values is None:
            return Prompt(enc.input_ids)
        if self.vision_cache is None:
            features = self.runner.encode_images(enc.pixel_values, enc.pixel_attention_mask)
        else:
            keys = enc.tile_keys or tile_keys(enc.pixel_values, enc.pixel_attention_mask)
            features = self._cached_features(enc, keys)
        rows = np.flatnonzero(enc.input_ids == self.spec.image_token_id)
        if len(rows) != features.shape[0]:
            raise ValueError(f"{len(rows)} image tokens in the prompt but {features.shape[0]} image features")
        if self.vision_cache is None or len(rows) % len(keys):
            return Prompt(enc.input_ids, features, rows)  # without keys its image blocks are never cached
        per_tile = len(rows) // len(keys)  # each tile's features fill consecutive image rows, in order
        return Prompt(enc.input_ids, features, rows, [keys[i // per_tile] for i in range(len(rows))])

    def _cached_features(self, enc: Encoded, keys: list[bytes]):
        """The features of every tile: cached ones reused, the others encoded together and kept."""
        found = [self.vision_cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            mask = enc.pixel_attention_mask
            fresh = self.runner.encode_images(enc.pixel_values[missing], None if mask is None else mask[missing])
            per_tile = fresh.shape[0] // len(missing)
            for j, i in enumerate(missing):
                found[i] = self.runner.backend.copy(fresh[j * per_tile:(j + 1) * per_tile])
                self.vision_cache.put(keys[i], found[i])
        return found[0] if len(found) == 1 else self.runner.backend.concat(found)

    # ---- running ---------------------------------------------------------------------------
    def logits(self, messages) -> np.ndarray:
        """float32 [seq, vocab]: the logits of every prompt position."""
        enc = self.encode(messages)
        p = self.prompt(enc)
        n = len(enc.input_ids)
        cache = self.runner.cache
        slot = cache.take(n)
        try:
            out = self.runner.prefill(p.token_ids, slot, p.image_features, p.image_rows, all_logits=True)
            return self.runner.to_host(out)
        finally:
            cache.release(slot)

    @functools.cached_property
    def grammar_tokenizer(self):
        """The vocabulary as llguidance sees it (built on the first constrained request)."""
        return grammar_tokenizer(self.tokenizer, self.spec.text.vocab_size, self.eos_ids)

    def constraint(self, response_format=None, json_schema=None, regex=None, choice=None) -> Constraint | None:
        """A request's constraint (engine/grammar.py's `constraint`), ready for this model."""
        found = constraint(response_format, json_schema, regex, choice)
        return found.bind(self.grammar_tokenizer) if found is not None else None

    def _start(self, conversations, settings: dict):
        stop = settings.get("stop", ())
        settings = {**settings, "stop": (stop,) if isinstance(stop, str) else tuple(stop)}
        asked = {k: settings.pop(k) for k in CONSTRAINT_KEYS if k in settings}
        if asked:
            settings["constraint"] = self.constraint(**asked)
        cfg = GenerationConfig(**settings)
        encoded = [self.encode(c) for c in conversations]
        room = self.runner.max_seq - max(len(e.input_ids) for e in encoded)
        if cfg.max_new_tokens > room:  # stop at the context's end rather than refuse
            cfg = GenerationConfig(**{**cfg.__dict__, "max_new_tokens": room})
        prompts = [self.prompt(e) for e in encoded]
        return generate_stream(self.runner, prompts, cfg, self.eos_ids, self._decode, prefix_cache=self.prefix_cache)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def scheduler(self, width: int = 8, sampler=None) -> Scheduler:
        """A continuous-batching scheduler of `width` sequences at once over this pipeline's
        runner (the server's engine drives one)."""
        return Scheduler(self.runner, self.eos_ids, self._decode, width, sampler, prefix_cache=self.prefix_cache)

    def generate(self, messages, **settings: Any) -> GenerationResult | list[GenerationResult]:
        """Generate for one conversation, or for a list of conversations as one batch.

        settings: GenerationConfig's (max_new_tokens, temperature, stop, ...) and one constraint:
        response_format (OpenAI's shape), json_schema, regex or choice (engine/grammar.py). A
        constrained answer cut by max_new_tokens ends with finish_reason "length" and may not parse."""
        batch = _is_batch(messages)
        conversations = messages if batch else [messages]
        gen = self._start(conversations, settings)
        results = drain(gen)
        return results if batch else results[0]

    def stream(self, messages, **settings: Any) -> Generator[str, None, GenerationResult]:
        """Text pieces of one conversation's answer as they are generated; the generator's
        return value (StopIteration.value) is the GenerationResult, timings included.
        Leaving the loop early frees what the answer held."""
        gen = self._start([messages], settings)
        try:
            while True:
                try:
                    _, piece = next(gen)
                except StopIteration as done:
                    return done.value[0]
                yield piece
        finally:
            gen.close()


def _is_batch(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], list)


def _bar(enabled: bool, what: str):
    if not enabled:
        return None

    def wrap(items):
        from tqdm import tqdm
        # disable=None: drawn on a terminal only; into a log it would write carriage returns
        # and leave a line of spaces behind
        return tqdm(items, desc=what, unit="tensor", leave=False, disable=None)
    return wrap


def load(model: str | Path = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
         progress: bool = True, kv_cache_bytes: int | None = None, quantize: str = "auto",
         prefix_cache: bool = True) -> Pipeline:
    """A local Hugging Face folder, a .gguf file, a Hub id, or "smollm2-135m-instruct".

    kv_cache_bytes: the KV cache's budget (default: a fifth of free GPU memory, or 2 GiB of
    address space on the CPU, where RAM is taken only by tokens in use).
    quantize: "int4", "int8", "f16" or "bf16" keeps the text decoder's weights compact on the CPU
    (activations stay in `dtype`); "auto" keeps a GGUF's own precision there (a Q4_1 file runs
    4-bit, an F16 file f16); "none": float weights.
    `pipe.runner.weight_form` says which form was chosen and why.
    prefix_cache: reuse the keys and values of prompt prefixes seen before (system prompts, earlier
    turns, the same image bytes) and cached vision features; False computes every prompt afresh."""
    options = compile_options(device, dtype, quantize)  # a missing GPU fails before any download
    checkpoint = load_checkpoint(model, progress=progress)
    return Pipeline(checkpoint, settle_dtype(options, dtype, checkpoint), progress=progress,
                    kv_cache_bytes=kv_cache_bytes, prefix_cache=prefix_cache)


def settle_dtype(options: CompileOptions, asked: str, checkpoint: Checkpoint) -> CompileOptions:
    """`options` with the CPU's "auto" dtype settled by the checkpoint, keeping its own
    precision: bfloat16 for weights stored in bfloat16 (SmolVLM2's safetensors) where the CPU
    multiplies bf16 natively (its packed products beat float32 ones: docs/perf.md), else
    float32 as compile_options chose."""
    if asked != "auto" or options.backend != "torch" or options.device != "cpu":
        return options
    stored = getattr(checkpoint.tensors, "stored", None)
    if stored is None:
        return options
    matrices = [n for n in checkpoint.tensors.keys() if len(shape_and_dtype(checkpoint.tensors, n)[0]) == 2]
    if not matrices or not all(stored(n) == "BF16" for n in matrices):
        return options
    from .backends.cpu_weights import bf16_products
    return dataclasses.replace(options, dtype="bfloat16") if bf16_products() else options


__all__ = ["load", "Pipeline", "DEFAULT_MODEL", "GenerationConfig", "GenerationResult"]
