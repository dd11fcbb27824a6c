"""A small Python client for svertka's image API (``svertka.v1.ImageClassifier``).

>>> from service.client import Client
>>> with Client("localhost:8001") as client:
...     result = client.classify(Path("digit.png"), model="digits", top_k=3)
...     print(result.top.label, result.top.score)

``classify`` sends one image (unary call). ``classify_many`` sends many over
one bidirectional stream, so the server can batch them, and returns results
in the order given. Failures raise :class:`ClassifyError` carrying the gRPC
status name and the server's message (docs/api.md lists which are safe to
retry). For tensors, use any KServe v2 client (e.g. ``tritonclient.grpc``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc

from service.gen.svertka.v1 import classifier_pb2 as pb
from service.gen.svertka.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_TIMEOUT_S = 30.0
#: Matches the server's default limit, so large images fail with the server's clear message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: More connections than this from one client help no server.
MAX_CONNECTIONS = 64


class ClassifyError(Exception):
    """A request failed; ``code`` is the gRPC status name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str, *, id: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float  # softmax probability


@dataclasses.dataclass(frozen=True)
class Result:
    """One image's answer. ``timings_us`` holds the server's decode/queue/compute/total microseconds."""

    predictions: tuple[Prediction, ...]
    model_name: str
    model_version: int
    id: str
    timings_us: dict[str, int]

    @property
    def top(self) -> Prediction:
        return self.predictions[0]


def _result(response: pb.ClassifyResponse) -> Result:
    t = response.timings
    return Result(
        predictions=tuple(Prediction(p.label, p.index, p.score) for p in response.predictions),
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        timings_us={"decode": t.decode_us, "queue": t.queue_us, "compute": t.compute_us, "total": t.total_us},
    )


def _image_bytes(image: bytes | str | Path) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


class Client:
    """A connection to one svertka server. Thread-safe; close it (or use ``with``) when done.

    ``tls_ca``: PEM file of the CA that signed the server's certificate (enables TLS);
    ``tls_cert``/``tls_key``: this client's certificate for mutual TLS;
    ``token``: bearer token for servers started with ``--auth-token-file``;
    ``connections``: how many TCP connections to open and take turns on, call by call. A server
    started with ``--frontends N`` hands each *connection* to one of its N processes, so a client
    that should keep all of them busy needs several (2N spreads well; docs/engine.md,
    "Balancing"). One by default, as every gRPC channel has.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        token: str | None = None,
        server_name_override: str | None = None,
        connections: int = 1,
    ) -> None:
        if not 1 <= connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be 1-{MAX_CONNECTIONS}, got {connections}")
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if connections > 1:
            # Channels with equal options share one connection through gRPC's global subchannel
            # pool; a local pool per channel gives each its own.
            options.append(("grpc.use_local_subchannel_pool", 1))
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        credentials = None
        if tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
                private_key=Path(tls_key).read_bytes() if tls_key else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
            )
        self._channels = [
            grpc.insecure_channel(target, options=options)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=options)
            for _ in range(connections)
        ]
        self._stubs = [pb_grpc.ImageClassifierStub(channel) for channel in self._channels]
        self._turn = itertools.count()  # next() on it is atomic under the GIL: thread-safe turns
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    @property
    def _stub(self) -> pb_grpc.ImageClassifierStub:
        """The stub whose turn it is (one per connection)."""
        return self._stubs[next(self._turn) % len(self._stubs)]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    @staticmethod
    def _request(image, *, model: str, version: int, top_k: int | None, id: str) -> pb.ClassifyRequest:
        request = pb.ClassifyRequest(model=model, version=version, image=_image_bytes(image), id=id)
        if top_k is not None:
            request.top_k = top_k
        return request

    def classify(
        self,
        image: bytes | str | Path,
        *,
        model: str = "",
        version: int = 0,
        top_k: int | None = None,
        id: str = "",
        timeout_s: float | None = None,
    ) -> Result:
        """Classify one encoded image (bytes or a file path). ``model=""``: the server's only model."""
        request = self._request(image, model=model, version=version, top_k=top_k, id=id)
        try:
            response = self._stub.Classify(
                request, timeout=timeout_s or self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise ClassifyError(exc.code().name, exc.details() or "", id=id) from None
        return _result(response)

    def classify_many(
        self,
        images: Iterable[bytes | str | Path],
        *,
        model: str = "",
        version: int = 0,
        top_k: int | None = None,
        timeout_s: float | None = None,
    ) -> list[Result | ClassifyError]:
        """Classify many images over one stream; one entry per image, in order.

        A failed image gives a :class:`ClassifyError` in its slot (the others are
        unaffected); a failure of the stream itself raises.
        """
        ids: list[str] = []

        def requests() -> Iterator[pb.ClassifyRequest]:
            for i in itertools.count():
                try:
                    image = next(iterator)
                except StopIteration:
                    return
                ids.append(str(i))
                yield self._request(image, model=model, version=version, top_k=top_k, id=str(i))

        iterator = iter(images)
        by_id: dict[str, Result | ClassifyError] = {}
        try:
            for response in self._stub.ClassifyStream(
                requests(), timeout=timeout_s or self._timeout_s, metadata=self._metadata
            ):
                if response.HasField("error"):
                    by_id[response.id] = ClassifyError(
                        response.error.code_name, response.error.message, id=response.id
                    )
                else:
                    by_id[response.id] = _result(response)
        except grpc.RpcError as exc:
            raise ClassifyError(exc.code().name, exc.details() or "") from None
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ClassifyError("INTERNAL", f"the server sent no answer for requests {missing}")
        return [by_id[i] for i in ids]
