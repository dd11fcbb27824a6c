"""Images that are cheap to send and costly to decode, built in memory (no files).

Each builder makes the construction that issue 15 (item 4) found or that a
read of Pillow's decoders suggests: work done in Python per marker, chunk,
block or pixel, or a large decoded size from a small file. Everything is
otherwise well formed (correct lengths and checksums), so the cost is the
only thing wrong with it. ``tests/engine/test_preprocess.py``,
``tests/reliability/test_costly_images.py`` and
``bench/research/decode_gil.py`` share them.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


# -- BMP --------------------------------------------------------------------------------------


def _bmp(width: int, height: int, bits: int, compression: int, palette: bytes, pixels: bytes) -> bytes:
    offset = 14 + 40 + len(palette)
    colors = len(palette) // 4
    info = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, colors, 0
    )
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


def _colour_palette(colors: int) -> bytes:
    """A non-grey palette (BGRX), so Pillow keeps mode P."""
    return b"".join(bytes((i % 256, (i * 7) % 256, 255 - i % 256, 0)) for i in range(colors))


def bmp_rle8_rows(width: int, height: int) -> bytes:
    """An RLE8 BMP whose every row is one end-of-line escape: a few bytes per row, all pixels padded.

    Pillow's ``BmpRleDecoder`` pads an ended row one byte per Python iteration: 6300 x 6300
    (26 KB) costs seconds of pure Python holding the GIL.
    """
    pixels = b"\x01\x05\x00\x00" * height + b"\x00\x01"  # one pixel of colour 5, end of line; end of bitmap
    return _bmp(width, height, 8, 1, _colour_palette(256), pixels)


def bmp_rle4_runs(width: int, height: int) -> bytes:
    """An RLE4 BMP of 255-pixel runs: Pillow's RLE4 path appends every pixel in a Python loop."""
    row = b""
    left = width
    while left > 0:
        run = min(255, left)
        row += bytes((run, 0x12))
        left -= run
    pixels = (row + b"\x00\x00") * height + b"\x00\x01"
    return _bmp(width, height, 4, 2, _colour_palette(16), pixels)


def bmp_rle8(image: Image.Image) -> bytes:
    """A genuine RLE8 encoding (runs, end of line, end of bitmap) of a palette image; Pillow cannot write one."""
    p = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    width, height = p.size
    indices = np.asarray(p)
    out = bytearray()
    for row in indices[::-1]:  # bottom-up
        x = 0
        while x < width:
            value = row[x]
            run = 1
            while x + run < width and run < 255 and row[x + run] == value:
                run += 1
            out += bytes((run, int(value)))
            x += run
        out += b"\x00\x00"
    out += b"\x00\x01"
    pal = p.getpalette()[: 256 * 3]
    pal += [0] * (256 * 3 - len(pal))
    palette = b"".join(bytes((pal[i + 2], pal[i + 1], pal[i], 0)) for i in range(0, 256 * 3, 3))
    return _bmp(width, height, 8, 1, palette, bytes(out))


def bmp_big_palette(colors: int = 65536) -> bytes:
    """An 8-bit BMP whose header claims ``colors`` palette entries (Pillow checks each in Python)."""
    return _bmp(8, 8, 8, 0, _colour_palette(colors), bytes(8 * 8))


# -- EXIF -------------------------------------------------------------------------------------


def tiff_directory(entries: int) -> bytes:
    """A little-endian TIFF block (an EXIF payload) whose first directory has ``entries`` SHORT entries.

    Pillow's ``getexif()`` parses every entry in Python (2-11 us each); the count is a 16-bit field.
    """
    body = b"".join(
        struct.pack("<HHI4s", 0x0100 + i % 60000, 3, 1, b"\x01\x00\x00\x00") for i in range(entries)
    )
    return b"II*\x00" + struct.pack("<IH", 8, entries) + body + b"\x00" * 4


# -- JPEG -------------------------------------------------------------------------------------


def jpeg_with_comments(jpeg: bytes, count: int, comment: bytes = b"") -> bytes:
    """``count`` COM segments right after SOI: Pillow reads each marker in Python before SOF."""
    segment = b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment
    return jpeg[:2] + segment * count + jpeg[2:]


def jpeg_with_fill_bytes(jpeg: bytes, count: int) -> bytes:
    """``count`` 0xFF fill bytes before the first marker after SOI (one Python iteration each in Pillow)."""
    return jpeg[:2] + b"\xff" * count + jpeg[2:]


def jpeg_with_junk(jpeg: bytes, count: int) -> bytes:
    """``count`` non-marker bytes between SOI and the next marker (Pillow skips them one at a time)."""
    return jpeg[:2] + b"\x00" * count + jpeg[2:]


def progressive_jpeg_with_scans(jpeg: bytes, extra_scans: int) -> bytes:
    """A progressive JPEG with ``extra_scans`` copies of its last scan appended (libjpeg redoes each)."""
    sos = [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xDA]
    last = jpeg[sos[-1] : -2]  # the last scan (header + data), EOI cut
    return jpeg[:-2] + last * extra_scans + b"\xff\xd9"


# -- PNG --------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_parts(png: bytes) -> list[tuple[bytes, bytes]]:
    at, parts = 8, []
    while at < len(png):
        (length,) = struct.unpack_from(">I", png, at)
        parts.append((png[at + 4 : at + 8], png[at + 8 : at + 8 + length]))
        at += 12 + length
    return parts


def png_with_chunks(png: bytes, count: int, where: str = "before", kind: bytes = b"prVt") -> bytes:
    """``count`` empty chunks before the first IDAT, between IDATs (empty IDATs) or after the last.

    Pillow handles every chunk in Python (an unknown one through an AttributeError).
    """
    parts = _png_parts(png)
    first = next(i for i, (k, _) in enumerate(parts) if k == b"IDAT")
    last = max(i for i, (k, _) in enumerate(parts) if k == b"IDAT")
    filler = png_chunk(b"IDAT" if where == "idat" else kind, b"") * count
    out = b"\x89PNG\r\n\x1a\n"
    for i, (k, data) in enumerate(parts):
        if where == "before" and i == first:
            out += filler
        out += png_chunk(k, data)
        if where in ("idat", "after") and i == (first if where == "idat" else last):
            out += filler
    return out


def png_split_idat(png: bytes, size: int) -> bytes:
    """The same image with its pixel data re-cut into IDAT chunks of ``size`` bytes (what libpng writes: 8 KiB)."""
    parts = _png_parts(png)
    stream = b"".join(data for k, data in parts if k == b"IDAT")
    out = b"\x89PNG\r\n\x1a\n"
    done = False
    for k, data in parts:
        if k != b"IDAT":
            out += png_chunk(k, data)
        elif not done:
            out += b"".join(png_chunk(b"IDAT", stream[i : i + size]) for i in range(0, len(stream), size))
            done = True
    return out


def png_solid(width: int, height: int, mode: str = "RGB") -> bytes:
    """A genuine ``width`` x ``height`` PNG of one colour, compressed row by row (fast to build, small)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    colour_type = {"RGB": 2, "RGBA": 6, "L": 0}[mode]
    row = b"\x00" + bytes([40, 120, 200, 255][:channels]) * width
    z = zlib.compressobj(9)
    stream = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(png_chunk(b"IDAT", stream[i : i + 65536]) for i in range(0, len(stream), 65536))
        + png_chunk(b"IEND", b"")
    )


# -- GIF --------------------------------------------------------------------------------------


def gif_with_extension_blocks(gif: bytes, count: int, per_extension: int = 1) -> bytes:
    """``count`` comment extensions of ``per_extension`` one-byte sub-blocks before the first image.

    Pillow reads every extension and every sub-block (``GifImageFile.data``) in Python.
    """
    at = gif.index(b"\x2c")  # the first image descriptor (after the header, palette and extensions)
    extension = b"\x21\xfe" + b"\x01x" * per_extension + b"\x00"
    return gif[:at] + extension * count + gif[at:]


# -- WebP -------------------------------------------------------------------------------------


def webp_solid(width: int, height: int, lossless: bool = True) -> bytes:
    """A genuine ``width`` x ``height`` WebP of one colour: tens of kilobytes, decoded at full size."""
    return save(
        Image.new("RGB", (width, height), (40, 120, 200)), "WEBP", lossless=lossless, quality=0, method=0
    )


def webp_claiming(webp: bytes, width: int, height: int) -> bytes:
    """A simple (VP8 or VP8L) WebP wrapped in a VP8X header whose canvas claims ``width`` x ``height``."""
    chunks = webp[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
    body = b"WEBP" + vp8x + chunks
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_with_chunks(webp: bytes, count: int, width: int = 64, height: int = 48) -> bytes:
    """A simple ``width`` x ``height`` WebP made extended (VP8X) with ``count`` empty unknown chunks before its image.

    libwebp walks every chunk in C, holding the GIL (about 0.17 us each).
    """
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4)
    vp8x += struct.pack("<I", width - 1)[:3] + struct.pack("<I", height - 1)[:3]
    body = b"WEBP" + vp8x + b"ZZZZ\x00\x00\x00\x00" * count + webp[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body
