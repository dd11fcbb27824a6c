"""The metadata schema: the one contract between export/ and service/."""

import onnx
import pytest
from onnx import TensorProto, helper

from service import modelmeta
from service.modelmeta import MetadataError, ModelMeta


def _meta(**changes):
    base = dict(
        labels=[str(i) for i in range(10)],
        crop=(32, 32),
        resize=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        arch="resnet20",
        dataset="digits",
        val_top1=0.993,
    )
    base.update(changes)
    return ModelMeta(**base)


def _identity_model():
    node = helper.make_node("Identity", ["input"], ["logits"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
    )
    return helper.make_model(graph)


def test_round_trip_through_an_onnx_file(tmp_path):
    meta = _meta(precision="int8", exported_at="2026-11-29T10:00:00Z", svertka_version="0.1.0")
    model = _identity_model()
    model.metadata_props.add(key="producer_note", value="kept")
    modelmeta.attach(model, meta)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))

    assert modelmeta.read_model_file(str(path)) == meta
    reloaded = onnx.load(str(path))
    assert {p.key: p.value for p in reloaded.metadata_props}["producer_note"] == "kept"


def test_attach_twice_replaces_instead_of_duplicating():
    model = _identity_model()
    modelmeta.attach(model, _meta(val_top1=0.5))
    modelmeta.attach(model, _meta(val_top1=0.9))
    keys = [p.key for p in model.metadata_props]
    assert len(keys) == len(set(keys))
    assert modelmeta.from_props({p.key: p.value for p in model.metadata_props}).val_top1 == 0.9


def test_every_value_is_a_string_and_prefixed():
    props = _meta().to_props()
    assert all(isinstance(v, str) and k.startswith(modelmeta.PREFIX) for k, v in props.items())


def test_input_shape_and_classes():
    meta = _meta(crop=(24, 40), resize=48)
    assert meta.input_shape == (3, 24, 40)
    assert meta.num_classes == 10


def test_a_foreign_model_is_rejected_with_a_clear_message():
    with pytest.raises(MetadataError, match="no svertka metadata"):
        modelmeta.from_props({"author": "someone else"})


def test_missing_key_is_named():
    props = _meta().to_props()
    del props["svertka.labels"]
    with pytest.raises(MetadataError, match="svertka.labels"):
        modelmeta.from_props(props)


def test_future_schema_version_is_refused():
    props = _meta().to_props()
    props["svertka.schema_version"] = "99"
    with pytest.raises(MetadataError, match="schema version 99"):
        modelmeta.from_props(props)


def test_malformed_json_is_named():
    props = _meta().to_props()
    props["svertka.mean"] = "[0.5, 0.5"
    with pytest.raises(MetadataError, match="svertka.mean"):
        modelmeta.from_props(props)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(labels=["only"]), "at least 2"),
        (dict(labels=["a", "a"]), "unique"),
        (dict(crop=(0, 32)), "crop"),
        (dict(resize=16), "smaller than the crop"),
        (dict(std=(0.0, 1.0, 1.0)), "std"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(color_order="YUV"), "color_order"),
        (dict(precision="int4"), "precision"),
        (dict(val_top1=1.5), "val_top1"),
        (dict(arch=""), "arch"),
    ],
)
def test_invalid_values_are_refused(changes, message):
    with pytest.raises(MetadataError, match=message):
        _meta(**changes)


def test_unreadable_file_is_a_metadata_error(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00not an onnx file\xff" * 10)
    with pytest.raises(MetadataError, match="not a readable ONNX model"):
        modelmeta.read_model_file(str(path))


def test_a_float32_nchw_model_keeps_schema_version_1_and_its_keys():
    props = _meta().to_props()
    assert props["svertka.schema_version"] == "1" and "svertka.input_dtype" not in props
    meta = modelmeta.from_props(props)
    assert (meta.input_dtype, meta.layout, meta.input_datatype, meta.input_itemsize) == (
        "float32",
        "NCHW",
        "FP32",
        4,
    )
    assert not meta.normalized_in_graph


def test_a_pixel_input_model_is_schema_version_2():
    meta = _meta().replace(input_dtype="uint8", layout="NHWC")
    props = meta.to_props()
    assert props["svertka.schema_version"] == "2" and props["svertka.input_dtype"] == '"uint8"'
    back = modelmeta.from_props(props)
    assert back == meta and back.input_shape == (meta.crop[0], meta.crop[1], 3)
    assert (back.input_datatype, back.input_itemsize, back.normalized_in_graph) == ("UINT8", 1, True)


def test_version_1_cannot_declare_another_input_format():
    """A version 1 reader would feed such a model normalised floats: the writer says version 2."""
    props = _meta().replace(input_dtype="uint8", layout="NHWC").to_props()
    props["svertka.schema_version"] = "1"
    with pytest.raises(MetadataError, match="schema version 1 cannot describe a uint8 NHWC input"):
        modelmeta.from_props(props)


def test_unknown_input_dtypes_are_named():
    with pytest.raises(MetadataError, match="input_dtype: expected one of"):
        _meta().replace(input_dtype="int16")


def test_an_output_of_probabilities_is_written_and_read_back():
    meta = _meta().replace(output="probabilities")
    props = meta.to_props()
    assert props["svertka.output"] == '"probabilities"' and "svertka.output" not in _meta().to_props()
    assert modelmeta.from_props(props).output == "probabilities"
    with pytest.raises(MetadataError, match="output: expected one of"):
        _meta().replace(output="scores")
