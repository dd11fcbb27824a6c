"""service/gen is exactly what ``make proto`` would write from proto/ today."""

from __future__ import annotations

import filecmp

from service import protogen


def test_generated_code_is_fresh(tmp_path):
    fresh = tmp_path / "gen"
    protogen.generate(fresh)
    committed = protogen.GEN_DIR
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed_files = sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh_files == committed_files, "run `make proto`: the set of generated files differs"
    stale = [str(p) for p in fresh_files if not filecmp.cmp(fresh / p, committed / p, shallow=False)]
    assert not stale, f"run `make proto`: stale generated files {stale}"


def test_generated_package_imports_without_sys_path_tricks():
    from service.gen.inference import grpc_service_pb2, grpc_service_pb2_grpc
    from service.gen.svertka.v1 import classifier_pb2, classifier_pb2_grpc

    assert grpc_service_pb2.DESCRIPTOR.name == "inference/grpc_service.proto"
    assert classifier_pb2.DESCRIPTOR.package == "svertka.v1"
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceServicer")
    assert hasattr(classifier_pb2_grpc, "ImageClassifierStub")
