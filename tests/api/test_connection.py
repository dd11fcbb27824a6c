"""Connection management: max connection age makes clients reconnect without failing calls."""

from __future__ import annotations

import logging
import time

from service.gen.svertka.v1 import classifier_pb2 as pb
from service.gen.svertka.v1 import classifier_pb2_grpc as pb_grpc
from service.logs import ACCESS_LOGGER
from service.server import grpc_options
from tests.api import images


def test_connections_are_aged_out_and_calls_keep_succeeding(make_server, caplog):
    srv = make_server(max_connection_age_s=0.3, max_connection_age_grace_s=5.0)
    options = dict(grpc_options(srv.config))
    assert options["grpc.max_connection_age_ms"] == 300
    assert options["grpc.max_connection_age_grace_ms"] == 5000
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOGGER)

    def peers() -> set[str]:
        return {r.peer for r in caplog.records if r.name == ACCESS_LOGGER}

    with srv.channel() as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        deadline = time.monotonic() + 30
        # One channel, busy until the server has aged out its connection at least once
        # (the access log then shows a second client port); every call must succeed throughout.
        while len(peers()) < 2 and time.monotonic() < deadline:
            assert stub.Classify(
                pb.ClassifyRequest(model="tiny", image=images.png(1)), timeout=10
            ).predictions
    assert len(peers()) >= 2
