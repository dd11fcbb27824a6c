"""System shared memory (Triton's extension): regions registered over gRPC, tensors passed by name.

Real POSIX shared memory objects (files in /dev/shm, what shm_open creates on
Linux), a real server on a loopback port started with --allow-shared-memory.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from service import errors, shm
from service.gen.inference import grpc_service_pb2 as pb
from service.gen.inference import grpc_service_pb2_grpc as pb_grpc
from tests.api.conftest import InProcessServer

C = grpc.StatusCode
ROW_BYTES = 3 * 32 * 32 * 4  # one input row of the tiny model
OUT_BYTES = 10 * 4  # one row of logits


class ShmObject:
    """A POSIX shared memory object of ``size`` bytes (``shm_open(key)`` on Linux)."""

    def __init__(self, size: int) -> None:
        self.key = f"/svertka-test-{uuid.uuid4().hex[:12]}"
        self.path = Path(shm.SHM_DIR) / self.key[1:]
        with open(self.path, "wb") as f:
            f.truncate(size)

    def write(self, offset: int, data: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read(self, offset: int, size: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture()
def objects():
    made: list[ShmObject] = []

    def make(size: int) -> ShmObject:
        made.append(ShmObject(size))
        return made[-1]

    yield make
    for obj in made:
        obj.remove()


@pytest.fixture(scope="module", params=["one-process", "engine-process"])
def shm_server(request, tiny_repository):
    """With ``engine-process`` the registrations live in the engine process (as with
    ``svertka serve --frontends N``) and this server is one frontend of it."""
    srv = InProcessServer(
        tiny_repository, allow_shared_memory=True, engine_process=request.param == "engine-process"
    )
    yield srv
    srv.close()


@pytest.fixture()
def stub(shm_server):
    with shm_server.channel() as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        yield stub
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())


def _error(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


def _register(stub, name, key, byte_size, offset=0):
    return stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size),
        timeout=10,
    )


def _shm_params(parameters, region, byte_size, offset=None):
    parameters[shm.REGION_PARAM].string_param = region
    parameters[shm.BYTE_SIZE_PARAM].int64_param = byte_size
    if offset is not None:
        parameters[shm.OFFSET_PARAM].int64_param = offset


def _request(
    rows, *, region="in", offset=None, byte_size=None, out_region=None, out_size=None, out_offset=None
):
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[rows, 3, 32, 32])
    if region is not None:
        _shm_params(tensor.parameters, region, rows * ROW_BYTES if byte_size is None else byte_size, offset)
    if out_region is not None:
        out = request.outputs.add(name="logits")
        _shm_params(
            out.parameters, out_region, rows * OUT_BYTES if out_size is None else out_size, out_offset
        )
    return request


def _inline_logits(stub, x: np.ndarray) -> np.ndarray:
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    response = stub.ModelInfer(request, timeout=30)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))


def test_register_status_unregister(stub, objects):
    a, b = objects(4096), objects(8192)
    _register(stub, "a", a.key, 1024, offset=512)
    _register(stub, "b", b.key, 8192)
    status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert {n: (r.name, r.key, r.offset, r.byte_size) for n, r in status.regions.items()} == {
        "a": ("a", a.key, 512, 1024),
        "b": ("b", b.key, 0, 8192),
    }
    one = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="b"))
    assert list(one.regions) == ["b"]
    # a name is unique while registered
    code, details = _error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
        name="a", key=b.key, byte_size=16))  # fmt: skip
    assert code == C.ALREADY_EXISTS and "'a' is already registered" in details
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="a"))
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="a"))  # idempotent
    code, details = _error(stub.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="a"))
    assert code == C.NOT_FOUND and "'a' is not registered" in details
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())  # every region
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


@pytest.mark.parametrize(
    ("key", "offset", "byte_size", "expected"),
    [
        ("/svertka-test-missing-object", 0, 16, "no shared memory object"),
        ("/../etc/passwd", 0, 16, "is not a shared memory object name"),
        ("a/b", 0, 16, "is not a shared memory object name"),
        ("/..", 0, 16, "is not a shared memory object name"),
        ("", 0, 16, "is not a shared memory object name"),
        (None, 0, 0, "byte_size must be >= 1"),
        (None, 4000, 200, "is beyond the end"),
    ],
)
def test_bad_registrations_say_what_was_expected(stub, objects, key, offset, byte_size, expected):
    obj = objects(4096)
    code, details = _error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
        name="r", key=obj.key if key is None else key, offset=offset, byte_size=byte_size))  # fmt: skip
    assert code == C.INVALID_ARGUMENT
    assert expected in details
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


def test_a_symlink_in_dev_shm_is_not_followed(stub, objects, tmp_path):
    """Outputs are written into regions: a link to another file must not make that file writable."""
    target = tmp_path / "victim"
    target.write_bytes(b"x" * 4096)
    link = Path(shm.SHM_DIR) / f"svertka-test-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(target)
    try:
        code, details = _error(stub.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
            name="r", key="/" + link.name, byte_size=16))  # fmt: skip
    finally:
        link.unlink()
    assert code == C.INVALID_ARGUMENT and "cannot open" in details


def test_a_leased_object_is_refused_at_once_not_waited_for(stub, objects):
    """A client's file lease on its object would hold the server's open for the lease-break time
    (45 s by default), with the event loop in it: the open does not wait."""
    import fcntl
    import signal

    obj = objects(4096)
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease break signals the holder
    fd = os.open(obj.path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        code, message = _error(
            stub.SystemSharedMemoryRegister,
            pb.SystemSharedMemoryRegisterRequest(name="leased", key=obj.key, byte_size=4096),
        )
        assert code == C.INVALID_ARGUMENT and "leased or locked" in message, (code, message)
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, previous)
    _register(stub, "leased", obj.key, 4096)  # released: it registers


def test_inference_through_shared_memory_matches_inline_inference(stub, objects):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    inputs, outputs = objects(256 + x.nbytes), objects(4096)
    inputs.write(256, x.tobytes())
    _register(stub, "in", inputs.key, x.nbytes, offset=256)
    _register(stub, "out", outputs.key, 4096)
    expected = _inline_logits(stub, x)

    # input and output in shared memory: the response carries the output's shape, not its data
    response = stub.ModelInfer(_request(3, out_region="out", out_offset=100), timeout=30)
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [3, 10])
    assert list(response.raw_output_contents) == [b""]  # aligned with outputs, as Triton does
    got = np.frombuffer(outputs.read(100, 3 * OUT_BYTES), "<f4").reshape(3, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

    # input in shared memory, output inline
    response = stub.ModelInfer(_request(3), timeout=30)
    np.testing.assert_allclose(
        np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 10), expected, rtol=1e-6, atol=1e-6
    )

    # the client rewrites its region between requests and gets the new answer
    inputs.write(256, x[::-1].copy().tobytes())
    response = stub.ModelInfer(_request(3, out_region="out"), timeout=30)
    got = np.frombuffer(outputs.read(0, 3 * OUT_BYTES), "<f4").reshape(3, 10)
    np.testing.assert_allclose(got, expected[::-1], rtol=1e-6, atol=1e-6)


def test_registrations_are_server_wide_across_frontends(tiny_repository, objects):
    """With ``--frontends N`` a client's connections land on different processes, so a region
    registered through one frontend is listed, used and unregistered through any other (Triton's
    registrations are the server's, not a connection's)."""
    srv = InProcessServer(tiny_repository, allow_shared_memory=True, engine_process=True)
    try:
        second = srv.another_frontend()
        with srv.channel() as a_channel, grpc.insecure_channel(second) as b_channel:
            a = pb_grpc.GRPCInferenceServiceStub(a_channel)
            b = pb_grpc.GRPCInferenceServiceStub(b_channel)
            x = np.random.default_rng(5).standard_normal((2, 3, 32, 32), dtype=np.float32)
            inputs, outputs = objects(x.nbytes), objects(2 * OUT_BYTES)
            inputs.write(0, x.tobytes())
            _register(a, "in", inputs.key, x.nbytes)
            _register(a, "out", outputs.key, 2 * OUT_BYTES)

            status = b.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
            assert sorted(status.regions) == ["in", "out"]
            assert status.regions["in"].key == inputs.key
            # the second frontend reads the input and writes the output through its own descriptors
            b.ModelInfer(_request(2, out_region="out"), timeout=30)
            got = np.frombuffer(outputs.read(0, 2 * OUT_BYTES), "<f4").reshape(2, 10)
            np.testing.assert_allclose(got, _inline_logits(a, x), rtol=1e-6, atol=1e-6)
            # a name is taken server-wide
            code, message = _error(
                b.SystemSharedMemoryRegister,
                pb.SystemSharedMemoryRegisterRequest(name="in", key=inputs.key, byte_size=8),
            )
            assert code == C.ALREADY_EXISTS, message

            b.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="in"), timeout=10)
            # known at once on the frontend that registered it: the reply waited for every frontend
            code, message = _error(a.ModelInfer, _request(2))
            assert code == C.INVALID_ARGUMENT and "'in' is not registered" in message, message
            code, _ = _error(a.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(name="in"))
            assert code == C.NOT_FOUND
            b.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=10)
            status = a.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
            assert not status.regions
    finally:
        srv.close()


def test_a_frontend_that_does_not_apply_a_registration_is_disconnected(tiny_repository, objects):
    """A register call waits for every frontend to apply it; a frontend stuck past the engine's
    SYNC_TIMEOUT_S is disconnected (its supervisor restarts it), so the call neither hangs nor
    leaves a frontend serving without the region."""
    import socket

    from service.ipc import framing
    from service.ipc.slab import Slab

    srv = InProcessServer(tiny_repository, allow_shared_memory=True, engine_process=True)
    stuck = socket.socket(socket.AF_UNIX)
    slab = Slab.create("svertka-test-stuck", 1 << 20)
    try:
        # A frontend that says hello and then never reads or acknowledges anything again.
        stuck.connect(str(srv.engine_process.socket_path))
        stuck.sendall(
            framing.encode({"op": "hello", "frontend": "stuck", "slab": slab.name, "size": 1 << 20})
        )
        with srv.channel() as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            obj = objects(4096)
            _register(stub, "first", obj.key, 4096)  # waits SYNC_TIMEOUT_S for the stuck one
            stuck.settimeout(30)
            while stuck.recv(1 << 16):  # what the engine sent it, then the end: disconnected
                pass
            _register(stub, "second", obj.key, 4096)
            status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
            assert sorted(status.regions) == ["first", "second"]
    finally:
        stuck.close()
        slab.unlink()
        slab.close()
        srv.close()


def test_bad_shared_memory_tensors_are_refused_before_compute(shm_server, stub, objects):
    inputs, outputs = objects(2 * ROW_BYTES), objects(OUT_BYTES)
    _register(stub, "in", inputs.key, 2 * ROW_BYTES)
    _register(stub, "out", outputs.key, OUT_BYTES)
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny", version="2")).model_stats[0]

    def refused(request) -> str:
        code, details = _error(stub.ModelInfer, request)
        assert code == C.INVALID_ARGUMENT, details
        return details

    assert "region 'nope' is not registered" in refused(_request(1, region="nope"))
    assert "do not fit in system shared memory region 'in'" in refused(_request(3))
    assert "do not fit" in refused(_request(1, offset=ROW_BYTES + 4))
    assert "needs 12288 bytes" in refused(_request(1, byte_size=ROW_BYTES - 4))
    no_size = _request(1)
    del no_size.inputs[0].parameters[shm.BYTE_SIZE_PARAM]
    assert "'shared_memory_byte_size' is required" in refused(no_size)
    wrong_shape = _request(1)
    wrong_shape.inputs[0].shape[2] = 16
    assert "expected FP32 shape [N,3,32,32], got [1,3,16,32]" in refused(wrong_shape)
    text_offset = _request(1)
    text_offset.inputs[0].parameters[shm.OFFSET_PARAM].string_param = "0"
    assert "'shared_memory_offset' must be an integer >= 0" in refused(text_offset)
    assert "'shared_memory_offset' must be an integer >= 0" in refused(_request(1, offset=-8))
    both = _request(1)
    both.raw_input_contents.append(bytes(ROW_BYTES))
    assert "both in a shared memory region and in the request" in refused(both)
    # an output region too small for the result is refused before the model runs
    assert "needs 80 bytes but shared_memory_byte_size is 40" in refused(
        _request(2, out_region="out", out_size=OUT_BYTES)
    )
    assert "80 bytes at offset 0 do not fit in system shared memory region 'out'" in refused(
        _request(2, out_region="out")
    )
    classification = _request(1)
    out = classification.outputs.add(name="logits")
    out.parameters["classification"].int64_param = 3
    _shm_params(out.parameters, "out", OUT_BYTES)
    assert "classification output cannot go to shared memory" in refused(classification)

    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="tiny", version="2")).model_stats[0]
    assert after.inference_count == before.inference_count


def test_a_region_truncated_after_registration_is_an_error_not_a_crash(stub, objects):
    inputs = objects(2 * ROW_BYTES)
    _register(stub, "in", inputs.key, 2 * ROW_BYTES)
    os.truncate(inputs.path, ROW_BYTES // 2)
    code, details = _error(stub.ModelInfer, _request(2))
    assert code == C.INVALID_ARGUMENT
    assert "ended after 6144 of 24576 bytes" in details
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_extension_is_advertised_only_when_allowed(stub, server):
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert "system_shared_memory" in meta.extensions
    with server.channel() as channel:
        plain = pb_grpc.GRPCInferenceServiceStub(channel)
        assert "system_shared_memory" not in plain.ServerMetadata(pb.ServerMetadataRequest()).extensions


def test_a_server_without_shared_memory_refuses_it_and_says_how_to_enable_it(server, objects):
    obj = objects(ROW_BYTES)
    with server.channel() as channel:
        plain = pb_grpc.GRPCInferenceServiceStub(channel)
        for rpc, request in (
            (
                "SystemSharedMemoryRegister",
                pb.SystemSharedMemoryRegisterRequest(name="r", key=obj.key, byte_size=8),
            ),
            ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest()),
            ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest()),
            ("ModelInfer", _request(1, region="r")),
        ):
            code, details = _error(getattr(plain, rpc), request)
            assert code == C.PERMISSION_DENIED, rpc
            assert "system shared memory is disabled on this server" in details
            assert "--allow-shared-memory" in details


def test_registry_bounds_its_regions(objects):
    registry = shm.Registry(max_regions=2)
    obj = objects(64)
    try:
        registry.register("a", obj.key, 0, 8)
        registry.register("b", obj.key, 8, 8)
        with pytest.raises(errors.Overloaded, match="2 regions are registered"):
            registry.register("c", obj.key, 16, 8)
        registry.unregister("a")
        registry.register("c", obj.key, 16, 8)
        assert [r.name for r in registry.status()] == ["b", "c"]
    finally:
        registry.close()
    assert len(registry) == 0


def test_a_process_opening_a_registered_region_later_gets_the_same_object_or_none(objects):
    """Frontends open a registered region themselves, after the engine checked it: an object
    deleted and made again under the same name in between is refused, not silently used."""
    registrations = shm.Registrations()
    obj = objects(4096)
    region, fd = registrations.register("r", obj.key, 0, 4096)
    os.close(fd)
    later = shm.OpenRegions()
    try:
        later.add(region)  # the same object: opened
        later.check(shm.Slice("r", 0, 4096), "input")
        later.close()
        # Another object under the same name (made before the first goes, so it is a new inode).
        replacement = objects(4096)
        os.replace(replacement.path, obj.path)
        later.add(region)
        with pytest.raises(errors.InvalidInput, match="not the object that was registered"):
            later.check(shm.Slice("r", 0, 4096), "input")
    finally:
        later.close()
