"""Parity of meganeura.processing.image with transformers' SmolVLM image processor.

The reference is ``transformers.SmolVLMImageProcessorPil`` (transformers 5.x), the Pillow /
NumPy backend of the SmolVLM image processor: the same LANCZOS resizes of uint8 images
that the published checkpoints use. The torchvision backend is not compared here.
Images are the photographs scikit-image ships plus synthetic images of odd sizes and
Pillow modes. Every bad-input path of ``load_image`` is checked for a clear message.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from meganeura.processing.image import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageProcessorConfig,
    load_image,
    pad_tiles,
    preprocess_images,
    to_rgb,
)

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
from transformers import SmolVLMImageProcessorPil  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

# preprocessor_config.json of HuggingFaceTB/SmolVLM2-500M-Video-Instruct (video keys
# trimmed): the extra keys must be ignored by ImageProcessorConfig.from_dict.
SMOLVLM2_CONFIG = {
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SmolVLMImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 512},
    "processor_class": "SmolVLMProcessor",
    "resample": 1,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048},
    "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}},
}
_HF_KEYS = (
    "do_convert_rgb do_image_splitting do_normalize do_pad do_rescale do_resize image_mean "
    "image_std max_image_size resample rescale_factor size"
).split()

RNG = np.random.default_rng(1234)


def _reference(config: dict) -> SmolVLMImageProcessorPil:
    return SmolVLMImageProcessorPil(**{k: config[k] for k in _HF_KEYS if k in config})


@pytest.fixture(scope="module")
def ref():
    return _reference(SMOLVLM2_CONFIG)


def assert_parity(batch, config=SMOLVLM2_CONFIG, ref_processor=None):
    ref_processor = ref_processor or _reference(config)
    ours = preprocess_images(batch, ImageProcessorConfig.from_dict(config))
    theirs = ref_processor(images=batch, return_row_col_info=True)
    assert ours["rows"] == theirs["rows"]
    assert ours["cols"] == theirs["cols"]
    assert ours["image_grids"] == [list(zip(r, c)) for r, c in zip(theirs["rows"], theirs["cols"])]
    expected = np.asarray(theirs["pixel_values"])
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == expected.shape
    np.testing.assert_allclose(ours["pixel_values"], expected, rtol=0, atol=1e-5)
    assert ours["pixel_attention_mask"].dtype == bool
    np.testing.assert_array_equal(ours["pixel_attention_mask"], np.asarray(theirs["pixel_attention_mask"]) == 1)
    return ours


def _noise(height: int, width: int) -> Image.Image:
    """Structured + random content, so resampling differences would show."""
    y, x = np.mgrid[0:height, 0:width]
    grad = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = RNG.integers(0, 64, (height, width, 3))
    return Image.fromarray(np.clip(grad + noise - 32, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def test_config_defaults_are_smolvlm2_500m():
    assert ImageProcessorConfig.from_dict(SMOLVLM2_CONFIG) == ImageProcessorConfig()
    cfg = ImageProcessorConfig()
    assert (cfg.longest_edge, cfg.max_image_size, cfg.resample) == (2048, 512, 1)
    assert cfg.resample_filter == Image.Resampling.LANCZOS


def test_config_from_dict_overrides_and_ignores_unknown_keys():
    cfg = ImageProcessorConfig.from_dict(
        {"do_image_splitting": False, "size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384},
         "image_mean": 0.25, "resample": 3, "something_new": [1, 2], "do_pad": None}
    )
    assert cfg.do_image_splitting is False
    assert (cfg.longest_edge, cfg.max_image_size, cfg.resample) == (1536, 384, 3)
    assert cfg.image_mean == (0.25, 0.25, 0.25)
    assert cfg.do_pad is True  # null keeps the default
    with pytest.raises(ValueError, match="longest_edge"):
        ImageProcessorConfig.from_dict({"size": {"height": 10, "width": 10}})


def test_size_arithmetic_matches_reference():
    """Target sizes of both resizes over many shapes, including the 4096 cap, without
    resizing anything: the reference's resize is replaced by one that reports its size."""
    from transformers.models.smolvlm import image_processing_pil_smolvlm as hf_module

    from meganeura.processing.image import _fit_longest_edge, _round_up_to_tiles

    class SizeOnly(SmolVLMImageProcessorPil):
        def resize(self, image, size, resample=None, **kwargs):
            return (size.height, size.width)

    probe = SizeOnly()
    rng = np.random.default_rng(7)
    shapes = [(1, 1), (1, 9999), (9999, 1), (2, 3), (4095, 4097)] + [tuple(s) for s in rng.integers(1, 6000, (300, 2))]
    for height, width in shapes:
        for longest in (364, 2048, 5000, 9000):
            image = np.broadcast_to(np.uint8(0), (3, height, width))
            expected = hf_module.get_resize_output_image_size(image, resolution_max_side=longest)
            assert _fit_longest_edge(height, width, longest) == tuple(expected), (height, width, longest)
        for tile in (384, 512):
            image = np.broadcast_to(np.uint8(0), (3, height, width))
            assert _round_up_to_tiles(height, width, tile) == probe.resize_for_vision_encoder(image, tile)


# --------------------------------------------------------------------------------------
# Processor parity
# --------------------------------------------------------------------------------------

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]  # camera is greyscale (L)


@pytest.mark.parametrize("name", PHOTOS)
def test_parity_skimage_photographs(name, ref):
    image = Image.fromarray(getattr(skimage_data, name)())
    if name == "camera":
        assert image.mode == "L"
    assert_parity([[image]], ref_processor=ref)


@pytest.mark.parametrize(
    "height,width",
    [(1, 1), (17, 900), (900, 17), (2050, 300), (513, 513), (511, 1025), (3, 5000)],
)
def test_parity_odd_sizes(height, width, ref):
    out = assert_parity([[_noise(height, width)]], ref_processor=ref)
    assert out["pixel_values"].shape[-2:] == (512, 512)


def _mode_images() -> dict[str, Image.Image]:
    base = _noise(37, 53)
    alpha = Image.fromarray(RNG.integers(0, 256, (37, 53), dtype=np.uint8))
    rgba = base.copy()
    rgba.putalpha(alpha)
    la = base.convert("L")
    la.putalpha(alpha)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = int(np.asarray(palette)[0, 0])
    keyed = base.copy()
    keyed.info["transparency"] = tuple(int(v) for v in np.asarray(base)[5, 7])
    wide = RNG.integers(0, 65536, (37, 53)).astype(np.uint16)
    return {
        "RGBA": rgba,
        "RGBa": rgba.convert("RGBa"),
        "P": palette,
        "P+transparency": palette_transparent,
        "PA": palette.convert("PA"),
        "L": base.convert("L"),
        "LA": la,
        "1": base.convert("1"),
        "CMYK": base.convert("CMYK"),
        "YCbCr": base.convert("YCbCr"),
        "LAB": base.convert("LAB"),
        "HSV": base.convert("HSV"),
        "RGB+transparency": keyed,
        "I;16": Image.fromarray(wide),
        "I": Image.fromarray(wide.astype(np.int32) - 20000),
        "F": Image.fromarray(RNG.uniform(-10, 300, (37, 53)).astype(np.float32)),
    }


MODE_IMAGES = _mode_images()


@pytest.mark.parametrize("mode", list(MODE_IMAGES))
def test_parity_pillow_modes(mode, ref):
    image = MODE_IMAGES[mode]
    assert_parity([[image]], ref_processor=ref)
    # load_image goes through the same conversion as the processor's convert_to_rgb.
    expected = ref.convert_to_rgb(image.copy())
    np.testing.assert_array_equal(np.asarray(load_image(image)), expected)


def test_alpha_is_composited_onto_white():
    transparent = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert np.asarray(load_image(transparent)).tolist()[0][0] == [255, 255, 255]
    assert np.asarray(load_image(half)).tolist()[0][0] == [127, 127, 127]


def test_sixteen_bit_is_clipped_not_scaled():
    # Pillow's I;16 -> RGB clamps to 255 (the reference inherits this): values are not scaled.
    image = Image.fromarray(np.array([[0, 100, 255, 256, 65535]], dtype=np.uint16))
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 100, 255, 255, 255]


def test_parity_without_splitting(ref):
    config = {**SMOLVLM2_CONFIG, "do_image_splitting": False}
    batch = [
        [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.coffee())],
        [_noise(17, 900)],
    ]
    out = assert_parity(batch, config)
    assert out["rows"] == [[0, 0], [0]] and out["cols"] == [[0, 0], [0]]
    assert out["pixel_values"].shape == (2, 2, 3, 512, 512)
    assert not out["pixel_attention_mask"][1, 1].any()  # sample 1 has one image: tile 2 is padding


def test_parity_batch_with_different_tile_counts(ref):
    batch = [[Image.fromarray(skimage_data.coffee()), _noise(17, 900)], [Image.fromarray(skimage_data.chelsea())]]
    out = assert_parity(batch, ref_processor=ref)
    assert out["rows"] == [[3, 1], [3]] and out["cols"] == [[4, 4], [4]]
    assert out["pixel_values"].shape == (2, 18, 3, 512, 512)
    assert out["pixel_attention_mask"][0].all()
    assert out["pixel_attention_mask"][1, :13].all() and not out["pixel_attention_mask"][1, 13:].any()
    assert not out["pixel_values"][1, 13:].any()


def test_parity_without_resize():
    config = {**SMOLVLM2_CONFIG, "do_resize": False}
    assert_parity([[_noise(700, 1100)], [_noise(300, 200)]], config)


def test_pad_tiles_matches_reference_pad(ref):
    # Spatial padding is unreachable through SmolVLM images (tiles are always square) but
    # is used for video frames; compare with the reference's pad on its own.
    tiles = [[RNG.standard_normal((3, 40, 60)).astype(np.float32), RNG.standard_normal((3, 64, 32)).astype(np.float32)],
             [RNG.standard_normal((3, 10, 10)).astype(np.float32)]]
    values, mask = pad_tiles(tiles)
    assert values.shape == (2, 2, 3, 64, 60) and mask.shape == (2, 2, 64, 60)
    for i, sample in enumerate(tiles):
        for j, tile in enumerate(sample):
            ref_tile, ref_mask = ref.pad(tile, (64, 60))
            np.testing.assert_array_equal(values[i, j], ref_tile)
            np.testing.assert_array_equal(mask[i, j], ref_mask == 1)
    assert not values[1, 1].any() and not mask[1, 1].any()


def test_preprocess_rejects_flat_list_and_non_images():
    image = _noise(8, 8)
    with pytest.raises(TypeError, match="one list of PIL images per sample"):
        preprocess_images([image])
    with pytest.raises(TypeError, match="load_image"):
        preprocess_images([[np.zeros((8, 8, 3), np.uint8)]])
    with pytest.raises(ImageError, match="mode 'L'"):
        preprocess_images([[image.convert("L")]], ImageProcessorConfig(do_convert_rgb=False))


# --------------------------------------------------------------------------------------
# load_image: sources
# --------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def test_load_image_sources_agree(tmp_path):
    image = _noise(31, 45)
    data = _png_bytes(image)
    path = tmp_path / "noise.png"
    path.write_bytes(data)
    expected = np.asarray(image)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (path, str(path), data, bytearray(data), memoryview(data), url, image, expected):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_load_image_path_matches_transformers_load_image_with_exif(tmp_path):
    # An EXIF orientation of 6 means "rotate 90 degrees clockwise to display".
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    _noise(20, 36).save(path, exif=exif.tobytes(), quality=95)
    ours = load_image(path)
    assert ours.size == (20, 36)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))


def test_load_image_file_with_alpha_is_composited(tmp_path):
    # transformers' own load_image would convert("RGB") here (dropping alpha); we composite
    # like its processor does for opened images, so both routes give the same pixels.
    image = MODE_IMAGES["RGBA"]
    path = tmp_path / "alpha.png"
    image.save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(to_rgb(image)))


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_load_image_uint8_arrays_match_transformers(channels, ref):
    shape = (23, 41) if channels is None else (23, 41, channels)
    array = RNG.integers(0, 256, shape, dtype=np.uint8)
    ours = preprocess_images([[load_image(array)]])
    # transformers takes the raw array (its numpy convert_to_rgb); HxW goes in as an L image.
    raw = Image.fromarray(array) if channels is None else array
    theirs = ref(images=[[raw]], return_row_col_info=True)
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)


def test_load_image_float_array():
    array = RNG.uniform(0, 1, (5, 7, 3))
    np.testing.assert_array_equal(np.asarray(load_image(array)), np.round(array * 255).astype(np.uint8))
    rgba = np.concatenate([array, np.zeros((5, 7, 1))], axis=-1)  # fully transparent
    assert (np.asarray(load_image(rgba.astype(np.float32))) == 255).all()


# --------------------------------------------------------------------------------------
# load_image: bad input
# --------------------------------------------------------------------------------------


def _fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which carries 1x1 worth of data:
    if we decoded before checking the size we would get a truncation error instead."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00")) + chunk(b"IEND", b"")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="not found"):
        load_image(str(path))


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="not a regular file") as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="empty image data"):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image file") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="<bytes>: not an image file"):
        load_image(b"GIF? no")


def test_decompression_bomb_checked_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_fake_png_header(10_000, 10_000))  # 100 MP > 64 MP default
    with pytest.raises(ImageError, match="decompression bomb") as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message and "10000x10000" in message and str(DEFAULT_MAX_PIXELS) in message
    # A header below the limit gets decoded, and then the missing pixel data shows.
    small = tmp_path / "small.png"
    small.write_bytes(_fake_png_header(100, 100))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(small)


def test_decompression_bomb_beyond_pillows_own_limit(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_fake_png_header(30_000, 30_000))  # Pillow itself refuses this at open
    with pytest.raises(ImageError, match="decompression bomb") as info:
        load_image(path, max_pixels=None)
    assert str(path) in str(info.value)


def test_pixel_limit_is_configurable():
    image = _noise(20, 20)
    with pytest.raises(ImageError, match="above the limit of 100"):
        load_image(_png_bytes(image), max_pixels=100)
    with pytest.raises(ImageError, match="<PIL image>.*above the limit"):
        load_image(image, max_pixels=100)
    with pytest.raises(ImageError, match="<array>.*above the limit"):
        load_image(np.asarray(image), max_pixels=100)
    assert load_image(_png_bytes(image), max_pixels=None).size == (20, 20)


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "HTTPS://example.com/cat.png"])
def test_remote_urls_are_refused(url):
    with pytest.raises(ValueError, match="remote URLs are not allowed") as info:
        load_image(url)
    assert isinstance(info.value, ImageError) and "example.com/cat.png" in str(info.value)


def test_bad_data_urls():
    with pytest.raises(ImageError, match="malformed data URL"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match="not base64-encoded"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,***")
    with pytest.raises(ImageError, match="empty payload"):
        load_image("data:image/png;base64,")
    with pytest.raises(ImageError, match=r"<data URL data:image/png;base64>: not an image file"):
        load_image("data:image/png;base64," + base64.b64encode(b"not a png").decode())


@pytest.mark.parametrize("source", [42, None, [1, 2, 3], {"url": "x"}])
def test_unsupported_source_type(source):
    with pytest.raises(ImageError, match=f"unsupported image source type {type(source).__name__}"):
        load_image(source)


def test_bad_arrays():
    with pytest.raises(ImageError, match="unsupported array shape"):
        load_image(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ImageError, match="unsupported array dtype"):
        load_image(np.zeros((8, 8, 3), np.uint16))
    with pytest.raises(ImageError, match=r"values in \[0, 1\]"):
        load_image(np.full((8, 8, 3), 2.0))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((8, 8, 3), np.nan))
    with pytest.raises(ImageError, match="empty"):
        load_image(np.zeros((0, 8, 3), np.uint8))


def test_unconvertible_mode():
    image = Image.new("La", (4, 4))
    with pytest.raises(ImageError, match="cannot convert image mode 'La' to RGB"):
        load_image(image)
