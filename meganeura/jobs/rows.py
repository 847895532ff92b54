"""One output row per input: its columns, the conversation an item becomes, and the row a
result (or a failure) becomes."""

from __future__ import annotations

from .inputs import Item

# The columns of OUT, in order. Parts also carry `index` (the input's place) until the merge.
COLUMNS = ("path", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error", "model")
INTEGER_COLUMNS = ("index", "prompt_tokens", "completion_tokens")


def conversation(item: Item, system: str | None = None, max_frames: int | None = None, media=None) -> list[dict]:
    """The chat an item asks: its image or video (or none, for text-only rows), then its prompt.
    `media` replaces the path as the image's source (the Ray path hands over decoded pixels)."""
    if item.prompt is None:
        raise ValueError("no prompt: this row has no path and no prompt (give --prompt or a prompt column)")
    parts = []
    if item.path and item.is_video:
        parts.append({"type": "video", "video": item.path, "max_frames": max_frames})
    elif item.path:
        parts.append({"type": "image", "image": item.path if media is None else media})
    parts.append({"type": "text", "text": item.prompt})
    system_turn = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return system_turn + [{"role": "user", "content": parts}]


def result_row(item: Item, result, model: str) -> dict:
    return {"index": item.index, "path": item.path, "prompt": item.prompt, "text": result.text,
            "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(result.token_ids), "error": None, "model": model}


def error_row(item: Item, error: BaseException | str, model: str) -> dict:
    return {"index": item.index, "path": item.path, "prompt": item.prompt, "text": None, "finish_reason": "error",
            "prompt_tokens": None, "completion_tokens": None, "error": str(error) or type(error).__name__,
            "model": model}
