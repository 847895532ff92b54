"""What a batch job reads: INPUT (a folder, a glob, one file, or a JSONL / CSV / Parquet table)
turned into an ordered list of `Item`s, each one output row.

A folder yields its images and videos, recursively, sorted by path. A glob yields every file it
matches, sorted (a file that is not an image becomes an error row, not a silent skip). A table
yields one item per row: the path column (default `path`, relative paths taken from the table's
folder) and, with `prompt_column`, a prompt per row. A row whose path is missing, null or empty
is a text-only prompt (for SmolLM2, or a VLM asked without a picture); it needs a prompt.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v"})
TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
DEFAULT_PROMPT = "Describe this image in one sentence."


@dataclass(frozen=True)
class Item:
    """One input: its place in the job (the output's order), a media path ("" = text only) and
    its prompt (None = none was given: an error row)."""

    index: int
    path: str
    prompt: str | None

    @property
    def is_video(self) -> bool:
        return Path(self.path).suffix.lower() in VIDEO_SUFFIXES


def list_inputs(source: Any, prompt: str | None = None, prompt_column: str | None = None,
                path_column: str | None = None) -> list[Item]:
    """The job's items, in output order. `source` is a path or glob string, or (from Python) a
    list of paths or of dicts with the path and prompt columns."""
    if prompt is not None and prompt_column is not None:
        raise ValueError("give --prompt or --prompt-column, not both")
    if isinstance(source, (list, tuple)):
        rows = [r if isinstance(r, dict) else {path_column or "path": str(r)} for r in source]
        return _from_rows(rows, "the input list", None, prompt, prompt_column, path_column)
    text = str(source)
    where = Path(text)
    if where.is_dir():
        media = IMAGE_SUFFIXES | VIDEO_SUFFIXES
        files = sorted(p for p in where.rglob("*") if p.is_file() and p.suffix.lower() in media)
        if not files:
            raise ValueError(f"{text}: no image or video files in this folder (looked for "
                             f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
        return _media_items([str(p) for p in files], prompt, prompt_column)
    if where.is_file() and where.suffix.lower() in TABLE_SUFFIXES:
        return _from_rows(_read_table(where), text, where.parent, prompt, prompt_column, path_column)
    if where.is_file():
        return _media_items([text], prompt, prompt_column)
    if glob.has_magic(text):
        files = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"{text}: the pattern matches no files")
        return _media_items(files, prompt, prompt_column)
    raise ValueError(f"{text}: no such folder, file or matching glob")


def _media_items(paths: list[str], prompt: str | None, prompt_column: str | None) -> list[Item]:
    if prompt_column is not None:
        raise ValueError(f"--prompt-column {prompt_column} needs a table input (.jsonl, .csv or .parquet)")
    return [Item(i, p, prompt or DEFAULT_PROMPT) for i, p in enumerate(paths)]


def _read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {n}: not valid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path} line {n}: expected a JSON object, found {type(row).__name__}")
                    rows.append(row)
            return rows
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install 'meganeura[parquet]'") from None
        return pq.read_table(path).to_pylist()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value)


def _from_rows(rows: list[dict], where: str, base: Path | None, prompt: str | None, prompt_column: str | None,
               path_column: str | None) -> list[Item]:
    if not rows:
        raise ValueError(f"{where}: the table has no rows")
    columns = set().union(*(r.keys() for r in rows))
    for flag, column in (("--path-column", path_column), ("--prompt-column", prompt_column)):
        if column is not None and column not in columns:
            names = ", ".join(sorted(map(str, columns)))
            raise ValueError(f"{where}: {flag} {column!r} is not a column (columns: {names})")
    path_column = path_column or "path"  # the default column may be absent: every row is then text only
    items = []
    for i, row in enumerate(rows):
        path = _cell(row, path_column)
        if path and base is not None and not Path(path).is_absolute():
            path = str(base / path)
        own = _cell(row, prompt_column) if prompt_column else ""
        items.append(Item(i, path, own or prompt or (DEFAULT_PROMPT if path else None)))
    return items
