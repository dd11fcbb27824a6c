"""``svertka serve`` and ``svertka classify``.

Every ``serve`` flag ``--foo-bar`` can also be set as ``SVERTKA_FOO_BAR``
(a flag wins over the environment, the environment over the default), which
is how the Kubernetes manifests configure the server. Both are made here from
ServerConfig's fields (their help, kind and metavar are the fields' metadata,
service.config.setting), so a new field is a new flag and variable. The
ServerConfig is built here, in ``main``, and validated on construction.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from service import config as cfg
from service.clierrors import CommandError


def serve_settings() -> list[dataclasses.Field]:
    """ServerConfig's fields, each a ``serve`` flag and an ``SVERTKA_*`` variable, in --help order."""
    fields = dataclasses.fields(cfg.ServerConfig)
    missing = [f.name for f in fields if "kind" not in f.metadata]
    if missing:  # a field added without config.setting(...)
        raise TypeError(f"ServerConfig fields without a setting(...): {missing}")
    return list(fields)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(field: str) -> str:
    return cfg.ENV_PREFIX + field.upper()


def _parse(kind: str, text: str, source: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "path":
            return Path(text)
        if kind == "bool":
            lowered = text.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE - {''})}")
        return text
    except ValueError as exc:
        raise cfg.ConfigError(f"{source}: cannot parse {text!r} ({exc})") from None


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for field in serve_settings():
        if field.metadata["kind"] == "bool":  # --foo and --no-foo
            how: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            how = {"metavar": field.metadata["metavar"]}
        help_text = f"{field.metadata['help']} [env {env_name(field.name)}]"
        parser.add_argument(flag_name(field.name), dest=field.name, default=None, help=help_text, **how)


def server_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> cfg.ServerConfig:
    """Flags, then SVERTKA_* variables, then the defaults in service.config."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in serve_settings():
        field, kind = setting.name, setting.metadata["kind"]
        given = getattr(args, field, None)
        if given is not None:
            values[field] = given if kind == "bool" else _parse(kind, given, flag_name(field))
        elif env_name(field) in environ:
            values[field] = _parse(kind, environ[env_name(field)], env_name(field))
    if "model_repository" not in values:
        raise cfg.ConfigError(f"--model-repository (or {env_name('model_repository')}) is required")
    return cfg.ServerConfig(**values)


def _check_files(config: cfg.ServerConfig) -> None:
    if not config.model_repository.is_dir():
        raise cfg.ConfigError(f"model repository {config.model_repository} is not a directory")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise cfg.ConfigError(f"{flag_name(name)}: {path} is not a readable file")
    if config.auth_token_file is not None and not Path(config.auth_token_file).read_bytes().strip():
        raise cfg.ConfigError(f"--auth-token-file: {config.auth_token_file} is empty")


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    try:
        config = server_config(args)
        _check_files(config)
    except cfg.ConfigError as exc:
        raise CommandError(str(exc)) from None
    from service import logs
    from service.server import serve
    from service.supervisor import frontend_count, supervise

    logs.setup_logging(config.log_format, config.log_level, access_log=config.access_log)
    try:
        if frontend_count(config) > 1:
            return asyncio.run(supervise(config))
        return asyncio.run(serve(config))
    except cfg.ConfigError as exc:
        raise CommandError(str(exc)) from None


def _format_table(path: str, result) -> str:
    t = result.timings_us
    lines = [
        f"{path}  ({result.model_name} v{result.model_version}, server {t['total'] / 1000:.1f} ms: "
        f"decode {t['decode'] / 1000:.1f}, queue {t['queue'] / 1000:.1f}, compute {t['compute'] / 1000:.1f})"
    ]
    width = max([len("label")] + [len(p.label) for p in result.predictions])
    lines.append(f"  {'rank':>4}  {'label':<{width}}  {'index':>5}  {'score':>7}")
    for rank, p in enumerate(result.predictions, 1):
        lines.append(f"  {rank:>4}  {p.label:<{width}}  {p.index:>5}  {p.score:>7.4f}")
    return "\n".join(lines)


def run_classify(args: argparse.Namespace) -> int:
    from service.client import ClassifyError, Client
    from service.logs import new_request_id

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CommandError(f"--token-file: {exc}") from None
    failures = printed = 0
    try:
        client = Client(
            args.server,
            timeout_s=args.timeout_s,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=token,
        )
    except OSError as exc:
        raise CommandError(str(exc)) from None
    with client:
        for image in args.images:
            try:
                data = Path(image).read_bytes()
            except OSError as exc:
                print(f"svertka classify: error: {image}: {exc.strerror or exc}", file=sys.stderr)
                failures += 1
                continue
            try:
                # A fresh id per request (the server's kind): an index repeated "0", "1", ... on every
                # run, and its log lines could not be told apart.
                result = client.classify(
                    data, model=args.model, version=args.version, top_k=args.top_k, id=new_request_id()
                )
            except ClassifyError as exc:
                print(f"svertka classify: error: {image}: {exc.code}: {exc.message}", file=sys.stderr)
                failures += 1
                continue
            if printed:
                print()
            print(_format_table(image, result))
            printed += 1
    return 1 if failures else 0


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model repository over gRPC (image API, KServe v2 / Triton API, health, reflection)",
        description="Serve every model in a repository until SIGTERM/SIGINT, then drain gracefully.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)

    classify = subparsers.add_parser(
        "classify",
        help="classify image files with a running server",
        description="Send each image to a svertka server's image API and print its top-k classes.",
    )
    classify.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, BMP, GIF)"
    )
    classify.add_argument(
        "--server", default="localhost:8001", help="HOST:PORT of the gRPC server (default %(default)s)"
    )
    classify.add_argument("--model", default="", help="model name (default: the server's only model)")
    classify.add_argument("--version", type=int, default=0, help="model version (default: newest)")
    classify.add_argument("--top-k", type=int, default=None, help="classes per image (default: 5)")
    classify.add_argument(
        "--timeout-s", type=float, default=30.0, help="per-image deadline (default %(default)s)"
    )
    classify.add_argument("--tls-ca", default=None, help="PEM CA of the server's certificate (enables TLS)")
    classify.add_argument("--tls-cert", default=None, help="client certificate for mutual TLS")
    classify.add_argument("--tls-key", default=None, help="client key for mutual TLS")
    classify.add_argument("--token-file", default=None, help="file with the bearer token")
    classify.set_defaults(handler=run_classify)
