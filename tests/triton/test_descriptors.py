"""Wire compatibility of proto/inference with Triton's own protocol definitions.

Standard clients (tritonclient, perf_analyzer, KServe) serialize with Triton's
descriptors; ours must agree on every field name, number, type, label and
oneof, or a client silently reads garbage. Our descriptors are built straight
from proto/ by protoc into a private pool, because importing service.gen's
``inference`` package next to tritonclient's clashes in the default pool.
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from service import protogen

pytestmark = pytest.mark.triton

#: Fields of Triton's messages that proto/inference/model_config.proto leaves out on purpose
#: (features svertka does not have). Anything missing that is not listed here fails the test.
OMITTED_FIELDS = {
    "inference.ModelInstanceGroup": {"rate_limiter", "secondary_devices"},
    "inference.ModelOptimizationPolicy": {"cuda", "execution_accelerators"},
    "inference.ModelSequenceBatching": {"direct", "oldest", "control_input", "state"},
    "inference.ModelEnsembling": {"step"},
    "inference.ModelConfig": {
        "batch_input",
        "batch_output",
        "model_warmup",
        "model_operations",
        "model_repository_agents",
    },
}


@pytest.fixture(scope="module")
def ours() -> descriptor_pool.DescriptorPool:
    fds = descriptor_pb2.FileDescriptorSet.FromString(protogen.descriptor_set())
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    return pool


def _theirs(full_name: str):
    return triton_service.DESCRIPTOR.pool.FindMessageTypeByName(full_name)


def _all_messages(container):
    for message in container.message_types_by_name.values():
        yield from _walk(message)


def _walk(message):
    yield message
    for nested in message.nested_types:
        yield from _walk(nested)


def _all_enums(file_descriptor):
    yield from file_descriptor.enum_types_by_name.values()
    for message in _all_messages(file_descriptor):
        yield from message.enum_types


def _field_signature(field) -> tuple:
    type_name = None
    if field.message_type is not None:
        type_name = field.message_type.full_name
    elif field.enum_type is not None:
        type_name = field.enum_type.full_name
    oneof = field.containing_oneof.name if field.containing_oneof is not None else None
    # proto3 `optional` is a synthetic oneof; Triton uses none, so treat them alike.
    if field.containing_oneof is not None and field.has_presence and oneof.startswith("_"):
        oneof = None
    return (field.name, field.type, field.is_repeated, type_name, oneof)


def _our_file(pool, name):
    return pool.FindFileByName(name)


@pytest.mark.parametrize("file_name", ["inference/model_config.proto", "inference/grpc_service.proto"])
def test_every_message_matches_tritons(ours, file_name):
    problems = []
    checked = 0
    for message in _all_messages(_our_file(ours, file_name)):
        try:
            theirs = _theirs(message.full_name)
        except KeyError:
            problems.append(f"{message.full_name}: Triton has no such message")
            continue
        their_fields = {f.number: f for f in theirs.fields}
        for field in message.fields:
            checked += 1
            other = their_fields.get(field.number)
            if other is None:
                problems.append(
                    f"{message.full_name}.{field.name} = {field.number}: Triton has no field with that number"
                )
            elif _field_signature(field) != _field_signature(other):
                problems.append(
                    f"{message.full_name} field {field.number}: ours {_field_signature(field)} "
                    f"!= Triton's {_field_signature(other)}"
                )
        ours_numbers = {f.number for f in message.fields}
        missing = {f.name for f in theirs.fields if f.number not in ours_numbers}
        unexpected = missing - OMITTED_FIELDS.get(message.full_name, set())
        if unexpected:
            problems.append(f"{message.full_name}: missing Triton fields {sorted(unexpected)}")
    assert not problems, "\n".join(problems)
    assert checked > 20  # the walk really visited the fields


def test_every_grpc_service_message_of_triton_exists_in_ours(ours):
    """grpc_service.proto is complete: each of Triton's messages has a namesake in ours."""
    missing = []
    for message in _all_messages(triton_service.DESCRIPTOR):
        try:
            ours.FindMessageTypeByName(message.full_name)
        except KeyError:
            missing.append(message.full_name)
    assert not missing


def test_enums_match(ours):
    problems = []
    for file_name in ("inference/model_config.proto", "inference/grpc_service.proto"):
        for enum in _all_enums(_our_file(ours, file_name)):
            theirs = triton_config.DESCRIPTOR.pool.FindEnumTypeByName(enum.full_name)
            our_values = {v.name: v.number for v in enum.values}
            their_values = {v.name: v.number for v in theirs.values}
            if our_values != their_values:
                problems.append(f"{enum.full_name}: ours {our_values} != Triton's {their_values}")
    assert not problems, "\n".join(problems)


def test_service_methods_match(ours):
    service = ours.FindServiceByName("inference.GRPCInferenceService")
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]

    def methods(svc):
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
            for m in svc.methods
        }

    assert methods(service) == methods(theirs)


def test_a_request_serialized_by_tritonclient_parses_identically_with_ours(ours):
    """Round trip through the wire format, not just the schemas."""
    from google.protobuf import json_format, message_factory

    request = triton_service.ModelInferRequest(model_name="digits", model_version="1", id="42")
    request.parameters["priority"].uint64_param = 3
    request.parameters["timeout"].int64_param = 1000
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 2, 2])
    tensor.parameters["binary_data_size"].int64_param = 48
    request.outputs.add(name="logits").parameters["classification"].int64_param = 3
    request.raw_input_contents.append(bytes(range(48)))

    our_class = message_factory.GetMessageClass(ours.FindMessageTypeByName("inference.ModelInferRequest"))
    parsed = our_class.FromString(request.SerializeToString())
    assert json_format.MessageToDict(parsed) == json_format.MessageToDict(request)
    assert parsed.SerializeToString(deterministic=True) == request.SerializeToString(deterministic=True)
