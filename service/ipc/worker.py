"""The processes the supervisor starts: ``python -m service.ipc.worker engine`` and ``... frontend N``.

Each gets the server's configuration as JSON in ``SVERTKA_WORKER_CONFIG``
(the supervisor's own, already validated), the engine's socket in
``SVERTKA_WORKER_SOCKET``, and, for frontends, the port to share in the
configuration itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from service import config as cfg
from service import limits, logs

log = logging.getLogger(__name__)

CONFIG_ENV = "SVERTKA_WORKER_CONFIG"
SOCKET_ENV = "SVERTKA_WORKER_SOCKET"


def config_to_json(config: cfg.ServerConfig) -> str:
    values = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        values[field.name] = str(value) if isinstance(value, Path) else value
    return json.dumps(values)


def config_from_json(text: str) -> cfg.ServerConfig:
    values: dict[str, Any] = json.loads(text)
    hints = typing.get_type_hints(cfg.ServerConfig)
    for name, value in values.items():
        if value is not None and "Path" in str(hints.get(name)):
            values[name] = Path(value)
    return cfg.ServerConfig(**values)


async def run_engine(config: cfg.ServerConfig, socket_path: Path) -> int:
    """The engine process: the repository, the batcher and onnxruntime, behind the socket.

    Listens at once; the frontends connect and wait until the models are loaded. On SIGTERM
    (the supervisor sends it once every frontend has drained) it drains and stops.
    """
    from service import shm
    from service.ipc.engine_server import EngineServer
    from service.metrics import Metrics
    from service.server import build_engine

    limits.raise_open_files_limit()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    engine = build_engine(config, Metrics(multiprocess=True))
    # The system shared memory registrations of every frontend (service/ipc/shared_memory.py).
    registrations = shm.Registrations() if config.allow_shared_memory else None
    server = EngineServer(engine, socket_path, registrations)
    await server.start()
    load = asyncio.create_task(engine.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if load.done() and load.exception() is not None:
        log.error("loading the model repository failed", exc_info=load.exception())
        exit_code = 1
    elif load.done():
        server.models_loaded()
        log.info("engine serving %s", ", ".join(f"{s.name}:{s.version}:{s.state}" for s in engine.statuses()))
        await stopping
    else:
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
    stopping.cancel()
    await engine.drain(config.grace_period_s)
    await server.close()
    await engine.close()
    return exit_code


async def run_frontend(config: cfg.ServerConfig, index: int, socket_path: Path) -> int:
    """One frontend process: ``serve`` with the engine process as its engine."""
    from service.ipc.engine_client import EngineClient
    from service.metrics import Metrics
    from service.server import FrontendRole, serve

    metrics = Metrics(multiprocess=True, frontend=index)
    engine = EngineClient(
        socket_path,
        frontend=str(index),
        slab_bytes=config.frontend_shm_mib << 20,
        decode_threads=max(1, cfg.default_intra_op_threads() // int(config.frontends)),
        metrics=metrics,
    )
    metrics.statistics_sink = engine.send_outcome
    return await serve(config, frontend=FrontendRole(engine=engine, metrics=metrics))


def main(argv: list[str]) -> int:
    config = config_from_json(os.environ[CONFIG_ENV])
    socket_path = Path(os.environ[SOCKET_ENV])
    role = argv[0] if argv else ""
    logs.setup_logging(config.log_format, config.log_level, access_log=config.access_log)
    if role == "engine":
        return asyncio.run(run_engine(config, socket_path))
    if role == "frontend" and len(argv) == 2:
        return asyncio.run(run_frontend(config, int(argv[1]), socket_path))
    print("usage: python -m service.ipc.worker engine | frontend INDEX", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
