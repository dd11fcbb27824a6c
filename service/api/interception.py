"""The machinery every server interceptor here shares: one way to rewrap a grpc.aio method handler.

A ``grpc.RpcMethodHandler`` comes in four kinds (unary or streaming request,
unary or streaming response) and its behaviour in four shapes (coroutine,
async generator, and the synchronous function and generator grpc.aio runs in
its thread pool). An interceptor that changes how a call runs has to rebuild a
handler of the same kind around a behaviour of the same shape. This module
does that once:

* :func:`behavior_of` / :func:`rebuilt`: a handler's behaviour, and a handler of
  the same kind with another behaviour (or another request deserializer);
* :func:`around_each_call`: every call of a handler runs inside a context
  manager made for it (what the metrics and the drain gate need: see when a call
  starts and how it ends, whatever its shape);
* :func:`refusing`: a handler of the same kind that refuses every call unread;
* :class:`PerMethodInterceptor`: wraps each method's handler once and keeps the
  result, since grpc hands the same handler object for every call of a method.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from service.api import error_codes

#: Wrapped handlers an interceptor keeps: far above the number of RPC methods served. A handler
#: made anew for every call (grpc does not do that, a generic handler could) is not kept.
MAX_KEPT_HANDLERS = 256

_SAME = object()

Scope = Callable[[Any], contextlib.AbstractContextManager]


def behavior_of(handler: grpc.RpcMethodHandler) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The handler's behaviour and the grpc factory that makes a handler of the same kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


def unread(data: bytes) -> None:
    """A request deserializer for a call that is refused unread: its message is never parsed."""
    return None


def is_async(handler: grpc.RpcMethodHandler) -> bool:
    """Whether the behaviour runs on the event loop (a coroutine or an async generator)."""
    behavior, _ = behavior_of(handler)
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def rebuilt(
    handler: grpc.RpcMethodHandler, behavior: Callable[..., Any], *, request_deserializer: Any = _SAME
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` with ``behavior`` (and maybe another deserializer)."""
    _, factory = behavior_of(handler)
    return factory(
        behavior,
        request_deserializer=(
            handler.request_deserializer if request_deserializer is _SAME else request_deserializer
        ),
        response_serializer=handler.response_serializer,
    )


def around_each_call(
    handler: grpc.RpcMethodHandler, scope: Scope, *, synchronous: bool = True
) -> grpc.RpcMethodHandler:
    """``handler`` with every call run inside ``scope(context)``, a context manager.

    The context manager sees the call start and end, and the exception it ends with (a
    cancellation included); for a streaming response that is when the last answer has been
    taken. With ``synchronous=False`` a behaviour that grpc runs in its thread pool is left as
    it is (the scope would not run in the call's task).
    """
    behavior, _ = behavior_of(handler)
    if inspect.isasyncgenfunction(behavior):

        async def each(request_or_iterator: Any, context: Any):
            with scope(context):
                async for response in behavior(request_or_iterator, context):
                    yield response

    elif inspect.iscoroutinefunction(behavior):

        async def each(request_or_iterator: Any, context: Any) -> Any:
            with scope(context):
                return await behavior(request_or_iterator, context)

    elif not synchronous:
        return handler
    elif inspect.isgeneratorfunction(behavior):

        def each(request_or_iterator: Any, context: Any):
            with scope(context):
                yield from behavior(request_or_iterator, context)

    else:

        def each(request_or_iterator: Any, context: Any) -> Any:
            with scope(context):
                return behavior(request_or_iterator, context)

    return rebuilt(handler, each)


def refusing(
    handler: grpc.RpcMethodHandler,
    error: BaseException,
    *,
    before: Callable[[], Awaitable[None]] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind that ends every call with ``error``'s status, its message unread.

    ``before`` is awaited first (the drain gate holds calls there until it answers them).
    """

    async def call(request_or_iterator: Any, context: Any) -> None:
        if before is not None:
            await before()
        error_codes.fail(context, error)

    async def stream(request_or_iterator: Any, context: Any):
        if before is not None:
            await before()
        error_codes.fail(context, error)
        return
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    return rebuilt(handler, stream if handler.response_streaming else call, request_deserializer=unread)


class PerMethodInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that rewraps each method's handler once (:meth:`wrap`) and reuses it."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, Any], grpc.RpcMethodHandler] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to serve ``method`` with instead of ``handler``."""
        raise NotImplementedError

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        key = (method, handler)
        kept = self._kept.get(key)
        if kept is None:
            kept = self.wrap(method, handler)
            if len(self._kept) < MAX_KEPT_HANDLERS:
                self._kept[key] = kept
        return kept

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrapped(handler_call_details.method or "", handler)
