"""Which image and video URLs a request may use: data: URLs always; http(s) only with
--allow-remote-media (fetched by fetch.py); local paths only with --media-root, and only
inside it."""

from __future__ import annotations

from pathlib import Path


class MediaError(ValueError):
    """An image or video URL this server will not open; the message says why."""


def is_remote(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


class MediaPolicy:
    def __init__(self, root: str | Path | None = None, max_bytes: int = 20 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.root = Path(root).resolve(strict=True) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"media root {root} is not a directory")

    def open(self, url: str, kind: str = "image") -> str | bytes:
        """A data: URL itself, or the bytes of a local file; `kind` ("image" or "video") words the errors."""
        if url[:5].lower() == "data:":
            return url
        if "://" in url:
            raise MediaError(f"unsupported {kind} URL {url[:40]!r}: send a data:{kind}/...;base64 URL")
        try:
            return self._local(url, kind)
        except OSError as e:  # a name too long, a permission, a directory loop...: the client's path
            raise MediaError(f"{url[:200]}: cannot read it ({e.strerror or e})") from None

    def _local(self, path: str, kind: str) -> bytes:
        if self.root is None:
            raise MediaError("local file paths are not allowed on this server (it was started without "
                             f"--media-root): send the {kind} as a data: URL")
        given = Path(path)
        if ".." in given.parts:
            raise MediaError(f"{path}: '..' is not allowed in media paths")
        # resolve() follows every symlink, so a link that leads out of the root is caught here
        real = (self.root / given).resolve()
        if not real.is_relative_to(self.root):
            raise MediaError(f"{path}: outside the media root")
        if not real.is_file():
            raise MediaError(f"{path}: no such file under the media root")
        with open(real, "rb") as f:
            return self._read(f, path)

    def _read(self, stream, name: str) -> bytes:
        data = stream.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise MediaError(f"{name[:200]}: larger than the limit of {self.max_bytes} bytes")
        return data
