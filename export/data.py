"""Datasets for training and export: ImageFolder directories and the bundled digits.

An ImageFolder is ``ROOT/<class>/<image>`` (class names sorted give the label
indices, as torchvision does), optionally split as ``ROOT/train/...`` and
``ROOT/val/...``. Every file is decoded once while scanning, so a corrupt or
unreadable image is reported by path before training starts rather than
crashing a worker in epoch 7; it is skipped, or fails the run under ``strict``.

The bundled dataset is scikit-learn's 1,797 real 8x8 handwritten digits,
written out as a PNG ImageFolder so that training exercises the same loading
path as any user dataset (see :func:`write_digits`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from export.errors import ExportError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

#: The bundled digits: 8x8 scikit-learn images upsampled to this size (see write_digits).
DIGITS_IMAGE_SIZE = 32
DIGITS_VAL_SIZE = 297
DIGITS_SEED = 0
DIGITS_FORMAT = 1  # bump when the written files change
DIGITS_DATASET_NAME = "sklearn-digits"
_DIGITS_MARKER = ".svertka-digits.json"


class DatasetError(ExportError):
    """The dataset cannot be used; the message names the path and the problem."""


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """A scanned ImageFolder: class names and ``(path, class index)`` samples."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]
    skipped: tuple[tuple[Path, str], ...] = ()

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def subset(self, indices: Sequence[int]) -> ImageFolder:
        return dataclasses.replace(self, samples=tuple(self.samples[i] for i in indices), skipped=())


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _check_image(path: Path) -> str | None:
    """Decode ``path`` fully; the reason it is unusable, or None when it is fine."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # PIL raises many types for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def scan_image_folder(root: str | os.PathLike[str], strict: bool = False) -> ImageFolder:
    """Scan ``root/<class>/<images>``; corrupt files are skipped and reported (an error if ``strict``)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    samples: list[tuple[Path, int]] = []
    skipped: list[tuple[Path, str]] = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and _is_image(p))
        if not files:
            raise DatasetError(
                f"{class_dir}: class folder has no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)"
            )
        good = 0
        for path in files:
            reason = _check_image(path)
            if reason is None:
                samples.append((path, index))
                good += 1
                continue
            if strict:
                raise DatasetError(f"{path}: unreadable image ({reason})")
            log.warning("skipping unreadable image %s (%s)", path, reason)
            skipped.append((path, reason))
        if good == 0:
            raise DatasetError(f"{class_dir}: every image in this class folder is unreadable")
    if len(class_dirs) < 2:
        raise DatasetError(f"{root}: found one class ({class_dirs[0].name}); a classifier needs at least 2")
    return ImageFolder(root, tuple(p.name for p in class_dirs), tuple(samples), tuple(skipped))


@dataclasses.dataclass(frozen=True)
class Splits:
    train: ImageFolder
    val: ImageFolder
    #: The unreadable files skipped while scanning, of both splits: the split halves of one scanned
    #: folder (``--val-split``) are subsets, which hold none of their own.
    skipped: tuple[tuple[Path, str], ...] = ()


def load_splits(
    root: str | os.PathLike[str], val_split: float | None = None, seed: int = 0, strict: bool = False
) -> Splits:
    """``root/train`` + ``root/val`` when both exist, else a seeded stratified split of ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if (root / "train").is_dir() and (root / "val").is_dir() and val_split is None:
        train = scan_image_folder(root / "train", strict)
        val = scan_image_folder(root / "val", strict)
        if train.classes != val.classes:
            raise DatasetError(
                f"{root}: train/ and val/ have different class folders "
                f"({list(train.classes)} vs {list(val.classes)})"
            )
        return Splits(train, val, train.skipped + val.skipped)
    if val_split is None:
        raise DatasetError(f"{root}: has no train/ and val/ subfolders; pass --val-split (e.g. 0.2)")
    if not 0.0 < val_split < 1.0:
        raise DatasetError(f"--val-split: expected a fraction in (0, 1), got {val_split}")
    base = root / "train" if (root / "train").is_dir() else root
    full = scan_image_folder(base, strict)
    train_idx, val_idx = stratified_split(full.targets, val_split, seed)
    if not val_idx or not train_idx:
        raise DatasetError(f"{root}: too few images ({len(full.samples)}) for --val-split {val_split}")
    return Splits(full.subset(train_idx), full.subset(val_idx), full.skipped)


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, a seeded shuffle; ``round(n * val_fraction)`` of each class go to val."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    train, val = [], []
    for t in sorted(by_class):
        idx = by_class[t]
        rng.shuffle(idx)
        k = round(len(idx) * val_fraction)
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        val.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(val)


def load_rgb(path: Path) -> Image.Image:
    """Decode as RGB: grayscale is replicated to three channels, alpha dropped (as the server does)."""
    with Image.open(path) as im:
        return im.convert("RGB")


class ImageDataset:
    """A map-style dataset over an :class:`ImageFolder` (what ``torch.utils.data.DataLoader`` wants)."""

    def __init__(self, folder: ImageFolder, transform: Callable[[Image.Image], Any]) -> None:
        self.folder = folder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.folder.samples[index]
        try:
            image = load_rgb(path)
        except Exception as exc:  # the file changed after the scan
            raise DatasetError(f"{path}: unreadable image ({exc})") from None
        return self.transform(image), target


# --- the bundled digits -----------------------------------------------------------------------


def digits_to_image(pixels: Any) -> Image.Image:
    """One scikit-learn digit (8x8 intensities 0..16) as a 32x32 8-bit grayscale image.

    Intensities are scaled by 255/16 and rounded (16 -> 255: white ink on black, as in
    the source data), then upsampled 4x with Pillow's bilinear filter.
    """
    import numpy as np

    arr = np.clip(np.rint(np.asarray(pixels, dtype=np.float64).reshape(8, 8) * 255.0 / 16.0), 0, 255)
    small = Image.fromarray(arr.astype(np.uint8), mode="L")
    return small.resize((DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.Resampling.BILINEAR)


def _digits_manifest() -> dict[str, Any]:
    return {
        "format": DIGITS_FORMAT,
        "seed": DIGITS_SEED,
        "val_size": DIGITS_VAL_SIZE,
        "image_size": DIGITS_IMAGE_SIZE,
    }


def digits_ready(root: str | os.PathLike[str]) -> bool:
    marker = Path(root) / _DIGITS_MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return {k: data.get(k) for k in _digits_manifest()} == _digits_manifest()


def write_digits(root: str | os.PathLike[str]) -> Path:
    """Write the bundled digits as ``root/{train,val}/<digit>/<index>.png``; reuse a complete copy.

    The split is stratified and seeded (``DIGITS_SEED``): 1,500 train / 297 val,
    the same files byte for byte on every machine. The tree is written to a
    sibling temporary directory and renamed into place, so an interrupted run
    never leaves a half-written dataset that a later run would trust.
    """
    root = Path(root)
    if digits_ready(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root}: exists but is not a complete svertka digits folder; remove it first")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the bundled digits need scikit-learn: install svertka[train]") from None
    digits = load_digits()
    targets = [int(t) for t in digits.target]
    train_idx, val_idx = stratified_split(targets, DIGITS_VAL_SIZE / len(targets), DIGITS_SEED)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        digest = hashlib.sha256()
        for split, indices in (("train", train_idx), ("val", val_idx)):
            for label in range(10):
                (staging / split / str(label)).mkdir(parents=True)
            for i in indices:
                path = staging / split / str(targets[i]) / f"{i:04d}.png"
                digits_to_image(digits.images[i]).save(path, format="PNG", optimize=False)
                digest.update(path.read_bytes())
        manifest = _digits_manifest() | {
            "train": len(train_idx),
            "val": len(val_idx),
            "sha256": digest.hexdigest(),
            "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
        }
        (staging / _DIGITS_MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote the bundled digits to %s (%d train, %d val)", root, len(train_idx), len(val_idx))
    return root
