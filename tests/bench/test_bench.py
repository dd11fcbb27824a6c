"""The benchmark cannot rot: its quick mode runs end to end, and its parsers read real formats.

The quick run (``make bench BENCH_QUICK=1``) starts a real svertka server on
loopback, loads it with perf_analyzer and the asyncio client, and writes the
report and plots. Nothing here asserts a speed: the machine is shared and the
quick windows are a second long. It asserts what a reader of the report
would notice: every model has its tables, plots that open, and a GPU section.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from bench import ceiling, modelstats, perf, report
from tests.bench.levels import assert_measured

REPO = Path(__file__).resolve().parents[2]

# A perf_analyzer 2.41 ``-f`` file, as it wrote one against the peer in development.
PERF_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "2,32.0365,124,5569,14453,192,41206,591,4,54007,128893,146351,220527\n"
)


def test_perf_analyzer_csv_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "pa.csv"
    path.write_text(PERF_CSV)
    row = perf.parse_csv(path)
    assert row["Concurrency"] == 2
    assert row["Inferences/Second"] == pytest.approx(32.0365)
    assert row["p99 latency"] == 220527


def test_perf_analyzer_csv_without_a_row_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pa.csv"
    path.write_text(PERF_CSV.splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="expected one data row"):
        perf.parse_csv(path)


def test_ceiling_batch_sizes_end_at_max_batch_size() -> None:
    assert ceiling.batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert ceiling.batch_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert ceiling.batch_sizes(1) == [1]


def test_batch_count_difference_keeps_only_new_batches() -> None:
    before = {1: 10, 2: 5}
    after = {1: 10, 2: 9, 4: 3}
    assert modelstats.difference(after, before) == {2: 4, 4: 3}
    assert modelstats.mean_batch_size({2: 4, 4: 3}) == pytest.approx(20 / 7)


def test_p99_at_equal_throughput_is_the_best_point_that_keeps_up() -> None:
    points = [
        {"concurrency": 1, "images_per_s": 10.0, "latency_ms": {"p99": 20.0}},
        {"concurrency": 2, "images_per_s": 30.0, "latency_ms": {"p99": 40.0}},
        {"concurrency": 4, "images_per_s": 29.0, "latency_ms": {"p99": 90.0}},
        {"concurrency": 8, "images_per_s": None},
    ]
    assert report.p99_at_throughput(points, 5.0) == 20.0
    assert report.p99_at_throughput(points, 20.0) == 40.0
    assert report.p99_at_throughput(points, 31.0) is None


def test_ceiling_keeps_the_faster_pass_per_batch_size() -> None:
    def point(b: int, ips: float) -> ceiling.BatchPoint:
        return ceiling.BatchPoint(b, 5, ips, {"p50": b / ips * 1e3})

    slow_then_fast = ceiling.Ceiling("m", "CPU", 2, [point(1, 50.0), point(2, 70.0)])
    fast_then_slow = ceiling.Ceiling("m", "CPU", 2, [point(1, 55.0), point(2, 60.0)])
    best = ceiling.best_of([slow_then_fast, fast_then_slow])
    assert [p.images_per_s for p in best.points] == [55.0, 70.0]
    assert best.images_per_s == 70.0 and best.batch1_latency_ms == pytest.approx(1 / 55 * 1e3)


@pytest.mark.slow
@pytest.mark.integration
def test_quick_benchmark_writes_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    results_path = tmp_path / "results.json"
    run = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "bench",
            "BENCH_QUICK=1",
            f"BENCH_ARGS=--out {out} --results {results_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    results = json.loads(results_path.read_text())
    assert results["meta"]["quick"] is True
    names = [m["name"] for m in results["models"]]
    assert names and names[0] == "digits"
    text = out.read_text()
    for model in results["models"]:
        assert [p["batch_size"] for p in model["ceiling"]["points"]] == ceiling.batch_sizes(
            model["max_batch_size"]
        )
        assert all(p["images_per_s"] > 0 for p in model["ceiling"]["points"])
        assert model["peer"] is None  # quick mode never installs or starts the peer
        assert_measured(model["svertka"]["perf"], f"{model['name']}: perf_analyzer")
        for point in model["svertka"]["perf"]:
            if point["images_per_s"]:
                assert sum(point["batches"].values()) > 0  # ModelStatistics moved during the run
                # CPU metered over the same run: both sides worked, divided by the images the server counted.
                use = point["cpu"]
                assert use["images"] == modelstats.images({int(k): v for k, v in point["batches"].items()})
                assert use["server_s"] > 0 and use["client_s"] > 0 and use["wall_s"] > 0
        for closed in model["svertka"]["image"]["closed"]:
            assert closed["completed"] > 0 and not closed["errors"], closed
            assert closed["cpu"]["images"] >= closed["completed"] and closed["cpu"]["server_s"] > 0
        assert all(p["cpu_ms_per_image"] > 0 for p in model["ceiling"]["points"])
        pairs = model["svertka"][
            "paired"
        ]  # one round: a ceiling window, then perf_analyzer at the best level
        assert len(pairs["ceiling"]) == len(pairs["served"]) == 1 and pairs["ceiling"][0] > 0
        assert pairs["concurrency"] in (1, 4) and pairs["ceiling_batch"][0] in {
            p["batch_size"] for p in model["ceiling"]["points"]
        }
        # the same round with the image API's closed loop
        image_pairs = model["svertka"]["paired_image"]
        assert len(image_pairs["ceiling"]) == len(image_pairs["served"]) == 1
        assert image_pairs["concurrency"] in (1, 4) and image_pairs["served"][0] > 0
        # one round: onnxruntime at batch 1, then perf_analyzer at concurrency 1
        c1 = model["svertka"]["paired_c1"]
        assert len(c1["raw_p50"]) == 1 and c1["raw_p50"][0] > 0 and list(c1["served_p50"]) == ["unary"]
        if c1["served_p50"]["unary"] is not None:
            assert c1["overhead_ms"]["unary"] == [c1["served_p50"]["unary"][0] - c1["raw_p50"][0]]
        for search in (model["svertka"]["tensor_rate"], model["svertka"]["image"]["rate"]):
            assert search["tried"] and all(r["completed"] > 0 for r in search["tried"])
        assert f"### {model['label']}" in text
        for kind in ("throughput", "latency", "batches"):
            png = tmp_path / "img" / "benchmarks" / f"{model['name']}-{kind}.png"
            assert f"(img/benchmarks/{png.name})" in text
            with Image.open(png) as image:
                assert image.format == "PNG" and image.width > 400 and image.height > 300
    frontend = results["frontend"]  # the null model: svertka's frontend without compute
    assert frontend["peer"] is None and [p["concurrency"] for p in frontend["svertka"]] == [1, 4]
    assert_measured(frontend["svertka"], "frontend alone")
    assert "## Frontend alone" in text
    # the shared memory pass ran through perf_analyzer --shared-memory system and is reported
    passes = [m["svertka"]["perf_shm"] for m in results["models"]] + [frontend["svertka_shm"]]
    for points in passes:
        assert [p["concurrency"] for p in points] == [1]
        assert all("--shared-memory system" in p["command"] for p in points)
    assert_measured([p for points in passes for p in points], "shared memory")
    assert "## Same-host clients: system shared memory" in text
    # and the streaming pass through perf_analyzer --streaming (ModelStreamInfer)
    passes = [m["svertka"]["perf_stream"] for m in results["models"]] + [frontend["svertka_stream"]]
    for points in passes:
        assert [p["concurrency"] for p in points] == [1]
        assert all(p["command"].endswith("--streaming") for p in points)
    assert_measured([p for points in passes for p in points], "streaming")
    assert "## Throughput clients: the streaming RPC" in text
    assert "## CPU time per image" in text
    # --frontends 1 against 2, one round in quick mode, on the digits models of the run
    processes = results["processes"]
    assert list(processes["pairs"]) == ["digits"]  # quick mode: one model
    for name, layouts in processes["pairs"].items():
        for layout in ("1", "2"):
            (window,) = layouts["windows"][layout]
            assert window["images_per_s"] and window["server_cpu_ms_per_image"] > 0, (name, layout, window)
        # both frontends of the two-process layout are running; the one-process layout has none
        assert len(layouts["windows"]["2"][0]["frontend_shares"]) == 2
        assert layouts["windows"]["1"][0]["frontend_shares"] == []
    assert "## One process or several (`--frontends 1` against `2`)" in text
    assert "## Served over ceiling, measured in pairs" in text  # one round per model in quick mode
    assert "| image (JPEG) |" in text  # and its image-API row
    if any(m["svertka"]["paired_c1"]["summary"] for m in results["models"]):
        assert "## Concurrency-1 overhead, measured in pairs" in text
        assert (
            "median of 1 rounds in pairs" in text
        )  # the concurrency-1 target's verdict comes from the round
    assert "## Headline" in text and "Quick mode" in text
    assert "## GPU" in text and "(benchmarks-gpu.md)" in text
