"""Image preprocessing against a straightforward reference pipeline, on real photographs.

The reference is what a training script does with Pillow: full decode, EXIF
transpose, ``convert("RGB")``, resize the shorter side, centre crop, then
``(x / 255 - mean) / std`` in float64. Non-JPEG formats must match it to one
grey level (the engine only resamples the crop); JPEGs are decoded with
DCT-domain downscaling, so they match closely but not exactly.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data as skdata

from service import errors
from service.preprocess import Preprocessor, resized_geometry, sniff_format
from tests.helpers.tinymodel import tiny_meta

META = tiny_meta(size=224).replace(resize=256)
# One grey level after normalisation is 1 / (255 * std) ~= 0.0175 for ImageNet std.
ONE_LEVEL = 1.0 / (255 * min(META.std)) + 1e-6


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def reference(
    data: bytes, meta=META, *, resample=Image.Resampling.BILINEAR, wide_grey: bool = False
) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image)
    if wide_grey:
        grey = np.asarray(image).astype(np.float64) / 65535.0 * 255.0
        image = Image.fromarray(np.rint(grey).astype(np.uint8), "L")
    image = image.convert("RGB")
    new_w, new_h, left, top = resized_geometry(image.width, image.height, meta.resize, meta.crop)
    crop_h, crop_w = meta.crop
    image = image.resize((new_w, new_h), resample).crop((left, top, left + crop_w, top + crop_h))
    x = np.asarray(image).astype(np.float64) / 255.0
    if meta.color_order == "BGR":
        x = x[..., ::-1]
    # mean/std are given in the model's channel order (ModelMeta's docstring).
    mean, std = np.array(meta.mean), np.array(meta.std)
    return ((x - mean) / std).transpose(2, 0, 1)


def pixel_levels(a: np.ndarray, b: np.ndarray, meta=META) -> np.ndarray:
    """Absolute difference of two normalised tensors in 0..255 grey levels."""
    std = np.asarray(meta.std)[:, None, None]
    return np.abs(a - b) * std * 255.0


@pytest.fixture(scope="module")
def pre() -> Preprocessor:
    return Preprocessor(META, max_pixels=40_000_000)


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())  # 600x400 photograph


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    return Image.fromarray(skdata.chelsea())  # 451x300: odd width


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF"])
@pytest.mark.parametrize("photo", ["coffee", "chelsea"])
def test_lossless_formats_match_reference(pre, fmt, photo, request):
    image = request.getfixturevalue(photo)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(image, fmt, **kwargs)
    out = pre(data)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference(data), atol=ONE_LEVEL, rtol=0)


@pytest.mark.parametrize("size", [(1024, 768), (451, 300), (300, 451)])
def test_jpeg_fast_path_close_to_full_decode(pre, coffee, size):
    data = encode(coffee.resize(size, Image.Resampling.LANCZOS), "JPEG", quality=90)
    diff = pixel_levels(pre(data), reference(data))
    # DCT-domain downscaling is a different (good) low-pass filter than a full decode + bilinear.
    assert diff.mean() < 3.0, diff.mean()
    assert np.percentile(diff, 99) < 25, np.percentile(diff, 99)


def test_greyscale_jpeg_gives_three_equal_channels(pre):
    data = encode(Image.fromarray(skdata.camera()), "JPEG", quality=92)
    rgb = pre.decode(data)
    assert rgb.shape == (224, 224, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert pixel_levels(pre(data), reference(data)).mean() < 3.0


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_exif_orientation_is_honoured(pre, coffee, fmt):
    upright = coffee  # landscape 600x400
    # Stored rotated by 90 degrees; orientation 6 says "rotate 90 clockwise to display".
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    kwargs = {"quality": 95} if fmt == "JPEG" else ({"lossless": True} if fmt == "WEBP" else {})
    data = encode(stored, fmt, exif=exif, **kwargs)
    upright_data = encode(upright, "PNG")
    out = pre(data)
    assert pixel_levels(out, reference(upright_data)).mean() < 3.0
    # Ignoring the tag would give a visibly different (rotated) crop.
    unrotated = encode(stored, "PNG")
    assert pixel_levels(out, reference(unrotated)).mean() > 15.0


def test_cmyk_jpeg_converts_to_the_right_colours(pre, coffee):
    data = encode(coffee.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = pre(data)
    assert pixel_levels(out, reference(data)).mean() < 3.0
    # And the colours are those of the RGB photo, not inverted or swapped.
    assert pixel_levels(out, reference(encode(coffee, "PNG"))).mean() < 6.0


def test_16_bit_png_is_scaled_not_clipped(pre):
    camera = skdata.camera()
    wide = camera.astype(np.uint16) * 257  # the same picture on a 0..65535 scale
    data = encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = pre(data)
    np.testing.assert_allclose(out, reference(encode(Image.fromarray(camera), "PNG")), atol=ONE_LEVEL, rtol=0)
    np.testing.assert_allclose(out, reference(data, wide_grey=True), atol=ONE_LEVEL, rtol=0)


def test_palette_png(pre, coffee):
    data = encode(coffee.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_allclose(pre(data), reference(data), atol=ONE_LEVEL, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1"])
def test_other_pixel_modes_convert_like_training(pre, coffee, mode):
    image = coffee.convert(mode)
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.random.default_rng(0).integers(0, 256, coffee.size[::-1], dtype=np.uint8))
        image.putalpha(alpha)
    data = encode(image, "PNG")
    np.testing.assert_allclose(pre(data), reference(data), atol=ONE_LEVEL, rtol=0)


def test_animated_gif_uses_first_frame(pre):
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    blue = Image.new("RGB", (64, 48), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    rgb = pre.decode(data)
    assert (rgb[..., 0] == 255).all() and (rgb[..., 2] == 0).all()


def test_colour_order_and_interpolation_follow_metadata(coffee):
    data = encode(coffee, "PNG")
    for interpolation, resample in [
        ("nearest", Image.Resampling.NEAREST),
        ("bicubic", Image.Resampling.BICUBIC),
    ]:
        meta = META.replace(interpolation=interpolation, color_order="BGR")
        out = Preprocessor(meta, max_pixels=10**8)(data)
        np.testing.assert_allclose(out, reference(data, meta, resample=resample), atol=ONE_LEVEL, rtol=0)
    rgb = Preprocessor(META, max_pixels=10**8)(data)
    bgr = Preprocessor(META.replace(color_order="BGR"), max_pixels=10**8)(data)
    std, mean = np.array(META.std)[:, None, None], np.array(META.mean)[:, None, None]
    # Same pixels, channels reversed, each normalised with its own channel's statistics.
    np.testing.assert_allclose((bgr[::-1] * std[::-1]) + mean[::-1], rgb * std + mean, atol=1e-5)


def test_non_square_crop(coffee):
    meta = META.replace(crop=(200, 240), resize=256)
    data = encode(coffee, "PNG")
    out = Preprocessor(meta, max_pixels=10**8)(data)
    assert out.shape == (3, 200, 240)
    np.testing.assert_allclose(out, reference(data, meta), atol=ONE_LEVEL, rtol=0)


def test_tiny_and_extreme_aspect_images(pre):
    one = encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    rgb = pre.decode(one)
    assert rgb.shape == (224, 224, 3) and (rgb == (10, 200, 30)).all()
    # 1x20000: a full resize would be 224 x 4,480,000 pixels; only the crop is computed.
    thin = np.zeros((20000, 1, 3), np.uint8)
    thin[10000:] = 255
    out = pre.decode(encode(Image.fromarray(thin), "PNG"))
    assert out.shape == (224, 224, 3)


def test_sniff_format():
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "PNG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"GIF89a") == "GIF"
    assert sniff_format(b"BM") == "BMP"
    assert sniff_format(b"%PDF-1.7") is None


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (valid CRC, tiny data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    body += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    return body + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """Patch the SOF0 marker of a baseline JPEG to claim another size."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


@pytest.mark.parametrize(
    "case,expected",
    [
        ("empty", "image is empty (0 bytes)"),
        ("text", "not an image: 11 bytes that are not JPEG, PNG, WebP, BMP or GIF (it starts with the text"),
        ("json", "it looks like JSON text"),
        ("truncated_jpeg", "JPEG image is corrupt or truncated"),
        ("truncated_png", "PNG image is corrupt or truncated"),
        ("corrupt_header", "JPEG image is corrupt or truncated"),
        ("png_bomb", "PNG image has 10000000000 pixels, more than the limit of 40000000"),
        ("jpeg_bomb", "JPEG image has 3600000000 pixels, more than the limit of 40000000"),
        ("jpeg_over_limit", "JPEG image is 7000x6000 = 42000000 pixels, more than the limit of 40000000"),
        ("garbage_after_signature", "PNG image is corrupt or truncated"),
    ],
)
def test_bad_images_raise_precise_invalid_input(pre, coffee, case, expected):
    jpeg = encode(coffee, "JPEG")
    png = encode(coffee, "PNG")
    data = {
        "empty": b"",
        "text": b"hello world",
        "json": b'{"image": "abc"}',
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "truncated_png": png[: len(png) // 2],
        "corrupt_header": b"\xff\xd8\xff\xe0" + b"\x00" * 64,
        "png_bomb": _png_claiming(100_000, 100_000),
        "jpeg_bomb": _jpeg_claiming(jpeg, 60000, 60000),
        "jpeg_over_limit": _jpeg_claiming(jpeg, 7000, 6000),
        "garbage_after_signature": b"\x89PNG\r\n\x1a\n" + b"\x01" * 100,
    }[case]
    with pytest.raises(errors.InvalidInput) as info:
        pre(data)
    assert expected in str(info.value)


def test_pixel_limit_comes_from_settings(coffee):
    data = encode(coffee, "PNG")
    with pytest.raises(
        errors.InvalidInput, match=r"PNG image is 600x400 = 240000 pixels, more than the limit of 239999"
    ):
        Preprocessor(META, max_pixels=239_999)(data)
    assert Preprocessor(META, max_pixels=240_000)(data).shape == (3, 224, 224)
