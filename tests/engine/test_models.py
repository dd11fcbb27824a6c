"""ModelRepository + ServedModel with the tiny real ONNX model and real onnxruntime.

Metrics are the real ``service.metrics.Metrics`` on a private registry, so the
assertions read what Prometheus would scrape.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service import errors
from service.engine import loading, served_model
from service.engine.interface import ModelStatus, Timings
from service.engine.loading import check_name
from service.engine.repository import ModelRepository
from service.engine.served_model import ServedModel
from service.metrics import Metrics
from tests.helpers.polling import until
from tests.helpers.tinymodel import make_repository, make_tiny_model, write_corrupt_model


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def new_metrics() -> Metrics:
    return Metrics(process_metrics=False, gpu_metrics=False)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def direct(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def png(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_config(repo: Path, name: str, text: str) -> None:
    (repo / name / "config.yaml").write_text(text)


async def started(repo: Path, **kwargs) -> tuple[ModelRepository, Metrics]:
    metrics = new_metrics()
    manager = ModelRepository(repo, metrics, **kwargs)
    await manager.start()
    return manager, metrics


def test_one_image_alone_equals_inside_a_batch_of_8(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})
    x = images(8)
    reference = direct(repo / "tiny/1/model.onnx", x)

    async def main():
        manager, metrics = await started(repo)
        model = manager.get("tiny")
        assert model.provider == "CPUExecutionProvider"
        whole = await model.infer_tensor(x)
        alone = [await model.infer_tensor(x[i : i + 1]) for i in range(8)]
        together = await asyncio.gather(*(model.infer_tensor(x[i : i + 1]) for i in range(8)))
        stats = await model.statistics()
        await manager.close()
        return whole, alone, together, stats

    whole, alone, together, stats = run(main())
    assert whole.shape == (8, 10) and whole.dtype == np.float32
    np.testing.assert_array_equal(whole, reference)
    for i in range(8):
        np.testing.assert_allclose(alone[i][0], reference[i], rtol=1e-5, atol=1e-5)
        # Concurrent callers are batched together and each gets exactly its own row.
        np.testing.assert_allclose(together[i][0], reference[i], rtol=1e-5, atol=1e-5)
        assert together[i].shape == (1, 10)
    assert stats.inference_count == 24
    assert stats.execution_count < stats.inference_count - 8  # the 8 concurrent rows shared batches


def test_image_api_decodes_each_image_and_isolates_bad_ones(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})
    good = [png(1), png(2), png(3)]

    async def main():
        manager, metrics = await started(repo)
        model = manager.get("tiny")
        timings = Timings()
        results = await model.infer_images([good[0], b"not an image", good[1], good[2]], timings=timings)
        expected = np.stack([model.preprocessor(g) for g in good])
        bad_count = sample(
            metrics, "svertka_rejections_total", model="tiny", version="1", reason="invalid_input"
        )
        await manager.close()
        return results, expected, timings, bad_count

    results, expected, timings, bad_count = run(main())
    assert isinstance(results[1], errors.InvalidInput) and "not an image" in str(results[1])
    reference = direct(repo / "tiny/1/model.onnx", expected)
    for got, want in zip([results[0], results[2], results[3]], reference, strict=True):
        assert got.shape == (10,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert timings.preprocess_s > 0 and timings.compute_s > 0
    assert bad_count == 1


def test_timings_travel_in_the_object_the_caller_passes(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})

    async def main():
        manager, _ = await started(repo)
        timings = Timings()
        await manager.get("tiny").infer_tensor(images(2), timings=timings)
        await manager.close()
        return timings

    seen = run(main())
    assert seen.compute_infer_s > 0 and seen.queue_s >= 0 and seen.preprocess_s == 0


def test_tensor_validation_messages(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})
    write_config(repo, "tiny", "max_rows_per_request: 4\nreject_non_finite_inputs: true\n")

    async def main():
        manager, metrics = await started(repo)
        model = manager.get("tiny")
        cases = {
            "expected FP32 data, got float64": images(1).astype(np.float64),
            r"expected FP32 shape \[N,3,32,32\], got \[1,3,32,31\]": images(1)[..., :31],
            r"expected FP32 shape \[N,3,32,32\], got \[3,32,32\]": images(1)[0],
            "batch of 5 rows; expected 1 to 4 rows": images(5),
            r"batch dimension must be >= 1, got \[0,3,32,32\]": images(0),
        }
        for message, x in cases.items():
            with pytest.raises(errors.InvalidInput, match=message):
                await model.infer_tensor(x)
        bad = images(2)
        bad[1, 0, 0, 0] = np.nan
        bad[0, 1, 2, 3] = np.inf
        with pytest.raises(errors.InvalidInput, match="2 values are NaN or infinite"):
            await model.infer_tensor(bad)
        with pytest.raises(errors.InvalidInput, match=r"batch of 5 rows; expected 1 to 4 rows per request"):
            await model.infer_images([png(0)] * 5)
        with pytest.raises(errors.InvalidInput, match="top_k must be >= 1, got 0"):
            model.top_k(np.zeros(10, np.float32), 0)
        count = sample(metrics, "svertka_rejections_total", model="tiny", version="1", reason="invalid_input")
        await manager.close()
        return count

    assert run(main()) == 7


def test_large_tensors_are_checked_off_the_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(served_model, "INLINE_CHECK_ELEMENTS", 0)
    repo = make_repository(tmp_path, {"tiny": [1]})
    write_config(repo, "tiny", "reject_non_finite_inputs: true\n")
    x = images(3)

    async def main():
        manager, _ = await started(repo)
        model = manager.get("tiny")
        out = await model.infer_tensor(x)
        bad = x.copy()
        bad[2, 2, 2, 2] = np.nan
        with pytest.raises(errors.InvalidInput, match="1 values are NaN or infinite"):
            await model.infer_tensor(bad)
        depth = model.batcher.queued_rows
        await manager.close()
        return out, depth

    out, depth = run(main())
    np.testing.assert_array_equal(out, direct(repo / "tiny/1/model.onnx", x))
    assert depth == 0  # the reservation taken for the rejected tensor was released


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "large"])
def test_non_finite_inputs_are_computed_by_default_without_a_scan(tmp_path, monkeypatch, inline):
    """As Triton does: NaN/Inf rows are computed; the finite scan does not run at all (either path)."""
    if not inline:
        monkeypatch.setattr(served_model, "INLINE_CHECK_ELEMENTS", 0)

    def no_scan(self, x):
        raise AssertionError("the finite check ran although reject_non_finite_inputs is off")

    monkeypatch.setattr(ServedModel, "_check_finite", no_scan)
    repo = make_repository(tmp_path, {"tiny": [1]})
    x = images(2)
    x[0, 0, 0, 0] = np.nan
    x[1, 1, 1, 1] = np.inf

    async def main():
        manager, _ = await started(repo)
        model = manager.get("tiny")
        out = await model.infer_tensor(x)
        checked = model.check_tensor(x)
        option = model.settings.reject_non_finite_inputs
        await manager.close()
        return out, checked, option

    out, checked, option = run(main())
    assert option is False and checked.shape == x.shape
    assert out.shape == (2, 10)
    np.testing.assert_array_equal(out, direct(repo / "tiny/1/model.onnx", x))  # NaN where onnxruntime has NaN


def test_top_k_scores_and_order(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]}, labels=["a", "b", "c"], num_classes=3)

    async def main():
        manager, _ = await started(repo)
        model = manager.get("tiny")
        await manager.close()
        return model

    model = run(main())
    logits = np.array([1.0, 3.0, 1.0], np.float32)
    top = model.top_k(logits, 2)
    p = np.exp(logits - 3.0) / np.exp(logits - 3.0).sum()
    assert [(i, label) for i, label, _ in top] == [(1, "b"), (0, "a")]  # tie: lower index first
    assert top[0][2] == pytest.approx(p[1]) and top[1][2] == pytest.approx(p[0])
    assert len(model.top_k(logits, 50)) == 3  # more than the classes: all of them


def test_corrupt_models_are_unavailable_with_a_reason_while_others_serve(tmp_path):
    repo = make_repository(tmp_path, {"good": [1]})
    write_corrupt_model(repo / "garbage/1/model.onnx", "garbage")
    write_corrupt_model(repo / "classes/1/model.onnx", "wrong_classes")
    write_corrupt_model(repo / "badmeta/1/model.onnx", "bad_metadata")
    (repo / "empty").mkdir()
    (repo / "badconfig/1").mkdir(parents=True)
    make_tiny_model(repo / "badconfig/1/model.onnx")
    write_config(repo, "badconfig", "max_batch_size: 0\n")
    (repo / "gpu/1").mkdir(parents=True)
    make_tiny_model(repo / "gpu/1/model.onnx")
    write_config(repo, "gpu", "providers: [cuda]\n")
    changes: list[ModelStatus] = []

    async def main():
        metrics = new_metrics()
        manager = ModelRepository(repo, metrics)
        manager.add_listener(changes.append)
        await manager.start()
        statuses = {s.name: s for s in manager.statuses()}
        out = await manager.get("good").infer_tensor(images(1))
        with pytest.raises(
            errors.ModelNotReady, match="model 'garbage' is unavailable: version 1: onnxruntime"
        ):
            manager.get("garbage")
        ready = sample(metrics, "svertka_model_ready", model="good", version="1")
        # Operators see the broken model as not ready; once a good version lands, that series goes.
        assert (
            metrics.registry.get_sample_value("svertka_model_ready", {"model": "garbage", "version": "1"})
            == 0
        )
        make_tiny_model(repo / "garbage/2/model.onnx")
        assert (await manager.load("garbage")).state == "READY"
        assert (
            metrics.registry.get_sample_value("svertka_model_ready", {"model": "garbage", "version": "1"})
            is None
        )
        assert sample(metrics, "svertka_model_ready", model="garbage", version="2") == 1
        await manager.close()
        return statuses, out, ready

    statuses, out, ready = run(main())
    assert out.shape == (1, 10) and ready == 1.0
    assert statuses["good"] == ModelStatus("good", 1, "READY", "")
    expected = {
        "garbage": "Protobuf parsing failed",
        "classes": "output 'logits' has 10 classes but the metadata lists 3 labels",
        "badmeta": "bad svertka metadata: metadata is missing svertka.labels",
        "empty": "no versions: expected",
        "badconfig": "bad config: ",
        "gpu": "providers ['cuda'] were requested but this onnxruntime",
    }
    for name, reason in expected.items():
        assert statuses[name].state == "UNAVAILABLE", statuses[name]
        assert reason in statuses[name].reason, statuses[name]
    # Listeners saw LOADING then the outcome for each model.
    assert ModelStatus("good", 1, "LOADING", "loading version 1") in changes
    assert changes.index(ModelStatus("good", 1, "LOADING", "loading version 1")) < changes.index(
        statuses["good"]
    )


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="needs a CPU-only onnxruntime"
)
def test_default_providers_fall_back_to_cpu_loudly(tmp_path, caplog):
    repo = make_repository(tmp_path, {"tiny": [1]})

    async def main():
        manager, metrics = await started(repo)
        provider = manager.get("tiny").provider
        info = sample(
            metrics,
            "svertka_model_info",
            model="tiny",
            version="1",
            provider="CPUExecutionProvider",
            precision="fp32",
            arch="tinycnn",
            sha256=loading.file_fingerprint(repo / "tiny/1/model.onnx"),
        )
        await manager.close()
        return provider, info

    with caplog.at_level("INFO"):
        provider, info = run(main())
    assert provider == "CPUExecutionProvider" and info == 1.0
    assert "on CPUExecutionProvider" in caplog.text


def test_version_selection(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1, 2, 10], "pinned": [1, 2]})
    write_config(repo, "pinned", "version: 1\n")
    (repo / "tiny/notaversion").mkdir()

    async def main():
        manager, _ = await started(repo)
        newest = manager.get("tiny")
        assert newest.version == 10  # numeric, not lexicographic
        assert manager.get("tiny", "10") is newest and manager.get("tiny", 10) is newest
        assert manager.get("tiny", "") is newest
        with pytest.raises(
            errors.ModelNotReady, match="model 'tiny' version 2 is not loaded .version 10 is serving"
        ):
            manager.get("tiny", 2)
        with pytest.raises(
            errors.ModelNotFound, match=r"has no version 5 \(versions in the repository: 1, 2, 10\)"
        ):
            manager.get("tiny", "5")
        with pytest.raises(errors.ModelNotFound, match="has no version 'latest'"):
            manager.get("tiny", "latest")
        with pytest.raises(
            errors.ModelNotFound, match=r"model 'nope' is not in the repository \(models: pinned, tiny\)"
        ):
            manager.get("nope")
        assert manager.get("pinned").version == 1
        await manager.close()

    run(main())


@pytest.mark.parametrize(
    "name", ["../tiny", "tiny/1", "..", ".hidden", "", "a" * 200, "ti\x00ny", "a/../../etc"]
)
def test_model_names_cannot_reach_outside_the_repository(tmp_path, name):
    with pytest.raises(errors.ModelNotFound, match="invalid model name"):
        check_name(name)

    async def main():
        manager, _ = await started(make_repository(tmp_path / "repo", {"tiny": [1]}))
        with pytest.raises(errors.ModelNotFound, match="invalid model name"):
            manager.get(name)
        with pytest.raises(errors.ModelNotFound, match="invalid model name"):
            await manager.load(name)
        await manager.close()

    run(main())


def test_runtime_failure_fails_only_its_batch(tmp_path):
    make_tiny_model(tmp_path / "tiny/1/model.onnx", fail_above=1000.0)

    async def main():
        manager, metrics = await started(tmp_path)
        model = manager.get("tiny")
        poisoned = images(1)
        poisoned[0, 0, 0, 0] = 5000.0
        with pytest.raises(errors.InferenceFailed, match="inference failed on a batch of 1 rows: .*Reshape"):
            await model.infer_tensor(poisoned)
        after = await model.infer_tensor(images(3))
        stats = await model.statistics()
        await manager.close()
        return after, stats

    after, stats = run(main())
    assert after.shape == (3, 10) and np.isfinite(after).all()
    assert stats.execution_count == 1 and stats.inference_count == 3  # the failed batch is not counted


def test_deadline_and_overload_are_refused_before_compute(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})
    write_config(repo, "tiny", "max_queue_size: 2\n")

    async def main():
        manager, metrics = await started(repo)
        model = manager.get("tiny")
        with pytest.raises(errors.DeadlineExceeded):
            await model.infer_tensor(images(1), deadline=time.monotonic() - 0.1)
        with pytest.raises(errors.DeadlineExceeded):
            await model.infer_images([png(0)], deadline=time.monotonic() - 0.1)
        with pytest.raises(errors.Overloaded, match="can never fit the queue of 2 rows"):
            await model.infer_images([png(0)] * 3)
        stats = await model.statistics()
        deadline = sample(metrics, "svertka_rejections_total", model="tiny", version="1", reason="deadline")
        await manager.close()
        return stats, deadline

    stats, deadline = run(main())
    assert stats.execution_count == 0 and deadline == 2


def test_version_swap_loses_nothing_and_in_flight_requests_finish_on_their_version(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})
    x = images(4, seed=7)
    v1 = direct(repo / "tiny/1/model.onnx", x)

    async def main():
        manager, metrics = await started(repo)
        old = manager.get("tiny")
        failures: list[BaseException] = []
        answers: list[tuple[int, np.ndarray]] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            while not stop.is_set():
                model = manager.get("tiny")
                try:
                    out = await model.infer_tensor(x[i : i + 1])
                except Exception as exc:  # any failure during the swap is a bug
                    failures.append(exc)
                    return
                answers.append((model.version, i, out[0]))
                await asyncio.sleep(0)

        clients = [asyncio.create_task(client(i)) for i in range(4)]
        # Requests queued on version 1 right before the swap.
        queued_on_v1 = [asyncio.create_task(old.infer_tensor(x)) for _ in range(3)]
        make_tiny_model(repo / "tiny/2/model.onnx", seed=2)
        status = await manager.load("tiny")
        assert status == ModelStatus("tiny", 2, "READY", "")
        await until(
            lambda: any(v == 2 for v, _, _ in answers[-4:]), "the clients to get version 2", timeout_s=30
        )
        stop.set()
        await asyncio.gather(*clients)
        v1_results = await asyncio.gather(*queued_on_v1)
        # The old version is unloaded once its work is done; its series are dropped.
        await until(
            lambda: (
                not sample(metrics, "svertka_model_ready", model="tiny", version="1") and not old.in_flight
            ),
            "version 1 to finish its work and be unloaded",
            timeout_s=30,
        )
        with pytest.raises(errors.ModelNotReady, match="replaced or unloaded"):
            await old.infer_tensor(x[:1])
        with pytest.raises(errors.ModelNotReady, match="version 1 is not loaded"):
            manager.get("tiny", 1)
        await manager.close()
        return failures, answers, v1_results

    failures, answers, v1_results = run(main())
    assert failures == []
    v2 = direct(repo / "tiny/2/model.onnx", x)
    assert not np.allclose(v1, v2)
    versions = {v for v, _, _ in answers}
    assert versions == {1, 2}
    for version, i, out in answers:
        np.testing.assert_allclose(out, (v1 if version == 1 else v2)[i], rtol=1e-5, atol=1e-5)
    for result in v1_results:
        np.testing.assert_allclose(result, v1, rtol=1e-5, atol=1e-5)


def test_failed_reload_keeps_the_serving_version(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})

    async def main():
        manager, _ = await started(repo)
        write_corrupt_model(repo / "tiny/2/model.onnx", "truncated")
        status = await manager.load("tiny")
        serving = manager.get("tiny")
        out = await serving.infer_tensor(images(1))
        listed = manager.statuses()
        await manager.close()
        return status, serving.version, out, listed

    status, version, out, listed = run(main())
    assert status.state == "UNAVAILABLE" and status.version == 2
    assert "still serving version 1" in status.reason
    assert version == 1 and out.shape == (1, 10)
    # still READY on version 1, saying why version 2 is not served (RepositoryIndex shows the reason)
    assert listed == [ModelStatus("tiny", 1, "READY", f"reload failed: {status.reason}")]


def test_repository_refresh_follows_the_disk(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})

    async def main():
        manager, metrics = await started(repo)
        # A new model and a new version appear (written then renamed: atomic, as deployments should).
        make_tiny_model(tmp_path / "staging/model.onnx", seed=2)
        (repo / "tiny/2").mkdir()
        os.replace(tmp_path / "staging/model.onnx", repo / "tiny/2/model.onnx")
        make_repository(repo, {"other": [3]})
        await manager.refresh()
        assert manager.get("tiny").version == 2 and manager.get("other").version == 3
        await manager.refresh()  # nothing changed: nothing reloaded
        assert manager.get("tiny").version == 2
        # The serving version is removed: the next newest takes over.
        for f in (repo / "tiny/2").iterdir():
            f.unlink()
        (repo / "tiny/2").rmdir()
        await manager.refresh()
        assert manager.get("tiny").version == 1
        # A whole model is removed.
        for f in (repo / "other/3").iterdir():
            f.unlink()
        (repo / "other/3").rmdir()
        (repo / "other").rmdir()
        await manager.refresh()
        statuses = {s.name: s for s in manager.statuses()}
        # The last version of a model is removed: it stops serving.
        (repo / "tiny/1/model.onnx").unlink()
        await manager.refresh()
        with pytest.raises(errors.ModelNotReady, match="model 'tiny' is unavailable: no versions"):
            manager.get("tiny")
        await manager.close()
        return statuses

    statuses = run(main())
    assert statuses["tiny"] == ModelStatus("tiny", 1, "READY", "")
    assert (
        statuses["other"].state == "UNAVAILABLE" and statuses["other"].reason == "removed from the repository"
    )


def test_polling_picks_up_a_new_version(tmp_path):
    repo = make_repository(tmp_path, {"tiny": [1]})

    async def main():
        manager, _ = await started(repo, poll_interval_s=0.05)
        make_tiny_model(tmp_path / "staging.onnx", seed=5)
        (repo / "tiny/5").mkdir()
        os.replace(tmp_path / "staging.onnx", repo / "tiny/5/model.onnx")
        await until(lambda: manager.get("tiny").version == 5, "the poll to load version 5", timeout_s=30)
        await manager.close()

    run(main())


def test_unload_and_drain(tmp_path):
    repo = make_repository(tmp_path, {"a": [1], "b": [1]})
    changes: list[ModelStatus] = []

    async def main():
        manager, metrics = await started(repo)
        manager.add_listener(changes.append)
        await manager.unload("a")
        with pytest.raises(errors.ModelNotReady, match="model 'a' is unavailable: unloaded"):
            manager.get("a")
        assert (await manager.load("a")).state == "READY"  # reload after unload works
        model = manager.get("b")
        pending = [asyncio.create_task(model.infer_tensor(images(2, seed=i))) for i in range(20)]
        await asyncio.sleep(0)
        assert sample(metrics, "svertka_in_flight_requests", model="b", version="1") == 20
        await manager.drain(30)
        assert all(t.done() and t.exception() is None for t in pending)
        assert sample(metrics, "svertka_in_flight_requests", model="b", version="1") == 0
        with pytest.raises(errors.Draining):
            await model.infer_tensor(images(1))
        with pytest.raises(errors.Draining, match="shutting down"):
            await manager.load("a")
        await manager.close()

    run(main())
    assert changes[:2] == [
        ModelStatus("a", 1, "UNLOADING", "unloaded"),
        ModelStatus("a", 1, "UNAVAILABLE", "unloaded"),
    ]


def test_drain_during_start_up_starts_nothing_more(tmp_path):
    repo = make_repository(tmp_path, {"a": [1], "b": [1], "c": [1]})
    changes: list[ModelStatus] = []

    async def main():
        manager = ModelRepository(repo, new_metrics())
        draining: list[asyncio.Task] = []

        def on_change(status: ModelStatus) -> None:
            changes.append(status)
            if status.state == "LOADING" and not draining:
                # Shutdown begins while "a" is loading: the task runs before the load can finish.
                draining.append(asyncio.get_running_loop().create_task(manager.drain(5)))

        manager.add_listener(on_change)
        await manager.start()
        await draining[0]
        statuses = {s.name: s for s in manager.statuses()}
        with pytest.raises(errors.Draining):
            await manager.load("b")
        await manager.close()
        return statuses

    statuses = run(main())
    assert statuses["a"] == ModelStatus("a", 1, "UNAVAILABLE", "not started: the server is shutting down")
    assert set(statuses) == {"a"}  # b and c were never started


def test_drain_during_decode_warm_up_does_not_make_the_model_ready(tmp_path, monkeypatch):
    repo = make_repository(tmp_path, {"a": [1]})
    warming = threading.Event()
    release = threading.Event()
    real_warm_up = ServedModel.warm_up_decode

    def slow_warm_up(self):
        warming.set()
        release.wait(30)
        real_warm_up(self)

    monkeypatch.setattr(ServedModel, "warm_up_decode", slow_warm_up)

    async def main():
        manager = ModelRepository(repo, new_metrics())
        starting = asyncio.create_task(manager.start())
        await asyncio.to_thread(warming.wait, 30)
        await manager.drain(5)  # the model is past loading, inside its warm-up
        release.set()
        await starting
        statuses = manager.statuses()
        with pytest.raises(errors.ModelNotReady):
            manager.get("a")
        await manager.close()
        return statuses

    assert run(main()) == [ModelStatus("a", 1, "UNAVAILABLE", "not started: the server is shutting down")]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_instances_and_precisions_from_the_repository(tmp_path, precision):
    repo = make_repository(tmp_path, {"tiny": [1]}, precision=precision)
    write_config(repo, "tiny", "instances: 2\nmax_batch_size: 4\npreferred_batch_sizes: [2, 4]\n")
    x = images(6)
    reference = direct(repo / "tiny/1/model.onnx", x)

    async def main():
        manager, metrics = await started(repo)
        model = manager.get("tiny")
        outs = await asyncio.gather(*(model.infer_tensor(x[i : i + 1]) for i in range(6)))
        info = sample(
            metrics,
            "svertka_model_info",
            model="tiny",
            version="1",
            provider="CPUExecutionProvider",
            precision=precision,
            arch="tinycnn",
            sha256=loading.file_fingerprint(repo / "tiny/1/model.onnx"),
        )
        stats = await model.statistics()
        await manager.close()
        return model, outs, info, stats

    model, outs, info, stats = run(main())
    assert model.instances == 2 and info == 1.0
    assert stats.inference_count == 6 and set(stats.batch_stats) <= {1, 2, 3, 4}
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out[0], reference[i], rtol=1e-3, atol=1e-3)
