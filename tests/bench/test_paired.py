"""bench.paired: one served/ceiling ratio per round, and a real round end to end."""

from __future__ import annotations

import json

import pytest

from bench import paired


def test_each_round_gives_one_ratio_and_unstable_rounds_none():
    values = paired.ratios([50.0, None, 60.0], [100.0, 80.0, 75.0])
    assert values == [0.5, 0.8]
    assert paired.summary(values) == {"median": 0.65, "min": 0.5, "max": 0.8, "rounds": 2}


def test_concurrency_1_rounds_subtract_each_rounds_own_raw_p50():
    # onnxruntime's batch-1 time drifts between rounds; each served p50 is set against its own round's.
    import time

    import numpy as np

    delay = [0.004]
    served = iter([6.0, None, 11.0, 10.5])

    def streaming() -> float | None:
        delay[0] = 0.008  # onnxruntime runs slower from the second round on
        return next(served)

    lines = []
    result = paired.measure_latency_rounds(
        lambda x: time.sleep(delay[0]),
        np.zeros((1, 3, 2, 2), np.float32),
        0.05,
        {"unary": lambda: next(served), "streaming": streaming},
        2,
        log=lines.append,
    )
    raw = result["raw_p50"]
    assert len(raw) == 2 and 4.0 <= raw[0] < 8.0 <= raw[1]  # the second round ran at the slower speed
    assert result["served_p50"] == {"unary": [6.0, 11.0], "streaming": [None, 10.5]}
    assert result["overhead_ms"]["unary"] == pytest.approx([6.0 - raw[0], 11.0 - raw[1]])
    assert result["overhead_ms"]["streaming"] == pytest.approx(
        [10.5 - raw[1]]
    )  # the unstable round gives none
    assert result["summary"]["streaming"]["rounds"] == 1
    assert "streaming unstable" in lines[0] and lines[1].startswith(
        "round 2: onnxruntime alone at batch 1 p50"
    )


def _tiny_model(tmp_path):
    from tests.helpers.tinymodel import make_tiny_model

    path = tmp_path / "tiny" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    make_tiny_model(path)
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_a_round_runs_end_to_end_against_a_real_server(tmp_path, capsys):
    path = _tiny_model(tmp_path)
    args = ["--model-path", str(path), "--name", "tiny", "--rounds", "2", "--batches", "1", "4",
            "--ceiling-s", "0.2", "--served-s", "0.5", "--concurrency", "2"]  # fmt: skip
    assert paired.main(args) == 0
    out = capsys.readouterr().out
    assert "round 1: ceiling" in out and "round 2: ceiling" in out
    assert "tiny, tensor API, concurrency 2: served/ceiling median" in out
    saved = json.loads((paired.WORK / "tiny-tensor-c2.json").read_text())
    assert len(saved["ceiling"]) == len(saved["served"]) == len(saved["ceiling_batch"]) == 2
    assert saved["summary"]["rounds"] == len(saved["ratios"]) >= 1


@pytest.mark.slow
@pytest.mark.integration
def test_latency_rounds_run_end_to_end_against_a_real_server(tmp_path, capsys):
    path = _tiny_model(tmp_path)
    args = ["--model-path", str(path), "--name", "tiny", "--latency", "--rounds", "1", "--ceiling-s", "0.2",
            "--served-s", "0.5"]  # fmt: skip
    assert paired.main(args) == 0
    out = capsys.readouterr().out
    assert "round 1: onnxruntime alone at batch 1 p50" in out
    assert "tiny, concurrency 1, unary: served p50 - onnxruntime's batch-1 p50, median" in out
    saved = json.loads((paired.WORK / "tiny-c1-latency.json").read_text())
    assert list(saved["served_p50"]) == ["unary", "streaming"] and len(saved["raw_p50"]) == 1
    assert saved["summary"]["unary"]["rounds"] == 1
