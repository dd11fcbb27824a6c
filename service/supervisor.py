"""``svertka serve --frontends N`` (N > 1): one engine process, N gRPC frontend processes, one supervisor.

::

                    svertka serve (this process: supervisor)
        config, port reservation, /metrics (summed over every process), restarts, drain
                 |                                  |
      frontend 0 .. frontend N-1                 engine (one)
      grpc.aio on the same port (SO_REUSEPORT)    repository, versions, swaps,
      protobuf, validation, auth, image           the dynamic batcher (the only one,
      decoding into its shared memory slab,       so batches stay as large as with
      per-request metrics, health  --slab rows->  one process), onnxruntime
                                   <--logits---
           control messages over one Unix socket per frontend (service.ipc)

The supervisor holds the gRPC port from the start (a socket bound with
SO_REUSEPORT but never listening: the kernel gives connections only to the
frontends' listening sockets), so a second ``svertka serve`` on the same port
fails to start, as a single-process one does.

* A frontend that exits is started again at once (its slab went with it; the
  engine cancels what it had queued); its counters stay in the summed metrics.
* If the engine exits, the frontends see it at once (their models turn
  UNAVAILABLE, so readiness goes NOT_SERVING), stop, and the supervisor exits 1.
* SIGTERM/SIGINT: the frontends drain first (every accepted call answered,
  the rest UNAVAILABLE), then the engine; the exit status is the worst of
  theirs (0, or ``EXIT_ABANDONED`` when a drain ran out of time). A second
  signal is passed on (the children then stop at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from service import config as cfg
from service import gpu_decode
from service.ipc import worker
from service.server import address

log = logging.getLogger(__name__)

#: A frontend that exits this soon after its start is not restarted in a tight loop.
MIN_RESTART_INTERVAL_S = 1.0


def frontend_count(config: cfg.ServerConfig) -> int:
    """The number of frontend processes ``config`` asks for; ``auto`` is 1 until measured otherwise.

    On the 2-core development host one process serves more than two (the IPC and a second
    interpreter cost CPU that the one process needs; docs/engine.md, "Processes"), and no
    host with more cores has been measured yet: ``auto`` never picks a layout that measured
    slower where it is used.
    """
    if config.frontends == "auto":
        return 1
    return int(config.frontends)


def reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket holding ``host:port`` for the frontends (SO_REUSEPORT, never listening).

    ConfigError when the port is taken, also by a process that shares it (a second server).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = host.strip("[]")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # plain bind: fails on any holder
            probe.bind((bind_host, port))
            port = probe.getsockname()[1]
    except OSError as exc:
        raise cfg.ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((bind_host, port))
    return holder, port


def check_shared_memory(frontends: int, slab_mib: int, shm_dir: str = "/dev/shm") -> None:
    """ConfigError naming the fix when ``shm_dir`` cannot hold every frontend's slab."""
    need = frontends * slab_mib
    try:
        stats = os.statvfs(shm_dir)
    except OSError as exc:
        raise cfg.ConfigError(f"--frontends {frontends} needs {shm_dir}: {exc.strerror}") from None
    free = stats.f_bavail * stats.f_frsize >> 20
    if free < need:
        raise cfg.ConfigError(
            f"--frontends {frontends} needs {need} MiB of shared memory in {shm_dir} "
            f"({frontends} x --frontend-shm-mib {slab_mib}), and {free} MiB are free: mount a "
            f"larger {shm_dir} (Kubernetes: an emptyDir with medium: Memory and sizeLimit of at "
            "least that at /dev/shm; docker: --shm-size), or lower --frontends or --frontend-shm-mib"
        )


@dataclasses.dataclass
class _Child:
    role: str
    index: int | None
    process: asyncio.subprocess.Process
    started: float


class Supervisor:
    """Starts, watches and stops the engine and frontend processes of one server."""

    def __init__(self, config: cfg.ServerConfig, frontends: int) -> None:
        self.config = config
        self.frontends = frontends
        self.restarts = 0
        self._workdir = Path(tempfile.mkdtemp(prefix="svertka-"))
        self._env: dict[str, str] = {}
        self._children: dict[str, _Child] = {}
        self._stopping = False
        self._exited = asyncio.Queue()
        self._http = None

    async def _start(self, role: str, index: int | None = None) -> None:
        args = [sys.executable, "-m", "service.ipc.worker", role] + ([] if index is None else [str(index)])
        process = await asyncio.create_subprocess_exec(*args, env=self._env)
        key = role if index is None else f"{role}-{index}"
        child = _Child(role, index, process, time.monotonic())
        self._http.process_started(role, 0 if index is None else index, process.pid)
        self._children[key] = child
        asyncio.get_running_loop().create_task(self._watch(key, child))

    async def _watch(self, key: str, child: _Child) -> None:
        code = await child.process.wait()
        await self._exited.put((key, child, code))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        check_shared_memory(self.frontends, self.config.frontend_shm_mib)
        try:  # the frontends decode: a decoder they cannot make must stop the start, not loop restarts
            gpu_decode.check_in_child(self.config.image_decoder)
        except gpu_decode.Unavailable as exc:
            raise cfg.ConfigError(f"image_decoder gpu: {exc} (or serve with --image-decoder cpu)") from None
        holder, port = reserve_port(self.config.host, self.config.grpc_port)
        socket_path = self._workdir / "engine.sock"
        config = dataclasses.replace(self.config, grpc_port=port, frontends=self.frontends)
        from service import metrics as metrics_mod

        metrics_dir = self._workdir / "metrics"
        self._env = {
            **os.environ,
            worker.CONFIG_ENV: worker.config_to_json(config),
            worker.SOCKET_ENV: str(socket_path),
            **metrics_mod.multiprocess_environment(metrics_dir),
        }
        http = metrics_mod.serve_multiprocess(
            metrics_dir,
            self.config.metrics_host or self.config.host,
            self.config.metrics_port,
            frontends=self.frontends,
        )
        self._http = http
        signals = asyncio.Queue()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        try:
            await self._start("engine")
            for index in range(self.frontends):
                await self._start("frontend", index)
            log.info(
                "svertka listening: grpc %s metrics %s (tls %s, auth %s, %d frontends)",
                address(self.config.host, port),
                address(self.config.metrics_host or self.config.host, http.port),
                "on" if self.config.tls_cert else "off",
                "on" if self.config.auth_token_file else "off",
                self.frontends,
            )
            return await self._supervise(signals, http)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            http.close()
            holder.close()
            shutil.rmtree(self._workdir, ignore_errors=True)

    async def _supervise(self, signals: asyncio.Queue, http) -> int:
        engine_code: int | None = None
        next_signal = asyncio.ensure_future(signals.get())
        next_exit = asyncio.ensure_future(self._exited.get())
        try:
            while True:
                await asyncio.wait({next_signal, next_exit}, return_when=asyncio.FIRST_COMPLETED)
                if next_signal.done():
                    signum = next_signal.result()
                    next_signal = asyncio.ensure_future(signals.get())
                    log.info("received %s", signal.Signals(signum).name)
                    if not self._stopping:
                        return await self._shutdown(signals, next_signal, next_exit)
                if next_exit.done():
                    key, child, code = next_exit.result()
                    next_exit = asyncio.ensure_future(self._exited.get())
                    http.process_exited(child.process.pid)
                    if child.role == "engine":
                        engine_code = code
                        log.error("the engine process exited (status %s): stopping", code)
                        await self._stop_frontends(self.config.grace_period_s)
                        return 1 if engine_code == 0 else max(1, abs(engine_code))
                    log.error("frontend %s exited (status %s): starting it again", child.index, code)
                    self.restarts += 1
                    http.frontend_restarted(child.index)
                    wait = MIN_RESTART_INTERVAL_S - (time.monotonic() - child.started)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await self._start("frontend", child.index)
        finally:
            next_signal.cancel()
            next_exit.cancel()

    async def _shutdown(self, signals: asyncio.Queue, next_signal, next_exit) -> int:
        """Drain the frontends, then the engine; pass a second signal on."""
        self._stopping = True
        next_exit.cancel()

        async def second_signal() -> None:
            signum = await next_signal
            log.warning("second signal: passing it on")
            for child in self._children.values():
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)

        forward = asyncio.ensure_future(second_signal())
        try:
            codes = await self._stop_frontends(self.config.grace_period_s + 5.0)
            engine = self._children["engine"].process
            with contextlib.suppress(ProcessLookupError):
                engine.send_signal(signal.SIGTERM)
            codes.append(await _wait(engine, self.config.grace_period_s + 5.0))
        finally:
            forward.cancel()
        if all(code == 0 for code in codes):
            return 0
        from service.server import EXIT_ABANDONED

        return EXIT_ABANDONED if EXIT_ABANDONED in codes else 1

    async def _stop_frontends(self, timeout_s: float) -> list[int]:
        frontends = [c.process for c in self._children.values() if c.role == "frontend"]
        for process in frontends:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        return list(await asyncio.gather(*(_wait(p, timeout_s) for p in frontends)))


async def _wait(process: asyncio.subprocess.Process, timeout_s: float) -> int:
    """The exit status, killing the process if it is still running after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await process.wait()
    except TimeoutError:
        log.error("process %d did not stop within %.0f s: killing it", process.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return 1


async def supervise(config: cfg.ServerConfig) -> int:
    return await Supervisor(config, frontend_count(config)).run()
