"""How long each decoding step holds the GIL, and what hostile images cost before and after the pre-scan.

Backs docs/engine.md, "Costly images: what is decoded where, and with what budget" (the GIL
and memory tables) and docs/reliability.md, "Images built to be costly to decode" (the
pre-scan's refusal times): ``python -m bench.research.decode_gil [--size 4096x4096] [--pillow]
[--memory]``. The hostile images come from ``tests/helpers/costly_images.py``, which the
reliability tests share.

A worker thread runs one step while the main thread sleeps 1 ms at a time
and records how late each wake-up is: a step that releases the GIL leaves
the ticks at about 1.1 ms; pure Python leaves them at the 5 ms switch
interval (``sys.getswitchinterval()``); C code that keeps the GIL delays the
tick by its whole duration. The event loop of a server is that main thread.
Each step runs ``--repeat`` times; the table shows the median step time,
the median of the longest gap and the ticks per second.

Allocating a decoded image holds the GIL while glibc clears memory it
reuses from its heap (about 0.8 ms per MB here); ``--mmap-threshold 1048576``
(``mallopt(M_MMAP_THRESHOLD)``) makes it map fresh zeroed pages instead, to
show the difference.

``--memory`` decodes one image of each kind in a fresh process and prints
the growth of its peak resident memory (what one decode thread holds).

``--pillow`` also feeds the hostile images to Pillow directly (what the
server did before ``service/imagescan.py``): slow, several seconds in all.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import simplejpeg
from PIL import Image

from service import errors
from service.preprocess import Preprocessor
from tests.helpers import costly_images as costly
from tests.helpers.tinymodel import tiny_meta

META = tiny_meta(size=224).replace(resize=256)


def ticked(fn) -> tuple[float, float, float]:
    """(step ms, longest main-thread gap ms, ticks per second) for one run of ``fn`` in a thread."""
    done = threading.Event()
    took: list[float] = []

    def work() -> None:
        start = time.perf_counter()
        try:
            fn()
        except errors.InvalidInput:
            pass
        took.append(time.perf_counter() - start)
        done.set()

    gaps = []
    thread = threading.Thread(target=work)
    last = time.perf_counter()
    thread.start()
    while True:
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        if done.is_set():
            break
    thread.join()
    return took[0] * 1000, max(gaps) * 1000, len(gaps) / max(took[0], sum(gaps))


def report(name: str, fn, repeat: int) -> None:
    try:
        fn()
        outcome = "ok"
    except errors.InvalidInput as exc:
        outcome = "refused: " + str(exc)[:60]
    runs = [ticked(fn) for _ in range(repeat)]
    ms = statistics.median(r[0] for r in runs)
    gap = statistics.median(r[1] for r in runs)
    rate = statistics.median(r[2] for r in runs)
    print(f"| {name} | {ms:.1f} | {gap:.1f} | {rate:.0f} | {outcome} |", flush=True)


def pillow_load(data: bytes, fmt: str, draft: bool = False):
    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=[fmt])
            if draft:
                image.draft(None, (256, 256))
            image.load()

    return run


def photo(width: int, height: int) -> Image.Image:
    """A smooth photo-like image (noise upscaled), so codecs compress it like a photograph."""
    small = costly.noise(max(8, width // 10), max(8, height // 10))
    return small.resize((width, height), Image.Resampling.BILINEAR)


def steps(size: tuple[int, int]) -> dict:
    image = photo(*size)
    jpeg = costly.save(image, "JPEG", quality=90)
    pre = Preprocessor(META, max_pixels=40_000_000, max_decoded_pixels=40_000_000)
    rgb = np.asarray(image)
    png = costly.save(image, "PNG", compress_level=1)
    palette = image.convert("P")
    w, h = size
    label = f"{w}x{h}"
    return {
        f"simplejpeg, DCT-downscaled ({label} JPEG)": lambda: simplejpeg.decode_jpeg(
            jpeg, "RGB", min_height=256, min_width=256
        ),
        f"Pillow JPEG, CMYK with draft() ({label})": pillow_load(
            costly.save(image.convert("CMYK"), "JPEG"), "JPEG", draft=True
        ),
        f"Pillow PNG, zlib ({label})": pillow_load(png, "PNG"),
        f"Pillow WebP lossy, libwebp ({label})": pillow_load(costly.save(image, "WEBP", quality=80), "WEBP"),
        f"Pillow GIF, LZW ({label})": pillow_load(costly.save(image.convert("P"), "GIF"), "GIF"),
        f"Pillow BMP, uncompressed ({label})": pillow_load(costly.save(image, "BMP"), "BMP"),
        "Pillow BMP RLE8, Python (512x512)": pillow_load(costly.bmp_rle8_rows(512, 512), "BMP"),
        f"Pillow convert P -> RGB ({label})": lambda: palette.convert("RGB"),
        f"Pillow crop-box resize -> 224x224 ({label})": lambda: image.resize(
            (224, 224), Image.Resampling.BILINEAR, box=(0, 0, min(w, h), min(w, h))
        ),
        "OpenCV normalise 224x224": lambda: pre.normalize(rgb[:224, :224]),
        f"Preprocessor, PNG ({label})": lambda: pre(png),
        "pure-Python loop (baseline)": lambda: sum(i * i for i in range(400_000)),
    }


def hostile() -> dict[str, tuple[bytes, str]]:
    jpeg = costly.save(costly.noise(64, 48), "JPEG")
    png = costly.save(costly.noise(64, 48), "PNG")
    gif = costly.save(costly.noise(64, 48).convert("P"), "GIF")
    webp = costly.save(costly.noise(64, 48), "WEBP", lossless=True)
    return {
        "RLE8 BMP 6300x6300, end-of-line rows": (costly.bmp_rle8_rows(6300, 6300), "BMP"),
        "JPEG + 2,000,000 COM segments": (costly.jpeg_with_comments(jpeg, 2_000_000), "JPEG"),
        "JPEG + 1,000,000 fill bytes": (costly.jpeg_with_fill_bytes(jpeg, 1_000_000), "JPEG"),
        "PNG + 300,000 empty chunks before IDAT": (costly.png_with_chunks(png, 300_000, "before"), "PNG"),
        "PNG + 300,000 empty IDAT chunks": (costly.png_with_chunks(png, 300_000, "idat"), "PNG"),
        "GIF + 300,000 comment extensions": (costly.gif_with_extension_blocks(gif, 300_000), "GIF"),
        "WebP + 300,000 empty chunks": (costly.webp_with_chunks(webp, 300_000), "WEBP"),
        "WebP 6300x6300, one colour": (costly.webp_solid(6300, 6300), "WEBP"),
        "PNG 6300x6300, one colour": (costly.png_solid(6300, 6300), "PNG"),
    }


def at_the_caps() -> dict[str, bytes]:
    """Files just inside the caps of service/imagescan.py: the most Python an accepted image can cost."""
    jpeg = costly.save(costly.noise(64, 48), "JPEG")

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload

    header = (
        segment(0xE1, b"Exif\x00\x00" + costly.tiff_directory(1024))
        + segment(0xE1, b"Exif\x00\x00" + bytes(60000)) * 15
        + segment(0xDB, (b"\x00" + bytes(64)) * 55)
        + segment(0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00\x00\x00\x00\x00" * 4000)
        + b"\xff" * 4000
        + segment(0xFE, b"") * 980
    )
    png = costly.save(costly.noise(64, 48), "PNG")
    size = 64 * 2**20
    chunky = costly.png_with_chunks(png, 1024 + size // 4096 - 16, "idat")
    filler = costly.png_chunk(b"prVt", bytes(size - len(chunky) - 12))
    gif = costly.save(costly.noise(64, 48).convert("P"), "GIF")
    return {
        "JPEG, every header cap nearly reached (974 KB)": jpeg[:2] + header + jpeg[2:],
        "PNG of 64 MB, chunk cap nearly reached": chunky[:33] + filler + chunky[33:],
        "GIF, 4,000 extension blocks": costly.gif_with_extension_blocks(gif, 2000),
        "RLE8 BMP 512x512 (the RLE cap)": costly.bmp_rle8_rows(512, 512),
    }


def memory_cases(size: tuple[int, int]) -> dict[str, bytes]:
    image = photo(*size)
    return {
        "PNG, RGB": costly.save(image, "PNG", compress_level=1),
        "PNG, RGBA": costly.save(image.convert("RGBA"), "PNG", compress_level=1),
        "PNG, palette": costly.save(image.convert("P"), "PNG", compress_level=1),
        "WebP, lossy": costly.save(image, "WEBP", quality=80),
        "GIF": costly.save(image.convert("P"), "GIF"),
        "BMP, 24-bit": costly.save(image, "BMP"),
        "JPEG, baseline": costly.save(image, "JPEG", quality=90),
        "JPEG, progressive": costly.save(image, "JPEG", quality=90, progressive=True),
        "JPEG, CMYK": costly.save(image.convert("CMYK"), "JPEG", quality=90),
    }


def peak_rss_of_one_decode(path: str) -> None:
    """In a fresh process: decode the image at ``path`` once; print the peak-RSS growth in MB."""
    pre = Preprocessor(META, max_pixels=10**9, max_decoded_pixels=10**9)
    with open(path, "rb") as f:
        data = f.read()
    pre(costly.save(costly.noise(40, 40), "PNG"))  # codec initialisation
    before = _peak_rss_kb()
    pre(data)
    print((_peak_rss_kb() - before) / 1024)


def _peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory(size: tuple[int, int]) -> None:
    print(f"| {size[0]}x{size[1]} image | bytes | peak RSS growth of one decode, MB | bytes per pixel |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, data) in enumerate(memory_cases(size).items()):
            path = f"{tmp}/{i}"
            with open(path, "wb") as f:
                f.write(data)
            out = subprocess.run(
                [sys.executable, "-m", "bench.research.decode_gil", "--peak-rss-of", path],
                check=True,
                capture_output=True,
                text=True,
            )
            mb = float(out.stdout.strip())
            print(
                f"| {name} | {len(data):,} | {mb:.0f} | {mb * 2**20 / (size[0] * size[1]):.1f} |", flush=True
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", default="4000x3000", help="ordinary images' size, WxH")
    parser.add_argument("--pillow", action="store_true", help="also time the hostile images in Pillow alone")
    parser.add_argument("--memory", action="store_true", help="only the peak-RSS table")
    parser.add_argument("--peak-rss-of", help=argparse.SUPPRESS)
    parser.add_argument(
        "--mmap-threshold", type=int, default=0, help="glibc M_MMAP_THRESHOLD, bytes (0: glibc's)"
    )
    args = parser.parse_args()
    if args.mmap_threshold:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold)  # M_MMAP_THRESHOLD
    size = tuple(int(v) for v in args.size.split("x"))
    if args.peak_rss_of:
        peak_rss_of_one_decode(args.peak_rss_of)
        return
    if args.memory:
        memory(size)
        return
    print(f"switch interval {sys.getswitchinterval() * 1000:.0f} ms; {args.repeat} runs each\n")
    print("| step (in a worker thread) | ms | longest gap of the 1 ms ticker, ms | ticks/s | outcome |")
    print("|---|---|---|---|---|")
    for name, fn in steps(size).items():
        report(name, fn, args.repeat)
    pre = Preprocessor(META, max_pixels=40_000_000)
    print("\n| hostile image | bytes | Preprocessor ms | longest gap ms | outcome |")
    print("|---|---|---|---|---|")
    cases = hostile()
    for name, (data, _fmt) in cases.items():
        runs = [ticked(lambda data=data: pre(data)) for _ in range(args.repeat)]
        try:
            pre(data)
            outcome = "decoded"
        except errors.InvalidInput as exc:
            outcome = "refused: " + str(exc)[:70] + "..."
        ms = statistics.median(r[0] for r in runs)
        gap = statistics.median(r[1] for r in runs)
        print(f"| {name} | {len(data):,} | {ms:.2f} | {gap:.1f} | {outcome} |", flush=True)
    print("\n| accepted, at the caps | bytes | Preprocessor ms | longest gap ms | ticks/s |")
    print("|---|---|---|---|---|")
    for name, data in at_the_caps().items():
        pre(data)  # accepted (an InvalidInput here means a cap moved)
        runs = [ticked(lambda data=data: pre(data)) for _ in range(args.repeat)]
        ms = statistics.median(r[0] for r in runs)
        gap = statistics.median(r[1] for r in runs)
        rate = statistics.median(r[2] for r in runs)
        print(f"| {name} | {len(data):,} | {ms:.1f} | {gap:.1f} | {rate:.0f} |", flush=True)
    if args.pillow:
        print("\n| hostile image, Pillow alone (before the pre-scan) | ms | longest gap ms | ticks/s |")
        print("|---|---|---|---|")
        for name, (data, fmt) in cases.items():
            ms, gap, rate = ticked(pillow_load(data, fmt))
            print(f"| {name} | {ms:.0f} | {gap:.1f} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
