"""Provider selection and the load-time checks of a model file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from service import config, modelmeta
from service.engine import runtime
from tests.helpers.tinymodel import build_tiny_model, make_tiny_model, tiny_meta

CPU, CUDA, TRT = runtime.CPU, runtime.CUDA, runtime.TENSORRT


def settings(*providers: str) -> config.ModelSettings:
    return config.ModelSettings(providers=providers) if providers else config.ModelSettings()


def test_default_providers_take_what_the_build_has_in_order():
    assert runtime.resolve_providers(settings(), available=[CPU]) == [CPU]
    assert runtime.resolve_providers(settings(), available=[CPU, CUDA]) == [CUDA, CPU]
    assert runtime.resolve_providers(settings(), available=[TRT, CUDA, CPU]) == [TRT, CUDA, CPU]


def test_explicit_gpu_provider_missing_is_an_error_not_a_cpu_fallback():
    with pytest.raises(runtime.ModelLoadError, match=r"providers \['tensorrt', 'cuda'\] were requested"):
        runtime.resolve_providers(settings("tensorrt", "cuda"), available=[CUDA, CPU])
    assert runtime.resolve_providers(settings("cuda", "cpu"), available=[CUDA, CPU]) == [CUDA, CPU]
    assert runtime.resolve_providers(settings("cpu"), available=[CUDA, CPU]) == [CPU]


def test_threads_are_shared_among_instances():
    cpus = config.default_intra_op_threads()
    assert runtime.intra_op_threads(config.ModelSettings()) == cpus
    assert runtime.intra_op_threads(config.ModelSettings(instances=2)) == max(1, cpus // 2)
    assert runtime.intra_op_threads(config.ModelSettings(intra_op_threads=3, instances=2)) == 3


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_session_runs_and_warms_up(tmp_path):
    make_tiny_model(tmp_path / "m.onnx", num_classes=7)
    session = runtime.Session(tmp_path / "m.onnx", config.ModelSettings(max_batch_size=4), threads=1)
    assert session.provider == CPU and session.meta.num_classes == 7
    assert set(session.warm_up(4)) == {1, 4}
    out = session.run(np.zeros((3, 3, 32, 32), np.float32))
    assert out.shape == (3, 7) and out.dtype == np.float32


def test_padded_sizes_auto_is_for_the_cuda_provider_and_a_list_applies_anywhere():
    auto = config.ModelSettings(max_batch_size=48)
    assert runtime.padded_sizes(auto, CUDA) == (1, 2, 4, 8, 16, 32, 48)
    assert runtime.padded_sizes(config.ModelSettings(max_batch_size=64), CUDA) == (1, 2, 4, 8, 16, 32, 64)
    assert runtime.padded_sizes(auto, CPU) == () and runtime.padded_sizes(auto, TRT) == ()
    listed = config.ModelSettings(max_batch_size=8, padded_batch_sizes=[4, 2])
    assert runtime.padded_sizes(listed, CPU) == (2, 4, 8)  # the largest batch always has a size
    assert runtime.padded_sizes(config.ModelSettings(padded_batch_sizes=[]), CUDA) == ()


def test_a_padded_session_answers_every_batch_size_as_the_unpadded_one_does(tmp_path):
    """Each padded size has its own onnxruntime session; a batch of 3 runs as 4 and comes back as 3 rows."""
    make_tiny_model(tmp_path / "m.onnx", num_classes=7)
    plain = runtime.Session(tmp_path / "m.onnx", config.ModelSettings(max_batch_size=8), threads=1)
    padded = runtime.Session(
        tmp_path / "m.onnx", config.ModelSettings(max_batch_size=8, padded_batch_sizes=[2, 4]), threads=1
    )
    assert plain.padded_sizes == () and padded.padded_sizes == (2, 4, 8)
    sessions = {id(s) for s in padded._by_size.values()}
    assert len(sessions) == 3 and id(padded._session) in sessions
    assert set(padded.warm_up(8)) == {1, 2, 4, 8}
    x = np.random.default_rng(1).standard_normal((9, 3, 32, 32), dtype=np.float32)
    for n in (1, 2, 3, 5, 8, 9):  # 9 rows: more than the largest size, run as 8 + 1 (as 2)
        got, want = padded.run(x[:n]), plain.run(x[:n])
        assert got.shape == (n, 7) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def _spins(session: runtime.Session) -> str:
    return session._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


@pytest.mark.parametrize("size,setting,expected", [
    (32, "auto", False),  # CIFAR-size input: decode-bound, workers sleep
    (224, "auto", True),  # ImageNet-size input: compute-bound, workers spin
    (32, True, True),
    (224, False, False),
])  # fmt: skip
def test_intra_op_spinning_follows_the_setting_or_the_input_size(tmp_path, size, setting, expected):
    make_tiny_model(tmp_path / "m.onnx", size=size)
    settings = config.ModelSettings(max_batch_size=2, intra_op_spinning=setting)
    (session,) = runtime.load_instances(tmp_path / "m.onnx", settings, cpu_budget=1)
    assert session.spinning is expected
    assert _spins(session) == ("1" if expected else "0")  # what onnxruntime was actually given
    assert _spins(runtime.Session(tmp_path / "m.onnx", settings, threads=1)) == _spins(session)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            "fixed_batch",
            "input 'input' has a fixed batch dimension of 2; svertka serves a batch dimension that is",
        ),
        ("input_name", "the graph's input is named 'input' but the metadata says 'pixels'"),
        ("output_name", "the graph has no output 'scores' (the metadata's output name); it has ['logits']"),
        ("crop", "input 'input' has shape ['batch', 3, 32, 32]; the metadata implies [batch, 3, 24, 24]"),
        ("missing", "does not exist"),
    ],
)
def test_incompatible_models_fail_with_a_reason(tmp_path, change, message):
    meta = tiny_meta()
    model = build_tiny_model(meta)
    if change == "fixed_batch":
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # 1 is served: test_fixed_batch.py
    elif change == "input_name":
        modelmeta.attach(model, meta.replace(input_name="pixels"))
    elif change == "output_name":
        modelmeta.attach(model, meta.replace(output_name="scores"))
    elif change == "crop":
        modelmeta.attach(model, meta.replace(crop=(24, 24), resize=24))
    path = tmp_path / "m.onnx"
    if change != "missing":
        _save(model, path)
    with pytest.raises(runtime.ModelLoadError) as info:
        runtime.load_instances(path, config.ModelSettings())
    assert message in str(info.value)


@pytest.mark.parametrize(
    "changes, dims", [({}, "3x32x32"), ({"input_dtype": "uint8", "layout": "NHWC"}, "32x32x3")]
)
def test_tensorrt_profiles_cover_every_batch_in_the_input_layout(changes, dims):
    """TensorRT builds one optimisation profile from batch 1 to max_batch_size, in the input's own
    layout (an NHWC pixel model's profile is N x H x W x 3); checked without a GPU."""
    options = runtime._provider_options(runtime.TENSORRT, tiny_meta().replace(**changes), 16)
    assert options["trt_profile_min_shapes"] == f"input:1x{dims}"
    assert options["trt_profile_opt_shapes"] == options["trt_profile_max_shapes"] == f"input:16x{dims}"
    assert options["trt_engine_cache_enable"] and not options["trt_fp16_enable"]


def test_the_tensorrt_engine_cache_goes_where_the_server_is_told(tmp_path):
    """--trt-cache-dir (a volume in the GPU overlay): created if needed; a path that cannot be a
    directory is the model's load error, naming the setting."""
    options = runtime._provider_options(runtime.TENSORRT, tiny_meta(), 8, tmp_path / "trt" / "cache")
    assert options["trt_engine_cache_path"] == str(tmp_path / "trt" / "cache")
    assert (tmp_path / "trt" / "cache").is_dir()
    assert runtime._provider_options(runtime.TENSORRT, tiny_meta(), 8)["trt_engine_cache_path"] == str(
        runtime.TRT_CACHE_DIR
    )
    (tmp_path / "a-file").write_text("")
    with pytest.raises(runtime.ModelLoadError, match="--trt-cache-dir"):
        runtime._provider_options(runtime.TENSORRT, tiny_meta(), 8, tmp_path / "a-file")
