"""RepositoryIndex lists the models the server knows, one row each, as docs/api.md says.

Known: every model directory present at start-up, and one added later only once polling finds
it or RepositoryModelLoad loads it. Each row is the version the model serves, not every
version in its directory.
"""

from __future__ import annotations

from service.gen.inference import grpc_service_pb2 as kpb
from service.gen.inference import grpc_service_pb2_grpc as kgrpc
from tests.helpers.tinymodel import make_repository


def _index(stub, *, ready: bool = False) -> list[tuple[str, str, str]]:
    index = stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=ready), timeout=10)
    return [(m.name, m.version, m.state) for m in index.models]


def test_one_row_per_known_model_and_a_directory_added_later_only_once_loaded(make_server, tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1, 2]})
    srv = make_server(repo, enable_model_control=True)
    with srv.channel() as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        assert _index(stub) == [("tiny", "2", "READY")]  # the serving version; version 1 is not listed

        make_repository(repo, {"late": [1]})  # after start-up, no --repository-poll-s
        assert _index(stub) == [("tiny", "2", "READY")]

        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="late"), timeout=60)
        assert _index(stub) == [("late", "1", "READY"), ("tiny", "2", "READY")]

        stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="late"), timeout=60)
        assert _index(stub) == [("late", "1", "UNAVAILABLE"), ("tiny", "2", "READY")]
        assert _index(stub, ready=True) == [("tiny", "2", "READY")]
