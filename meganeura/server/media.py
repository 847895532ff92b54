"""Which image URLs a request may use: data: URLs always; http(s) only with
--allow-remote-media; local paths only with --media-root, and only inside it."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path


class MediaError(ValueError):
    """An image URL this server will not open; the message says why."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would also follow a redirect to ftp://
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise MediaError(f"refusing a redirect to {newurl!r}: only http and https are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class MediaPolicy:
    def __init__(self, allow_remote: bool = False, root: str | Path | None = None,
                 max_bytes: int = 20 * 2**20, timeout_s: float = 10.0) -> None:
        self.allow_remote, self.max_bytes, self.timeout_s = allow_remote, max_bytes, timeout_s
        self.root = Path(root).resolve(strict=True) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"media root {root} is not a directory")
        self._opener = urllib.request.build_opener(_HttpOnlyRedirects)

    def open(self, url: str) -> str | bytes:
        """A source for load_image: the data: URL itself, or the bytes of a remote or local file."""
        head = url[:16].lower()
        if head.startswith("data:"):
            return url
        if head.startswith(("http://", "https://")):
            return self._download(url)
        if "://" in url:
            raise MediaError(f"unsupported image URL {url[:40]!r}: send a data:image/...;base64 URL")
        return self._local(url)

    def _download(self, url: str) -> bytes:
        if not self.allow_remote:
            raise MediaError("remote image URLs are not allowed on this server (it was started without "
                             "--allow-remote-media): send the image as a data: URL")
        try:
            with self._opener.open(url, timeout=self.timeout_s) as response:
                return self._read(response, url)
        except MediaError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise MediaError(f"cannot fetch {url[:200]}: {getattr(e, 'reason', e)}") from None

    def _local(self, path: str) -> bytes:
        if self.root is None:
            raise MediaError("local file paths are not allowed on this server (it was started without "
                             "--media-root): send the image as a data: URL")
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
