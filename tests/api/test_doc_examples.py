"""The Python in docs/api.md's "Examples" that stands in for grpcurl runs against a real server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.api import images

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def _python_block_after(text: str, marker: str) -> str:
    start = text.index("```python\n", text.index(marker)) + len("```python\n")
    return text[start : text.index("```", start)]


@pytest.mark.parametrize("server", ["one-process"], indirect=True)  # the snippet, not the layouts
def test_the_grpcurl_stand_in_lists_checks_and_calls_any_method(server, tmp_path):
    code = _python_block_after(API_DOC.read_text(), "Without grpcurl")
    assert code.count('"localhost:8001"') == 1 and code.count('"digits"') == 2
    code = code.replace('"localhost:8001"', repr(server.address)).replace('"digits"', '"tiny"')
    (tmp_path / "digit.png").write_bytes(images.png(3))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    services = [
        "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
        "inference.GRPCInferenceService", "svertka.v1.ImageClassifier",
    ]  # fmt: skip
    assert run.stdout.startswith(f"{services}\n")
    assert "status: SERVING" in run.stdout
    assert '"name": "tiny"' in run.stdout and '"datatype": "FP32"' in run.stdout  # ModelMetadata
    assert '"modelName": "tiny"' in run.stdout and run.stdout.count('"label": "class') == 3  # Classify, top 3
