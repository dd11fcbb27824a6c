"""What the kubelet's probes see: liveness is not readiness.

The manifests point startup and readiness probes at ``""`` (the whole server,
SERVING once a model is READY) and the liveness probe at
``service.api.health.LIVENESS_SERVICE``, SERVING while the process answers.
Checked on every rendered workload, and on real ``svertka serve`` processes in
both layouts (every frontend of ``--frontends 2`` has its own health
servicer): with no model ready, readiness says NOT_SERVING, liveness SERVING,
and the log says so at WARNING; through a drain liveness stays SERVING until
the server stops.
"""

from __future__ import annotations

import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.target import ServerProcess
from service import config as cfg
from service.api.health import LIVENESS_SERVICE
from tests.deploy import manifests as m
from tests.helpers.layouts import LAYOUTS, layout_args
from tests.helpers.tinymodel import make_repository
from tests.reliability.harness import json_log_records, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: Fresh connections per check: with --frontends 2 the kernel hands each to one frontend.
CONNECTIONS = 8


@pytest.mark.parametrize("target", [t for t in (*m.TARGETS, *m.SIDE_BY_SIDE) if list(m.workloads(t))])
def test_every_liveness_probe_asks_for_another_service_than_readiness(target):
    for workload in m.workloads(target):
        container = m.server_container(m.pod_spec(workload))
        live, ready, startup = (
            container[p]["grpc"]["service"] for p in ("livenessProbe", "readinessProbe", "startupProbe")
        )
        assert live != ready and live != startup, workload["metadata"]["name"]
        assert (live, ready, startup) == (
            LIVENESS_SERVICE,
            cfg.SERVER_HEALTH_SERVICE,
            cfg.SERVER_HEALTH_SERVICE,
        )


def statuses(server: ServerProcess, service: str) -> set[int]:
    """What ``service`` is on CONNECTIONS fresh connections (NOT_FOUND shows as -1)."""
    seen = set()
    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(
            server.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            try:
                seen.add(
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    .status
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                seen.add(-1)
    return seen


def health_records(server: ServerProcess) -> list[dict]:
    return [r for r in json_log_records(server.log()) if r.get("msg", "").startswith("health:")]


@pytest.mark.integration
@pytest.mark.parametrize("layout", LAYOUTS)
def test_liveness_stays_serving_when_the_last_model_goes(tmp_path, layout):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    args = (*layout_args(layout), "--repository-poll-s", "0.2", "--log-format", "json")
    server = ServerProcess(repo, tmp_path / "server.log", *args)
    try:
        server.start().wait_serving()
        assert statuses(server, LIVENESS_SERVICE) == {SERVING}
        assert any(
            r["level"] == "info" and r["msg"].startswith("health: SERVING") for r in health_records(server)
        )

        shutil.rmtree(repo / "tiny")
        wait_until(lambda: statuses(server, "") == {NOT_SERVING}, what="readiness NOT_SERVING")
        assert statuses(server, LIVENESS_SERVICE) == {SERVING}, "the kubelet would restart this process"
        warning = wait_until(
            lambda: [r for r in health_records(server) if r["level"] == "warning"], what="the warning"
        )
        assert "health: NOT_SERVING: no model is READY (of tiny;" in warning[0]["msg"]
        assert LIVENESS_SERVICE in warning[0]["msg"]
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.integration
def test_an_empty_repository_logs_what_the_probes_see(tmp_path):
    """Not `health: SERVING`, which the log said while every probe failed."""
    repo = tmp_path / "empty"
    repo.mkdir()
    server = ServerProcess(repo, tmp_path / "server.log", "--log-format", "json")
    try:
        server.start()
        records = wait_until(lambda: health_records(server), what="the health line")
        assert statuses(server, "") == {NOT_SERVING}
        assert statuses(server, LIVENESS_SERVICE) == {SERVING}
    finally:
        assert server.stop() == 0, server.log()
    assert [r["level"] for r in records] == ["warning"], records
    message = records[0]["msg"]
    assert message.startswith("health: NOT_SERVING: the model repository holds no model")
    # What the probes will see, and what to do.
    assert "Readiness and startup probes" in message and "add one to the repository" in message


@pytest.mark.integration
def test_liveness_stays_serving_through_the_drain_until_the_server_stops(tmp_path):
    """The in-process server of tests/api (its real HealthReporter), stepped through a shutdown."""
    from tests.api.conftest import InProcessServer

    srv = InProcessServer(make_repository(tmp_path / "repo", {"tiny": [1]}))
    try:
        health = srv.server.health

        def status(service: str) -> int:
            with srv.channel() as channel:
                request = health_pb2.HealthCheckRequest(service=service)
                return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status

        assert [status(s) for s in ("", "tiny", LIVENESS_SERVICE)] == [SERVING] * 3
        srv.call(health.enter_draining())
        srv.call(health.refresh())  # the engine changing state while draining changes nothing
        assert [status(s) for s in ("", "tiny", LIVENESS_SERVICE)] == [NOT_SERVING, NOT_SERVING, SERVING]
        srv.call(health.stop())
        assert status(LIVENESS_SERVICE) == NOT_SERVING
    finally:
        srv.close()
