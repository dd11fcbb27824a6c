"""Training, read top to bottom: ``train_one_epoch``, ``evaluate``, ``main``.

The recipe is torchvision's reference classification recipe cut down for
CPUs: SGD with Nesterov momentum, weight decay, a one-cycle learning-rate
schedule stepped per batch, and standard augmentation (padded random crops for
small images, random-resized crops for ImageNet-size ones, optional
horizontal flips). A checkpoint is written after every epoch (atomically, so a
killed run leaves the previous one intact) and ``--resume`` continues from it.

A checkpoint carries the model's preprocessing (crop, resize, mean/std,
colour order) and labels next to the weights, so ``svertka export`` needs
nothing else to write a self-describing model.

A run is reproducible bit for bit (:func:`reproducible`): the same settings and
seed on the same machine, at the same thread count, give the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export import data as datamod
from export import models
from export.errors import ExportError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "svertka-checkpoint"
CHECKPOINT_VERSION = 1
AUGMENTATIONS = ("standard", "affine")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on (saved in each checkpoint for ``--resume``)."""

    data: Path
    arch: str = "resnet20"
    output: Path = Path("runs/train")
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    image_size: int | None = None  # the crop; default 32 for CIFAR-style archs, 224 otherwise
    resize: int | None = None  # shorter side before the crop; default derived from image_size
    val_split: float | None = None
    seed: int = 0
    workers: int = 0
    threads: int | None = None  # torch's intra-op threads; None: torch's default (the cores available)
    strict: bool = False
    weights: Path | None = None
    hflip: bool = True
    augment: str = "standard"  # "standard" or "affine" (small rotations/shifts/scaling: digits, glyphs)
    crop_padding: int | None = None  # small-image random-crop padding; default image_size // 8
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    dataset_name: str = ""
    keep_all: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.output = Path(self.output)
        if self.arch not in models.ARCHS:
            raise ExportError(f"unknown architecture {self.arch!r}; choose one of {', '.join(models.ARCHS)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ExportError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ExportError(f"--lr: expected > 0, got {self.lr}")
        if self.augment not in AUGMENTATIONS:
            raise ExportError(f"--augment: expected one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.workers < 0:
            raise ExportError(f"--workers: expected >= 0, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise ExportError(f"--threads: expected >= 1, got {self.threads}")
        if self.image_size is None:
            self.image_size = 32 if models.is_small_image_arch(self.arch) else 224
        if self.image_size < 8:
            raise ExportError(f"--image-size: expected >= 8, got {self.image_size}")
        if self.resize is None:
            # ImageNet-style: resize 256 for a 224 crop (torchvision's eval recipe); small images: no margin.
            small = models.is_small_image_arch(self.arch)
            self.resize = self.image_size if small else int(round(self.image_size * 256 / 224))
        if self.resize < self.image_size:
            raise ExportError(f"--resize: {self.resize} is smaller than --image-size {self.image_size}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) == 1:
                    value = value * 3
                if len(value) != 3:
                    raise ExportError(f"--{name}: expected 1 or 3 numbers, got {len(value)}")
                setattr(self, name, value)
        if self.std is not None and min(self.std) <= 0:
            raise ExportError(f"--std: values must be > 0, got {list(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
        return out


@dataclasses.dataclass
class EvalResult:
    loss: float
    top1: float  # fractions in [0, 1]
    top5: float
    confusion: torch.Tensor  # [true, predicted] counts

    @property
    def count(self) -> int:
        return int(self.confusion.sum())


@dataclasses.dataclass
class TrainResult:
    checkpoint: Path
    val: EvalResult
    epochs: int
    seconds: float
    labels: tuple[str, ...]


# --- building blocks ----------------------------------------------------------------------------


def build_transforms(cfg: TrainConfig, mean: Sequence[float], std: Sequence[float], train: bool) -> Any:
    """Train-time augmentation or the eval pipeline (the one the server reproduces)."""
    from torchvision import transforms as T

    bilinear = T.InterpolationMode.BILINEAR
    crop = cfg.image_size
    steps: list[Any]
    if not train:
        steps = [T.Resize(cfg.resize, interpolation=bilinear, antialias=True), T.CenterCrop(crop)]
    elif cfg.augment == "affine":
        steps = [
            T.Resize(cfg.resize, interpolation=bilinear, antialias=True),
            T.CenterCrop(crop),
            T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), interpolation=bilinear),
        ]
    elif models.is_small_image_arch(cfg.arch):
        steps = [
            T.Resize(cfg.resize, interpolation=bilinear, antialias=True),
            T.RandomCrop(
                crop, padding=cfg.crop_padding if cfg.crop_padding is not None else max(1, crop // 8)
            ),
        ]
    else:
        steps = [T.RandomResizedCrop(crop, interpolation=bilinear, antialias=True)]
    if train and cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


def compute_mean_std(
    cfg: TrainConfig, folder: datamod.ImageFolder, limit: int = 2000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the (eval-preprocessed) training images, rounded to 4 decimals.

    Rounded so the metadata shows the exact numbers training normalised with.
    """
    transform = build_transforms(cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=False)
    step = max(1, len(folder.samples) // limit)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for path, _ in folder.samples[::step]:
        x = transform(datamod.load_rgb(path)).to(torch.float64)
        total += x.sum(dim=(1, 2))
        total_sq += (x * x).sum(dim=(1, 2))
        pixels += x.shape[1] * x.shape[2]
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(max(round(float(v), 4), 1e-4) for v in std)


def weights_url(arch: str) -> str | None:
    """Where torchvision publishes ``arch``'s ImageNet weights, or None (the small-image archs).

    IMAGENET1K_V1: evaluated at resize 256, crop 224, svertka's default preprocessing for a 224
    crop (resnet50's newer V2 file was evaluated at resize 232).
    """
    if arch not in models.IMAGENET_ARCHS:
        return None
    from torchvision.models import get_model_weights

    return get_model_weights(arch).IMAGENET1K_V1.url


def weights_hint(arch: str | None = None) -> str:
    """What to do about a missing weights file, naming ``arch``'s own file when it has one."""
    url = weights_url(arch) if arch else None
    if url is not None:
        where = f"{arch}'s torchvision weights file on a machine with internet ({url})"
    elif arch:
        return (
            f"nothing is downloaded at run time, and torchvision publishes no {arch} weights: "
            "pass a svertka train checkpoint (last.pt)"
        )
    else:
        where = (
            "your --arch's torchvision weights file on a machine with internet "
            "(torchvision.models.get_model_weights(ARCH).IMAGENET1K_V1.url names it)"
        )
    return f"nothing is downloaded at run time: fetch {where} and pass its path"


def load_state_dict_file(path: Path, arch: str | None = None) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict (or a svertka checkpoint's weights) from a local file;
    ``arch``, when known, names its torchvision file in the error for a missing one."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such weights file ({weights_hint(arch)})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{path}: not a readable PyTorch weights file ({_first_line(exc)})") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ExportError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    return obj


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: Path) -> None:
    """Load ``state`` into ``model``; the classifier is re-initialised when its class count differs."""
    own = model.state_dict()
    state = dict(state)
    dropped = []
    for key in models.classifier_keys(arch):
        if key in state and key in own and state[key].shape != own[key].shape:
            dropped.append(key)
            del state[key]
    missing = [k for k in own if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise ExportError(f"{source}: does not fit {arch} ({detail})")
    model.load_state_dict(state, strict=False)
    if dropped:
        log.info("loaded %s; classifier re-initialised for %d classes", source, _classes_of(model))
    else:
        log.info("loaded %s", source)


def _classes_of(model: nn.Module) -> int:
    fc = getattr(model, "fc", None)
    return int(fc.out_features) if isinstance(fc, nn.Linear) else -1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _progress_enabled(cfg: TrainConfig) -> bool:
    return sys.stderr.isatty() if cfg.progress is None else cfg.progress


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- the loop -------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    epochs: int,
    progress: bool,
) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) on the augmented training batches."""
    from tqdm import tqdm

    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False, unit="batch")
    for images, targets in bar:
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = criterion(logits, targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = targets.shape[0]
        loss_sum += float(loss.detach()) * n
        correct += int((logits.detach().argmax(1) == targets).sum())
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.1f}%")
    bar.close()
    if seen == 0:
        raise ExportError("the training set yields no batch (fewer images than --batch-size?)")
    return loss_sum / seen, correct / seen


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Any, num_classes: int) -> EvalResult:
    """Loss, top-1, top-5 and the confusion matrix of ``model`` in eval mode."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, top5_hits = 0.0, 0
    for images, targets in loader:
        logits = model(images)
        loss_sum += float(criterion(logits, targets))
        k = min(5, num_classes)
        top5_hits += int((logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum())
        pred = logits.argmax(1)
        confusion += torch.bincount(targets * num_classes + pred, minlength=num_classes**2).view(
            num_classes, num_classes
        )
    n = int(confusion.sum())
    if n == 0:
        raise ExportError("the validation set is empty")
    return EvalResult(loss_sum / n, float(confusion.diag().sum()) / n, top5_hits / n, confusion)


def confusion_summary(result: EvalResult, labels: Sequence[str], worst: int = 5) -> list[str]:
    """Lines for people: per-class recall (worst first) and the most frequent confusions."""
    cm = result.confusion
    per_class = cm.diag().double() / cm.sum(1).clamp_min(1).double()
    order = sorted(range(len(labels)), key=lambda i: (float(per_class[i]), labels[i]))
    lines = [
        "per-class recall (worst first): "
        + ", ".join(f"{labels[i]} {100 * float(per_class[i]):.1f}%" for i in order[:worst])
    ]
    off = cm.clone()
    off.fill_diagonal_(0)
    pairs = [(int(off[t, p]), t, p) for t in range(len(labels)) for p in range(len(labels)) if off[t, p] > 0]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    if pairs:
        lines.append(
            "most confused (true -> predicted): "
            + ", ".join(f"{labels[t]} -> {labels[p]} x{n}" for n, t, p in pairs[:worst])
        )
    else:
        lines.append("no confusions on the validation set")
    return lines


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """One-cycle, stepped per batch: a short warm-up (15 %) then cosine annealing to ~0."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15, div_factor=10
    )


def make_loaders(cfg: TrainConfig, splits: datamod.Splits, mean: Sequence[float], std: Sequence[float]):
    from torch.utils.data import DataLoader

    train_ds = datamod.ImageDataset(splits.train, build_transforms(cfg, mean, std, train=True))
    val_ds = datamod.ImageDataset(splits.val, build_transforms(cfg, mean, std, train=False))
    drop_last = len(train_ds) > cfg.batch_size  # avoid a 1-image BatchNorm batch, keep tiny sets usable
    # The shuffle order comes from this generator. So do the seeds of worker processes: DataLoader
    # seeds each worker's torch, random and numpy from a draw of it plus the worker's index, and a
    # worker's batches are always the same ones, so a given --workers count is reproducible. Another
    # count gives each image other augmentation draws (with 0 they come from the global torch RNG).
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=drop_last,
        num_workers=cfg.workers,
        generator=generator,
        persistent_workers=cfg.workers > 0,
    )
    val_loader = DataLoader(val_ds, batch_size=max(cfg.batch_size, 128), num_workers=cfg.workers)
    return train_loader, val_loader, generator


@contextlib.contextmanager
def reproducible(seed: int, threads: int | None = None) -> Iterator[None]:
    """Seed every RNG and make torch use deterministic kernels, for the duration of a run.

    Seeds Python's ``random``, numpy's and torch's global RNGs (augmentation draws from torch's;
    nothing in training draws from the other two, seeded all the same for custom transforms), and
    turns on ``torch.use_deterministic_algorithms`` (``warn_only``: an operator without a
    deterministic implementation warns rather than stops the run; none of the CPU ops used here
    lacks one). ``threads`` pins torch's intra-op thread count. The caller's settings come back
    afterwards, so an in-process run (tests, ``build-default``) does not change the process.

    What still varies is the floating-point summation order, which depends on the thread count and
    on the kernels oneDNN and MKL pick for the CPU (AVX2 or AVX-512, ...): runs agree bit for bit at
    the same thread count on the same CPU and torch build, and not otherwise (docs/training.md).
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if threads is not None:
            torch.set_num_threads(previous_threads)


def numeric_environment() -> dict[str, Any]:
    """What, besides the settings and the seed, decides the weights bit for bit (kept in checkpoints)."""
    return {
        "torch": str(torch.__version__),  # a str subclass torch.load(weights_only=True) refuses
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def resume_config(path: Path, epochs: int | None = None, progress: bool | None = None) -> TrainConfig:
    """The configuration saved in checkpoint ``path`` (optionally with more epochs)."""
    saved = TrainConfig(**_config_from_dict(load_checkpoint(path)["config"]))
    if epochs is not None:
        saved.epochs = epochs
    saved.progress = progress
    return saved


def main(cfg: TrainConfig, resume: Path | None = None) -> TrainResult:
    """Train ``cfg.arch`` on ``cfg.data``; checkpoints go to ``cfg.output`` (``last.pt`` each epoch).

    With ``resume``, ``cfg`` should come from :func:`resume_config`; training
    continues after the checkpoint's epoch with its optimizer, schedule and RNG state.
    Runs are reproducible (:func:`reproducible`): the same ``cfg`` on the same machine gives
    bit-identical weights. So does a resumed run as against an uninterrupted one when the number of
    epochs is the planned one and ``workers`` is 0 (worker processes' RNG states are not saved).
    """
    with reproducible(cfg.seed, cfg.threads):
        return _main(cfg, resume)


def _main(cfg: TrainConfig, resume: Path | None) -> TrainResult:
    started = time.perf_counter()
    state: dict[str, Any] | None = None
    if resume is not None:
        state = load_checkpoint(resume)
        if int(state["epoch"]) >= cfg.epochs:
            raise ExportError(
                f"{resume}: already trained {state['epoch']} of {cfg.epochs} epochs (raise --epochs)"
            )
        log.info("resuming %s from %s after epoch %d", cfg.arch, resume, state["epoch"])
    splits = datamod.load_splits(cfg.data, cfg.val_split, cfg.seed, cfg.strict)
    labels = splits.train.classes
    if state is not None and tuple(state["meta"]["labels"]) != labels:
        raise ExportError(
            f"{resume}: trained on classes {state['meta']['labels']}, the data has {list(labels)}"
        )
    if cfg.mean is None or cfg.std is None:
        if cfg.weights is not None and not models.is_small_image_arch(cfg.arch):
            from service.modelmeta import IMAGENET_MEAN, IMAGENET_STD

            mean, std = IMAGENET_MEAN, IMAGENET_STD  # what torchvision's weights were trained with
        else:
            mean, std = compute_mean_std(cfg, splits.train)
        cfg.mean = cfg.mean or tuple(mean)
        cfg.std = cfg.std or tuple(std)
    log.info(
        "data %s: %d classes, %d train / %d val images (%d unreadable skipped); mean %s std %s",
        cfg.data,
        len(labels),
        len(splits.train.samples),
        len(splits.val.samples),
        len(splits.skipped),
        list(cfg.mean),
        list(cfg.std),
    )
    environment = numeric_environment()
    log.info(
        "seed %d, torch %s, %d threads, %s kernels, %d loader workers (bit-identical weights on a run "
        "with all of these the same)",
        cfg.seed, environment["torch"], environment["threads"], environment["cpu_capability"], cfg.workers,
    )  # fmt: skip
    if state is not None and state.get("environment", environment) != environment:
        log.warning(
            "%s was trained with %s, this run has %s: the result will not be bit-identical to an "
            "uninterrupted run", resume, state["environment"], environment,
        )  # fmt: skip
    train_loader, val_loader, generator = make_loaders(cfg, splits, cfg.mean, cfg.std)

    model = models.build_model(cfg.arch, len(labels))
    if cfg.weights is not None and state is None:
        apply_weights(model, load_state_dict_file(cfg.weights, cfg.arch), cfg.arch, cfg.weights)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on BatchNorm and biases
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    start_epoch, history = 0, []
    if state is not None:
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        planned = int(state["config"]["epochs"])
        if planned == cfg.epochs:
            scheduler.load_state_dict(state["scheduler"])
        else:
            # More epochs than planned: the same one-cycle shape over the new length, at the
            # step already reached (the learning rate rises again a little, then anneals).
            scheduler = make_scheduler(optimizer, cfg, len(train_loader))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
                for _ in range(start_epoch * len(train_loader)):
                    scheduler.step()
            log.info("learning-rate schedule stretched from %d to %d epochs", planned, cfg.epochs)
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["loader"])

    cfg.output.mkdir(parents=True, exist_ok=True)
    progress = _progress_enabled(cfg)
    result: EvalResult | None = None
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss, acc = train_one_epoch(
            model, train_loader, criterion, optimizer, scheduler, epoch, cfg.epochs, progress
        )
        result = evaluate(model, val_loader, len(labels))
        seconds = time.perf_counter() - t0
        history.append(
            {"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_loss": result.loss,
             "val_top1": result.top1, "val_top5": result.top5, "seconds": seconds}
        )  # fmt: skip
        log.info(
            "epoch %d/%d  train loss %.4f acc %.2f%%  val loss %.4f top-1 %.2f%% top-5 %.2f%%  (%.1f s)",
            epoch, cfg.epochs, loss, 100 * acc, result.loss, 100 * result.top1, 100 * result.top5, seconds,
        )  # fmt: skip
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": epoch,
            "config": cfg.to_dict(),
            "meta": {
                "labels": list(labels),
                "arch": cfg.arch,
                "crop": [cfg.image_size, cfg.image_size],
                "resize": cfg.resize,
                "mean": list(cfg.mean),
                "std": list(cfg.std),
                "interpolation": "bilinear",
                "color_order": "RGB",
                "layout": "NCHW",
                "dataset": cfg.dataset_name or cfg.data.name,
                "val_top1": result.top1,
            },
            "val_top5": result.top5,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "loader": generator.get_state()},
            "environment": environment,
            "history": history,
        }
        save_atomic(checkpoint, cfg.output / "last.pt")
        if cfg.keep_all:
            save_atomic(checkpoint, cfg.output / f"epoch-{epoch:03d}.pt")
    assert result is not None
    for line in confusion_summary(result, labels):
        log.info("%s", line)
    elapsed = time.perf_counter() - started
    log.info(
        "done: %s val top-1 %.2f%% top-5 %.2f%% on %d images in %.1f s; checkpoint %s",
        cfg.arch, 100 * result.top1, 100 * result.top5, result.count, elapsed, cfg.output / "last.pt",
    )  # fmt: skip
    return TrainResult(cfg.output / "last.pt", result, cfg.epochs, elapsed, labels)


def _config_from_dict(data: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in data.items() if k in known}
    for key in ("mean", "std"):
        if out.get(key) is not None:
            out[key] = tuple(out[key])
    if out.get("weights") is not None:
        out["weights"] = Path(out["weights"])
    return out


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A ``svertka train`` checkpoint, checked for the fields export and resume need."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"{path}: not a readable checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(
            f"{path}: not a svertka train checkpoint (for a torchvision state dict use --weights with --arch)"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise ExportError(f"{path}: checkpoint version {state.get('version')!r} is not supported")
    return state
