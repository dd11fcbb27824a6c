"""``svertka serve`` settings: flags, SVERTKA_* variables and defaults agree with ServerConfig."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from service import config as cfg
from service import server_cli


def _parse(argv):
    parser = argparse.ArgumentParser()
    server_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_every_server_setting_has_a_flag():
    parser = argparse.ArgumentParser()
    server_cli.add_serve_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = dataclasses.fields(cfg.ServerConfig)
    assert list(actions) == [f.name for f in fields]  # the order of --help is the order of the fields
    for f in fields:
        action = actions[f.name]
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert f.metadata["help"] and action.help.endswith(f"[env SVERTKA_{f.name.upper()}]"), f.name
        if f.metadata["kind"] == "bool":
            assert action.option_strings[1:] == ["--no-" + f.name.replace("_", "-")]
        else:
            assert action.metavar == f.metadata["metavar"], f.name


def test_a_setting_needs_a_kind_and_a_metavar_that_agree():
    with pytest.raises(TypeError):
        cfg.setting("bool", "a switch", default=False, metavar="X")
    with pytest.raises(TypeError):
        cfg.setting("int", "a number", default=0)
    with pytest.raises(TypeError):
        cfg.setting("list", "items", default=(), metavar="ITEMS")


def test_flags_win_over_environment_which_wins_over_defaults(tmp_path):
    env = {
        "SVERTKA_MODEL_REPOSITORY": str(tmp_path),
        "SVERTKA_GRPC_PORT": "9001",
        "SVERTKA_METRICS_PORT": "9002",
        "SVERTKA_ENABLE_MODEL_CONTROL": "true",
        "SVERTKA_GRACE_PERIOD_S": "3.5",
    }
    config = server_cli.server_config(_parse(["serve", "--grpc-port", "7001"]), env)
    assert config.model_repository == Path(tmp_path)
    assert config.grpc_port == 7001  # flag
    assert config.metrics_port == 9002  # environment
    assert config.enable_model_control is True
    assert config.grace_period_s == 3.5
    assert config.max_message_bytes == cfg.DEFAULT_MAX_MESSAGE_BYTES  # default
    config = server_cli.server_config(_parse(["serve", "--no-enable-model-control"]), env)
    assert config.enable_model_control is False


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["serve"], {}, "--model-repository (or SVERTKA_MODEL_REPOSITORY) is required"),
        (["serve", "--model-repository", "m", "--grpc-port", "x"], {}, "--grpc-port: cannot parse 'x'"),
        (
            ["serve", "--model-repository", "m"],
            {"SVERTKA_ACCESS_LOG": "maybe"},
            "SVERTKA_ACCESS_LOG: cannot parse",
        ),
        (["serve", "--model-repository", "m", "--grpc-port", "70000"], {}, "grpc_port: expected 0..65535"),
        (["serve", "--model-repository", "m", "--tls-cert", "c.pem"], {}, "tls_cert and tls_key: give both"),
    ],
)
def test_bad_settings_name_the_setting(argv, env, message):
    with pytest.raises(cfg.ConfigError) as info:
        server_cli.server_config(_parse(argv), env)
    assert message in str(info.value)


def test_the_assembled_server_gets_every_engine_setting(make_server):
    """``assemble`` (serve's and the in-process tests') passes the poll interval and the CPU budget on."""
    srv = make_server(repository_poll_s=30.0, intra_op_threads=3, load=False, engine_process=False)
    assert srv.engine.poll_interval_s == 30.0
    assert srv.engine.cpu_budget == 3
    assert srv.server.metrics is srv.metrics and srv.engine.metrics is srv.metrics
