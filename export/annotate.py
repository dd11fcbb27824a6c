"""``svertka annotate``: svertka's metadata written into an ONNX classifier made elsewhere.

A plain file (a ``torch.onnx.export``, a timm or Model Zoo classifier) is served
through the tensor API as its graph says; images need its preprocessing, which
the file does not say. This writes it: the labels and the preprocessing come
from the user (flags, or a preset), the input and output from the graph, as
:func:`service.engine.signature.graph_metadata` derives them for the server.
Before anything is written the result must pass the server's own check
(:func:`~service.engine.signature.check_signature`), so the file written is a
fully known svertka model: ``Classify`` serves it.

Nothing is written on any refusal. The file is replaced atomically: a hidden
temporary file in the same directory, fsync'd, then ``os.replace``-d over the
target, so a reader (a server polling its repository) sees the old bytes or
the new ones, never a half-written file.

Importing this module imports neither onnx nor onnxruntime (about a second):
export/cli.py reads :data:`PRESETS` while it builds the parser of every
``svertka`` command, ``svertka serve`` included.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import stat
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.repository import _umask, replace_file, resolve_model_file
from service import __version__, modelmeta


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the server does to an image before the graph; ``None``: not given."""

    resize: int | None = None
    crop: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    color_order: str | None = None

    def over(self, base: Preprocessing) -> Preprocessing:
        """These values where given, ``base``'s elsewhere (flags over a preset)."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


#: ``--preset`` names. ``imagenet`` is torchvision's ImageNet evaluation transform, the one its
#: classification weights publish ("The images are resized to resize_size=[256] using
#: interpolation=InterpolationMode.BILINEAR, followed by a central crop of crop_size=[224]. Finally
#: the values are first rescaled to [0.0, 1.0] and then normalized using mean=[0.485, 0.456, 0.406]
#: and std=[0.229, 0.224, 0.225]": https://pytorch.org/vision/stable/models/generated/
#: torchvision.models.resnet18.html, ResNet18_Weights.IMAGENET1K_V1.transforms), on RGB images.
PRESETS: dict[str, Preprocessing] = {
    "imagenet": Preprocessing(
        resize=256,
        crop=(224, 224),
        mean=modelmeta.IMAGENET_MEAN,
        std=modelmeta.IMAGENET_STD,
        interpolation="bilinear",
        color_order="RGB",
    ),
}

#: What annotate adds to a plain file (the image API needs all of it; ``svertka inspect`` lists
#: them as missing), and what it takes from the graph (the server's reading, graph_metadata's).
SUPPLIED_FIELDS = ("labels", "resize", "interpolation", "mean", "std", "color_order")
GRAPH_FIELDS = (
    "input_name",
    "input_dtype",
    "layout",
    "crop",
    "output_name",
    "output",
    "num_classes",
    "precision",
)

#: A uint8 input takes the pixels 0-255 as decoded and normalises them in its graph: the server
#: never uses mean and std, which then only record that normalisation. Not given, they are written
#: as the identity on [0, 1].
_IDENTITY_MEAN, _IDENTITY_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Request:
    """One ``svertka annotate`` invocation."""

    model: Path
    labels: Path
    preprocessing: Preprocessing = Preprocessing()
    preset: str | None = None
    layout: str | None = None
    out: Path | None = None
    force: bool = False


def annotate(request: Request) -> tuple[Path, modelmeta.ModelMeta]:
    """Write the metadata ``request`` describes; the file written (as the request names it) and
    its metadata.

    Raises :class:`ExportError` (one line) on any refusal, having written nothing.
    """
    source = resolve_model_file(request.model)
    target = check_target(source, request.out, request.force)  # before any work
    labels = read_labels(request.labels)
    model = _load(source)
    kept = _existing(source, model, request.force)
    session, graph = _graph(source)
    meta = _metadata(request, source, graph, labels, kept)
    from service.engine.signature import ModelLoadError, check_signature

    try:  # the server's own check of a file's metadata against its graph
        check_signature(session, meta)
    except ModelLoadError as exc:
        raise ExportError(f"{source}: the server would refuse this metadata: {exc}") from None
    modelmeta.attach(model, meta)
    if target.parent.resolve() != source.resolve().parent:
        _embed_external_data(model, source)
    replace_file(target, _serialised(model, source), _mode_for(target))
    return (source if request.out is None else request.out), meta


def read_labels(path: Path) -> tuple[str, ...]:
    """One label per line, in the order of the model's output; surrounding whitespace is stripped
    and blank lines are skipped (a stray one is harmless: a missing label still shows as a count
    that differs from the output's width)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte order mark is no part of a label
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--labels {path}: cannot read the labels file ({exc})") from None
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(numbered) < 2:
        raise ExportError(f"--labels {path}: expected one label per line, at least 2, got {len(numbered)}")
    first: dict[str, int] = {}
    for n, label in numbered:
        if label in first:
            raise ExportError(
                f"--labels {path}: label {label!r} on line {n} is also on line {first[label]}; "
                "every class needs a label of its own"
            )
        first[label] = n
    return tuple(label for _, label in numbered)


def check_target(source: Path, out: Path | None, force: bool) -> Path:
    """The file to write (``out``, or ``source`` in place), refused up front when it cannot be written."""
    if out is None or (out.exists() and out.resolve() == source.resolve()):
        target = source.resolve()  # through a symlink: the file it names is what gets annotated
        if _read_only(target):
            raise ExportError(f"{source}: the file is read-only; pass --out FILE to write an annotated copy")
    else:
        target = Path(os.path.abspath(out))
        if target.is_dir():
            raise ExportError(f"--out {out}: is a directory; name the file to write")
        if target.exists():
            if not force:
                raise ExportError(f"--out {out}: already exists (pass --force to replace it)")
            if _read_only(target):
                raise ExportError(f"--out {out}: the file is read-only")
    where = source if out is None else f"--out {out}"
    if not target.parent.is_dir():
        raise ExportError(f"{where}: no such directory {target.parent}")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ExportError(
            f"{where}: the directory {target.parent} is not writable (the file is written next to "
            "the target, then renamed over it)"
        )
    return target


def _read_only(path: Path) -> bool:
    # Mode bits too: access(2) grants root everything, but a file nobody may write (chmod a-w) is
    # one its owner meant to keep as it is.
    return not os.access(path, os.W_OK) or not stat.S_IMODE(path.stat().st_mode) & 0o222


def _load(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ExportError(f"{path}: not a readable ONNX model ({exc})") from None
    # Protobuf parses many byte strings as a message with a few unknown fields; a model has a graph.
    if not model.HasField("graph") or not model.ir_version:
        raise ExportError(f"{path}: not an ONNX model (no graph)")
    return model


def _existing(path: Path, model: Any, force: bool) -> modelmeta.ModelMeta | None:
    """The metadata the file has already, if it parses; refused without ``force``."""
    props = {p.key: p.value for p in model.metadata_props}
    if not modelmeta.has_metadata(props):
        return None
    if not force:
        raise ExportError(
            f"{path}: already has svertka metadata ('svertka inspect' shows it); pass --force to replace it"
        )
    try:
        return modelmeta.from_props(props)
    except modelmeta.MetadataError:
        return None  # replacing unreadable metadata is what --force is for


def _embed_external_data(model: Any, source: Path) -> None:
    """Weights kept in data files next to ``source`` read into the model: a copy in another
    directory would not find those files. (torch 2.14's ``torch.onnx.export`` writes resnet18 so
    by default: 86 KB of graph, 45 MB of ``resnet18.onnx.data``.)"""
    from onnx import external_data_helper

    try:
        external_data_helper.load_external_data_for_model(model, str(source.resolve().parent))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{source}: cannot read its external data ({exc})") from None


def _serialised(model: Any, source: Path) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit, with external data read in
        raise ExportError(
            f"{source}: {exc}; annotate it in place (--out into its own directory), where its "
            "weights stay in their data files"
        ) from None


def _graph(path: Path) -> tuple[Any, modelmeta.ModelMeta]:
    """An onnxruntime session of ``path`` and what the server reads from its graph."""
    import onnxruntime as ort

    from service.engine.signature import ModelLoadError, graph_metadata

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only read, never run
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/NotImplemented...
        raise ExportError(f"{path}: onnxruntime cannot load it: {str(exc).strip().splitlines()[0]}") from None
    try:
        return session, graph_metadata(session, path)
    except ModelLoadError as exc:
        raise ExportError(f"{path}: svertka cannot serve this graph: {exc}") from None


def _metadata(
    request: Request,
    source: Path,
    graph: modelmeta.ModelMeta,
    labels: tuple[str, ...],
    kept: modelmeta.ModelMeta | None,
) -> modelmeta.ModelMeta:
    """The graph's facts with the labels and preprocessing, each checked against the graph."""
    base = PRESETS[request.preset] if request.preset else Preprocessing()
    pre = request.preprocessing.over(base)
    inp = f"the graph's input '{graph.input_name}' ({graph.input_datatype} {_shape(graph)})"
    if len(labels) != graph.num_classes:
        raise ExportError(
            f"--labels {request.labels}: {len(labels)} labels, but the graph's output "
            f"'{graph.output_name}' has {graph.num_classes} classes"
        )
    if request.layout is not None and request.layout != graph.layout:
        raise ExportError(f"--layout {request.layout}: {inp} is {graph.layout}")
    if pre.crop is not None and tuple(pre.crop) != graph.crop:
        given = "--crop" if request.preprocessing.crop else f"--preset {request.preset} crops"
        raise ExportError(
            f"{given} {_size(pre.crop)} does not fit {inp}: the crop is the input's size "
            f"({_size(graph.crop)}; pass --crop {_size(graph.crop, ',')} and a --resize for it)"
        )
    if pre.resize is None:
        raise ExportError("--resize N is needed (the shorter side before the centre crop), or a --preset")
    mean, std = pre.mean, pre.std
    if graph.input_dtype == "uint8":
        mean, std = mean or _IDENTITY_MEAN, std or _IDENTITY_STD
    elif mean is None or std is None:
        raise ExportError(
            f"--mean a,b,c and --std a,b,c are needed for {inp} (what the server normalises "
            "pixels scaled to [0, 1] with), or a --preset"
        )
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) != 3:
            raise ExportError(f"{flag}: expected 3 numbers (one per channel), got {len(values)}")
    return graph.replace(
        labels=labels,
        resize=pre.resize,
        mean=mean,
        std=std,
        interpolation=pre.interpolation or "bilinear",
        color_order=pre.color_order or "RGB",
        # With --force, what describes the graph itself stays (an int8 graph stays int8 for TensorRT).
        arch=kept.arch if kept else graph.arch,
        precision=kept.precision if kept else graph.precision,
        dataset="",
        val_top1=None,
        svertka_version=__version__,
        exported_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        preprocessing_known=True,
    )


def _shape(meta: modelmeta.ModelMeta) -> str:
    return "[" + ", ".join(["batch", *map(str, meta.input_shape)]) + "]"


def _size(crop: tuple[int, ...], sep: str = "x") -> str:
    return f"{crop[0]}{sep}{crop[1]}"


def _mode_for(target: Path) -> int:
    """An existing file keeps its permissions; a new one gets what ``open`` would give it."""
    if target.exists():
        return stat.S_IMODE(target.stat().st_mode)
    return 0o666 & ~_umask()


def summary(path: Path, meta: modelmeta.ModelMeta) -> str:
    """The line ``svertka annotate`` prints."""
    return (
        f"wrote {path}: {meta.num_classes} labels; resize {meta.resize} ({meta.interpolation}), "
        f"crop {_size(meta.crop)}, mean {list(meta.mean)}, std {list(meta.std)}, {meta.color_order}; "
        f"input '{meta.input_name}' {meta.input_datatype} {meta.layout}, output '{meta.output_name}' "
        f"({meta.output}): the image API serves it"
    )
