"""Loading models: bad settings, version directories, leaks on failure, and which weights answer.

Each model stands alone: a bad config or a misnamed version directory makes
that model UNAVAILABLE with the reason while the others serve; a load that
fails at any stage keeps no session and no thread; and the served model
reports the sha256 of the file it loaded, so a file replaced in place shows.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from service import config, errors, layout
from service.engine import interface, loading, runtime, served_model
from service.engine.repository import ModelRepository
from service.metrics import Metrics
from tests.helpers.polling import until
from tests.helpers.tinymodel import make_repository, make_tiny_model

#: config.yaml text -> what the model's unavailability reason must say.
BAD_CONFIGS = {
    "inf-pixels": ("max_image_pixels: .inf\n", "max_image_pixels: expected an integer from 1 to"),
    "nan-queue": ("max_queue_size: .nan\n", "max_queue_size: expected an integer from 1 to 2147483647, got nan"),
    "float-batch": ("max_batch_size: 4.0\n", "max_batch_size: expected an integer from 1 to 2147483647, got 4.0"),
    "bool-batch": ("max_batch_size: true\n", "got True (boolean)"),
    "string-instances": ('instances: "2"\n', "instances: expected an integer from 1 to 64, got '2' (string)"),
    "inf-delay": ("max_queue_delay_ms: .inf\n", "max_queue_delay_ms: expected a finite number"),
    "huge-version": ("version: 99999999999999999999999\n", "version: expected an integer from 1 to"),
    "providers-string": ("providers: cpu\n", "providers: expected a list of provider names"),
    "float-sizes": ("preferred_batch_sizes: [1.5]\n", "preferred_batch_sizes: expected a list of batch sizes"),
    "non-string-key": ("1: 2\n", "unknown settings [1]"),
    "finite-option": ("reject_non_finite_inputs: yes please\n", "reject_non_finite_inputs: expected true or false"),
    "not-a-mapping": ("[1, 2]\n", "expected a mapping of settings, got list"),
}  # fmt: skip


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def new_metrics() -> Metrics:
    return Metrics(process_metrics=False, gpu_metrics=False)


def threads() -> int:
    """Threads of this process, native ones included (onnxruntime's intra-op pools)."""
    return len(os.listdir("/proc/self/task"))


async def settled_threads(target: int, timeout_s: float = 20.0) -> int:
    """Poll until the thread count is back to ``target`` (or the deadline passes); the last count."""
    deadline = time.monotonic() + timeout_s
    while (count := threads()) != target and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return count


def test_bad_configs_make_only_their_model_unavailable(tmp_path):
    repo = make_repository(tmp_path, {"good": [1], **{name: [1] for name in BAD_CONFIGS}})
    for name, (text, _) in BAD_CONFIGS.items():
        (repo / name / "config.yaml").write_text(text)

    async def main():
        manager = ModelRepository(repo, new_metrics())
        await manager.start()  # must not raise
        statuses = {s.name: s for s in manager.statuses()}
        out = await manager.get("good").infer_tensor(np.zeros((1, 3, 32, 32), np.float32))
        await manager.close()
        return statuses, out

    statuses, out = run(main())
    assert statuses["good"].state == interface.READY and out.shape == (1, 10)
    for name, (_, reason) in BAD_CONFIGS.items():
        status = statuses[name]
        assert status.state == interface.UNAVAILABLE, status
        assert status.reason.startswith("bad config: ") and reason in status.reason, status


def test_a_failure_after_the_sessions_loaded_closes_them_and_keeps_no_thread(tmp_path, monkeypatch):
    repo = make_repository(tmp_path, {"tiny": [1]})
    loaded: list[runtime.Session] = []
    real_load = runtime.load_instances

    def recording_load(*args):
        sessions = real_load(*args)
        loaded.extend(sessions)
        return sessions

    class BrokenPreprocessor:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("preprocessor construction failed")

    monkeypatch.setattr(runtime, "load_instances", recording_load)
    monkeypatch.setattr(served_model, "Preprocessor", BrokenPreprocessor)

    async def main():
        manager = ModelRepository(repo, new_metrics(), cpu_budget=2)
        await manager.start()
        first = manager.status("tiny")
        before = await settled_threads(threads())
        for _ in range(20):
            status = await manager.load("tiny")
            assert status.state == interface.UNAVAILABLE
        after = await settled_threads(before)
        await manager.close()
        return first, before, after

    first, before, after = run(main())
    assert first.state == interface.UNAVAILABLE and "preprocessor construction failed" in first.reason
    assert len(loaded) == 21 and all(s._session is None and not s._by_size for s in loaded)
    assert after == before


def test_a_failed_second_instance_closes_the_first(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    make_tiny_model(path)
    opened: list[runtime.Session] = []
    real_warm_up = runtime.Session.warm_up

    def warm_up(self, max_batch_size):
        opened.append(self)
        if self.instance == 1:
            raise runtime.ModelLoadError("warm-up of instance 1 failed")
        return real_warm_up(self, max_batch_size)

    monkeypatch.setattr(runtime.Session, "warm_up", warm_up)
    settings = config.ModelSettings(instances=2, max_batch_size=2, providers=("cpu",))
    with pytest.raises(runtime.ModelLoadError, match="instance 1"):
        runtime.load_instances(path, settings, cpu_budget=2)
    assert [s.instance for s in opened] == [0, 1]
    assert all(s._session is None for s in opened)


@pytest.mark.parametrize("bad", ["99999999999999999999999", "²", "01", "0", "9223372036854775808"])
def test_version_directories_that_break_the_rule_are_skipped(tmp_path, bad):
    repo = make_repository(tmp_path, {"tiny": [1], "only": []})
    make_tiny_model(repo / "tiny" / bad / "model.onnx", seed=7)
    make_tiny_model(repo / "only" / bad / "model.onnx", seed=7)

    async def main():
        manager = ModelRepository(repo, new_metrics())
        await manager.start()
        tiny = manager.get("tiny")
        out = await tiny.infer_tensor(np.zeros((1, 3, 32, 32), np.float32))
        only = manager.status("only")
        await manager.close()
        return tiny.version, out, only

    version, out, only = run(main())
    assert version == 1 and out.shape == (1, 10)  # the misnamed directory is not a newer version
    assert only.state == interface.UNAVAILABLE and only.reason.startswith("no versions: expected ")
    assert layout.VERSION_RULE in only.reason
    if bad.isdigit():  # "0" and "01" and the overflowing ones are named in the reason
        assert f"skipped {bad!r}" in only.reason, only.reason


def test_the_largest_version_is_served(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})
    make_tiny_model(repo / "tiny" / str(layout.MAX_VERSION) / "model.onnx", seed=3)

    async def main():
        manager = ModelRepository(repo, new_metrics())
        await manager.start()
        model = manager.get("tiny", str(layout.MAX_VERSION))
        out = await model.infer_tensor(np.zeros((1, 3, 32, 32), np.float32))
        await manager.close()
        return model.version, out

    version, out = run(main())
    assert version == layout.MAX_VERSION and out.shape == (1, 10)


def _info(metrics: Metrics, sha256: str) -> float | None:
    labels = {
        "model": "tiny",
        "version": "1",
        "provider": "CPUExecutionProvider",
        "precision": "fp32",
        "arch": "tinycnn",
        "sha256": sha256,
    }
    return metrics.registry.get_sample_value("svertka_model_info", labels)


def _replace(path: Path, seed: int) -> None:
    staging = path.with_name(".staging.onnx")
    make_tiny_model(staging, seed=seed)
    os.replace(staging, path)


def test_the_fingerprint_follows_a_file_replaced_in_place(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})
    path = repo / "tiny" / "1" / "model.onnx"
    first = loading.file_fingerprint(path)
    metrics = new_metrics()

    async def main():
        manager = ModelRepository(repo, metrics)
        await manager.start()
        seen = [(manager.get("tiny").sha256, _info(metrics, first))]
        _replace(path, seed=11)  # same version label, different weights
        await manager.load("tiny")  # what RepositoryModelLoad does
        second = loading.file_fingerprint(path)
        seen.append((manager.get("tiny").sha256, _info(metrics, second), _info(metrics, first)))
        _replace(path, seed=12)
        await manager.refresh()  # what repository polling does
        third = loading.file_fingerprint(path)
        seen.append((manager.get("tiny").sha256, _info(metrics, third), _info(metrics, second)))
        await manager.close()
        return seen, second, third

    seen, second, third = run(main())
    assert len(first) == loading.FINGERPRINT_CHARS and len({first, second, third}) == 3
    assert seen[0] == (first, 1.0)
    assert seen[1] == (second, 1.0, None)  # one info series per version: the old fingerprint is gone
    assert seen[2] == (third, 1.0, None)


def test_the_load_time_of_each_ready_version_is_exported_and_goes_with_it(tmp_path, caplog):
    """svertka_model_load_seconds: file to ready (sessions, and the warm-up where TensorRT builds
    its engines); the warm-up's time per batch size is logged."""
    repo = make_repository(tmp_path, {"tiny": [1, 2]})
    metrics = new_metrics()

    def load_seconds(version: int) -> float | None:
        return metrics.registry.get_sample_value(
            "svertka_model_load_seconds", {"model": "tiny", "version": str(version)}
        )

    async def main():
        manager = ModelRepository(repo, metrics)
        with caplog.at_level("INFO", logger="service.engine.runtime"):
            await manager.start()
        loaded = load_seconds(2)
        (repo / "tiny" / "2" / "model.onnx").unlink()
        (repo / "tiny" / "2").rmdir()
        await manager.refresh()  # version 1 takes over; version 2's series go once it retires
        await until(lambda: load_seconds(2) is None, "version 2's load time removed")
        after = (load_seconds(1), load_seconds(2))
        await manager.close()
        return loaded, after

    loaded, (one, two) = run(main())
    assert loaded is not None and loaded > 0 and one is not None and one > 0 and two is None
    warm_ups = [r.getMessage() for r in caplog.records if "warm-up (kernels chosen" in r.getMessage()]
    assert warm_ups and "per batch size" in warm_ups[0]


def test_a_cancelled_load_closes_what_the_loader_thread_finishes(tmp_path, monkeypatch):
    import threading

    repo = make_repository(tmp_path, {"tiny": [1]})
    release = threading.Event()
    loaded: list[runtime.Session] = []
    real_load = runtime.load_instances

    def gated_load(*args):
        release.wait(30)
        sessions = real_load(*args)
        loaded.extend(sessions)
        return sessions

    monkeypatch.setattr(runtime, "load_instances", gated_load)

    async def main():
        manager = ModelRepository(repo, new_metrics())
        task = asyncio.ensure_future(manager.load("tiny"))
        loading = interface.ModelStatus("tiny", 1, interface.LOADING, "loading version 1")
        await until(lambda: loading in manager.statuses(), "the load to start", timeout_s=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        status = manager.status("tiny")
        release.set()
        await until(
            lambda: loaded and all(s._session is None for s in loaded),
            "the sessions loaded after the cancel to be closed",
            timeout_s=30,
        )
        await manager.close()
        return status

    status = run(main())
    assert status.state == interface.UNAVAILABLE and status.reason == "loading was cancelled"
    assert loaded and all(s._session is None for s in loaded)


def test_reasons_clients_see_name_paths_inside_the_repository_only(tmp_path):
    repo = make_repository(tmp_path / "repo", {"tiny": [1]})
    (repo / "empty").mkdir()

    async def scenario():
        manager = ModelRepository(repo, new_metrics())
        await manager.start()
        try:
            status = manager.status("empty")
            with pytest.raises(errors.ModelNotFound) as info:
                await manager.load("absent")
            return status, info.value.message
        finally:
            await manager.close()

    status, not_found = run(scenario())
    assert status.state == "UNAVAILABLE"
    assert status.reason.startswith("no versions: expected empty/<version>/model.onnx")
    assert str(tmp_path) not in status.reason and str(tmp_path) not in not_found
    assert not_found == "no model 'absent' in the repository"
