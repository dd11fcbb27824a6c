"""Settings are validated on construction, with messages naming the setting; the docs' table is theirs."""

import dataclasses
from pathlib import Path

import pytest

from service.config import ConfigError, ModelSettings, ServerConfig, settings_table
from service.config import main as config_main


def test_model_settings_defaults_are_valid():
    settings = ModelSettings()
    assert settings.max_batch_size >= 1 and settings.providers[-1] == "cpu"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"preferred_batch_sizes": [64]}, "preferred_batch_sizes"),
        ({"padded_batch_sizes": [0, 4]}, r"padded_batch_sizes: expected values in \[1, 32\], got \[0\]"),
        ({"padded_batch_sizes": "powers"}, "padded_batch_sizes: expected auto or a list of batch sizes"),
        ({"padded_batch_sizes": [2.5]}, "padded_batch_sizes: expected auto or a list"),
        ({"providers": ["tpu"]}, "providers"),
        ({"instances": 0}, "instances"),
        ({"batch_size": 8}, "unknown settings"),
    ],
)
def test_bad_model_settings_name_the_setting(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelSettings.from_mapping(data)


def test_model_settings_load_yaml_and_json(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text(
        "max_batch_size: 8\npreferred_batch_sizes: [4, 8]\npadded_batch_sizes: [4, 2, 4]\n"
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"max_queue_delay_ms": 5, "instances": 2}')
    (tmp_path / "c").mkdir()
    a, b, c = (ModelSettings.load(tmp_path / n) for n in "abc")
    assert (a.max_batch_size, a.preferred_batch_sizes, a.padded_batch_sizes) == (8, (4, 8), (2, 4))
    assert (b.max_queue_delay_ms, b.instances) == (5, 2)
    assert c == ModelSettings()


def test_unparseable_config_file_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("max_batch_size: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml"):
        ModelSettings.load(tmp_path)


def test_server_config_tls_needs_cert_and_key(tmp_path):
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        ServerConfig(model_repository=tmp_path, tls_cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="grpc_port"):
        ServerConfig(model_repository=tmp_path, grpc_port=70000)


def test_thread_budget_is_shared_among_instances_unless_a_model_sets_it():
    from service.engine.runtime import intra_op_threads

    assert intra_op_threads(ModelSettings(instances=2), cpu_budget=8) == 4
    assert intra_op_threads(ModelSettings(instances=3), cpu_budget=2) == 1
    assert intra_op_threads(ModelSettings(intra_op_threads=5, instances=2), cpu_budget=8) == 5
    with pytest.raises(ConfigError, match="intra_op_threads"):
        ServerConfig(model_repository=".", intra_op_threads=-1)


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("auto", "auto"), ("", "auto")])
def test_intra_op_spinning_is_true_false_or_auto(tmp_path, text, expected):
    (tmp_path / "config.yaml").write_text(f"intra_op_spinning: {text}\n" if text else "max_batch_size: 4\n")
    assert ModelSettings.load(tmp_path).intra_op_spinning == expected


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_intra_op_spinning_refuses_anything_else_and_says_what_it_takes(value):
    with pytest.raises(ConfigError, match=r"intra_op_spinning: expected true, false or auto, got "):
        ModelSettings.from_mapping({"intra_op_spinning": value})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"max_image_pixels": float("inf")}, "max_image_pixels: expected an integer from 1 to 9223372036854775807, got inf (number)"),
        ({"max_decoded_pixels": 0}, "max_decoded_pixels: expected auto or an integer from 1 to 9223372036854775807, got 0 (integer)"),
        ({"max_decoded_pixels": "big"}, "max_decoded_pixels: expected auto or an integer from 1 to 9223372036854775807, got 'big' (string)"),
        ({"max_queue_size": float("nan")}, "max_queue_size: expected an integer from 1 to 2147483647, got nan (number)"),
        ({"max_batch_size": 4.0}, "max_batch_size: expected an integer from 1 to 2147483647, got 4.0 (number)"),
        ({"max_batch_size": True}, "max_batch_size: expected an integer from 1 to 2147483647, got True (boolean)"),
        ({"instances": "2"}, "instances: expected an integer from 1 to 64, got '2' (string)"),
        ({"instances": 65}, "instances: expected an integer from 1 to 64, got 65 (integer)"),
        ({"max_queue_size": 2**31}, "max_queue_size: expected an integer from 1 to 2147483647, got 2147483648"),
        ({"intra_op_threads": -1}, "intra_op_threads: expected an integer from 0 to 1024, got -1"),
        ({"max_rows_per_request": None}, "max_rows_per_request: expected an integer from 1 to 2147483647, got None (null)"),
        ({"max_queue_delay_ms": float("inf")}, "max_queue_delay_ms: expected a finite number from 0 to 3.6e+06, got inf"),
        ({"max_queue_delay_ms": float("nan")}, "max_queue_delay_ms: expected a finite number"),
        ({"max_queue_delay_ms": "2"}, "max_queue_delay_ms: expected a finite number from 0 to 3.6e+06, got '2' (string)"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms: expected a finite number from 0"),
        ({"version": 2**63}, "version: expected an integer from 1 to 9223372036854775807, got 9223372036854775808"),
        ({"version": 1.0}, "version: expected an integer"),
        ({"preferred_batch_sizes": [1.5]}, "preferred_batch_sizes: expected a list of batch sizes"),
        ({"preferred_batch_sizes": "4"}, "preferred_batch_sizes: expected a list of batch sizes"),
        ({"preferred_batch_sizes": [True]}, "preferred_batch_sizes: expected a list of batch sizes"),
        ({"providers": "cpu"}, "providers: expected a list of provider names"),
        ({"providers": [1]}, "providers: expected a list of provider names"),
        ({"reject_non_finite_inputs": "true"}, "reject_non_finite_inputs: expected true or false, got 'true' (string)"),
        ({"reject_non_finite_inputs": 1}, "reject_non_finite_inputs: expected true or false"),
        ({1: 2}, "unknown settings [1]"),
        ({"x" * 10_000: 1}, "... (10000 characters)]; known: ["),
    ],
)  # fmt: skip
def test_settings_are_strictly_typed_finite_and_in_range(data, message):
    with pytest.raises(ConfigError) as info:
        ModelSettings.from_mapping(data)
    assert message in str(info.value)
    assert len(str(info.value)) < 1000  # a huge key or value is quoted bounded


def test_settings_keep_their_types_and_accept_what_yaml_writes(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "max_queue_delay_ms: 5\nmax_image_pixels: 9223372036854775807\nversion: 9223372036854775807\n"
        "reject_non_finite_inputs: true\nproviders: [CPU]\n"
    )
    settings = ModelSettings.load(tmp_path)
    assert settings.max_queue_delay_ms == 5.0 and isinstance(settings.max_queue_delay_ms, float)
    assert settings.max_image_pixels == settings.version == 2**63 - 1
    assert settings.reject_non_finite_inputs is True and settings.providers == ("cpu",)
    assert ModelSettings().reject_non_finite_inputs is False


def test_an_unreadable_config_file_is_a_config_error(tmp_path):
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe max_batch_size: 4")
    with pytest.raises(ConfigError, match="config.yaml: cannot"):
        ModelSettings.load(tmp_path)


def test_max_decoded_pixels_auto_follows_the_model_input():
    settings = ModelSettings()
    assert settings.max_decoded_pixels == "auto"
    assert settings.decoded_pixels(32) == 1024 * 1024  # the floor: 256 * 32**2 is 262,144
    assert settings.decoded_pixels(128) == 256 * 128 * 128
    assert settings.decoded_pixels(256) == 4096 * 4096  # the cap
    assert settings.decoded_pixels(512) == 4096 * 4096
    assert ModelSettings(max_decoded_pixels=5).decoded_pixels(256) == 5


ENGINE_DOC = Path(__file__).resolve().parents[2] / "docs" / "engine.md"


def test_the_settings_table_in_the_docs_is_the_one_generated_from_the_fields():
    text = ENGINE_DOC.read_text()
    start = text.index("| setting | default | accepted |\n")
    in_docs = text[start : text.index("\n\n", start) + 1]
    assert in_docs == settings_table(), (
        "docs/engine.md's settings table is stale: paste `python -m service.config --table` over it"
    )
    rows = [line.split("|")[1].strip(" `") for line in in_docs.splitlines()[2:]]
    assert rows == [f.name for f in dataclasses.fields(ModelSettings)]


def test_the_table_is_printed_by_python_m_service_config(capsys):
    assert config_main(["--table"]) == 0
    assert capsys.readouterr().out == settings_table()


def test_the_example_config_yaml_in_the_docs_loads(tmp_path):
    text = ENGINE_DOC.read_text()
    start = text.index("```yaml\n", text.index("| setting | default | accepted |")) + len("```yaml\n")
    (tmp_path / "config.yaml").write_text(text[start : text.index("```", start)])
    settings = ModelSettings.load(tmp_path)
    assert settings != ModelSettings() and settings.providers == ("cpu",)
