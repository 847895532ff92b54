"""Video loading and SmolVLM video preprocessing.

The reference is transformers' ``SmolVLMVideoProcessor`` (video_processing_smolvlm.py) as
``SmolVLMProcessor.apply_chat_template`` drives it, with its default decoder, torchcodec in
exact mode. What it does, and so do we (decoding with PyAV):

* metadata, from a scan of the packets of the first video stream (no decoding), as exact
  mode makes it: the frame count is the number of packets, the duration runs from the
  earliest timestamp to the end of the last packet, fps = frames / duration;
* sampling (:func:`sample_frame_indices`): round(fps x duration) frames, at most max_frames
  and at least one, spread evenly (linspace, truncated to ints, duplicates dropped); when
  duration - 2 s > max_frames x fps (sic), the first and last second are left out;
* pixels: each frame is resized twice with torch's uint8 LANCZOS, the function torchvision's
  resize runs: first so that its longest edge is the checkpoint's ``size`` (2048 for
  SmolVLM2; in the reference ``size`` overrides ``video_sampling.video_size``), then
  squashed to a ``max_image_size`` square. Frames are never split into tiles. Rescale and
  normalize are fused as the reference fuses them: (x - 255 mean) / (255 std) in float32;
* frames are turned upright by the stream's display rotation (phone videos), as torchcodec
  turns them.

Without torch (or with a torch older than its uint8 LANCZOS) frames are resized with Pillow's
LANCZOS, which differs from torch's by 1-2/255 on about 1% of pixels.

A video may also be a list of frames (any image source). As in the reference, such frames
are all kept (no sampling) and time-stamped at 24 fps unless the caller gives the rate.

A video may also be bytes in memory (:class:`VideoBytes`, or a ``data:`` URL): uploads, which
the server reads without temporary files. Those are opened only as the common video
containers (``MEMORY_FORMATS``): other FFmpeg demuxers (playlists, concat lists, image
sequences) may open further files or URLs named inside the data. Reading a video can be bounded
in time (``time_limit_s``), frame count and frame size, all checked as the packets and
pictures come, so a hostile file fails with a VideoError instead of running on.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from .image import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageProcessorConfig,
    _edge,
    _fit_longest_edge,
    load_image,
)

__all__ = [
    "VideoError",
    "VideoBytes",
    "VideoProcessorConfig",
    "video_config_dict",
    "VideoInfo",
    "VideoClip",
    "probe_video",
    "sample_frame_indices",
    "open_video",
    "preprocess_video",
]

# transformers caps the first resize of a frame at this edge (its MAX_IMAGE_SIZE).
_ABSOLUTE_MAX_EDGE = 4096
# transformers' timestamps for frames that come without metadata.
DEFAULT_FRAME_LIST_FPS = 24.0
# PIL resampling code -> torch interpolate mode; both run on uint8 in torchvision's resize.
_TORCH_MODES = {1: "lanczos", 3: "bicubic"}
# Demuxers allowed for videos read from memory (FFmpeg's format_whitelist; a demuxer is allowed
# when any of its names is listed), and how errors name them.
MEMORY_FORMATS = "mov,matroska,avi,mpegts,mpeg,flv,asf,ogg"
_MEMORY_FORMAT_NAMES = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, WMV/ASF or Ogg"


class VideoError(ValueError):
    """A video source could not be read or sampled."""


@dataclass(frozen=True)
class VideoBytes:
    """A video file held in memory, and the name its errors give it."""

    data: bytes
    name: str = "<video bytes>"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_data_url(cls, url: str, name: str | None = None) -> "VideoBytes":
        """The bytes of a ``data:<type>;base64,<data>`` URL (any media type: the bytes are probed)."""
        header, sep, payload = url.partition(",")
        name = name or f"<data URL {header[:60]}>"
        if not sep or not header[:5].lower() == "data:" or not header.lower().endswith(";base64"):
            raise VideoError(f"{name}: malformed data URL {url[:40]!r}...: expected 'data:video/<type>;base64,<data>'")
        try:
            return cls(base64.b64decode(payload, validate=True), name)
        except (binascii.Error, ValueError) as exc:
            raise VideoError(f"{name}: invalid base64 payload ({exc})") from None


@dataclass(frozen=True)
class _Deadline:
    seconds: float
    at: float     # time.monotonic()

    @classmethod
    def start(cls, seconds: float | None) -> "_Deadline | None":
        return None if seconds is None else cls(seconds, time.monotonic() + seconds)

    def check(self, source) -> None:
        if time.monotonic() > self.at:
            raise VideoError(f"{source}: not read within the time limit of {self.seconds:g} s: send a shorter or "
                             "smaller video, or sample fewer frames")


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoProcessorConfig:
    """Video settings; defaults are those of SmolVLM2-500M-Video-Instruct."""

    fps: float = 1.0          # frames sampled per second of video
    max_frames: int = 64
    longest_edge: int = 2048  # the first resize; the second squashes to image.max_image_size
    image: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)  # tile size, resample, mean/std

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VideoProcessorConfig":
        """Build from the video processor's config dict (see ``video_config_dict``).

        As the reference: ``video_sampling`` (fps, max_frames, video_size) wins over the
        top-level ``fps`` / ``num_frames``, and a top-level ``size`` wins over video_size.
        """
        image = ImageProcessorConfig.from_dict(data)
        if image.resample not in _TORCH_MODES:
            raise ValueError(f"video resample {image.resample} is not supported (1 = LANCZOS and 3 = BICUBIC are)")
        sampling = data.get("video_sampling") or {}
        fps = sampling.get("fps", data.get("fps"))
        max_frames = sampling.get("max_frames", data.get("num_frames"))
        size = data.get("size") if data.get("size") is not None else sampling.get("video_size")
        config = cls(
            fps=cls.fps if fps is None else float(fps),
            max_frames=cls.max_frames if max_frames is None else int(max_frames),
            longest_edge=cls.longest_edge if size is None else _edge(size, "size"),
            image=image,
        )
        if config.fps <= 0 or config.max_frames < 1:
            raise ValueError(f"video sampling needs fps > 0 and max_frames >= 1, got {config.fps} and {config.max_frames}")
        return config


def video_config_dict(processor_config: Mapping, video_preprocessor_config: Mapping,
                      preprocessor_config: Mapping) -> Mapping:
    """Pick the video processor's settings as transformers does: the ``video_processor``
    entry of processor_config.json, else video_preprocessor_config.json, else the image
    processor's preprocessor_config.json."""
    return processor_config.get("video_processor") or video_preprocessor_config or preprocessor_config


# --------------------------------------------------------------------------------------
# Files: probe, sample, decode
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What the scan of a video file found."""

    frames: int
    fps: float
    duration: float                     # seconds
    width: int
    height: int
    pts: tuple[int, ...] | None = None  # presentation time of each frame, ascending (None: the file has none)
    keyframes: tuple[tuple[int, int], ...] = ()  # (pts, dts) of each keyframe, by pts


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("reading video files needs PyAV: pip install 'meganeura[video]'") from None
    return av


def _check_source(source: str | Path | VideoBytes) -> Path | VideoBytes:
    if isinstance(source, VideoBytes):
        if not source.data:
            raise VideoError(f"{source}: empty file")
        return source
    if isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
        raise VideoError(f"remote URLs are not allowed here: {source!r}; download the video and pass a local path")
    path = Path(source)
    if not path.exists():
        raise VideoError(f"{path}: video file not found")
    if not path.is_file():  # a folder, FIFO or device would block or make no sense
        raise VideoError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")
    return path


def _reason(exc: Exception) -> str:
    """FFmpeg's words for an error, without the errno and file name PyAV adds."""
    return getattr(exc, "strerror", None) or str(exc)


def _open(source: Path | VideoBytes):
    av = _av()
    try:
        # metadata_errors: tags in any encoding (PyAV decodes them strictly as UTF-8 by default)
        if isinstance(source, VideoBytes):
            return av.open(io.BytesIO(source.data), options={"format_whitelist": MEMORY_FORMATS},
                           metadata_errors="replace")
        return av.open(str(source), metadata_errors="replace")
    except (av.error.FFmpegError, OSError) as exc:
        if isinstance(source, VideoBytes):
            raise VideoError(f"{source}: not a video file FFmpeg can read as {_MEMORY_FORMAT_NAMES} "
                             f"({_reason(exc)})") from None
        raise VideoError(f"{source}: not a video file FFmpeg can read ({_reason(exc)})") from None


def _check_size(source, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"{source}: frames are {width}x{height} = {width * height} pixels, above the limit of "
                         f"{max_pixels}; raise max_pixels to allow it")


def probe_video(source: str | Path | VideoBytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                max_stream_frames: int | None = None, time_limit_s: float | None = None) -> VideoInfo:
    """Scan a video file's first video stream (packets only, nothing is decoded).

    Raises :class:`VideoError` naming the file for anything that is not a readable video:
    a missing, empty or unreadable file, a still image, no video stream, frames above
    ``max_pixels``, more than ``max_stream_frames`` frames, no frame rate, no frames, fewer
    frames than the header promises, or a scan longer than ``time_limit_s``.
    """
    return _probe(_check_source(source), max_pixels, max_stream_frames, _Deadline.start(time_limit_s))


def _probe(path: Path | VideoBytes, max_pixels: int | None, max_stream_frames: int | None,
           deadline: _Deadline | None) -> VideoInfo:
    av = _av()
    with _open(path) as container:
        kind = container.format.name
        if kind == "image2" or kind.endswith("_pipe"):
            raise VideoError(f"{path}: a still image ({kind}), not a video: pass it as an image part")
        if not container.streams.video:
            raise VideoError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # PyAV makes no decoder context for a codec FFmpeg does not know
            raise VideoError(f"{path}: the video stream's codec is not one FFmpeg can decode")
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(f"{path}: the video stream has no frame size")
        _check_size(path, width, height, max_pixels)
        pts, ends, keys = [], [], []
        try:
            for packet in container.demux(stream):
                if deadline:
                    deadline.check(path)
                if max_stream_frames is not None and len(pts) >= max_stream_frames:
                    raise VideoError(f"{path}: more than {max_stream_frames} frames, the limit for a video here")
                if packet.size:  # empty packets only flush the decoder
                    pts.append(packet.pts)
                    ends.append(None if packet.pts is None else packet.pts + (packet.duration or 0))
                    if packet.is_keyframe:
                        keys.append((packet.pts, packet.pts if packet.dts is None else packet.dts))
        except av.error.FFmpegError as exc:
            raise VideoError(f"{path}: corrupt video data after {len(pts)} frames ({_reason(exc)})") from None
        if not pts:
            raise VideoError(f"{path}: the video stream has no frames")
        if stream.frames and len(pts) < stream.frames:
            raise VideoError(f"{path}: the video stream ends early: the header promises {stream.frames} frames, "
                             f"the file holds {len(pts)} (truncated file?)")
        timed = None not in pts
        # Seconds as torchcodec computes them: each timestamp times num / den, in doubles.
        num, den = stream.time_base.numerator, stream.time_base.denominator
        span = max(ends) * num / den - min(pts) * num / den if timed else 0
        rate = stream.average_rate or stream.guessed_rate
        if span > 0:
            fps, duration = len(pts) / span, span
        elif rate and rate > 0:  # no usable timestamps: trust the header's rate
            fps = float(rate)
            duration = len(pts) / fps
        else:
            raise VideoError(f"{path}: the video stream has no frame rate")
    return VideoInfo(frames=len(pts), fps=fps, duration=duration, width=width, height=height,
                     pts=tuple(sorted(pts)) if timed else None, keyframes=tuple(sorted(keys)) if timed else ())


def sample_frame_indices(info: VideoInfo, max_frames: int, fps: float, skip_secs: float = 1.0) -> np.ndarray:
    """The frames the reference picks: ascending, unique int indices into the video."""
    duration = info.duration
    count = max(min(round(fps * duration), max_frames), 1)
    start, end = 0, info.frames - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * fps:
        start, end = int(skip_secs * info.fps), int(info.frames - skip_secs * info.fps)
    start, end = max(0, start), min(end, info.frames - 1)
    if start >= end:
        start, end = 0, info.frames - 1
    return np.unique(np.linspace(start, end, count, dtype=int))


class _SeekMissed(Exception):
    """A seek landed after the frame it aimed at (the file's index is off)."""


def _decode(path: Path | VideoBytes, info: VideoInfo, indices: np.ndarray, max_pixels: int | None = None,
            deadline: _Deadline | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 [H, W, 3] frames at `indices` (ascending), in order."""
    av = _av()
    done = 0
    try:
        if info.pts is not None:
            try:
                for image in _decode_seeking(path, info, indices, max_pixels, deadline):
                    done += 1
                    yield image
                return
            except _SeekMissed:
                pass  # decode the rest from the start instead
        yield from _decode_in_order(path, indices[done:], max_pixels, deadline)
    except av.error.FFmpegError as exc:
        raise VideoError(f"{path}: corrupt video data ({_reason(exc)})") from None


def _watched(pictures, path, max_pixels: int | None, deadline: _Deadline | None):
    """The decoder's pictures, each checked against the size and time limits: a stream may
    change its frame size after the header, and a small file can hold a long video."""
    for picture in pictures:
        if deadline:
            deadline.check(path)
        _check_size(path, picture.width, picture.height, max_pixels)
        yield picture


def _decode_in_order(path: Path | VideoBytes, indices: np.ndarray, max_pixels: int | None,
                     deadline: _Deadline | None) -> Iterator[np.ndarray]:
    wanted = set(indices.tolist())
    count = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, picture in enumerate(_watched(container.decode(stream), path, max_pixels, deadline), start=1):
            if count - 1 in wanted:
                yield _upright(picture)
            if count - 1 == indices[-1]:
                return
    raise VideoError(f"{path}: the video stream ends early: {count} frames decoded, frame {indices[-1]} wanted")


def _decode_seeking(path: Path | VideoBytes, info: VideoInfo, indices: np.ndarray, max_pixels: int | None,
                    deadline: _Deadline | None) -> Iterator[np.ndarray]:
    # Jump to the keyframe before a wanted frame whenever one lies ahead of the decoder: a
    # long video then costs about one group of pictures per sampled frame, not all of it.
    # Seeks aim at the keyframe's decode time, which demuxers without an index search by.
    key_pts = [k for k, _ in info.keyframes]
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames, position = None, None
        for i in indices:
            target = info.pts[i]
            key = max(bisect.bisect_right(key_pts, target) - 1, 0)
            seeking = bool(info.keyframes) and (frames is None or position < key_pts[key])
            if seeking:
                container.seek(info.keyframes[key][1], stream=stream, backward=True)
            if seeking or frames is None:
                frames = _watched(container.decode(stream), path, max_pixels, deadline)
            for picture in frames:
                if picture.pts is None:
                    continue
                if seeking and picture.pts > target:
                    raise _SeekMissed
                seeking, position = False, picture.pts
                if position >= target:
                    break
            else:
                raise VideoError(f"{path}: the video stream ends early: frame {i} of {info.frames} "
                                 "could not be decoded")
            if position != target:
                raise VideoError(f"{path}: no frame at the time of frame {i} (damaged file?)")
            yield _upright(picture)


def _upright(picture) -> np.ndarray:
    """RGB uint8 [H, W, 3], turned by the display rotation (counter-clockwise degrees)."""
    return np.rot90(picture.to_ndarray(format="rgb24"), round(picture.rotation / 90) % 4)


# --------------------------------------------------------------------------------------
# Clips: a video made ready for the prompt
# --------------------------------------------------------------------------------------


@dataclass
class VideoClip:
    """Which frames of a video the model sees and when they were taken. Pixels are decoded
    only by :meth:`frames`, so a prompt can be checked for length before any decoding."""

    source: Path | VideoBytes | list[Image.Image]
    indices: np.ndarray                     # into the file's frames, or into the list
    timestamps: list[float]                 # seconds, one per frame
    duration: float | None                  # None for a list of frames
    info: VideoInfo | None = None
    max_pixels: int | None = None           # decoding limits (a file's)
    deadline: _Deadline | None = None

    def frames(self) -> Iterator[np.ndarray]:
        """RGB uint8 [H, W, 3] frames, in order."""
        if isinstance(self.source, (Path, VideoBytes)):
            yield from _decode(self.source, self.info, self.indices, self.max_pixels, self.deadline)
        else:
            for i in self.indices:
                yield np.asarray(self.source[i])


def _spread(count: int, max_frames: int | None) -> np.ndarray:
    if max_frames is None or count <= max_frames:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, max_frames, dtype=int))


def open_video(source: Any, config: VideoProcessorConfig | None = None, *, max_frames: int | None = None,
               fps: float | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               max_stream_frames: int | None = None, time_limit_s: float | None = None) -> VideoClip:
    """Probe and sample a video: a file path, bytes (:class:`VideoBytes`, ``bytes`` or a
    ``data:`` URL), a list of frames (image sources), or a uint8 [frames, H, W, 3] array.

    ``max_frames`` and ``fps`` override the checkpoint's sampling for a file (the reference's
    ``num_frames`` / ``fps``). For a list of frames, ``fps`` is the rate they were taken at
    (default 24, as transformers assumes) and ``max_frames`` keeps that many, evenly spread.
    For a file, ``max_stream_frames`` bounds the frames it may hold and ``time_limit_s`` the
    seconds from this call to the last frame decoded by :meth:`VideoClip.frames`.
    """
    config = config or VideoProcessorConfig()
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be at least 1, got {max_frames}")
    if fps is not None and not fps > 0:
        raise VideoError(f"fps must be positive, got {fps}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = VideoBytes(bytes(source))
    elif isinstance(source, str) and source[:5].lower() == "data:":
        source = VideoBytes.from_data_url(source)
    if isinstance(source, (str, Path, VideoBytes)):
        deadline = _Deadline.start(time_limit_s)
        source = _check_source(source)
        info = _probe(source, max_pixels, max_stream_frames, deadline)
        indices = sample_frame_indices(info, max_frames or config.max_frames, fps or config.fps)
        return VideoClip(source, indices, (indices / info.fps).tolist(), info.duration, info, max_pixels, deadline)
    if isinstance(source, np.ndarray) and source.ndim == 4:
        source = list(source)
    if isinstance(source, Sequence):
        if not source:
            raise VideoError("<frames>: a video given as a list of frames needs at least one frame")
        images = []
        for i, item in enumerate(source):
            try:
                images.append(load_image(item, max_pixels=max_pixels))
            except ImageError as exc:
                raise VideoError(f"<frames> frame {i}: {exc}") from None
        indices = _spread(len(images), max_frames)
        return VideoClip(images, indices, (indices / (fps or DEFAULT_FRAME_LIST_FPS)).tolist(), None)
    raise VideoError(f"unsupported video source type {type(source).__name__}: expected a path, bytes, a data: URL, "
                     "a list of frames or a uint8 [frames, H, W, 3] array")


# --------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _torch_interpolate():
    """torch's interpolate when it has uint8 LANCZOS (the reference's resize), else None."""
    try:
        import torch
        import torch.nn.functional as F

        F.interpolate(torch.zeros((1, 3, 4, 4), dtype=torch.uint8), size=(2, 2), mode="lanczos", antialias=True)
    except (ImportError, RuntimeError, ValueError, NotImplementedError):
        return None
    return F.interpolate


def _resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):  # the reference leaves equal sizes untouched
        return rgb
    interpolate = _torch_interpolate()
    if interpolate is None:
        return np.asarray(Image.fromarray(rgb).resize((width, height), resample=Image.Resampling(resample)))
    import torch

    frame = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].contiguous()  # [1, 3, H, W]
    out = interpolate(frame, size=(height, width), mode=_TORCH_MODES[resample], align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def _resize_frame(rgb: np.ndarray, config: VideoProcessorConfig) -> np.ndarray:
    image = config.image
    if not image.do_resize:
        return rgb
    # Same arithmetic as the image processor's first resize (the reference caps the edge first).
    rgb = _resize(rgb, *_fit_longest_edge(*rgb.shape[:2], min(config.longest_edge, _ABSOLUTE_MAX_EDGE)),
                  image.resample)
    return _resize(rgb, image.max_image_size, image.max_image_size, image.resample)


def _to_pixels(rgb: np.ndarray, image: ImageProcessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] with the reference's fused float32 arithmetic."""
    x = rgb.transpose(2, 0, 1).astype(np.float32)
    if image.do_normalize:
        scale = np.float32(1 / image.rescale_factor if image.do_rescale else 1)
        mean = (np.asarray(image.image_mean, np.float32) * scale)[:, None, None]
        std = (np.asarray(image.image_std, np.float32) * scale)[:, None, None]
        return (x - mean) / std
    if image.do_rescale:
        return x * np.float32(image.rescale_factor)
    return x


def preprocess_video(clip: VideoClip, config: VideoProcessorConfig | None = None) -> list[np.ndarray]:
    """The clip's frames as float32 [3, H, W] arrays, as the reference makes them
    (each a ``max_image_size`` square unless the config turns resizing off)."""
    config = config or VideoProcessorConfig()
    return [_to_pixels(_resize_frame(rgb, config), config.image) for rgb in clip.frames()]
