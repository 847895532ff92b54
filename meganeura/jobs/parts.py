"""Results on disk, so that no kill loses more than the rows in flight.

Rows are committed in parts: each part is written to a temporary name, flushed to disk and
renamed into OUT.parts/ (a rename is atomic, so a part is either whole or absent). A manifest
written first records what the job is (its inputs, model and settings); a restart with the same
command reads the committed parts, skips their inputs and goes on; one with another command is
refused. When every input has its row, the parts are merged into OUT (again through a rename)
and the folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .rows import COLUMNS, INTEGER_COLUMNS

FORMATS = (".parquet", ".jsonl")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError("writing Parquet needs pyarrow: pip install 'meganeura[parquet]', or write .jsonl") from None
    return pyarrow


def fingerprint(items, model: str, settings: dict) -> dict:
    """What makes two runs the same job: the inputs (in order), the model and every setting."""
    listing = json.dumps([[item.path, item.prompt] for item in items], ensure_ascii=False).encode()
    return json.loads(json.dumps({"version": 1, "inputs": len(items),
                                  "inputs_sha256": hashlib.sha256(listing).hexdigest(),
                                  "model": model, "settings": settings}))


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


class PartStore:
    def __init__(self, output: str | Path, job: dict, overwrite: bool = False) -> None:
        self.output = Path(output)
        self.format = self.output.suffix.lower()
        if self.format not in FORMATS:
            raise ValueError(f"{output}: the output must end in .parquet or .jsonl")
        if self.format == ".parquet":
            _pyarrow()
        self.folder = self.output.with_name(self.output.name + ".parts")
        manifest = self.folder / "manifest.json"
        if self.folder.is_dir() and manifest.is_file():
            found = json.loads(manifest.read_text())
            if found != job:
                changed = sorted(k for k in set(job) | set(found) if job.get(k) != found.get(k))
                raise ValueError(f"{self.folder} holds the parts of another job (its {', '.join(changed)} differ); "
                                 "run the same command to finish it, or delete the folder to start again")
        else:
            if self.output.exists() and not overwrite:
                raise ValueError(f"{self.output} exists: pass --overwrite (overwrite=True) to replace it")
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomically(manifest, lambda f: f.write(json.dumps(job, indent=1).encode()))
        for stray in self.folder.glob(".tmp-*"):  # a part that was being written when the job died
            stray.unlink()
        self.parts = sorted(self.folder.glob("part-*" + self.format))
        self.done: set[int] = set()
        for part in self.parts:
            for index in (row["index"] for row in self._read(part)):
                if index in self.done:
                    raise ValueError(f"{part}: input {index} is in two parts; the folder was changed by hand")
                self.done.add(index)

    def commit(self, rows: list[dict]) -> None:
        """Write rows as one more part; once this returns they survive any kill."""
        if not rows:
            return
        part = self.folder / f"part-{len(self.parts):06d}{self.format}"
        _write_atomically(part, lambda f: self._write(f, rows))
        self.parts.append(part)
        self.done.update(row["index"] for row in rows)

    def merge(self, total: int) -> list[dict]:
        """Every input's row, in input order, written to OUT; the parts folder is removed."""
        rows = sorted((row for part in self.parts for row in self._read(part)), key=lambda r: r["index"])
        if [row["index"] for row in rows] != list(range(total)):
            raise ValueError(f"{self.folder}: the parts hold {len(rows)} rows for {total} inputs")
        rows = [{k: row[k] for k in COLUMNS} for row in rows]
        _write_atomically(self.output, lambda f: self._write(f, rows))
        finished = self.folder.with_name(self.folder.name + ".merged")  # one rename: no half-removed job
        shutil.rmtree(finished, ignore_errors=True)
        os.replace(self.folder, finished)
        shutil.rmtree(finished)
        return rows

    def _write(self, f, rows: list[dict]) -> None:
        if self.format == ".jsonl":
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
            return
        pa = _pyarrow()
        names = [k for k in rows[0]]
        schema = pa.schema([(k, pa.int64() if k in INTEGER_COLUMNS else pa.string()) for k in names])
        pa.parquet.write_table(pa.Table.from_pylist(rows, schema=schema), f)

    def _read(self, part: Path) -> list[dict]:
        if self.format == ".jsonl":
            return [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines()]
        return _pyarrow().parquet.read_table(part).to_pylist()
