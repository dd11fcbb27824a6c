"""How batches reach onnxruntime: the staging buffer, padding, IO binding (CPU provider), page locking."""

from __future__ import annotations

import numpy as np
import pytest

from service import config
from service.engine import batch_run, pinned, runtime
from tests.helpers.tinymodel import make_tiny_model

SIZES = (2, 4, 8)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("binding") / "m.onnx"
    make_tiny_model(path, num_classes=7)
    return path


@pytest.fixture(scope="module")
def plain(model_path):
    return runtime.Session(model_path, config.ModelSettings(max_batch_size=8), threads=1)


@pytest.fixture()
def padded(model_path):
    settings = config.ModelSettings(max_batch_size=8, padded_batch_sizes=list(SIZES[:-1]))
    session = runtime.Session(model_path, settings, threads=1)
    yield session
    session.close()


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


class _Spy:
    """A real session that records how it was run: ``run`` (any shape) or a bound run."""

    def __init__(self, session) -> None:
        self._session = session
        self.plain_runs: list[tuple[int, ...]] = []
        self.bound_runs = 0

    def run(self, outputs, feeds):
        self.plain_runs.append(next(iter(feeds.values())).shape)
        return self._session.run(outputs, feeds)

    def run_with_iobinding(self, binding):
        self.bound_runs += 1
        return self._session.run_with_iobinding(binding)


def test_without_padding_on_the_cpu_there_is_no_staging_buffer(plain):
    assert plain.feed.capacity == 0 and plain.feed.sizes == ()
    a, b = _rows(2, 1), _rows(1, 2)
    staged = plain.stage([a, b])
    np.testing.assert_array_equal(staged, np.concatenate([a, b]))
    assert plain.stage([a]) is a  # one request's rows run as they came


def test_rows_are_gathered_into_one_reused_buffer_and_padding_rows_are_zero(padded):
    feed = padded.feed
    assert feed.capacity == 8 and feed.sizes == SIZES
    full = feed.stage([_rows(5, 1), _rows(3, 2)])  # 8 rows: the buffer is filled
    assert full.shape[0] == 8 and not (full == 0).all(axis=(1, 2, 3)).any()
    a, b = _rows(2, 3), _rows(1, 4)
    staged = feed.stage([a, b])  # 3 rows run as 4: the last row was data, now zero
    assert staged.shape[0] == 4 and np.shares_memory(staged, full)
    np.testing.assert_array_equal(staged[:3], np.concatenate([a, b]))
    assert (staged[3] == 0).all()


def test_bound_runs_read_the_staging_buffer_each_time_and_match_the_unpadded_session(padded, plain):
    """Every size from 1 to the largest: bound runs only (no session sees a new shape), outputs as unpadded."""
    spies = {size: _Spy(s) for size, s in padded.feed._by_size.items()}
    padded.feed._by_size = spies
    for n in range(1, 9):
        x = _rows(n, 10 + n)  # different rows each time: a binding that copied at bind time would fail
        batch = padded.stage([x[: n // 2], x[n // 2 :]])
        got = padded.run_staged(batch)
        assert got.shape == (padded.feed.padded_size(n), 7)
        np.testing.assert_allclose(got[:n], plain.run(x), rtol=0, atol=1e-5)
    assert all(spy.plain_runs == [] for spy in spies.values())
    assert {size: spy.bound_runs for size, spy in spies.items()} == {2: 2, 4: 2, 8: 4}


def test_a_batch_larger_than_the_largest_size_runs_in_chunks_of_that_size(padded, plain):
    spies = {size: _Spy(s) for size, s in padded.feed._by_size.items()}
    padded.feed._by_size = spies
    x = _rows(19, 5)  # one request larger than max_batch_size runs alone: 8 + 8 + 3 (as 4)
    np.testing.assert_allclose(padded.run(x), plain.run(x), rtol=0, atol=1e-5)
    assert {size: spy.bound_runs for size, spy in spies.items()} == {2: 0, 4: 1, 8: 2}
    assert all(spy.plain_runs == [] for spy in spies.values())


def test_compute_counts_the_requests_rows_and_splits_off_the_padding(padded, plain):
    a, b = _rows(2, 6), _rows(1, 7)
    outputs, info = batch_run.compute(padded, [a, b])
    assert info.size == 3 and [o.shape for o in outputs] == [(2, 7), (1, 7)]
    np.testing.assert_allclose(np.concatenate(outputs), plain.run(np.concatenate([a, b])), rtol=0, atol=1e-5)
    outputs, _ = batch_run.compute(padded, [_rows(3, 8)])  # the next batch reuses the buffer ...
    np.testing.assert_allclose(outputs[0][:1], plain.run(_rows(3, 8))[:1], rtol=0, atol=1e-5)
    assert not np.shares_memory(outputs[0], padded.feed._staging)  # ... and no answer is a view of it


def test_a_bare_run_function_still_gets_the_rows_concatenated():
    seen = []

    def run(batch):
        seen.append(batch.shape)
        return batch[:, :1]

    outputs, info = batch_run.compute(batch_run.as_runner(run), [np.ones((2, 3)), np.zeros((1, 3))])
    assert seen == [(3, 3)] and info.size == 3 and [o.tolist() for o in outputs] == [[[1.0], [1.0]], [[0.0]]]


def test_page_locking_without_a_gpu_is_refused_with_the_reason():
    registration, why = pinned.register(np.zeros((4, 16), np.float32))
    assert registration is None
    # Without cuda-python: says to install it; with it but no driver or device: the CUDA error's name.
    assert "cuda-python (cuda.bindings) is not installed" in why or why.startswith(
        "cudaHostRegister of 256 bytes failed: cudaError"
    )
    with pytest.raises(ValueError, match="C-contiguous"):
        pinned.register(np.zeros((4, 16), np.float32)[:, ::2])


def test_cuda_graphs_are_refused_where_they_cannot_apply(model_path):
    with pytest.raises(
        config.ConfigError, match=r"cuda_graphs: true needs padded batch sizes .*padded_batch_sizes is \[\]"
    ):
        config.ModelSettings(cuda_graphs=True, padded_batch_sizes=[])
    with pytest.raises(config.ConfigError, match="cuda_graphs: expected true or false, got 'yes'"):
        config.ModelSettings(cuda_graphs="yes")
    settings = config.ModelSettings(cuda_graphs=True, providers=["cpu"])
    with pytest.raises(
        runtime.CudaGraphSettingError,
        match="needs the CUDA execution provider and this model would run on CPUExecutionProvider",
    ):
        runtime.Session(model_path, settings, threads=1)
    # A wrong setting is the load's failure, never retried without graphs.
    with pytest.raises(runtime.CudaGraphSettingError):
        runtime.load_instances(model_path, settings, cpu_budget=1)
