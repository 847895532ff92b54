"""Image loading and SmolVLM image preprocessing.

The numerics follow the PIL backend of transformers' SmolVLM image processor
(``SmolVLMImageProcessorPil``), which is what the published checkpoints are used with:

* every resize is a Pillow resize of a uint8 RGB image (LANCZOS by default), so the pixel
  values are quantised to uint8 after each resize; only then are they rescaled (float64
  multiply, cast to float32) and normalised (float32), in that order;
* an image is first resized so its *longest edge equals* ``longest_edge`` (small images are
  upscaled too), then up to multiples of the tile size, cut into row-major tiles, and
  followed by a "global" view: the multiple-sized image squashed to one tile;
* without splitting, the image is squashed to a single square tile.

Alpha is composited onto white (the processor's ``convert_to_rgb``). Note that
transformers' own ``load_image`` (used when the processor is handed a path or URL string)
instead calls ``convert("RGB")``, which drops alpha without compositing. We composite for
every source, so a picture gives the same pixels whether it arrives as a path or as an
opened PIL image; the two agree for opaque images.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageProcessorConfig",
    "load_image",
    "to_rgb",
    "preprocess_images",
    "pad_tiles",
]

# Refuse images above this many pixels before decoding them. 64 MP comfortably covers
# camera photos while keeping a hostile file from allocating gigabytes.
DEFAULT_MAX_PIXELS = 64_000_000

# transformers caps the first resize at this size (its MAX_IMAGE_SIZE); only matters for
# configs whose longest_edge exceeds it.
_ABSOLUTE_MAX_EDGE = 4096

ImageSource = Union[str, Path, bytes, bytearray, memoryview, np.ndarray, Image.Image]


class ImageError(ValueError):
    """An image source could not be turned into an RGB image."""


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way transformers' PIL backend does.

    Anything with transparency (an "A" band, or a ``transparency`` entry in ``info``, e.g.
    palette or colour-keyed images) is composited onto opaque white; everything else goes
    through Pillow's own ``convert("RGB")``. Quirks inherited on purpose:

    * 16/32-bit integer modes (I;16*, I) and float mode F are *clipped* to 0..255 by
      Pillow, not scaled: a 16-bit value of 1000 becomes 255 (white), and F truncates.
    * the band test is by name, so LAB (bands L, A, B) counts as "having alpha"; Pillow's
      LAB->RGBA conversion yields alpha 255, so the result is the plain RGB conversion.
    """
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:  # Pillow has no conversion path for a few exotic modes (La)
        raise ImageError(f"cannot convert image mode {image.mode!r} to RGB: {exc}") from exc


def _array_to_rgb(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    """HxW / HxWx{1,3,4} uint8 (or float in [0, 1]) array -> RGB image.

    For uint8 this mirrors transformers' numpy ``convert_to_rgb`` (grey repeated to three
    channels; RGBA blended onto white in float64 and rounded), so an array fed to
    transformers and ``load_image(array)`` fed to us give the same pixels. Floats are
    composited in float, then rounded to uint8 (transformers would truncate there and
    later rescale twice, so there is no parity to keep for float input).
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"unsupported array shape {array.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ImageError(f"image array is empty (shape {array.shape})")
    _check_pixels(width, height, max_pixels, "<array>")

    if array.dtype == np.uint8:
        white = 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ImageError("float image array contains NaN or infinity")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(
                f"float image array must hold values in [0, 1], got [{array.min()}, {array.max()}]"
            )
        white = 1.0
    else:
        raise ImageError(f"unsupported array dtype {array.dtype}: expected uint8, or float in [0, 1]")

    if array.shape[2] == 1:
        rgb = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        alpha = array[:, :, 3:4] / white
        rgb = alpha * array[:, :, :3] + (1.0 - alpha) * white
    else:
        rgb = array
    if white == 1.0:
        rgb = rgb * 255.0
    if rgb.dtype != np.uint8:
        rgb = np.round(rgb).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _check_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (possible decompression bomb; raise max_pixels to allow it)"
        )


def _decode(stream: Any, name: str, max_pixels: int | None) -> Image.Image:
    """Open an encoded image (path or file object), checking its size before decoding."""
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; Pillow's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image too large to decode (decompression bomb): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image file (format not recognised)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: cannot read image header: {exc}") from exc

    with image:
        # Image.open has only parsed the header: reject huge images before allocating them.
        _check_pixels(image.width, image.height, max_pixels, name)
        try:
            # Force the full decode so truncated or corrupt pixel data is reported here,
            # not later inside some resize.
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{name}: truncated or corrupt image data: {exc}") from exc
        try:
            # Honour the EXIF orientation tag as transformers' load_image does.
            upright = ImageOps.exif_transpose(image)
        except Exception as exc:  # malformed EXIF blocks raise assorted errors
            raise ImageError(f"{name}: cannot apply EXIF orientation: {exc}") from exc
        return to_rgb(upright)


def _decode_data_url(url: str, max_pixels: int | None) -> Image.Image:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/"):
        raise ImageError(f"malformed data URL {url[:40]!r}...: expected 'data:image/<type>;base64,<data>'")
    if not header.lower().endswith(";base64"):
        raise ImageError(f"data URL {header!r} is not base64-encoded; only ';base64' image data URLs are supported")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URL {header!r}: invalid base64 payload: {exc}") from exc
    if not data:
        raise ImageError(f"data URL {header!r}: empty payload")
    return _decode(io.BytesIO(data), f"<data URL {header}>", max_pixels)


def load_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image from a path, PIL image, numpy array, raw bytes or data URL, as RGB.

    EXIF orientation is applied to encoded sources (files, bytes, data URLs), as
    transformers' ``load_image`` does; PIL images and arrays are taken as they are, and an
    RGB PIL image is returned as is (not copied).

    Remote (http/https) URLs are refused: fetching is the caller's decision. Every failure
    raises :class:`ImageError` (a ``ValueError``) naming the source and the problem.
    ``max_pixels=None`` disables our size limit (Pillow's own bomb check still applies to
    encoded files).
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels, "<PIL image>")
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("<bytes>: empty image data")
        return _decode(io.BytesIO(bytes(source)), "<bytes>", max_pixels)
    if isinstance(source, str):
        lowered = source[:16].lower()
        if lowered.startswith(("http://", "https://")):
            raise ImageError(
                f"remote URLs are not allowed here: {source!r}; download the image and pass "
                "its bytes or a local path"
            )
        if lowered.startswith("data:"):
            return _decode_data_url(source, max_pixels)
        source = Path(source)
    if isinstance(source, Path):
        if not source.exists():
            raise ImageError(f"{source}: image file not found")
        if not source.is_file():
            raise ImageError(f"{source}: not a regular file")
        if source.stat().st_size == 0:
            raise ImageError(f"{source}: empty file")
        return _decode(source, str(source), max_pixels)
    raise ImageError(
        f"unsupported image source type {type(source).__name__}: expected a path, PIL image, "
        "numpy array, bytes or a data:image/...;base64 URL"
    )


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def _edge(value: Any, key: str) -> int:
    """Read ``{"longest_edge": n}`` (the only size form SmolVLM uses) or a bare int."""
    if isinstance(value, Mapping):
        if "longest_edge" not in value:
            raise ValueError(f"{key} must have a 'longest_edge' entry, got {dict(value)}")
        value = value["longest_edge"]
    return int(value)


def _triple(value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {values}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Image preprocessing settings; defaults are those of SmolVLM2-500M-Video-Instruct."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    longest_edge: int = 2048  # "size": {"longest_edge": ...}
    do_image_splitting: bool = True
    max_image_size: int = 512  # tile side: "max_image_size": {"longest_edge": ...}
    resample: int = 1  # PIL resampling code; 1 = LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_pad: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageProcessorConfig":
        """Build from a checkpoint's preprocessor_config.json contents (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if value is None:  # an explicit null keeps the default
                continue
            if key == "size":
                kwargs["longest_edge"] = _edge(value, "size")
            elif key == "max_image_size":
                kwargs["max_image_size"] = _edge(value, "max_image_size")
            elif key in ("image_mean", "image_std"):
                kwargs[key] = _triple(value)
            elif key == "resample":
                kwargs[key] = int(value)
            elif key == "rescale_factor":
                kwargs[key] = float(value)
            elif key.startswith("do_") and key in known:
                kwargs[key] = bool(value)
        return cls(**kwargs)

    @property
    def resample_filter(self) -> Image.Resampling:
        return Image.Resampling(self.resample)


def _fit_longest_edge(height: int, width: int, longest: int) -> tuple[int, int]:
    """Target size with the longest edge set to ``longest`` (up- or down-scaling).

    Same arithmetic as the reference (it matters: int() truncation on a float ratio): the
    short side is truncated, bumped to an even number, and kept >= 1; then anything above
    the absolute 4096 cap is scaled down again, truncating, without the even bump.
    """
    ratio = width / height
    if width >= height:
        width = longest
        height = int(width / ratio)
        height += height % 2
    else:
        height = longest
        width = int(height * ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)

    ratio = width / height
    if width >= height and width > _ABSOLUTE_MAX_EDGE:
        width = _ABSOLUTE_MAX_EDGE
        height = int(width / ratio)
    elif height > width and height > _ABSOLUTE_MAX_EDGE:
        height = _ABSOLUTE_MAX_EDGE
        width = int(height * ratio)
    return max(height, 1), max(width, 1)


def _round_up_to_tiles(height: int, width: int, tile: int) -> tuple[int, int]:
    """Grow both sides to multiples of ``tile``.

    The reference derives the short side from the *rounded* long side through the aspect
    ratio before rounding it up; we keep that order since it can change the tile count.
    """
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * ratio) / tile) * tile
    return height, width


def _resize(image: Image.Image, height: int, width: int, config: ImageProcessorConfig) -> Image.Image:
    return image.resize((width, height), resample=config.resample_filter)


def _to_tiles(image: Image.Image, config: ImageProcessorConfig) -> tuple[list[Image.Image], int, int]:
    """Resize and split one RGB image; returns (tiles, rows, cols), rows = cols = 0 if unsplit."""
    if config.do_resize:
        image = _resize(image, *_fit_longest_edge(image.height, image.width, config.longest_edge), config)

    tile = config.max_image_size
    if not config.do_image_splitting:
        return [_resize(image, tile, tile, config)], 0, 0

    image = _resize(image, *_round_up_to_tiles(image.height, image.width, tile), config)
    if image.height <= tile and image.width <= tile:
        return [image], 0, 0

    # Both sides are multiples of the tile now, so the grid covers the image exactly.
    rows, cols = image.height // tile, image.width // tile
    tiles = [
        image.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    # The global view is the multiple-sized image squashed to one tile (not the original).
    tiles.append(_resize(image, tile, tile, config))
    return tiles, rows, cols


def _tile_to_array(tile: Image.Image, config: ImageProcessorConfig) -> np.ndarray:
    """uint8 HWC tile -> float32 CHW, rescaled then normalised with the reference's dtypes."""
    array = np.asarray(tile).transpose(2, 0, 1)
    if config.do_rescale:
        # float64 multiply then cast, as the reference does, so values match bit for bit.
        array = (array.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        array = array.astype(np.float32, copy=False)
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
        array = (array - mean) / std
    return array.astype(np.float32, copy=False)


def pad_tiles(samples: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-sample CHW tiles into [batch, max_tiles, C, H, W], zero-padded at the
    bottom/right and at the end of the tile list, with a bool [batch, max_tiles, H, W]
    mask that is True exactly on real pixels (all False for padding tiles)."""
    all_tiles = [t for tiles in samples for t in tiles]
    if not all_tiles:
        raise ValueError("no images in the batch")
    channels = all_tiles[0].shape[0]
    height = max(t.shape[1] for t in all_tiles)
    width = max(t.shape[2] for t in all_tiles)
    max_tiles = max(len(tiles) for tiles in samples)
    pixel_values = np.zeros((len(samples), max_tiles, channels, height, width), dtype=np.float32)
    mask = np.zeros((len(samples), max_tiles, height, width), dtype=bool)
    for i, tiles in enumerate(samples):
        for j, t in enumerate(tiles):
            pixel_values[i, j, :, : t.shape[1], : t.shape[2]] = t
            mask[i, j, : t.shape[1], : t.shape[2]] = True
    return pixel_values, mask


def preprocess_images(
    images: Sequence[Sequence[Image.Image]], config: ImageProcessorConfig | None = None
) -> dict[str, Any]:
    """Turn a batch (one list of images per prompt) into model inputs.

    Returns a dict with
      ``pixel_values``: float32 [batch, max_tiles, 3, H, W] (with ``do_pad``; otherwise a
        list of float32 [tiles, 3, H, W] arrays, one per sample),
      ``pixel_attention_mask``: bool [batch, max_tiles, H, W] (only with ``do_pad``),
      ``rows``, ``cols``: per sample, per image tile grid (0, 0 when not split),
      ``image_grids``: the same as per-sample lists of (rows, cols) tuples.
    Tiles of all images of a sample are concatenated in order, each image's tiles followed
    by its global view.
    """
    config = config or ImageProcessorConfig()
    if isinstance(images, Image.Image) or any(isinstance(s, Image.Image) for s in images):
        raise TypeError("images must be a list with one list of PIL images per sample")

    samples: list[list[np.ndarray]] = []
    rows: list[list[int]] = []
    cols: list[list[int]] = []
    for sample in images:
        sample_tiles: list[np.ndarray] = []
        sample_rows: list[int] = []
        sample_cols: list[int] = []
        for image in sample:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected PIL images (see load_image), got {type(image).__name__}")
            if config.do_convert_rgb:
                image = to_rgb(image)
            elif image.mode != "RGB":
                raise ImageError(f"do_convert_rgb is off but the image is in mode {image.mode!r}, not RGB")
            tiles, r, c = _to_tiles(image, config)
            sample_tiles.extend(_tile_to_array(t, config) for t in tiles)
            sample_rows.append(r)
            sample_cols.append(c)
        samples.append(sample_tiles)
        rows.append(sample_rows)
        cols.append(sample_cols)

    out: dict[str, Any] = {
        "rows": rows,
        "cols": cols,
        "image_grids": [list(zip(r, c)) for r, c in zip(rows, cols)],
    }
    if config.do_pad:
        out["pixel_values"], out["pixel_attention_mask"] = pad_tiles(samples)
    else:
        out["pixel_values"] = [np.stack(tiles) if tiles else np.zeros((0, 3, 0, 0), np.float32) for tiles in samples]
    return out
