"""grpc-ecosystem server metrics from the interceptor, on a real grpc.aio server.

A generic handler with raw-bytes methods stands in for the servicers, so
this test covers the interceptor alone: every RPC type, and every way a
handler ends (return, set_code, abort, exception, client cancel, deadline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import grpc.aio
import pytest

from service.api.grpc_metrics import GrpcMetricsInterceptor
from service.metrics import Metrics

SERVICE = "test.v1.Probe"


async def unary_ok(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    return req


async def unary_set_code(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    ctx.set_code(grpc.StatusCode.NOT_FOUND)
    ctx.set_details("no such thing")
    return b""


async def unary_abort(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")


async def unary_raise(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("boom")


async def unary_hang(req: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
    await asyncio.Event().wait()  # only a cancel or a deadline ends this
    return b""


def unary_sync(req: bytes, ctx: grpc.ServicerContext) -> bytes:
    return req[::-1]


async def server_stream(req: bytes, ctx: grpc.aio.ServicerContext):
    for i in range(3):
        yield bytes([i])


async def server_stream_write(req: bytes, ctx: grpc.aio.ServicerContext) -> None:
    await ctx.write(b"a")
    await ctx.write(b"b")


async def client_stream(it, ctx: grpc.aio.ServicerContext) -> bytes:
    total = b""
    async for chunk in it:
        total += chunk
    return total


async def bidi(it, ctx: grpc.aio.ServicerContext):
    async for chunk in it:
        if chunk == b"bad":
            await ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "bad chunk")
        yield chunk


def handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ok": grpc.unary_unary_rpc_method_handler(unary_ok),
            "SetCode": grpc.unary_unary_rpc_method_handler(unary_set_code),
            "Abort": grpc.unary_unary_rpc_method_handler(unary_abort),
            "Raise": grpc.unary_unary_rpc_method_handler(unary_raise),
            "Hang": grpc.unary_unary_rpc_method_handler(unary_hang),
            "Sync": grpc.unary_unary_rpc_method_handler(unary_sync),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ServerStreamWrite": grpc.unary_stream_rpc_method_handler(server_stream_write),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


def handled(m: Metrics, method: str, rtype: str, code: str) -> float | None:
    return m.registry.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": rtype, "grpc_code": code},
    )


def started(m: Metrics, method: str, rtype: str) -> float | None:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": rtype}
    return m.registry.get_sample_value("grpc_server_started_total", labels)


async def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    """Server-side bookkeeping finishes after the client sees the status; poll, don't sleep-and-hope."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)


async def _scenario(m: Metrics) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(2)
    server = grpc.aio.server(interceptors=[GrpcMetricsInterceptor(m)], migration_thread_pool=pool)
    server.add_generic_rpc_handlers((handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:

            def uu(name: str):
                return ch.unary_unary(f"/{SERVICE}/{name}")

            assert await uu("Ok")(b"x") == b"x"
            assert await uu("Ok")(b"y") == b"y"
            assert await uu("Sync")(b"ab") == b"ba"
            for name, want in [
                ("SetCode", grpc.StatusCode.NOT_FOUND),
                ("Abort", grpc.StatusCode.INVALID_ARGUMENT),
                ("Raise", grpc.StatusCode.UNKNOWN),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await uu(name)(b"")
                assert err.value.code() == want

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await uu("Hang")(b"", timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            call = uu("Hang")(b"")
            await _wait_for(lambda: started(m, "Hang", "unary") == 2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

            got = [r async for r in ch.unary_stream(f"/{SERVICE}/ServerStream")(b"")]
            assert got == [b"\x00", b"\x01", b"\x02"]
            got = [r async for r in ch.unary_stream(f"/{SERVICE}/ServerStreamWrite")(b"")]
            assert got == [b"a", b"b"]

            async def chunks(*items: bytes):
                for it in items:
                    yield it

            assert await ch.stream_unary(f"/{SERVICE}/ClientStream")(chunks(b"a", b"b", b"c")) == b"abc"
            got = [r async for r in ch.stream_stream(f"/{SERVICE}/Bidi")(chunks(b"1", b"2"))]
            assert got == [b"1", b"2"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in ch.stream_stream(f"/{SERVICE}/Bidi")(chunks(b"1", b"bad")):
                    pass
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await uu("NoSuchMethod")(b"")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

            await _wait_for(lambda: handled(m, "Hang", "unary", "CANCELLED") == 1)
    finally:
        await server.stop(None)
        pool.shutdown()


def test_interceptor_counts_every_rpc_type_and_outcome() -> None:
    m = Metrics()
    asyncio.run(_scenario(m))
    assert started(m, "Ok", "unary") == 2
    assert handled(m, "Ok", "unary", "OK") == 2
    assert handled(m, "Sync", "unary", "OK") == 1
    assert handled(m, "SetCode", "unary", "NOT_FOUND") == 1
    assert handled(m, "Abort", "unary", "INVALID_ARGUMENT") == 1
    assert handled(m, "Raise", "unary", "UNKNOWN") == 1
    assert handled(m, "Hang", "unary", "DEADLINE_EXCEEDED") == 1
    assert handled(m, "Hang", "unary", "CANCELLED") == 1
    assert started(m, "Hang", "unary") == 2
    assert handled(m, "ServerStream", "server_stream", "OK") == 1
    assert handled(m, "ServerStreamWrite", "server_stream", "OK") == 1
    assert handled(m, "ClientStream", "client_stream", "OK") == 1
    assert started(m, "Bidi", "bidi_stream") == 2
    assert handled(m, "Bidi", "bidi_stream", "OK") == 1
    assert handled(m, "Bidi", "bidi_stream", "FAILED_PRECONDITION") == 1
    # unknown methods are not registered services: no series invented for them
    assert started(m, "NoSuchMethod", "unary") is None
    # the latency histogram saw every handled RPC of a method
    count = m.registry.get_sample_value(
        "grpc_server_handling_seconds_count",
        {"grpc_service": SERVICE, "grpc_method": "Hang", "grpc_type": "unary"},
    )
    assert count == 2
    le_inf = m.registry.get_sample_value(
        "grpc_server_handling_seconds_bucket",
        {"grpc_service": SERVICE, "grpc_method": "Hang", "grpc_type": "unary", "le": "+Inf"},
    )
    assert le_inf == 2
