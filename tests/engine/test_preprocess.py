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
from tests.helpers import costly_images as costly
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


# -- Costly images (issue 15, item 4): refused from the header or a bounded pre-scan --------------
# The hostile files are built in memory by tests/helpers/costly_images.py; service/imagescan.py
# holds the caps. Each refusal is an InvalidInput that names what was wrong and what is accepted.


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    return encode(Image.fromarray(skdata.coffee()).resize((160, 120)), "JPEG", quality=90)


@pytest.fixture(scope="module")
def small_png(coffee) -> bytes:
    return encode(coffee.resize((160, 120)), "PNG")


def _refused(pre: Preprocessor, data: bytes) -> str:
    with pytest.raises(errors.InvalidInput) as info:
        pre(data)
    return str(info.value)


@pytest.mark.parametrize(
    "build,expected",
    [
        (
            lambda: costly.bmp_rle8_rows(6300, 6300),
            "BMP image is RLE8-compressed and 6300x6300 = 39690000 pixels; RLE-compressed BMPs are "
            "accepted up to 262144 pixels (512x512): send it uncompressed or as PNG",
        ),
        (
            lambda: costly.bmp_rle4_runs(1000, 1000),
            "BMP image is RLE4-compressed and 1000x1000 = 1000000 pixels; RLE-compressed BMPs are accepted up to 262144",
        ),
        (
            lambda: costly.bmp_big_palette(65536),
            "BMP image has a palette of 65536 colours; at most 256 are accepted",
        ),
    ],
)
def test_costly_bmps_are_refused_from_the_header(pre, build, expected):
    assert _refused(pre, build()).startswith(expected)


def test_small_rle8_bmp_still_decodes(pre, coffee):
    data = costly.bmp_rle8(coffee.resize((300, 200)))
    assert Image.open(io.BytesIO(data)).info["compression"] == 1  # really RLE8
    np.testing.assert_allclose(pre(data), reference(data), atol=ONE_LEVEL, rtol=0)
    # The largest RLE BMP accepted (512x512) decodes too.
    assert pre(costly.bmp_rle8_rows(512, 512)).shape == (3, 224, 224)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _insert_after_soi(jpeg: bytes, segments: bytes) -> bytes:
    return jpeg[:2] + segments + jpeg[2:]


@pytest.mark.parametrize(
    "build,expected",
    [
        (
            lambda j: costly.jpeg_with_comments(j, 5000),
            "JPEG image has more than 1024 marker segments before its image data; at most 1024 are accepted",
        ),
        (
            lambda j: costly.jpeg_with_comments(j, 2_000_000),  # 8 MB of comment markers: 2.1 s in Pillow
            "JPEG image has more than 1024 marker segments before its image data",
        ),
        (
            lambda j: costly.jpeg_with_fill_bytes(j, 100_000),
            "JPEG image has more than 4096 padding or stray bytes between its header segments; at most 4096",
        ),
        (
            lambda j: _insert_after_soi(j, _segment(0xFE, b"x") + b"\x00" * 100_000),
            "JPEG image has more than 4096 padding or stray bytes",
        ),
        (
            lambda j: _insert_after_soi(j, _segment(0xDB, (b"\x00" + bytes(64)) * 1000) * 5),
            "JPEG image has more than 4096 bytes of quantization tables; at most 4096 are accepted",
        ),
        (
            lambda j: _insert_after_soi(
                j, _segment(0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00" * 5000)
            ),
            "JPEG image has more than 4096 Photoshop resources; at most 4096 are accepted",
        ),
        (
            lambda j: _insert_after_soi(j, _segment(0xE1, b"Exif\x00\x00" + costly.tiff_directory(4000))),
            "JPEG image's EXIF block has 4000 entries in its first directory; at most 1024 are accepted",
        ),
        (
            lambda j: _insert_after_soi(j, _segment(0xE1, b"Exif\x00\x00" + costly.tiff_directory(3)) * 17),
            "JPEG image has more than 16 EXIF segments; at most 16 are accepted",
        ),
        (
            lambda j: _insert_after_soi(j, _segment(0xE2, b"MPF\x00" + costly.tiff_directory(2000))),
            "JPEG image's multi-picture (MPF) index has 2000 entries; at most 1024 are accepted",
        ),
        (
            lambda j: (
                j[: j.index(b"\xff\xc0")]
                + _segment(0xC0, bytes(6) + b"\x01\x22\x00" * 20000)
                + j[j.index(b"\xff\xc0") :]
            ),
            "JPEG image has more than one frame header (SOF) before its image data; exactly one is accepted",
        ),
    ],
)
def test_jpegs_with_costly_headers_are_refused(pre, small_jpeg, build, expected):
    assert expected in _refused(pre, build(small_jpeg))


def test_jpeg_headers_within_the_caps_decode_as_before(pre, small_jpeg):
    plain = pre(small_jpeg)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    padded = [
        costly.jpeg_with_comments(small_jpeg, 1000, b"a comment"),
        costly.jpeg_with_fill_bytes(small_jpeg, 4000),
        _insert_after_soi(small_jpeg, _segment(0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00" * 100)),
        _insert_after_soi(small_jpeg, _segment(0xE1, b"Exif\x00\x00" + costly.tiff_directory(1000))),
    ]
    for data in padded:
        np.testing.assert_array_equal(pre(data), plain)


def test_progressive_jpeg_is_limited_like_a_full_size_decode(coffee):
    image = coffee.resize((1200, 1000))
    pre = Preprocessor(META, max_pixels=40_000_000, max_decoded_pixels=1_000_000)
    baseline = encode(image, "JPEG", quality=90)
    progressive = encode(image, "JPEG", quality=90, progressive=True)
    # Baseline JPEGs are decoded downscaled in the DCT domain: only max_image_pixels applies.
    assert pixel_levels(pre(baseline), reference(baseline)).mean() < 3.0
    assert _refused(pre, progressive) == (
        "progressive JPEG image is 1200x1000 = 1200000 pixels, more than the limit of 1000000 for images "
        "decoded at full size (max_decoded_pixels); only baseline JPEGs, decoded downscaled, may have up to "
        "40000000 (max_image_pixels)"
    )
    small = Preprocessor(META, max_pixels=40_000_000)
    assert pixel_levels(small(progressive), reference(progressive)).mean() < 3.0


def test_progressive_jpeg_with_too_many_scans_is_refused(pre, small_jpeg):
    progressive = encode(Image.open(io.BytesIO(small_jpeg)), "JPEG", progressive=True)
    assert pre(progressive).shape == (3, 224, 224)  # libjpeg's default script: 10 scans
    assert _refused(pre, costly.progressive_jpeg_with_scans(progressive, 200)) == (
        "progressive JPEG image has 210 scans; at most 100 are accepted (encoders write about 10)"
    )


@pytest.mark.slow
def test_photo_sized_baseline_jpeg_above_the_full_size_limit_still_decodes(pre):
    # 24 Mpx: above max_decoded_pixels (16.8 Mpx), fine for a baseline JPEG (decoded at 1/8 scale here).
    photo = Image.fromarray(skdata.astronaut()).resize((6000, 4000), Image.Resampling.BILINEAR)
    data = encode(photo, "JPEG", quality=90)
    assert pixel_levels(pre(data), reference(data)).mean() < 3.0


@pytest.mark.parametrize("where", ["before", "idat", "after"])
def test_png_with_tens_of_thousands_of_chunks_is_refused(pre, small_png, where):
    data = costly.png_with_chunks(small_png, 30_000, where)
    limit = 1024 + len(data) // 4096
    assert _refused(pre, data) == (
        f"PNG image has more than {limit} chunks; at most {limit} are accepted for a file of {len(data)} bytes "
        "(1024 plus one per 4096 bytes; encoders write 8-64 KiB chunks)"
    )


def test_png_chunks_within_the_cap_decode_as_before(pre, small_png):
    plain = pre(small_png)
    for where in ("before", "idat", "after"):
        np.testing.assert_array_equal(pre(costly.png_with_chunks(small_png, 1000, where)), plain)


def test_animated_png_with_many_frames_decodes_its_first(pre):
    # 1500 frames: 3000 chunks in 175 KB, above the chunk cap for the whole file; Pillow reads only
    # up to the second frame for the first one, and so does the scan.
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(1500)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert data.count(b"fcTL") == 1500
    np.testing.assert_array_equal(pre(data), pre(encode(frames[0], "PNG")))


def test_webp_with_hundreds_of_thousands_of_chunks_is_refused(pre):
    webp = encode(Image.new("RGB", (64, 48), (10, 20, 30)), "WEBP", lossless=True)
    np.testing.assert_array_equal(pre(costly.webp_with_chunks(webp, 1000)), pre(webp))
    spam = costly.webp_with_chunks(webp, 300_000)
    limit = 4096 + len(spam) // 1024
    assert _refused(pre, spam) == (
        f"WebP image has more than {limit} chunks; at most {limit} are accepted for a file of {len(spam)} bytes "
        "(4096 plus one per 1024 bytes)"
    )


def test_multi_megapixel_png_within_the_limit_decodes(pre):
    photo = Image.fromarray(skdata.astronaut()).resize((2400, 1800), Image.Resampling.BILINEAR)
    data = encode(photo, "PNG", compress_level=1)
    libpng_like = costly.png_split_idat(data, 8192)  # what libpng writes: 8 KiB IDAT chunks
    assert libpng_like.count(b"IDAT") > 400
    out = pre(data)
    np.testing.assert_allclose(out, reference(data), atol=ONE_LEVEL, rtol=0)
    np.testing.assert_array_equal(pre(libpng_like), out)


@pytest.mark.parametrize(
    "build,what",
    [
        (lambda: costly.png_solid(6300, 6300), "PNG image"),
        (lambda: costly.webp_solid(6300, 6300), "WebP image"),
        (lambda: costly.webp_claiming(encode(Image.new("RGB", (64, 48)), "WEBP"), 6300, 6300), "WebP image"),
        (lambda: hostile_gif_of(6300, 6300), "GIF image"),
    ],
)
def test_full_size_formats_above_the_decoded_limit_are_refused(pre, build, what):
    assert _refused(pre, build()) == (
        f"{what} is 6300x6300 = 39690000 pixels, more than the limit of 16777216 for images decoded at full "
        "size (max_decoded_pixels); only baseline JPEGs, decoded downscaled, may have up to 40000000 "
        "(max_image_pixels)"
    )


def hostile_gif_of(width: int, height: int) -> bytes:
    """A small GIF whose logical screen and frame claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    at = data.index(b"\x2c")
    struct.pack_into("<HH", data, at + 5, width, height)
    return bytes(data)


def test_decoded_pixel_limit_comes_from_settings(coffee):
    data = encode(coffee, "PNG")
    assert _refused(Preprocessor(META, max_pixels=10**8, max_decoded_pixels=239_999), data).startswith(
        "PNG image is 600x400 = 240000 pixels, more than the limit of 239999 for images decoded at full size"
    )
    assert Preprocessor(META, max_pixels=10**8, max_decoded_pixels=240_000)(data).shape == (3, 224, 224)
    # Above max_image_pixels the general limit's message applies, as before.
    assert "more than the limit of 239999 (max_image_pixels)" in _refused(
        Preprocessor(META, max_pixels=239_999, max_decoded_pixels=1000), data
    )


def test_gif_with_many_extension_blocks_is_refused(pre):
    gif = encode(Image.new("P", (64, 48), 3), "GIF")
    expected = (
        "GIF image has more than 4096 extension blocks before its first frame; at most 4096 are accepted"
    )
    assert _refused(pre, costly.gif_with_extension_blocks(gif, 100_000)) == expected
    assert _refused(pre, costly.gif_with_extension_blocks(gif, 1, 100_000)) == expected
    np.testing.assert_array_equal(pre(costly.gif_with_extension_blocks(gif, 1000)), pre(gif))


@pytest.mark.parametrize("fmt,name", [("PNG", "PNG"), ("WEBP", "WebP")])
def test_exif_with_a_huge_directory_is_refused(pre, coffee, fmt, name):
    image = coffee.resize((160, 120))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    huge = encode(image, fmt, exif=b"Exif\x00\x00" + costly.tiff_directory(65535), **kwargs)
    assert _refused(pre, huge) == (
        f"{name} image's EXIF block has 65535 entries in its first directory; at most 1024 are accepted"
    )
    fine = encode(image, fmt, exif=b"Exif\x00\x00" + costly.tiff_directory(100), **kwargs)
    np.testing.assert_array_equal(pre(fine), pre(encode(image, fmt, **kwargs)))


def test_png_with_many_compressed_text_chunks_is_refused(pre):
    """64 zTXt chunks of 65 KB that each inflate to 1 MB: Pillow would inflate 64 MB reading the header."""
    png = encode(Image.new("RGB", (40, 30), (10, 20, 30)), "PNG")
    ztxt = costly.png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b" " * (1 << 20), 9))
    parts = png.index(b"IDAT") - 4
    bomb = png[:parts] + ztxt * 64 + png[parts:]
    assert _refused(pre, bomb) == (
        "PNG image has more than 8 compressed text or profile chunks (zTXt, iTXt, iCCP); each is inflated "
        "while reading the header"
    )
    np.testing.assert_array_equal(pre(png[:parts] + ztxt * 2 + png[parts:]), pre(png))
