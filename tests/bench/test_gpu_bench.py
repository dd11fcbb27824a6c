"""``python -m bench.gpu`` cannot rot: its pipeline runs on the CPU, and the GPU page is its data's rendering.

The GPU benchmark only means something on a GPU, which CI never has; the same
code with ``--providers cpu`` (a small resnet18, seconds per step) exports the
fp32 and fp16 models, measures the ceiling, serves each model and loads it
with perf_analyzer and the image client, so a change that breaks it fails
here and not on the next rare GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ceiling, gpu, gpu_report
from tests.bench.levels import assert_measured

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_benchmark_pipeline_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--providers", "cpu", "--arch", "resnet18", "--image-size", "64",
         "--quick", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["meta"]["providers"] == ["cpu"] and results["meta"]["finished"]
    models = {m["name"]: m for m in results["models"]}
    assert list(models) == ["resnet18", "resnet18-fp16", "resnet18-u8-fp16"]
    for name, m in models.items():
        assert "error" not in m, m.get("error")
        sizes = [p["batch_size"] for p in m["ceiling"]["points"]]
        assert sizes == ceiling.batch_sizes(gpu.QUICK.max_batch_size)
        assert m["ceiling"]["provider"] == "CPUExecutionProvider"
        # on a CPU, fp32 is served a second time with padded batch sizes off (on CUDA the fp16 model
        # gets every variant)
        variants = m["variants"]
        assert list(variants) == (["unpadded"] if name == "resnet18" else [])
        for key, points in [("perf", m["perf"]), ("perf_shm", m["perf_shm"])] + [
            (v, e["perf_shm"]) for v, e in variants.items()
        ]:
            assert [p["concurrency"] for p in points] == list(gpu.QUICK.concurrencies)
            assert_measured(points, f"{name} {key}")
        for v, e in variants.items():
            assert e["settings"]["padded_batch_sizes"] == [] and e["ceiling"]["points"], v
        assert all(r["completed"] > 0 and not r["errors"] for r in m["image"])
        precision = "fp16" if name.endswith("fp16") else "fp32"
        assert any(f'precision="{precision}"' in line for line in m["model_info"])
    # svertka serve --frontends N on the null model and the fp16 model
    sweeps = results["frontends"]
    assert list(sweeps) == ["null"]  # quick mode; a full run also sweeps the fp16 model
    for name, points in sweeps.items():
        assert [p["frontends"] for p in points] == list(gpu.QUICK.frontends), name
        for p in points:
            assert p["images_per_s"] and p["server_cpu_ms_per_request"] and not p["error"], (name, p)
    agreement = results["decode_agreement"]  # nvImageCodec's CPU backend here
    assert agreement["backend"] == "cpu" and agreement["digits_images"] > 0, agreement
    assert 0 <= agreement["digits_top1_agreement"] <= 1 and agreement["photos"] > 0
    page = (tmp_path / "benchmarks-gpu.md").read_text()
    assert "| resnet18 |" in page and "| resnet18-fp16 |" in page and "padded batch sizes off" in page
    assert "One setting changed from the baseline" in page and "JPEG decoders: `--image-decoder cpu`" in page
    assert "--frontends N" in page and "| null | 2 |" in page


def test_the_gpu_page_is_the_rendering_of_its_results_files() -> None:
    runs = gpu_report.committed_runs()
    assert runs, "docs/gpu holds the GPU runs"
    rendered = gpu_report.render(runs)
    assert (REPO / "docs" / "benchmarks-gpu.md").read_text() == rendered
