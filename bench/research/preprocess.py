"""Engine benchmark: ways to turn a 1024x768 JPEG photo into a 224x224 crop.

Backs docs/engine.md, "Preprocessing" (the pipeline table) and the measured
choices in ``service/preprocess.py``'s docstring. ::

    .venv/bin/python -m bench.research.preprocess [--repeat 200]

Prints the 10th-percentile time of each pipeline (the machine is shared, so
the fast tail is the stable number; pipelines run interleaved), its mean
absolute difference from a full decode + Pillow resize + crop in grey
levels, and whether the decode releases the GIL (``releases_gil``), next to
a pure-Python baseline that holds it.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time

import cv2
import numpy as np
import simplejpeg
from PIL import Image
from skimage import data as skdata

from service.preprocess import Preprocessor, resized_geometry
from tests.helpers.tinymodel import tiny_meta

RESIZE, CROP = 256, 224


def photo_jpeg() -> bytes:
    image = Image.fromarray(skdata.coffee()).resize((1024, 768), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def box(w0: int, h0: int, w: int, h: int) -> tuple[float, float, float, float]:
    new_w, new_h, left, top = resized_geometry(w0, h0, RESIZE, (CROP, CROP))
    sx, sy = w / new_w, h / new_h
    return (left * sx, top * sy, (left + CROP) * sx, (top + CROP) * sy)


def pipelines(jpeg: bytes) -> dict:
    def full_resize_crop():
        im = Image.open(io.BytesIO(jpeg)).convert("RGB")
        new_w, new_h, left, top = resized_geometry(*im.size, RESIZE, (CROP, CROP))
        im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
        return np.asarray(im.crop((left, top, left + CROP, top + CROP)))

    def full_box():
        im = Image.open(io.BytesIO(jpeg)).convert("RGB")
        return np.asarray(im.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box(*im.size, *im.size)))

    def draft_box():
        im = Image.open(io.BytesIO(jpeg))
        w0, h0 = im.size
        im.draft("RGB", (RESIZE, RESIZE))
        im = im.convert("RGB")
        return np.asarray(im.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box(w0, h0, *im.size)))

    def simplejpeg_pillow_box():
        h0, w0, _, _ = simplejpeg.decode_jpeg_header(jpeg)
        a = simplejpeg.decode_jpeg(jpeg, "RGB", min_height=RESIZE, min_width=RESIZE)
        im = Image.fromarray(a)
        return np.asarray(
            im.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box(w0, h0, a.shape[1], a.shape[0]))
        )

    def simplejpeg_cv2(interp):
        def run():
            h0, w0, _, _ = simplejpeg.decode_jpeg_header(jpeg)
            a = simplejpeg.decode_jpeg(jpeg, "RGB", min_height=RESIZE, min_width=RESIZE)
            new_w, new_h, left, top = resized_geometry(w0, h0, RESIZE, (CROP, CROP))
            return cv2.resize(a, (new_w, new_h), interpolation=interp)[top : top + CROP, left : left + CROP]

        return run

    pre = Preprocessor(tiny_meta(size=CROP).replace(resize=RESIZE), max_pixels=40_000_000)
    return {
        "Pillow full decode + resize + crop (reference)": full_resize_crop,
        "Pillow full decode + crop-box resize": full_box,
        "Pillow draft() + crop-box resize": draft_box,
        "simplejpeg min-size + Pillow crop-box resize": simplejpeg_pillow_box,
        "simplejpeg min-size + cv2 INTER_LINEAR": simplejpeg_cv2(cv2.INTER_LINEAR),
        "simplejpeg min-size + cv2 INTER_AREA": simplejpeg_cv2(cv2.INTER_AREA),
        "service.preprocess.Preprocessor.decode": lambda: pre.decode(jpeg),
        "service.preprocess.Preprocessor (+ normalize)": lambda: pre(jpeg),
    }


def p10_ms(funcs: dict, repeat: int) -> dict[str, float]:
    """10th-percentile ms per pipeline, the pipelines interleaved so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for fn in funcs.values():
        fn()
    for _ in range(repeat):
        for name, fn in funcs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.percentile(t, 10) * 1000) for name, t in times.items()}


def releases_gil(fn, tries: int = 20) -> float:
    """Fraction of calls during which another thread ran Python (1.0: ``fn`` releases the GIL).

    Forced GIL switching is pushed out to 10 s, so the main thread, woken
    while the worker starts ``fn``, can only run before ``fn`` returns if
    ``fn`` itself lets go of the GIL. Independent of how busy the cores are.
    """
    old = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    released = 0
    try:
        for _ in range(tries):
            started = threading.Event()
            stamps: dict[str, float] = {}

            def worker(started: threading.Event = started, stamps: dict = stamps) -> None:
                started.set()
                fn()
                stamps["end"] = time.perf_counter()

            thread = threading.Thread(target=worker)
            thread.start()
            started.wait()
            stamps["main"] = time.perf_counter()
            thread.join()
            released += stamps["main"] < stamps["end"]
    finally:
        sys.setswitchinterval(old)
    return released / tries


def python_busy() -> None:
    """A GIL-holding baseline of a few milliseconds."""
    total = 0
    for i in range(60_000):
        total += i * i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    jpeg = photo_jpeg()
    funcs = pipelines(jpeg)
    reference = funcs["Pillow full decode + resize + crop (reference)"]().astype(np.float32)
    print(f"1024x768 JPEG, {len(jpeg)} bytes -> {CROP}x{CROP} (resize {RESIZE})")
    print(f"{'pipeline':50s} {'p10 ms':>7s} {'mean |diff|':>12s}")
    timings = p10_ms(funcs, args.repeat)
    for name, fn in funcs.items():
        out = fn()
        diff = np.abs(out.astype(np.float32) - reference).mean() if out.dtype == np.uint8 else float("nan")
        print(f"{name:50s} {timings[name]:7.2f} {diff:12.2f}")
    for name in (
        "service.preprocess.Preprocessor (+ normalize)",
        "Pillow full decode + resize + crop (reference)",
    ):
        print(f"GIL released during {name}: {releases_gil(funcs[name]):.0%} of calls")
    print(f"GIL released during a pure-Python baseline: {releases_gil(python_busy):.0%} of calls")


if __name__ == "__main__":
    main()
