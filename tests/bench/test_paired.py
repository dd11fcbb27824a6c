"""bench.paired: one served/ceiling ratio per round, and a real round end to end."""

from __future__ import annotations

import json

import pytest

from bench import paired


def test_each_round_gives_one_ratio_and_unstable_rounds_none():
    values = paired.ratios([50.0, None, 60.0], [100.0, 80.0, 75.0])
    assert values == [0.5, 0.8]
    assert paired.summary(values) == {"median": 0.65, "min": 0.5, "max": 0.8, "rounds": 2}


@pytest.mark.slow
def test_a_round_runs_end_to_end_against_a_real_server(tmp_path, capsys):
    from tests.helpers.tinymodel import make_tiny_model

    path = tmp_path / "tiny" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    make_tiny_model(path)
    args = ["--model-path", str(path), "--name", "tiny", "--rounds", "2", "--batches", "1", "4",
            "--ceiling-s", "0.2", "--served-s", "0.5", "--concurrency", "2"]  # fmt: skip
    assert paired.main(args) == 0
    out = capsys.readouterr().out
    assert "round 1: ceiling" in out and "round 2: ceiling" in out
    assert "tiny, tensor API, concurrency 2: served/ceiling median" in out
    saved = json.loads((paired.WORK / "tiny-tensor-c2.json").read_text())
    assert len(saved["ceiling"]) == len(saved["served"]) == len(saved["ceiling_batch"]) == 2
    assert saved["summary"]["rounds"] == len(saved["ratios"]) >= 1
