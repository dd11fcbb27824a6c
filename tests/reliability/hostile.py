"""Hostile, broken and merely unusual encoded images, made in memory for the malformed-request catalogue.

Everything is generated (Pillow, numpy, a few hand-built headers), so the
catalogue needs no files. Headers that lie about their size are built with
correct checksums, so the lie is the only thing wrong with them.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

from tests.helpers.costly_images import noise, save


def png(width: int = 40, height: int = 40, mode: str = "RGB", seed: int = 0) -> bytes:
    return save(noise(width, height, seed).convert(mode), "PNG")


def jpeg(width: int = 48, height: int = 48, mode: str = "RGB", seed: int = 0, **kwargs) -> bytes:
    return save(noise(width, height, seed).convert(mode), "JPEG", quality=90, **kwargs)


def png16() -> bytes:
    """A 16-bit greyscale PNG using the whole 0..65535 range."""
    ramp = (np.arange(40 * 40, dtype=np.uint32).reshape(40, 40) * 40).astype(np.uint16)
    return save(Image.fromarray(ramp), "PNG")


def palette_png(transparency: bool = False) -> bytes:
    image = noise(40, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return save(image, "PNG", **({"transparency": 0} if transparency else {}))


def palette_png_without_plte() -> bytes:
    """A palette PNG with its PLTE chunk cut out (found by the atheris decode fuzzer)."""
    data = palette_png()
    at = data.index(b"PLTE") - 4
    length = struct.unpack_from(">I", data, at)[0]
    return data[:at] + data[at + 12 + length :]


def gif(frames: int) -> bytes:
    images = [noise(40, 40, seed).convert("P", palette=Image.Palette.ADAPTIVE) for seed in range(frames)]
    return save(images[0], "GIF", save_all=frames > 1, append_images=images[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return save(noise(60, 40), "JPEG", quality=90, exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose (checksummed) header claims ``width`` x ``height``, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def real_png_bomb() -> bytes:
    """A genuine, fully decodable 7000 x 7000 one-bit PNG: 49 M pixels in a few kilobytes."""
    return save(Image.new("1", (7000, 7000), 0), "PNG")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG with its frame header (SOF0) patched to claim another size."""
    data = bytearray(jpeg(16, 16))
    at = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(gif(1))
    struct.pack_into("<HH", data, 6, width, height)  # the logical screen
    at = data.index(b"\x2c")  # the image descriptor
    struct.pack_into("<HH", data, at + 5, width, height)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(save(noise(8, 8), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def png_corrupt_stream() -> bytes:
    """A 40 x 40 PNG whose pixel data (correctly checksummed) is not a zlib stream at all."""
    ihdr = struct.pack(">IIBBBBB", 40, 40, 8, 2, 0, 0, 0)
    junk = bytes(range(7, 250, 3)) * 4
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", junk)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_corrupt_scan() -> bytes:
    """A JPEG whose entropy-coded data is replaced by marker garbage after the headers."""
    data = bytearray(jpeg())
    at = data.index(b"\xff\xda")  # start of scan
    length = struct.unpack_from(">H", data, at + 2)[0]
    body = at + 2 + length
    return bytes(data[:body]) + b"\xff\xd0\xff\xd0" * 64 + b"\xff\xd9"


def cmyk_jpeg() -> bytes:
    return save(noise(48, 48).convert("CMYK"), "JPEG", quality=90)


def webp() -> bytes:
    return save(noise(40, 40), "WEBP", quality=90)


def bmp() -> bytes:
    return save(noise(40, 40), "BMP")


def tiff() -> bytes:
    return save(noise(16, 16), "TIFF")
