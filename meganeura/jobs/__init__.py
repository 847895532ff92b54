"""Batch jobs: caption or question whole collections (`meganeura caption`, `meganeura.caption`).

inputs.py lists the inputs, rows.py shapes each one's conversation and output row, local.py
runs them on one machine, ray_job.py on a Ray cluster, and parts.py commits the rows so that a
killed job, started again with the same command, finishes with every input exactly once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..generate import GenerationConfig
from .inputs import DEFAULT_PROMPT, Item, list_inputs
from .parts import PartStore, fingerprint
from .rows import COLUMNS

COMMIT_EVERY_S = 30.0  # a slow job still commits this often, whatever the batch size


def caption(inputs: Any, output: str | Path | None = None, *, model: Any = None, prompt: str | None = None,
            prompt_column: str | None = None, path_column: str | None = None, system: str | None = None,
            max_frames: int | None = None, batch_size: int = 16, ray: bool | str | None = None,
            workers: int | None = None, device: str = "auto", dtype: str = "auto", overwrite: bool = False,
            kv_cache_bytes: int | None = None, progress: bool = True, **sampling: Any) -> list[dict]:
    """Answer `prompt` (or each row's own) about every input; one row per input, in input order.

    inputs: a folder (images and videos, recursively), a glob, a JSONL/CSV/Parquet table with a
    `path_column` (default "path"; empty = a text-only prompt) and optional `prompt_column`, or a
    list of paths or dicts. output: a .parquet or .jsonl file, written in committed parts as the
    job goes (`OUTPUT.parts/`), resumed by the same call after a crash; None keeps the rows in
    memory only. model: a name or path (default SmolVLM2-500M-Video-Instruct), or a loaded
    Pipeline (not with Ray). ray: True (a local Ray, or RAY_ADDRESS) or a cluster address;
    workers: Ray actors (default: one per GPU, else one). batch_size: sequences generated
    together, and rows per committed part. kv_cache_bytes: as for `load`. sampling: GenerationConfig's settings.

    Rows: path, prompt, text, finish_reason, prompt_tokens, completion_tokens, error (None when
    fine; a bad input's row says what is wrong and the job goes on), model."""
    from ..pipeline import DEFAULT_MODEL, Pipeline, compile_options
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if workers is not None and not ray:
        raise ValueError("workers (--workers) sets the number of Ray actors: it needs ray (--ray)")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    stop = sampling.get("stop", ())
    cfg = GenerationConfig(**{**sampling, "stop": (stop,) if isinstance(stop, str) else tuple(stop)})  # fail first
    if not ray:  # a Ray driver may have no GPU where its workers do
        compile_options(device, dtype)
    model = DEFAULT_MODEL if model is None else model
    model_name = model.checkpoint.source if isinstance(model, Pipeline) else str(model)
    items = list_inputs(inputs, prompt, prompt_column, path_column)
    settings = dataclasses.asdict(cfg)
    store = None
    if output is not None:
        job = {"model": model_name, "generation": settings, "system": system, "max_frames": max_frames}
        store = PartStore(output, fingerprint(items, model_name, job), overwrite)
    done = store.done if store else set()
    pending = [item for item in items if item.index not in done]
    if ray:
        from .ray_job import ray_rows
        rows = ray_rows(pending, model_name, settings,
                        address=None if ray is True else ray, workers=workers, batch_size=batch_size,
                        system=system, max_frames=max_frames, device=device, dtype=dtype,
                        kv_cache_bytes=kv_cache_bytes)
    else:
        from .local import caption_rows
        pipe = model if isinstance(model, Pipeline) else _load(model, device, dtype, kv_cache_bytes, progress)
        rows = caption_rows(pipe, pending, cfg, model_name, batch_size, system, max_frames)
    return _collect(rows, store, len(items), len(done), batch_size, progress)


def _load(model, device, dtype, kv_cache_bytes, progress):
    import meganeura
    return meganeura.load(model, device=device, dtype=dtype, progress=progress, kv_cache_bytes=kv_cache_bytes)


def _collect(rows, store: PartStore | None, total: int, done: int, batch_size: int, progress: bool) -> list[dict]:
    """Drain the rows into committed parts (on Ctrl-C or a failure too: what finished is kept),
    then merge them into the output."""
    from tqdm import tqdm
    bar = tqdm(total=total, initial=done, unit="item", desc="caption", disable=None if progress else True,
               smoothing=0.05)
    kept, buffer, last = [], [], time.monotonic()
    try:
        for row in rows:
            bar.update(1)
            if store is None:
                kept.append(row)
                continue
            buffer.append(row)
            if len(buffer) >= batch_size or time.monotonic() - last > COMMIT_EVERY_S:
                # Out of the buffer before the write: a Ctrl-C inside it may lose these rows (they
                # are redone), never commit them twice.
                rows_to_commit, buffer, last = buffer, [], time.monotonic()
                store.commit(rows_to_commit)
    finally:
        rows.close()  # stops the engine (and Ray) before anything else
        bar.close()
        if store is not None:
            store.commit(buffer)
    if store is None:
        return [{k: row[k] for k in COLUMNS} for row in sorted(kept, key=lambda r: r["index"])]
    return store.merge(total)


__all__ = ["caption", "list_inputs", "Item", "DEFAULT_PROMPT"]
