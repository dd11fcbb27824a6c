"""What a model file declares and whether its graph agrees: svertka's metadata, or for a file
without any, what the graph itself says (``graph_metadata``); and the signature check every
loaded session passes (``check_signature``)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from service import modelmeta


class ModelLoadError(Exception):
    """The model file cannot be served; the message is the model's unavailability reason."""


class CudaGraphSettingError(ModelLoadError):
    """``cuda_graphs: true`` where it cannot apply (no CUDA provider, no padded sizes): the setting is wrong."""


def read_metadata(session: ort.InferenceSession, path: str | Path | None = None) -> modelmeta.ModelMeta:
    """The file's svertka metadata; for a file without any, what its graph says (tensors only).

    Either way ``fixed_batch`` is what the graph says: its first input's batch dimension is 1.
    """
    props = session.get_modelmeta().custom_metadata_map
    if not modelmeta.has_metadata(props):
        return graph_metadata(session, path)
    try:
        meta = modelmeta.from_props(props)
    except modelmeta.MetadataError as exc:
        raise ModelLoadError(f"bad svertka metadata: {exc}") from None
    return meta.replace(
        fixed_batch=_batch_of_one(session), extra_outputs=_extra_outputs(session, meta.output_name)
    )


def _batch_of_one(session: ort.InferenceSession) -> bool:
    inputs = session.get_inputs()
    return bool(inputs) and len(inputs[0].shape) > 0 and inputs[0].shape[0] == 1


#: What a model without svertka metadata must be, said in every refusal.
SUPPORTED_GRAPHS = (
    "svertka serves classifiers with one image input ([N,3,H,W] or [N,H,W,3], FP32, FP16 or UINT8, "
    "H and W fixed, N dynamic or 1) and an [N, classes] FP32 output (the first such; other outputs "
    "[N, ...] of fixed sizes are served beside it)"
)

#: The numpy dtype of each onnxruntime output type an extra output may have.
_OUTPUT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}  # fmt: skip


def _extra_outputs(
    session: ort.InferenceSession, classifier: str
) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """Every output but the classifier's, as (name, numpy dtype, dims after the batch); or why not."""
    extras = []
    for out in session.get_outputs():
        if out.name == classifier:
            continue
        dtype, shape = _OUTPUT_TYPES.get(out.type), list(out.shape)
        if dtype is None:
            raise ModelLoadError(
                f"output '{out.name}' is {out.type}; besides the classifier's, svertka serves outputs of "
                f"types {sorted(modelmeta.OUTPUT_DATATYPES.values())}"
            )
        if not shape or any(_is_dynamic(d) or d < 1 for d in shape[1:]):
            raise ModelLoadError(
                f"output '{out.name}' has shape {shape}; besides the classifier's, svertka serves outputs "
                "[N, ...] whose sizes after the batch are fixed in the graph"
            )
        extras.append((out.name, dtype, tuple(int(d) for d in shape[1:])))
    return tuple(extras)


def graph_metadata(session: ort.InferenceSession, path: str | Path | None = None) -> modelmeta.ModelMeta:
    """A ModelMeta from the graph of a file without svertka metadata, or ModelLoadError saying why
    svertka cannot serve it. With the file's ``path``, an output made by a Softmax node is known to
    hold probabilities."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelLoadError(
            f"the graph has {len(inputs)} inputs {[i.name for i in inputs][:8]}; {SUPPORTED_GRAPHS}"
        )
    (inp,) = inputs
    dtype = {v: k for k, v in _ORT_TYPES.items()}.get(inp.type)
    shape = list(inp.shape)
    if dtype is None or len(shape) != 4:
        raise ModelLoadError(f"input '{inp.name}' is {inp.type} {shape}; {SUPPORTED_GRAPHS}")
    if shape[1] == 3 and shape[3] != 3:
        layout, spatial = "NCHW", shape[2:4]
    elif shape[3] == 3:
        layout, spatial = "NHWC", shape[1:3]
    else:
        raise ModelLoadError(
            f"input '{inp.name}' has shape {shape}: no axis of 3 colour channels after the batch "
            f"(axis 1 or 3); {SUPPORTED_GRAPHS}"
        )
    if any(_is_dynamic(d) or d < 1 for d in spatial):
        raise ModelLoadError(
            f"input '{inp.name}' has shape {shape}: its height and width are not fixed in the graph; "
            f"{SUPPORTED_GRAPHS}"
        )
    out = next((o for o in outputs if o.type == "tensor(float)" and _classes(o.shape) >= 2), None)
    if out is None:
        shown = [f"{o.name} {o.type} {list(o.shape)}" for o in outputs[:8]]
        raise ModelLoadError(
            f"the graph's outputs are {shown}: none is [N, classes] FP32; {SUPPORTED_GRAPHS}"
        )
    size = (int(spatial[0]), int(spatial[1]))
    kind = "probabilities" if path is not None and _made_by_softmax(path, out.name) else "logits"
    meta = modelmeta.from_graph(inp.name, dtype, layout, size, out.name, _classes(out.shape), kind)
    return meta.replace(fixed_batch=_batch_of_one(session), extra_outputs=_extra_outputs(session, out.name))


def _classes(shape: list) -> int:
    """The class count of an [N, classes] output shape; 0 for any other shape."""
    return int(shape[1]) if len(shape) == 2 and not _is_dynamic(shape[1]) else 0


def _made_by_softmax(path: str | Path, output: str) -> bool:
    """Whether the graph's node that writes ``output`` is a Softmax."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type == "Softmax" and output in node.output for node in graph.node)


def _is_dynamic(dim: object) -> bool:
    return not isinstance(dim, int) or dim < 0


#: onnxruntime's name of each input dtype the metadata can declare.
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "uint8": "tensor(uint8)"}


def check_signature(session: ort.InferenceSession, meta: modelmeta.ModelMeta) -> None:
    """The graph's input and output must be what the metadata says, with a dynamic batch dim."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(
            f"the graph has {len(inputs)} inputs {[i.name for i in inputs]}; svertka serves "
            f"single-input classifiers with input '{meta.input_name}'"
        )
    inp = inputs[0]
    if inp.name != meta.input_name:
        raise ModelLoadError(
            f"the graph's input is named '{inp.name}' but the metadata says '{meta.input_name}'"
        )
    want_type = _ORT_TYPES[meta.input_dtype]
    if inp.type != want_type:
        raise ModelLoadError(
            f"input '{inp.name}' has type {inp.type}; the metadata says {want_type} ({meta.input_datatype})"
        )
    shape = list(inp.shape)
    expected = list(meta.input_shape)
    if len(shape) != 4:
        raise ModelLoadError(
            f"input '{inp.name}' has shape {shape}; expected [batch, {', '.join(map(str, expected))}]"
        )
    if not _is_dynamic(shape[0]) and not (shape[0] == 1 and meta.fixed_batch):
        raise ModelLoadError(
            f"input '{inp.name}' has a fixed batch dimension of {shape[0]}; svertka serves a batch dimension "
            "that is dynamic (batched) or 1 (each request alone): re-export it with a dynamic batch dimension"
        )
    for axis, (got, want) in enumerate(zip(shape[1:], expected, strict=True), start=1):
        if not _is_dynamic(got) and got != want:
            raise ModelLoadError(
                f"input '{inp.name}' has shape {shape}; the metadata implies [batch, "
                f"{', '.join(map(str, expected))}] (axis {axis} differs)"
            )
    outputs = {o.name: o for o in session.get_outputs()}
    out = outputs.get(meta.output_name)
    if out is None:
        raise ModelLoadError(
            f"the graph has no output '{meta.output_name}' (the metadata's output name); it has {sorted(outputs)}"
        )
    if out.type != "tensor(float)":
        raise ModelLoadError(f"output '{out.name}' has type {out.type}; expected tensor(float) (FP32) logits")
    oshape = list(out.shape)
    if len(oshape) != 2:
        raise ModelLoadError(f"output '{out.name}' has shape {oshape}; expected [batch, {meta.num_classes}]")
    if not _is_dynamic(oshape[1]) and oshape[1] != meta.num_classes:
        raise ModelLoadError(
            f"output '{out.name}' has {oshape[1]} classes but the metadata lists {meta.num_classes} labels"
        )
