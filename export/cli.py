"""``svertka train | export | quantize | annotate | inspect | build-default``.

This module is imported by every ``svertka`` invocation, including ``svertka
serve`` on installs without torch: it must not import torch, torchvision or
onnxruntime at import time. Handlers import what they need; a missing torch
becomes a one-line error saying which extra to install.

User-fixable failures (bad paths, names, files, a failed verification or
accuracy gate) become :class:`service.clierrors.CommandError`: one line, exit
status 2, no traceback, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from service.clierrors import CommandError

TRAIN_EXTRA_HINT = "install the training extra: pip install 'svertka[train]' (or make setup)"
ARCH_CHOICES = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110") + (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)


def register(subparsers: Any) -> None:
    """Add the export-stage subcommands to the ``svertka`` parser."""
    _add_train(subparsers)
    _add_export(subparsers)
    _add_quantize(subparsers)
    _add_annotate(subparsers)
    _add_inspect(subparsers)
    _add_build_default(subparsers)


# --- argument parsing -----------------------------------------------------------------------------


def _arch(value: str) -> str:
    if value not in ARCH_CHOICES:
        raise argparse.ArgumentTypeError(
            f"unknown architecture {value!r} (choose from {', '.join(ARCH_CHOICES)})"
        )
    return value


def _floats(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,0.5,0.5, got {value!r}") from None


def _crop(value: str) -> tuple[int, int]:
    parts = value.replace(",", " ").replace("x", " ").split()
    try:
        sizes = tuple(int(v) for v in parts)
    except ValueError:
        sizes = ()
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive integers), got {value!r}")
    return (sizes[0], sizes[-1])


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected >= 1, got {n}")
    return n


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a ResNet on an ImageFolder (or the bundled digits)",
        description="Train a ResNet (BatchNorm everywhere) on an ImageFolder directory; "
        "writes OUTPUT/last.pt after every epoch.",
    )
    p.add_argument("--data", type=Path, help="ImageFolder root (with train/ and val/, or use --val-split)")
    p.add_argument(
        "--digits",
        action="store_true",
        help="use the bundled scikit-learn digits, written as PNGs to --data (default data/digits)",
    )
    p.add_argument("--arch", type=_arch, default="resnet20", help="architecture (default resnet20)")
    p.add_argument("--output", type=Path, default=Path("runs/train"), help="checkpoint directory")
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs (default 15)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument(
        "--image-size", type=_positive_int, help="crop size (default 32 for resnet20-110, 224 otherwise)"
    )
    p.add_argument("--resize", type=_positive_int, help="shorter side before the centre crop")
    p.add_argument("--val-split", type=float, help="hold out this fraction when DATA has no train/ and val/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads (default: the cores available); weights are bit-identical only at the same count",
    )
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--weights", type=Path, help="fine-tune from a local torchvision-format state dict")
    p.add_argument("--no-hflip", dest="hflip", action="store_false", help="no horizontal flips (e.g. digits)")
    p.add_argument(
        "--augment",
        choices=("standard", "affine"),
        default="standard",
        help="standard: padded random crops (small images) or random-resized crops; "
        "affine: small rotations, shifts and scaling (digits, glyphs)",
    )
    p.add_argument("--mean", type=_floats, help="normalisation mean (default: computed on the train split)")
    p.add_argument("--std", type=_floats, help="normalisation std (default: computed on the train split)")
    p.add_argument("--keep-all", action="store_true", help="also keep epoch-NNN.pt for every epoch")
    p.add_argument("--resume", type=Path, help="continue from a checkpoint (its settings are reused)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    _add_common(p)
    p.set_defaults(handler=_guarded(_train))


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model to ONNX in a model repository",
        description="Export to REPOSITORY/NAME/VERSION/model.onnx with parity and batch-invariance checks.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a 'svertka train' checkpoint (last.pt)")
    src.add_argument("--weights", help="a torchvision-format state dict file, or 'random' (benchmarks)")
    p.add_argument("--arch", type=_arch, help="architecture (with --weights)")
    p.add_argument("--labels", type=Path, help="class labels file, one per line (with --weights)")
    p.add_argument("--num-classes", type=_positive_int, help="with --weights random and no --labels")
    p.add_argument("--image-size", type=_positive_int, help="crop size (with --weights)")
    p.add_argument("--resize", type=_positive_int, help="shorter side before the crop (with --weights)")
    p.add_argument("--mean", type=_floats, help="normalisation mean (with --weights; default ImageNet)")
    p.add_argument("--std", type=_floats, help="normalisation std (with --weights; default ImageNet)")
    p.add_argument("--dataset", default="", help="dataset name recorded in the metadata (with --weights)")
    p.add_argument(
        "--data", type=Path, help="ImageFolder for parity and val top-1 (default: the checkpoint's)"
    )
    p.add_argument("--val-split", type=float, help="as in 'svertka train'")
    p.add_argument("--repository", type=Path, required=True, help="model repository root")
    p.add_argument("--name", required=True, help="model name (directory under the repository)")
    p.add_argument("--version", type=_positive_int, help="version (default: the next free one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument("--int8", action="store_true", help="also write a quantized NAME-int8 model")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also write NAME-fp16: fp16 weights and activations for GPUs, float32 input and output",
    )
    p.add_argument(
        "--input",
        choices=("float32-nchw", "uint8-nhwc"),
        default="float32-nchw",
        help="the models' input: normalised float32 [N,3,H,W] (default), or the pixels as uint8 "
        "[N,H,W,3] with the normalisation inside the graph (a quarter of the bytes per request)",
    )
    _add_quant_options(p)
    _add_common(p)
    p.set_defaults(handler=_guarded(_export))


def _add_quant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration-size", type=_positive_int, default=200, help="training images (>= 100)")
    p.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        help="allowed int8 (or fp16) top-1 drop in points (default 1.0)",
    )
    p.add_argument(
        "--force", action="store_true", help="write the int8 (or fp16) model even if it fails the gate"
    )


def _add_quantize(sub: Any) -> None:
    p = sub.add_parser(
        "quantize",
        help="static int8 quantization of an exported model, with an accuracy gate",
        description="Quantize MODEL (QDQ, per-channel) calibrated on training images; refuses to write "
        "it when val top-1 drops more than --max-drop points.",
    )
    p.add_argument("model", type=Path, help="fp32 model.onnx (or its model/version directory)")
    p.add_argument(
        "--data", type=Path, help="ImageFolder for calibration and accuracy (default: from metadata)"
    )
    p.add_argument("--val-split", type=float, help="as in 'svertka train'")
    p.add_argument("--repository", type=Path, help="model repository (default: MODEL's)")
    p.add_argument("--name", help="model name (default: MODEL's name + '-int8')")
    p.add_argument("--version", type=_positive_int, help="version (default: the next free one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    _add_quant_options(p)
    _add_common(p)
    p.set_defaults(handler=_guarded(_quantize))


def _add_annotate(sub: Any) -> None:
    from export.annotate import PRESETS
    from service.modelmeta import COLOR_ORDERS, INTERPOLATIONS, LAYOUTS

    p = sub.add_parser(
        "annotate",
        help="write labels and preprocessing into an ONNX classifier made elsewhere (for the image API)",
        description="Write svertka's metadata into MODEL (atomically, in place or into --out): the labels "
        "and preprocessing given here, the input and output as its graph declares them, each checked "
        "against the graph. Then Classify serves it.",
    )
    p.add_argument("model", type=Path, help="an ONNX file (or a model/version directory: its newest version)")
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="class labels, one per line in the output's order (blank lines are skipped)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="imagenet: torchvision's ImageNet evaluation transform (resize 256, crop 224, bilinear, "
        "ImageNet mean and std, RGB); the flags below override its values",
    )
    p.add_argument("--resize", type=_positive_int, help="shorter side before the centre crop")
    p.add_argument("--crop", type=_crop, help="H or H,W: must be the input's size (default: the graph's)")
    p.add_argument("--mean", type=_floats, help="a,b,c on pixels scaled to [0, 1] (needed for float inputs)")
    p.add_argument("--std", type=_floats, help="a,b,c (needed for float inputs)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize filter (default bilinear)")
    p.add_argument("--color-order", choices=COLOR_ORDERS, help="channel order the model takes (default RGB)")
    p.add_argument(
        "--layout", choices=LAYOUTS, help="checked against the graph's input (default: the graph's)"
    )
    p.add_argument("--out", type=Path, help="write an annotated copy here; MODEL is left as it is")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace svertka metadata MODEL already has, or an existing --out",
    )
    _add_common(p)
    p.set_defaults(handler=_guarded(_annotate))


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="print a model file's svertka metadata")
    p.add_argument("model", type=Path, help="model.onnx, or a model/version directory (newest version)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_guarded(_inspect))


def _add_build_default(sub: Any) -> None:
    p = sub.add_parser(
        "build-default",
        help="build the bundled default models (digits fp32 + int8) if absent",
        description="Train resnet20 on the bundled digits and write REPOSITORY/digits/1 and "
        "REPOSITORY/digits-int8/1; does nothing when both are present.",
    )
    p.add_argument("--repository", type=Path, default=Path("models"))
    p.add_argument("--data", type=Path, default=Path("data/digits"), help="where the digits PNGs are cached")
    p.add_argument("--runs", type=Path, default=Path("runs/digits"), help="checkpoint directory")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    _add_common(p)
    p.set_defaults(handler=_guarded(_build_default))


# --- handlers -------------------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (in-process callers and tests swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("onnxscript", "onnx_ir", "torch", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Map the errors a user can fix to CommandError (one line, exit 2)."""
    try:
        yield
    except CommandError:
        raise
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing.split(".")[0] in ("torch", "torchvision", "sklearn", "tqdm", "onnxscript"):
            raise CommandError(f"this command needs {missing.split('.')[0]}: {TRAIN_EXTRA_HINT}") from None
        if missing.split(".")[0] == "onnxruntime":
            raise CommandError("this command needs onnxruntime: pip install 'svertka[cpu]'") from None
        raise
    except Exception as exc:
        from export.errors import ExportError
        from service.modelmeta import MetadataError

        if isinstance(exc, ExportError | MetadataError):
            raise CommandError(_one_line(str(exc))) from None
        raise


def _quiet_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spin (must happen before torch is imported).

    On a shared machine spinning threads fight over the cores: 10 resnet20 training
    steps (batch 32) took 49.4 s of wall time with the default policy and 4.5 s with
    PASSIVE at a load average of ~8 on 2 cores (bench/research/omp_wait_policy.py, docs/training.md).
    A user's own OMP_WAIT_POLICY wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        _quiet_openmp()
        _setup_logging(getattr(args, "verbose", False))
        with _user_errors():
            return handler(args)

    return run


def _train(args: argparse.Namespace) -> int:
    from export import data as datamod

    if args.resume is not None:
        from export import train

        cfg = train.resume_config(args.resume, args.epochs, args.progress)
        train.main(cfg, resume=args.resume)
        return 0
    data = args.data
    dataset_name = ""
    if args.digits:
        data = datamod.write_digits(data or Path("data/digits"))
        dataset_name = datamod.DIGITS_DATASET_NAME
    if data is None:
        raise CommandError("--data DIR is required (or --digits for the bundled dataset)")
    if not data.is_dir():  # before importing torch: a typo should not cost seconds
        raise CommandError(f"{data}: no such dataset directory")
    from export import train

    cfg = train.TrainConfig(
        data=data,
        arch=args.arch,
        output=args.output,
        epochs=args.epochs or 15,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        image_size=args.image_size,
        resize=args.resize,
        val_split=args.val_split,
        seed=args.seed,
        workers=args.workers,
        threads=args.threads,
        strict=args.strict,
        weights=args.weights,
        hflip=args.hflip,
        augment=args.augment,
        mean=args.mean,
        std=args.std,
        dataset_name=dataset_name,
        keep_all=args.keep_all,
        progress=args.progress,
    )
    if cfg.weights is not None:
        train.load_state_dict_file(cfg.weights, cfg.arch)  # fail before scanning a large dataset
    train.main(cfg)
    return 0


def _export(args: argparse.Namespace) -> int:
    from export import pipeline

    pipeline.export_command(args)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from export import pipeline

    pipeline.quantize_command(args)
    return 0


def _annotate(args: argparse.Namespace) -> int:
    from export import annotate

    pre = annotate.Preprocessing(
        resize=args.resize,
        crop=args.crop,
        mean=args.mean,
        std=args.std,
        interpolation=args.interpolation,
        color_order=args.color_order,
    )
    request = annotate.Request(
        model=args.model,
        labels=args.labels,
        preprocessing=pre,
        preset=args.preset,
        layout=args.layout,
        out=args.out,
        force=args.force,
    )
    path, meta = annotate.annotate(request)
    print(annotate.summary(path, meta))
    return 0


def _graph_meta(path: Path, missing: Exception):
    """What the server serves of a file without svertka metadata (its graph), or ``missing``'s
    error extended with the reason the server would give."""
    import onnxruntime as ort

    from service.engine import runtime
    from service.modelmeta import MetadataError

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return runtime.graph_metadata(session, path)
    except runtime.ModelLoadError as exc:
        raise MetadataError(f"{missing}; and the server cannot serve its graph as it is: {exc}") from None


def _inspect(args: argparse.Namespace) -> int:
    from export.repository import resolve_model_file
    from service.modelmeta import MetadataError, read_model_file

    path = resolve_model_file(args.model)
    try:
        meta = read_model_file(str(path))
    except MetadataError as exc:
        if "has no svertka metadata" not in str(exc):
            raise
        meta = _graph_meta(path, exc)
    info = {"path": str(path), **meta.describe()}
    if not meta.preprocessing_known:
        from export.annotate import GRAPH_FIELDS, SUPPLIED_FIELDS

        # What the graph says, then what it does not: the fields annotate supplies would show
        # as placeholders (labels "0", "1", ..., mean 0, std 1) that the server never uses.
        info = {"path": str(path), **{k: info[k] for k in GRAPH_FIELDS}, "preprocessing_known": False}
        info["missing"] = list(SUPPLIED_FIELDS)
        info["image_api"] = (
            "no: no svertka metadata, so the preprocessing is unknown (tensors only); "
            f"'svertka annotate {path} --labels FILE --preset imagenet' (or --resize, --mean, --std) adds it"
        )
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value)
        elif key == "val_top1" and value is not None:
            value = f"{100 * value:.2f}%"
        lines.append(f"{key:<{width}}  {value}")
    try:
        print("\n".join(lines))
        sys.stdout.flush()
    except BrokenPipeError:  # `svertka inspect MODEL | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _build_default(args: argparse.Namespace) -> int:
    from export import pipeline

    pipeline.build_default(args.repository, args.data, args.runs, args.progress)
    return 0
