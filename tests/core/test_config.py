"""Settings are validated on construction, with messages naming the setting."""

import pytest

from service.config import ConfigError, ModelSettings, ServerConfig


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
    from service.runtime import intra_op_threads

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
