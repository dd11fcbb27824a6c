"""The ``export``, ``quantize`` and ``build-default`` commands, composed from the stage modules.

Each command does every check before it writes anything: a failed
verification, accuracy gate or bad input leaves the model repository as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export import data as datamod
from export import half, models, pixel_input, verify
from export.errors import ExportError
from export.onnx_export import EvalData, prepare_export
from export.quantize import MIN_CALIBRATION_IMAGES, quantize
from export.repository import check_target, model_path, publish, resolve_model_file
from service import layout
from service.modelmeta import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, read_model_file

log = logging.getLogger(__name__)

#: Parity/invariance images per export: enough to cover every digit class several times.
PARITY_IMAGES = 64

# --- the default model ---------------------------------------------------------------------------

DEFAULT_NAME = "digits"
DEFAULT_INT8_NAME = "digits-int8"
DEFAULT_MIN_TOP1 = 0.985
#: The default recipe (resnet20 on the bundled digits, 32x32); see docs/training.md for its numbers.
DEFAULT_RECIPE = dict(
    arch="resnet20",
    epochs=15,
    batch_size=32,
    lr=0.1,
    weight_decay=5e-4,
    label_smoothing=0.1,
    augment="affine",  # digits are not mirror-symmetric: small rotations/shifts/scaling, no flips
    hflip=False,
    seed=0,
)


@dataclasses.dataclass(frozen=True)
class DatasetArrays:
    splits: datamod.Splits
    val_images: np.ndarray
    val_targets: np.ndarray


def _load_dataset(data: Path, val_split: float | None, meta: ModelMeta, seed: int = 0) -> DatasetArrays:
    splits = datamod.load_splits(data, val_split, seed)
    if tuple(splits.train.classes) != tuple(meta.labels):
        raise ExportError(
            f"{data}: dataset classes {list(splits.train.classes)[:12]} do not match the model's labels "
            f"{list(meta.labels)[:12]}"
        )
    images, targets = verify.load_images(splits.val, meta)
    return DatasetArrays(splits, images, targets)


def _evaluation(dataset: DatasetArrays | None, meta: ModelMeta) -> EvalData:
    if dataset is None:
        log.warning("no dataset: parity is checked on random inputs and val top-1 is not measured")
        return EvalData(verify.random_images(16, meta.crop), "random inputs (no --data)")
    idx = np.linspace(0, len(dataset.val_images) - 1, min(PARITY_IMAGES, len(dataset.val_images)))
    idx = idx.round().astype(int)
    return EvalData(dataset.val_images[idx], "val images", dataset.val_images, dataset.val_targets)


def _check_calibration_size(count: int) -> None:
    if count < MIN_CALIBRATION_IMAGES:
        raise ExportError(f"--calibration-size: expected >= {MIN_CALIBRATION_IMAGES}, got {count}")


def _calibration(dataset: DatasetArrays, meta: ModelMeta, count: int) -> np.ndarray:
    _check_calibration_size(count)
    available = len(dataset.splits.train.samples)
    if available < MIN_CALIBRATION_IMAGES:
        raise ExportError(
            f"calibration needs >= {MIN_CALIBRATION_IMAGES} training images; the dataset has {available}"
        )
    images, _ = verify.load_images(dataset.splits.train, meta, limit=count)
    return images


# --- export ----------------------------------------------------------------------------------------


def _read_labels(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: cannot read the labels file ({exc})") from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(labels) < 2:
        raise ExportError(f"{path}: expected one label per line, at least 2, got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise ExportError(f"{path}: labels must be unique")
    return labels


def _model_from_weights(args: argparse.Namespace) -> tuple[Any, ModelMeta]:
    import torch

    from export import train

    if args.arch is None:
        raise ExportError("--weights needs --arch")
    if args.labels is not None:
        labels = _read_labels(args.labels)
    elif args.weights == "random":
        labels = tuple(f"class_{i}" for i in range(args.num_classes or 1000))
    else:
        raise ExportError("--weights FILE needs --labels FILE (one class label per line)")
    state = None
    if args.weights != "random":
        state = train.load_state_dict_file(Path(args.weights), args.arch)
        fc = state.get("fc.weight")
        if fc is not None and fc.shape[0] != len(labels):
            raise ExportError(
                f"{args.labels}: {len(labels)} labels but the weights' classifier has {fc.shape[0]} classes"
            )
    torch.manual_seed(0)
    model = models.build_model(args.arch, len(labels))
    if state is not None:
        train.apply_weights(model, state, args.arch, Path(args.weights))
    size = args.image_size or (32 if models.is_small_image_arch(args.arch) else 224)
    resize = args.resize or (size if models.is_small_image_arch(args.arch) else int(round(size * 256 / 224)))
    mean = _three(args.mean, "--mean") if args.mean else IMAGENET_MEAN
    std = _three(args.std, "--std") if args.std else IMAGENET_STD
    meta = ModelMeta(
        labels=labels,
        crop=(size, size),
        resize=resize,
        mean=mean,
        std=std,
        arch=args.arch,
        dataset=args.dataset or ("none (random weights)" if args.weights == "random" else ""),
    )
    return model, meta


def _three(values: tuple[float, ...], flag: str) -> tuple[float, float, float]:
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ExportError(f"{flag}: expected 1 or 3 numbers, got {len(values)}")
    return values  # type: ignore[return-value]


def _model_from_checkpoint(path: Path) -> tuple[Any, ModelMeta, dict[str, Any]]:
    from export import train

    state = train.load_checkpoint(path)
    meta = ModelMeta(**state["meta"])
    model = models.build_model(meta.arch, meta.num_classes)
    model.load_state_dict(state["model"])
    return model, meta, state["config"]


def export_command(args: argparse.Namespace) -> None:
    check_target(args.repository, args.name, args.version, args.overwrite)
    _check_calibration_size(args.calibration_size)
    if args.int8:
        check_target(args.repository, args.name + "-int8", args.version, args.overwrite)
    if args.fp16:
        check_target(args.repository, args.name + "-fp16", args.version, args.overwrite)
    data, val_split = args.data, args.val_split
    if args.checkpoint is not None:
        given = [
            f
            for f in ("arch", "labels", "image_size", "resize", "mean", "std", "num_classes")
            if getattr(args, f)
        ]
        if given:
            raise ExportError(
                f"--{given[0].replace('_', '-')} applies to --weights; a checkpoint carries its own"
            )
        model, meta, config = _model_from_checkpoint(args.checkpoint)
        if data is None and config.get("data") and Path(config["data"]).is_dir():
            data, val_split = Path(config["data"]), config.get("val_split")
    else:
        model, meta = _model_from_weights(args)
    if args.int8 and data is None:
        raise ExportError("--int8 needs --data (calibration and the accuracy gate use the dataset)")
    pixels = getattr(args, "input", "float32-nchw") == "uint8-nhwc"
    if pixels and args.int8:
        raise ExportError("--int8 with --input uint8-nhwc is not supported yet: export them separately")
    dataset = _load_dataset(data, val_split, meta) if data is not None else None
    evaluation = _evaluation(dataset, meta)
    prepared = prepare_export(model, meta, evaluation, opset=args.opset)
    print(prepared.report.summary())
    int8 = None
    if args.int8:
        assert dataset is not None
        int8 = quantize(
            prepared.model_bytes,
            prepared.meta,
            _calibration(dataset, prepared.meta, args.calibration_size),
            dataset.val_images,
            dataset.val_targets,
            max_drop=args.max_drop,
            force=args.force,
        )
    fp16 = None
    if args.fp16:
        fp16 = half.to_fp16(
            prepared.model_bytes,
            prepared.meta,
            evaluation.images,
            evaluation.val_images,
            evaluation.val_targets,
            max_drop=args.max_drop,
            force=args.force,
        )
        print(fp16.summary())
    model_bytes, model_meta = prepared.model_bytes, prepared.meta
    if pixels:
        model_bytes, model_meta = _pixel_input(model_bytes, model_meta, evaluation, verify.FP32_ATOL)
        if fp16 is not None:
            fp16_bytes, fp16_meta = _pixel_input(fp16.model_bytes, fp16.meta, evaluation, half.FP16_RTOL)
            fp16 = dataclasses.replace(fp16, model_bytes=fp16_bytes, meta=fp16_meta)
    path = publish(args.repository, args.name, model_bytes, args.version, args.overwrite)
    _print_written(path, model_meta)
    if int8 is not None:
        int8_path = publish(
            args.repository, args.name + "-int8", int8.model_bytes, args.version, args.overwrite
        )
        _print_quantized(int8_path, int8)
    if fp16 is not None:
        fp16_path = publish(
            args.repository, args.name + "-fp16", fp16.model_bytes, args.version, args.overwrite
        )
        _print_written(fp16_path, fp16.meta)


def _pixel_input(
    model_bytes: bytes, meta: ModelMeta, evaluation: EvalData, rtol: float
) -> tuple[bytes, ModelMeta]:
    """``model_bytes`` behind a uint8 NHWC input, proven against it on the evaluation images' pixels."""
    wrapped, wrapped_meta = pixel_input.with_pixel_input(model_bytes, meta)
    report = pixel_input.verify_parity(
        model_bytes, wrapped, pixel_input.pixels_of(evaluation.images, meta), rtol=rtol
    )
    print(report.summary())
    return wrapped, wrapped_meta


def _print_written(path: Path, meta: ModelMeta) -> None:
    top1 = "not measured" if meta.val_top1 is None else f"{100 * meta.val_top1:.2f}%"
    print(f"wrote {path} ({meta.arch}, {meta.num_classes} classes, {meta.precision}, val top-1 {top1})")


def _print_quantized(path: Path, result: Any) -> None:
    print(
        f"wrote {path} (int8, val top-1 {100 * result.int8_top1:.2f}% vs fp32 {100 * result.fp32_top1:.2f}%, "
        f"drop {result.drop_points:.2f} points)"
    )
    if result.speed is not None:
        print(f"int8 speed-up on this machine: {result.speed.summary()}")


# --- quantize --------------------------------------------------------------------------------------


def _default_target(path: Path) -> tuple[Path | None, str | None]:
    """``repo/name/N/model.onnx`` -> (repo, name); otherwise (None, None)."""
    parts = path.resolve().parts
    if len(parts) >= 4 and layout.parse_version(parts[-2]) is not None:
        return Path(*parts[:-3]), parts[-3]
    return None, None


def quantize_command(args: argparse.Namespace) -> None:
    path = resolve_model_file(args.model)
    meta = read_model_file(str(path))
    repo, name = _default_target(path)
    repository = args.repository or repo
    name = args.name or (name + "-int8" if name else None)
    if repository is None or name is None:
        raise ExportError(f"{path} is not inside a model repository: pass --repository and --name")
    check_target(repository, name, args.version, args.overwrite)
    _check_calibration_size(args.calibration_size)
    if meta.precision != "fp32":
        raise ExportError(f"{path} is already {meta.precision}; quantize an fp32 model")
    data = args.data
    if data is None:
        if meta.dataset != datamod.DIGITS_DATASET_NAME:
            raise ExportError("--data DIR is required (calibration and the accuracy gate use the dataset)")
        data = datamod.write_digits(Path("data/digits"))
    dataset = _load_dataset(data, args.val_split, meta)
    result = quantize(
        path.read_bytes(),
        meta,
        _calibration(dataset, meta, args.calibration_size),
        dataset.val_images,
        dataset.val_targets,
        max_drop=args.max_drop,
        force=args.force,
    )
    written = publish(repository, name, result.model_bytes, args.version, args.overwrite)
    _print_quantized(written, result)


# --- build-default ---------------------------------------------------------------------------------


def _present(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        read_model_file(str(path))
    except Exception as exc:
        raise ExportError(f"{path} exists but is not a readable svertka model ({exc}); remove it") from None
    return True


@contextlib.contextmanager
def _exclusive(repository: Path) -> Iterator[None]:
    """One build-default per repository at a time (``make model`` from two shells, CI retries).

    A second build waits, then finds the models present and does nothing. flock(2)
    is released by the kernel if the holder dies, so a killed build never wedges the next.
    """
    try:
        repository.mkdir(parents=True, exist_ok=True)
        handle = open(repository / ".build-default.lock", "a+")  # noqa: SIM115 - held for the build
    except OSError as exc:
        raise ExportError(f"{repository}: cannot use it as a model repository ({exc.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another build-default is writing {repository}; waiting for it", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def build_default(repository: Path, data: Path, runs: Path, progress: bool | None = None) -> None:
    """``models/digits/1`` (resnet20 fp32) and ``models/digits-int8/1``, each only if absent."""
    repository = Path(repository)
    fp32_path = model_path(repository, DEFAULT_NAME, 1)
    int8_path = model_path(repository, DEFAULT_INT8_NAME, 1)
    if _present(fp32_path) and _present(int8_path):
        print(f"default models present ({fp32_path}, {int8_path}): nothing to do")
        return
    with _exclusive(repository):
        _build_default(repository, data, runs, progress)


def _build_default(repository: Path, data: Path, runs: Path, progress: bool | None) -> None:
    started = time.perf_counter()
    fp32_path = model_path(repository, DEFAULT_NAME, 1)
    int8_path = model_path(repository, DEFAULT_INT8_NAME, 1)
    have_fp32, have_int8 = _present(fp32_path), _present(int8_path)
    if have_fp32 and have_int8:
        print(f"default models present ({fp32_path}, {int8_path}): nothing to do")
        return
    datamod.write_digits(data)
    if not have_fp32:
        from export import train

        cfg = train.TrainConfig(
            data=data,
            output=runs,
            dataset_name=datamod.DIGITS_DATASET_NAME,
            progress=progress,
            **DEFAULT_RECIPE,
        )
        result = train.main(cfg)
        model, meta, _ = _model_from_checkpoint(result.checkpoint)
        dataset = _load_dataset(data, None, meta)
        prepared = prepare_export(model, meta, _evaluation(dataset, meta))
        print(prepared.report.summary())
        _require_top1(prepared.meta, "fp32")
        publish(repository, DEFAULT_NAME, prepared.model_bytes, 1)
        _print_written(fp32_path, prepared.meta)
        fp32_bytes, meta = prepared.model_bytes, prepared.meta
    else:
        fp32_bytes = fp32_path.read_bytes()
        meta = read_model_file(str(fp32_path))
        print(f"{fp32_path} present")
    if not have_int8:
        dataset = _load_dataset(data, None, meta)
        result = quantize(
            fp32_bytes, meta, _calibration(dataset, meta, 200), dataset.val_images, dataset.val_targets
        )
        _require_top1(result.meta, "int8")
        publish(repository, DEFAULT_INT8_NAME, result.model_bytes, 1)
        _print_quantized(int8_path, result)
    print(f"default models built in {time.perf_counter() - started:.0f} s")


def _require_top1(meta: ModelMeta, what: str) -> None:
    if meta.val_top1 is None or meta.val_top1 < DEFAULT_MIN_TOP1:
        raise ExportError(
            f"the default {what} model reached val top-1 {100 * (meta.val_top1 or 0):.2f}% "
            f"< {100 * DEFAULT_MIN_TOP1:.1f}%; nothing written"
        )
