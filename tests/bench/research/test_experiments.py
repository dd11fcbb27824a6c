"""bench.research.experiments: B's change is made from outside the service code, and an A/B run completes."""

from __future__ import annotations

import os
import threading

import pytest

from bench import perf
from bench.research import experiments
from service import config
from tests.helpers.tinymodel import make_repository


def test_every_policy_a_finding_cites_is_offered():
    assert experiments.POLICIES == sorted(
        ["spinning", "no-spinning", "two-instances", "one-decoder", "nice-frontend", "grpc-options"]
    )


def test_a_settings_policy_serves_a_copy_of_the_model_with_the_change_over_its_own_settings(tmp_path):
    source = make_repository(tmp_path / "repo", {"tiny": [1, 2]})
    (source / "tiny" / "config.yaml").write_text("max_batch_size: 4\nintra_op_spinning: false\n")
    repo = experiments.with_settings(source, "tiny", tmp_path / "b", {"intra_op_spinning": True})

    settings = config.ModelSettings.load(repo / "tiny")
    assert settings.intra_op_spinning is True and settings.max_batch_size == 4
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["1", "2", "config.json"]
    for version in ("1", "2"):  # the same model files, not new ones
        assert os.path.samefile(
            repo / "tiny" / version / "model.onnx", source / "tiny" / version / "model.onnx"
        )
    assert config.ModelSettings.load(source / "tiny").intra_op_spinning is False  # A's copy is untouched


def test_process_policies_find_svertkas_threads_by_name():
    seen: list[str] = []
    experiments._at_thread_start(seen.append)
    try:
        thread = threading.Thread(target=lambda: None, name="svertka-run0")
        thread.start()
        thread.join()
    finally:
        threading.setprofile(None)
    assert seen == ["svertka-run0"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not perf.perf_analyzer_path().is_file(), reason="perf_analyzer is not installed")
@pytest.mark.parametrize("policy", ["two-instances", "one-decoder"])  # B's own repository; B's own process
def test_an_ab_run_measures_both_arms(tmp_path, capsys, policy):
    model = make_repository(tmp_path / "repo") / "tiny" / "1" / "model.onnx"
    argv = ["ab", "--model-path", str(model), "--name", "tiny", "--policy", policy, "--concurrency", "2",
            "--interval-ms", "500", "--stability", "50"]  # fmt: skip
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    for arm in "AB":
        line = next(line for line in out.splitlines() if line.startswith(f"{arm} c= 2:"))
        assert "img/s" in line and "server CPU" in line, out
