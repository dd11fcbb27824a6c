"""A cheap structural pre-scan of encoded images, before Pillow or libjpeg sees them.

Pillow parses every container in Python: each JPEG marker segment, PNG
chunk and GIF extension block before (and, for PNG, after) the pixel data is
one or more Python-level loop iterations, and so is every pixel of an RLE
BMP. That work holds the GIL, so a small file made of nothing but those
structures stalls the event loop, and every other client, for seconds
(issue 15: a 26 KB RLE8 BMP cost 4.9 s, 8 MB of JPEG comment markers 2.1 s).
The pixel decoders themselves (libjpeg-turbo, zlib, libwebp, Pillow's GIF
and raw decoders) run in C and release the GIL; see docs/engine.md for what
was measured.

:func:`scan` walks the same structures the way Pillow will, with plain index
arithmetic, and refuses a file as soon as it holds more of them than any
real image does (the caps below, each with a wide margin over what encoders
write). The scan itself is bounded by the same caps, so a refusal costs
about a millisecond whatever the file. It also reads the size from the
header, and whether the format is decoded at full size, so that
:class:`service.preprocess.Preprocessor` can apply its pixel limits before
anything is allocated.

It never accepts what Pillow would refuse: a file it cannot follow
(truncated, malformed) gets ``None`` and Pillow's own error, which arrives at
the same place in the file, so Pillow never walks further than the scan did.
"""

from __future__ import annotations

import dataclasses
import re
import struct

import numpy as np
from PIL import JpegImagePlugin, PngImagePlugin

from service import errors

#: JPEG: marker segments before the first scan (photos have 5-30; Extended XMP, e.g. depth maps,
#: adds one per 64 KB). Pillow spends about 1 us on each in Python.
JPEG_MAX_SEGMENTS = 1024
#: JPEG: 0xFF fill bytes and stray non-marker bytes before the first scan (Pillow: one loop per byte).
JPEG_MAX_STRAY_BYTES = 4096
#: JPEG: EXIF APP1 segments (one in practice; Pillow concatenates them, quadratic in their number).
JPEG_MAX_EXIF_SEGMENTS = 16
#: JPEG: bytes of quantization tables (4 tables of 129 bytes at most in practice; Pillow parses
#: each in Python, about 3.4 ms per 64 KB segment).
JPEG_MAX_QUANT_BYTES = 4096
#: JPEG: resources in Photoshop APP13 segments (tens in practice; Pillow walks each in Python).
JPEG_MAX_PHOTOSHOP_RESOURCES = 4096
#: JPEG: scans of a progressive or multi-scan JPEG (libjpeg's default progressive script has 10);
#: libjpeg-turbo re-reads the whole coefficient buffer for each.
JPEG_MAX_SCANS = 100
#: Entries of an EXIF (or MPF) directory: Pillow parses each in Python, 2-11 us apiece; a camera's
#: first directory has 10-30.
IFD_MAX_ENTRIES = 1024
#: PNG: chunks allowed whatever the size, plus one per PNG_CHUNK_BYTES of file. libpng writes 8 KiB
#: IDAT chunks (Pillow 64 KiB), so real files stay far below; Pillow spends about 2.3 us of Python on
#: each chunk (a 64 MB file at the cap: about 150 ms, in 5 ms slices of the GIL).
PNG_BASE_CHUNKS = 1024
PNG_CHUNK_BYTES = 4096
#: PNG chunks that Pillow inflates while reading the header (zTXt, iTXt, iCCP), each up to 1 MiB
#: (its MAX_TEXT_CHUNK): a 65 KB file with 64 zTXt chunks made it inflate 64 MB. Real files carry
#: a colour profile and a few text chunks.
PNG_MAX_COMPRESSED_CHUNKS = 8
_PNG_COMPRESSED = (b"zTXt", b"iTXt", b"iCCP")
#: WebP: the same rule, looser (an animated WebP has one chunk per frame; libwebp parses one in
#: about 0.17 us, in C but holding the GIL: a 64 MB file at the cap, about 12 ms).
WEBP_BASE_CHUNKS = 4096
WEBP_CHUNK_BYTES = 1024
#: GIF: extension blocks, data sub-blocks and stray bytes before the first frame (Pillow reads each
#: in Python). A GIF carries a handful; an embedded ICC profile or XMP packet a few hundred.
GIF_MAX_BLOCKS = 4096
#: BMP: Pillow's RLE4/RLE8 decoder (``BmpRleDecoder``) is Python, about 120 ns per pixel at worst
#: (6300x6300: 4.9 s); RLE BMPs are accepted up to 512x512 (about 30 ms).
BMP_RLE_MAX_PIXELS = 512 * 512
#: BMP: palette entries (Pillow compares each in Python; 8-bit BMPs have at most 256).
BMP_MAX_COLORS = 256

_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_JPEG_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}
#: Sequential DCT frames: libjpeg decodes these a row of blocks at a time, downscaled in the DCT domain.
_JPEG_SEQUENTIAL = {0xC0, 0xC1, 0xC9}
_WEBP_IMAGE = (b"VP8 ", b"VP8L", b"VP8X")


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the header says: size, and whether the pixels are decoded at full size."""

    width: int
    height: int
    #: False only for single-scan sequential JPEGs (decoded downscaled, a row of blocks at a time).
    full_size: bool
    #: How the refusal names it: "PNG image", "progressive JPEG image", ...
    what: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def scan(data: bytes, fmt: str) -> Layout | None:
    """The header's layout, or None when the structure cannot be followed (Pillow then refuses it).

    Raises :class:`errors.InvalidInput` when the file holds more structure than the caps allow.
    ``fmt`` is the sniffed format (:func:`service.preprocess.sniff_format`).
    """
    view = memoryview(data)
    try:
        if fmt == "JPEG":
            return _scan_jpeg(data, view)
        if fmt == "PNG":
            return _scan_png(data)
        if fmt == "WEBP":
            return _scan_webp(data)
        if fmt == "GIF":
            return _scan_gif(data)
        if fmt == "BMP":
            return _scan_bmp(data)
    except (struct.error, IndexError):
        return None  # truncated inside a structure: Pillow refuses it at the same place
    return None


def ifd_entries(blob: bytes) -> int | None:
    """Entries in the first directory of a TIFF-structured block (EXIF, MPF), as Pillow reads them."""
    blob = bytes(blob)
    for _ in range(2):  # Pillow strips up to two "Exif\0\0" prefixes
        if blob.startswith(b"Exif\x00\x00"):
            blob = blob[6:]
    head = blob[:4]
    if head in (b"II*\x00", b"MM\x00*"):
        order = "<" if head[:2] == b"II" else ">"
        (offset,) = struct.unpack_from(order + "I", blob, 4)
        if offset + 2 > len(blob):
            return None
        return struct.unpack_from(order + "H", blob, offset)[0]
    if head in (b"II+\x00", b"MM\x00+"):  # BigTIFF layout: 8-byte offsets and counts
        order = "<" if head[:2] == b"II" else ">"
        if len(blob) < 16:
            return None
        (offset,) = struct.unpack_from(order + "Q", blob, 8)
        if offset + 8 > len(blob):
            return None
        return struct.unpack_from(order + "Q", blob, offset)[0]
    return None


def _cap(count: int, cap: int, image: str, things: str, note: str = "") -> None:
    """Refuse once ``count`` passes ``cap``: "<image> has more than <cap> <things>; at most <cap> ..."."""
    if count > cap:
        raise errors.InvalidInput(f"{image} has more than {cap} {things}; at most {cap} are accepted{note}")


def check_exif(blob: bytes | None, what: str) -> None:
    """Refuse an EXIF block whose first directory has more entries than Pillow should parse."""
    if not blob:
        return
    try:
        entries = ifd_entries(blob)
    except struct.error:
        return  # unreadable: Pillow fails on it too, and a broken EXIF block only means "upright"
    if entries is not None and entries > IFD_MAX_ENTRIES:
        raise errors.InvalidInput(
            f"{what}'s EXIF block has {entries} entries in its first directory; "
            f"at most {IFD_MAX_ENTRIES} are accepted"
        )


# -- JPEG -------------------------------------------------------------------------------------


def _scan_jpeg(data: bytes, view: memoryview) -> Layout | None:
    """Walk the marker segments up to the first scan exactly as ``JpegImagePlugin`` does."""
    n = len(data)
    at = 2  # after SOI; Pillow then reads marker by marker
    segments = stray = exif_segments = quant_bytes = photoshop = 0
    frames: list[tuple[int, int, int, int]] = []  # (marker, width, height, components)
    note = " (photos have a few dozen)"  # for the refusal of too many segments
    while True:
        if at >= n:
            return None
        if data[at] != 0xFF:
            # Pillow skips non-marker bytes one at a time.
            found = data.find(b"\xff", at)
            end = n if found < 0 else found
            stray += end - at
            at = end
        else:
            end = _JPEG_FILL.match(data, at).end()
            stray += end - at - 1  # 0xFF fill bytes before a marker
            at = end - 1
            if at + 1 >= n:
                return None
            code = data[at + 1]
            if code == 0x00:  # an escaped 0xFF outside a scan
                stray += 2
                at += 2
            else:
                entry = JpegImagePlugin.MARKER.get(0xFF00 | code)
                if entry is None:
                    return None  # Pillow: "no marker found"
                segments += 1
                _cap(segments, JPEG_MAX_SEGMENTS, "JPEG image", "marker segments before its image data", note)
                if entry[2] is None:  # SOI, EOI, RSTn, JPGn: no payload
                    at += 2
                else:
                    if at + 4 > n:
                        return None
                    length = max(0, (data[at + 2] << 8 | data[at + 3]) - 2)
                    start, at = at + 4, at + 4 + length
                    if at > n:
                        return None
                    payload = view[start:at]
                    if code == 0xDA:  # start of scan: the end of what Pillow reads
                        return _jpeg_layout(data, frames, payload, at)
                    if entry[2] is JpegImagePlugin.SOF:
                        if len(payload) >= 6:
                            frames.append(
                                (code, payload[3] << 8 | payload[4], payload[1] << 8 | payload[2], payload[5])
                            )
                        if len(frames) > 1:
                            raise errors.InvalidInput(
                                "JPEG image has more than one frame header (SOF) before its image data; "
                                "exactly one is accepted"
                            )
                    elif code == 0xDB:
                        quant_bytes += length
                        _cap(quant_bytes, JPEG_MAX_QUANT_BYTES, "JPEG image", "bytes of quantization tables")
                    elif code == 0xE1 and payload[:6] == b"Exif\x00\x00":
                        exif_segments += 1
                        _cap(exif_segments, JPEG_MAX_EXIF_SEGMENTS, "JPEG image", "EXIF segments")
                        if exif_segments == 1:
                            check_exif(payload, "JPEG image")
                    elif code == 0xE2 and payload[:4] == b"MPF\x00":
                        _check_mpf(payload[4:])
                    elif code == 0xED and payload[:14] == b"Photoshop 3.0\x00":
                        photoshop += bytes(payload).count(b"8BIM")
                        _cap(photoshop, JPEG_MAX_PHOTOSHOP_RESOURCES, "JPEG image", "Photoshop resources")
        _cap(stray, JPEG_MAX_STRAY_BYTES, "JPEG image", "padding or stray bytes between its header segments")


def _check_mpf(blob: memoryview) -> None:
    try:
        entries = ifd_entries(blob)
    except struct.error:
        return
    if entries is not None and entries > IFD_MAX_ENTRIES:
        raise errors.InvalidInput(
            f"JPEG image's multi-picture (MPF) index has {entries} entries; at most {IFD_MAX_ENTRIES} are accepted"
        )


def _jpeg_layout(
    data: bytes, frames: list[tuple[int, int, int, int]], sos: memoryview, scan_start: int
) -> Layout | None:
    if not frames:
        return None
    code, width, height, components = frames[0]
    in_first_scan = sos[0] if len(sos) else components
    if code in _JPEG_SEQUENTIAL and in_first_scan >= components:
        return Layout(width, height, False, "JPEG image")
    # Progressive, lossless, hierarchical and non-interleaved JPEGs: libjpeg keeps the whole image's
    # coefficients (2 bytes per sample) or pixels, and reads every scan over all of them.
    if code in _JPEG_PROGRESSIVE:
        what = "progressive JPEG image"
    elif code in _JPEG_LOSSLESS:
        what = "lossless JPEG image"
    else:
        what = "multi-scan JPEG image"
    scans = _jpeg_scans(data, scan_start)
    if scans > JPEG_MAX_SCANS:
        raise errors.InvalidInput(
            f"{what} has {scans} scans; at most {JPEG_MAX_SCANS} are accepted (encoders write about 10)"
        )
    return Layout(width, height, True, what)


def _jpeg_scans(data: bytes, start: int) -> int:
    """1 + the start-of-scan markers after the first scan, up to the end-of-image marker.

    Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so
    0xFF 0xDA only starts a scan and 0xFF 0xD9 only ends the image. numpy does the search
    (it releases the GIL over large arrays).
    """
    a = np.frombuffer(data, np.uint8)[start:]
    if a.size < 2:
        return 1
    marks = np.flatnonzero(a[:-1] == 0xFF)
    following = a[marks + 1]
    ends = np.flatnonzero(following == 0xD9)
    if ends.size:
        following = following[: ends[0]]
    return 1 + int(np.count_nonzero(following == 0xDA))


# -- PNG --------------------------------------------------------------------------------------


def _scan_png(data: bytes) -> Layout | None:
    """Walk the chunks as far as Pillow reads them for the first frame: to IEND, or an APNG's second frame."""
    n = len(data)
    limit = PNG_BASE_CHUNKS + n // PNG_CHUNK_BYTES
    at, chunks = 8, 0
    layout = None
    animated = seen_data = False
    compressed = 0
    while at + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, at)
        if not PngImagePlugin.is_cid(kind):
            break  # Pillow stops (or fails) at a chunk type that is not four word characters
        if kind == b"fcTL" and animated and seen_data:
            break  # the next frame: Pillow's load_end() stops here
        chunks += 1
        if chunks > limit:
            raise errors.InvalidInput(
                f"PNG image has more than {limit} chunks; at most {limit} are accepted for a file of {n} bytes "
                f"({PNG_BASE_CHUNKS} plus one per {PNG_CHUNK_BYTES} bytes; encoders write 8-64 KiB chunks)"
            )
        if chunks == 1:
            if kind != b"IHDR" or length < 8:
                return None
            width, height = struct.unpack_from(">II", data, at + 8)
            layout = Layout(width, height, True, "PNG image")
        elif kind == b"IEND":
            break
        elif kind == b"acTL":
            animated = True
        elif kind in (b"IDAT", b"fdAT"):
            seen_data = True
        elif kind in _PNG_COMPRESSED:
            compressed += 1
            if compressed > PNG_MAX_COMPRESSED_CHUNKS:
                raise errors.InvalidInput(
                    f"PNG image has more than {PNG_MAX_COMPRESSED_CHUNKS} compressed text or profile chunks "
                    "(zTXt, iTXt, iCCP); each is inflated while reading the header"
                )
        at += 12 + length
    return layout


# -- WebP -------------------------------------------------------------------------------------


def _scan_webp(data: bytes) -> Layout | None:
    n = len(data)
    if n < 30:
        return None
    (riff_size,) = struct.unpack_from("<I", data, 4)
    end = min(n, 8 + riff_size)
    limit = WEBP_BASE_CHUNKS + n // WEBP_CHUNK_BYTES
    at, chunks = 12, 0
    while at + 8 <= end:
        (size,) = struct.unpack_from("<I", data, at + 4)
        chunks += 1
        if chunks > limit:
            raise errors.InvalidInput(
                f"WebP image has more than {limit} chunks; at most {limit} are accepted for a file of "
                f"{n} bytes ({WEBP_BASE_CHUNKS} plus one per {WEBP_CHUNK_BYTES} bytes)"
            )
        at += 8 + size + (size & 1)
    first = data[12:16]
    if first == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    elif first == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        width, height = width & 0x3FFF, height & 0x3FFF
    elif first == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        return None
    return Layout(width, height, True, "WebP image")


# -- GIF --------------------------------------------------------------------------------------


def _scan_gif(data: bytes) -> Layout | None:
    """Walk the blocks before the first image descriptor exactly as ``GifImagePlugin`` does."""
    n = len(data)
    if n < 13:
        return None
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    at = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)
    blocks = 0
    things = "extension blocks before its first frame"
    while at < n:
        kind = data[at]
        if kind == 0x3B:  # trailer: no frame at all (Pillow refuses)
            return None
        if kind == 0x2C:  # the first image descriptor
            if at + 9 >= n:
                return None
            x0, y0, w, h = struct.unpack_from("<HHHH", data, at + 1)
            # Pillow grows the image to hold a frame that extends past the logical screen.
            return Layout(max(width, x0 + w), max(height, y0 + h), True, "GIF image")
        if kind == 0x21:  # extension: label, then data sub-blocks up to an empty one
            at += 2
            while True:
                blocks += 1
                _cap(blocks, GIF_MAX_BLOCKS, "GIF image", things)
                size = data[at]  # IndexError when truncated
                at += 1 + size
                if size == 0:
                    break
        else:  # Pillow skips anything else one byte at a time
            blocks += 1
            _cap(blocks, GIF_MAX_BLOCKS, "GIF image", things)
            at += 1
    return None


# -- BMP --------------------------------------------------------------------------------------


def _scan_bmp(data: bytes) -> Layout | None:
    (header_size,) = struct.unpack_from("<I", data, 14)
    if header_size == 12:
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
        compression = colors = 0
    elif header_size in (40, 52, 56, 64, 108, 124):
        width, raw_height, _planes, bits, compression = struct.unpack_from("<IIHHI", data, 18)
        (colors,) = struct.unpack_from("<I", data, 46)
        # Pillow's reading of a negative (top-down) height.
        height = 2**32 - raw_height if data[25] == 0xFF else raw_height
    else:
        return None
    if bits <= 8 and colors > BMP_MAX_COLORS:
        raise errors.InvalidInput(
            f"BMP image has a palette of {colors} colours; at most {BMP_MAX_COLORS} are accepted"
        )
    if compression in (1, 2):
        pixels = width * height
        if pixels > BMP_RLE_MAX_PIXELS:
            kind = "RLE8" if compression == 1 else "RLE4"
            raise errors.InvalidInput(
                f"BMP image is {kind}-compressed and {width}x{height} = {pixels} pixels; RLE-compressed "
                f"BMPs are accepted up to {BMP_RLE_MAX_PIXELS} pixels (512x512): send it uncompressed or as PNG"
            )
    return Layout(width, height, True, "BMP image")
