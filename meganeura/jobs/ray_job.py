"""A batch job on Ray Data: read -> decode images in CPU tasks -> generate on an actor pool
(one engine per GPU, or `workers` CPU actors) -> rows back to the driver, which commits them
in parts exactly as a single-machine job does (jobs/parts.py), so resuming works the same.

Each actor runs the single-machine loop (jobs/local.py) over the batches it is handed, so a
greedy row is the same whichever actor, and however many, made it. Ray is imported here only.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..generate import GenerationConfig
from .inputs import Item
from .local import caption_rows
from .rows import INTEGER_COLUMNS

IMAGE_COLUMNS = ("index", "path", "prompt", "pixels", "height", "width", "decode_error")


def _schema(pa, names):
    kinds = {"pixels": pa.binary(), "height": pa.int64(), "width": pa.int64()}
    return pa.schema([(k, kinds.get(k, pa.int64() if k in INTEGER_COLUMNS else pa.string())) for k in names])


def decode_images(batch):
    """A CPU task: decode each row's image to RGB pixels (errors are kept for the row)."""
    import pyarrow as pa

    from ..processing.image import load_image
    rows = batch.to_pylist()
    for row in rows:
        row.update(pixels=None, height=None, width=None, decode_error=None)
        if not row["path"] or Item(row["index"], row["path"], row["prompt"]).is_video:
            continue  # text rows need nothing; videos are sampled by the engine's actor
        try:
            pixels = np.asarray(load_image(row["path"]))
            row.update(pixels=pixels.tobytes(), height=pixels.shape[0], width=pixels.shape[1])
        except Exception as e:  # the row reports it; the job goes on
            row["decode_error"] = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
    return pa.Table.from_pylist(rows, schema=_schema(pa, IMAGE_COLUMNS))


class CaptionActor:
    """One engine: loads the model once, then generates for every batch it is handed."""

    def __init__(self, model: str, settings: dict, width: int, system: str | None, max_frames: int | None,
                 device: str, dtype: str, kv_cache_bytes: int | None) -> None:
        import meganeura
        self.pipe = meganeura.load(model, device=device, dtype=dtype, progress=False, kv_cache_bytes=kv_cache_bytes)
        self.cfg = GenerationConfig(**settings)
        self.model, self.width, self.system, self.max_frames = model, width, system, max_frames

    def __call__(self, batch):
        import pyarrow as pa

        from ..processing.image import ImageError
        from .rows import COLUMNS
        items, media = [], {}
        for row in batch.to_pylist():
            item = Item(row["index"], row["path"], row["prompt"])
            items.append(item)
            if row["decode_error"] is not None:
                media[item.index] = ImageError(row["decode_error"])
            elif row["pixels"] is not None:
                shape = (row["height"], row["width"], 3)
                media[item.index] = np.frombuffer(row["pixels"], np.uint8).reshape(shape)
        rows = list(caption_rows(self.pipe, items, self.cfg, self.model, self.width, self.system, self.max_frames,
                                 media))
        return pa.Table.from_pylist(rows, schema=_schema(pa, ("index",) + COLUMNS))


def ray_rows(items: list[Item], model: str, settings: dict, *, address: str | None, workers: int | None,
             batch_size: int, system: str | None, max_frames: int | None, device: str, dtype: str,
             kv_cache_bytes: int | None) -> Iterator[dict]:
    """Rows for `items` from a Ray cluster (`address`; None starts or joins a local one), as
    they come back."""
    if not items:
        return
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError("--ray needs Ray Data: pip install 'meganeura[ray]'") from None
    joined = not ray.is_initialized()
    if joined:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
        if device.startswith("cuda") and not gpus:
            raise ValueError(f"--device {device}: the Ray cluster has no GPUs")
        actors = workers or gpus or 1
        ray.data.DataContext.get_current().enable_progress_bars = False  # the job's own bar counts the rows
        rows = ray.data.from_items([{"index": it.index, "path": it.path, "prompt": it.prompt} for it in items])
        rows = rows.map_batches(decode_images, batch_size=batch_size, batch_format="pyarrow", num_cpus=0.5)
        rows = rows.map_batches(
            CaptionActor, batch_size=batch_size, batch_format="pyarrow", num_gpus=1 if gpus else 0, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"model": model, "settings": settings, "width": batch_size, "system": system,
                                   "max_frames": max_frames, "device": "cuda" if gpus else "cpu", "dtype": dtype,
                                   "kv_cache_bytes": kv_cache_bytes})
        try:
            yield from rows.iter_rows()
        except ray.exceptions.RayError as e:  # e.g. an actor that could not load the model: its error, not Ray's trace
            cause = str(e).strip().splitlines()
            raise ValueError(f"the Ray job failed: {cause[-1] if cause else type(e).__name__}") from None
    finally:
        if joined:
            ray.shutdown()
