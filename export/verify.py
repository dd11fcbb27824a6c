"""Proof by round trip: the ONNX model computes what the torch model computes.

Two checks run on every export, on real images from the dataset:

* **parity** — onnxruntime vs torch (eval mode): max |logit difference| <=
  ``atol`` (1e-4 for fp32) and the same top-1 class for every image;
* **batch invariance** — each image alone vs inside a batch of 8 gives the
  same logits within ``atol``. This is what catches BatchNorm exported in
  training mode (batch statistics make an image's logits depend on its
  batch-mates), and it is the property the server's dynamic batcher relies on.

Also here: the evaluation helpers (preprocessing from a model's metadata,
onnxruntime top-1) that export and quantize use to measure val accuracy the
way the server will compute it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from export import data as datamod
from export.errors import VerificationError
from service.modelmeta import INPUT_NAME, ModelMeta

log = logging.getLogger(__name__)

FP32_ATOL = 1e-4
INVARIANCE_BATCH = 8


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    images: int
    source: str
    max_abs_diff: float  # onnxruntime vs torch
    top1_agree: int
    batch_max_abs_diff: float  # alone vs in a batch of 8 (onnxruntime)

    def summary(self) -> str:
        return (
            f"parity on {self.images} {self.source}: max |logit diff| {self.max_abs_diff:.2e}, "
            f"top-1 identical {self.top1_agree}/{self.images}; batch invariance (alone vs batch of "
            f"{INVARIANCE_BATCH}): max diff {self.batch_max_abs_diff:.2e}"
        )


def session(model: bytes | str, threads: int = 0) -> Any:
    """An onnxruntime CPU session with the server's default (full) graph optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def run(sess: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    outs = [
        sess.run(None, {INPUT_NAME: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def eval_transform(meta: ModelMeta) -> Any:
    """The preprocessing the metadata describes (what the server applies), as a torchvision pipeline."""
    from torchvision import transforms as T

    modes = {
        "bilinear": T.InterpolationMode.BILINEAR,
        "bicubic": T.InterpolationMode.BICUBIC,
        "nearest": T.InterpolationMode.NEAREST,
    }
    return T.Compose(
        [
            T.Resize(meta.resize, interpolation=modes[meta.interpolation], antialias=True),
            T.CenterCrop(list(meta.crop)),
            T.ToTensor(),
            T.Normalize(list(meta.mean), list(meta.std)),
        ]
    )


def load_images(
    folder: datamod.ImageFolder, meta: ModelMeta, limit: int | None = None, evenly: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images [N, 3, H, W] float32 and their class indices from an ImageFolder.

    ``evenly`` picks ``limit`` samples spread over the (class-sorted) folder so every class shows up.
    """
    samples = list(folder.samples)
    if limit is not None and len(samples) > limit:
        if evenly:
            idx = np.linspace(0, len(samples) - 1, limit).round().astype(int)
            samples = [samples[i] for i in idx]
        else:
            samples = samples[:limit]
    transform = eval_transform(meta)
    arrays = []
    for path, _ in samples:
        x = transform(datamod.load_rgb(path)).numpy()
        if meta.color_order == "BGR":
            x = x[::-1]
        arrays.append(np.ascontiguousarray(x, dtype=np.float32))
    images = np.stack(arrays) if arrays else np.zeros((0, 3, *meta.crop), np.float32)
    return images, np.asarray([t for _, t in samples], dtype=np.int64)


def top1(sess: Any, images: np.ndarray, targets: np.ndarray) -> float:
    logits = run(sess, images)
    return float((logits.argmax(1) == targets).mean())


def batch_invariance(sess: Any, images: np.ndarray) -> float:
    """Max |logit difference| between each of the first 8 images alone and inside one batch of 8."""
    batch = images[:INVARIANCE_BATCH]
    together = sess.run(None, {INPUT_NAME: batch})[0]
    alone = np.concatenate([sess.run(None, {INPUT_NAME: batch[i : i + 1]})[0] for i in range(len(batch))])
    return float(np.abs(together - alone).max())


def verify(
    onnx_model: bytes | str,
    torch_model: Any,
    images: np.ndarray,
    source: str,
    atol: float = FP32_ATOL,
) -> VerifyReport:
    """Parity and batch invariance; raises :class:`VerificationError` with the numbers when either fails."""
    import torch

    if len(images) < INVARIANCE_BATCH:
        raise VerificationError(f"need at least {INVARIANCE_BATCH} images to verify, got {len(images)}")
    sess = session(onnx_model)
    torch_model.eval()
    with torch.inference_mode():
        expected = np.concatenate(
            [torch_model(torch.from_numpy(images[i : i + 64])).numpy() for i in range(0, len(images), 64)]
        )
    got = run(sess, images)
    if got.shape != expected.shape:
        raise VerificationError(f"onnxruntime returned shape {list(got.shape)}, torch {list(expected.shape)}")
    diff = float(np.abs(got - expected).max())
    agree = int((got.argmax(1) == expected.argmax(1)).sum())
    report = VerifyReport(len(images), source, diff, agree, batch_invariance(sess, images))
    problems = []
    if not diff <= atol:
        problems.append(f"max |logit diff| onnxruntime vs torch {diff:.3g} > {atol:g}")
    if agree != len(images):
        problems.append(f"top-1 differs on {len(images) - agree} of {len(images)} images")
    if not report.batch_max_abs_diff <= atol:
        problems.append(
            f"logits depend on the batch (alone vs batch of {INVARIANCE_BATCH}: {report.batch_max_abs_diff:.3g} "
            f"> {atol:g}; BatchNorm in training mode?)"
        )
    if problems:
        raise VerificationError("verification failed: " + "; ".join(problems))
    log.info("%s", report.summary())
    return report


def check_batch_invariance(onnx_model: bytes | str, images: np.ndarray, atol: float) -> float:
    """Batch invariance alone (for a model without a torch twin, e.g. int8)."""
    diff = batch_invariance(session(onnx_model), images)
    if not diff <= atol:
        raise VerificationError(
            f"logits depend on the batch (alone vs batch of {INVARIANCE_BATCH}: {diff:.3g} > {atol:g})"
        )
    return diff


def random_images(count: int, size: Sequence[int], seed: int = 0) -> np.ndarray:
    """Stand-in inputs when there is no dataset (``--weights random`` benchmarks)."""
    return np.random.default_rng(seed).standard_normal((count, 3, *size)).astype(np.float32)
