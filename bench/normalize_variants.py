"""Measures the normalisation step of the image path against one fused OpenCV call (a suggestion, not a change).

The profile (``bench/profile.py``) shows ``Preprocessor.normalize`` taking
about as many decode-thread samples as the JPEG decode itself. It converts
uint8 HWC to float32 CHW and applies scale and offset in three numpy passes.
``cv2.dnn.blobFromImageWithParams`` does the same arithmetic (subtract
mean*255, multiply by 1/(255*std), HWC->CHW) in one pass of C++ that releases
the GIL. This script times both on the benchmark photographs' real crops and
prints the largest difference, so the suggestion can be judged by numbers:
``python -m bench.normalize_variants``.
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

import cv2
import numpy as np

from service import modelmeta
from service.preprocess import Preprocessor

REPO_ROOT = Path(__file__).resolve().parent.parent


def fused(meta: modelmeta.ModelMeta):
    """The one-call OpenCV normalisation for ``meta`` (RGB order; BGR models swap channels)."""
    std = np.asarray(meta.std, np.float64)
    params = cv2.dnn.Image2BlobParams(
        scalefactor=tuple(float(x) for x in 1.0 / (255.0 * std)),
        size=(meta.crop[1], meta.crop[0]),
        mean=tuple(float(x) * 255.0 for x in meta.mean),
        swapRB=meta.color_order == "BGR",
        ddepth=cv2.CV_32F,
    )

    def run(rgb: np.ndarray) -> np.ndarray:
        return cv2.dnn.blobFromImageWithParams(rgb, params)[0]

    return run


def main() -> int:
    from bench import images

    meta = modelmeta.ModelMeta(
        labels=("a", "b"), crop=(224, 224), resize=256, mean=modelmeta.IMAGENET_MEAN,
        std=modelmeta.IMAGENET_STD, arch="resnet18",
    )  # fmt: skip
    pre = Preprocessor(meta, max_pixels=40_000_000)
    jpegs = images.load_jpegs(REPO_ROOT / ".bench" / "images")
    crops = [pre.decode(data) for data in jpegs]
    other = fused(meta)
    err = max(float(np.abs(pre.normalize(c) - other(c)).max()) for c in crops)
    for name, fn in (("Preprocessor.normalize", pre.normalize), ("cv2.dnn.blobFromImageWithParams", other)):
        best = min(timeit.repeat(lambda fn=fn: [fn(c) for c in crops], number=20, repeat=5)) / (
            20 * len(crops)
        )
        print(f"{name:34s} {best * 1e6:8.1f} us per 224x224 image")
    full = min(
        timeit.repeat(
            lambda: [pre(d) for d in images.load_jpegs(REPO_ROOT / ".bench" / "images")], number=3, repeat=3
        )
    )
    print(f"{'whole Preprocessor (1024x768 JPEG)':34s} {full / (3 * len(crops)) * 1e6:8.1f} us per image")
    print(f"largest difference between the two: {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
