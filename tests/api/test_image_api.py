"""svertka.v1.ImageClassifier against the offline model: unary, stream, concurrency."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest

from service.gen.svertka.v1 import classifier_pb2 as pb
from service.gen.svertka.v1 import classifier_pb2_grpc as pb_grpc
from tests.api import images


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.ImageClassifierStub(channel)


def test_classify_matches_the_offline_model(server, tiny_repository, stub):
    for seed, data in enumerate([images.png(1), images.jpeg(2), images.png(3, size=97, mode="L")]):
        response = stub.Classify(pb.ClassifyRequest(model="tiny", image=data, top_k=3, id=f"r{seed}"))
        tensor = images.preprocess(tiny_repository, "tiny", 2, data)
        expected = images.softmax(images.offline_logits(tiny_repository, "tiny", 2, tensor[None])[0])
        order = np.argsort(-expected, kind="stable")[:3]
        assert [p.index for p in response.predictions] == order.tolist()
        assert [p.label for p in response.predictions] == [f"class{i}" for i in order]
        np.testing.assert_allclose(
            [p.score for p in response.predictions], expected[order], rtol=1e-4, atol=1e-6
        )
        assert (response.model_name, response.model_version, response.id) == ("tiny", 2, f"r{seed}")
        t = response.timings
        assert t.total_us > 0 and t.compute_us > 0 and t.decode_us > 0
        assert t.total_us >= t.compute_us


def test_versions_and_top_k_rules(server, tiny_repository, stub):
    """The newest version serves; naming it explicitly is the same model."""
    data = images.png(7)
    newest = stub.Classify(pb.ClassifyRequest(model="tiny", image=data, top_k=10))
    named = stub.Classify(pb.ClassifyRequest(model="tiny", version=2, image=data, top_k=10))
    assert newest.model_version == named.model_version == 2
    assert [p.index for p in newest.predictions] == [p.index for p in named.predictions]
    tensor = images.preprocess(tiny_repository, "tiny", 2, data)[None]
    expected = images.softmax(images.offline_logits(tiny_repository, "tiny", 2, tensor)[0])
    assert newest.predictions[0].index == int(np.argmax(expected))
    # Unset top_k: 5; above the class count: every class (4 for "small"), best first.
    assert len(stub.Classify(pb.ClassifyRequest(model="tiny", image=data)).predictions) == 5
    small = stub.Classify(pb.ClassifyRequest(model="small", image=data, top_k=50)).predictions
    assert sorted(p.index for p in small) == [0, 1, 2, 3]
    scores = [p.score for p in small]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_stream_answers_every_request_by_id_under_concurrency(server, stub):
    """Three streams at once, 24 requests each, one bad image per stream: every id answered once."""
    payloads = {i: images.png(100 + i) for i in range(12)}
    unary = {
        i: stub.Classify(pb.ClassifyRequest(model="tiny", image=data, top_k=2)).predictions[0].index
        for i, data in payloads.items()
    }

    def run_stream(stream_no: int):
        def requests():
            for j in range(24):
                if j == 5:
                    yield pb.ClassifyRequest(model="tiny", image=b"not an image", id=f"{stream_no}-bad")
                else:
                    yield pb.ClassifyRequest(
                        model="tiny", image=payloads[j % 12], top_k=2, id=f"{stream_no}-{j}"
                    )

        return list(stub.ClassifyStream(requests(), timeout=60))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(run_stream, range(3)))
    for stream_no, responses in enumerate(results):
        ids = [r.id for r in responses]
        assert len(ids) == len(set(ids)) == 24
        assert all(i.startswith(f"{stream_no}-") for i in ids)  # no answer crossed to another stream
        for response in responses:
            if response.id.endswith("-bad"):
                assert response.error.code_name == "INVALID_ARGUMENT"
                assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert "image" in response.error.message
                assert not response.predictions
            else:
                j = int(response.id.split("-")[1])
                assert not response.HasField("error")
                assert response.predictions[0].index == unary[j % 12]


def test_python_client_and_classify_many(server, tmp_path):
    from service.client import ClassifyError, Client

    path = tmp_path / "a.png"
    path.write_bytes(images.png(5))
    with Client(server.address) as client:
        one = client.classify(path, model="tiny", top_k=3)
        assert len(one.predictions) == 3 and one.model_name == "tiny"
        many = client.classify_many([path, b"garbage", images.png(5)], model="tiny", top_k=3)
        assert many[0].predictions == many[2].predictions
        assert isinstance(many[1], ClassifyError) and many[1].code == "INVALID_ARGUMENT"
        assert many[0].top == one.top
        with pytest.raises(ClassifyError) as info:
            client.classify(path, model="nope")
        assert info.value.code == "NOT_FOUND"


@pytest.mark.parametrize("connections", [1, 4])
def test_python_client_takes_turns_on_its_own_connections(server, connections):
    """``Client(connections=N)`` opens N TCP connections (what spreads calls over ``--frontends``,
    which balance connections) and uses every one; channels with equal options would share one."""
    import psutil

    from service.client import Client

    def connected_ports() -> set[int]:
        return {
            c.laddr.port
            for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == server.port and c.status == psutil.CONN_ESTABLISHED
        }

    before = connected_ports()
    with Client(server.address, connections=connections) as client:
        tops = {client.classify(images.png(5), model="tiny").top for _ in range(2 * connections)}
        assert len(tops) == 1
        assert len(connected_ports() - before) == connections
    with pytest.raises(ValueError, match="connections must be 1-64"):
        Client(server.address, connections=0)


def test_draining_ends_open_streams_after_answering_what_they_sent(make_server):
    """A stream that stays open during shutdown gets its answers, then UNAVAILABLE (not a hang, not CANCELLED)."""
    import threading

    srv = make_server()
    release = threading.Event()
    answered = []

    def requests():
        for i in range(5):
            yield pb.ClassifyRequest(model="tiny", image=images.png(i), id=str(i))
        release.wait(30)  # the client has nothing more to say for now, but keeps the stream open

    with srv.channel() as channel:
        stream = pb_grpc.ImageClassifierStub(channel).ClassifyStream(requests(), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            for response in stream:
                answered.append(response.id)
                if len(answered) == 5:
                    srv.loop.call_soon_threadsafe(lambda: srv.loop.create_task(srv.server.shutdown(10)))
        release.set()
    assert sorted(answered) == ["0", "1", "2", "3", "4"]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "server is shutting down" in info.value.details()
