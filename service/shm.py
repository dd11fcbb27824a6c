"""System shared memory regions: tensor data that a same-host client passes by reference.

Triton's system-shared-memory extension (Triton's docs/protocol/extension_shared_memory.md,
and docs/api.md here): a client
creates a POSIX shared memory object (``shm_open``; on Linux a file in
``/dev/shm``), registers a byte range of it under a region name, and then
names that region in an input's or output's parameters instead of sending the
bytes through gRPC. For a 224x224 FP32 image that is 588 KiB per request the
client does not serialize and the server does not receive, parse and copy.

The server only ever reads and writes registered objects with ``pread`` /
``pwrite`` on a file descriptor it opened at registration; nothing is
``mmap``-ed. A client that shrinks its object after registering it therefore
gets a short read reported as INVALID_ARGUMENT, never a SIGBUS that would take
the server down. It is still a door into the server's memory for any process
that can write to ``/dev/shm`` as the client's user: off unless the server is
started with ``--allow-shared-memory``, like Triton's ``--allow-client-shm``.

Knows nothing of gRPC: errors are :mod:`service.errors`, mapped to status
codes in one place (``service.api.error_codes``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import resource
import stat
import threading

import numpy as np

from service import errors

#: Where Linux keeps POSIX shared memory objects: ``shm_open("/name")`` is ``/dev/shm/name``.
SHM_DIR = "/dev/shm"
#: Regions one server holds at most (each keeps one file descriptor open) ...
MAX_REGIONS = 1024
#: ... and never more than this share of the process's file descriptor limit: the rest stays
#: for connections, model files and the metrics port. At 1,000 regions under the default limit
#: of 1,024 descriptors, health checks and scrapes on new connections timed out.
FD_SHARE = 4
#: The longest region name accepted (Triton sets no limit; a name is held for as long as its region).
MAX_NAME_CHARS = 256
#: An object name as ``shm_open`` takes it: one optional leading slash, then one path component.
_KEY_RE = re.compile(r"^/?([^/\x00]{1,255})$")
_NAME_RE = re.compile(rf"^[^\x00]{{1,{MAX_NAME_CHARS}}}$")


def region_cap() -> int:
    """How many regions this process may hold: MAX_REGIONS, or a quarter of its descriptor limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_REGIONS
    return max(1, min(MAX_REGIONS, soft // FD_SHARE))


#: The tensor parameters of the extension (Triton's names).
REGION_PARAM = "shared_memory_region"
OFFSET_PARAM = "shared_memory_offset"
BYTE_SIZE_PARAM = "shared_memory_byte_size"
PARAMS = (REGION_PARAM, OFFSET_PARAM, BYTE_SIZE_PARAM)


@dataclasses.dataclass(frozen=True)
class Region:
    """A registered byte range ``[offset, offset + byte_size)`` of the object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Slice:
    """Where one tensor's bytes are: ``byte_size`` bytes at ``offset`` inside ``region``."""

    region: str
    offset: int
    byte_size: int


class Registry:
    """The server's registered regions, by name. Safe to call from any thread."""

    def __init__(self, shm_dir: str = SHM_DIR, max_regions: int | None = None) -> None:
        self._dir = shm_dir
        #: Read when the registry is made: after ``serve`` has raised the descriptor limit.
        self._max = region_cap() if max_regions is None else max_regions
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    # -- registration -------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Open ``key`` and hold ``[offset, offset + byte_size)`` of it under ``name``."""
        if not _NAME_RE.fullmatch(name or ""):
            raise errors.InvalidInput(
                f"system shared memory: region name must be 1-{MAX_NAME_CHARS} characters without NUL, "
                f"got {errors.shown(name)}"
            )
        match = _KEY_RE.fullmatch(key or "")
        if not match or match.group(1) in (".", ".."):
            raise errors.InvalidInput(
                f"system shared memory region '{name}': key {errors.shown(key)} is not a shared memory "
                "object name; "
                "expected what shm_open takes, e.g. '/my_input' (one path component)"
            )
        if byte_size < 1:
            raise errors.InvalidInput(
                f"system shared memory region '{name}': byte_size must be >= 1, got {byte_size}"
            )
        with self._lock:
            if name in self._regions:
                raise errors.AlreadyExists(
                    f"system shared memory region '{name}' is already registered; unregister it first"
                )
            if len(self._regions) >= self._max:
                raise errors.Overloaded(
                    f"system shared memory: {self._max} regions are registered, the most this server holds; "
                    "unregister some first"
                )
            path = os.path.join(self._dir, match.group(1))
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                raise errors.InvalidInput(
                    f"system shared memory region '{name}': no shared memory object {key!r} on this host "
                    "(the client creates it with shm_open before registering it)"
                ) from None
            except OSError as exc:
                raise errors.InvalidInput(
                    f"system shared memory region '{name}': cannot open {key!r} for reading and writing: "
                    f"{exc.strerror}"
                ) from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise errors.InvalidInput(
                        f"system shared memory region '{name}': {key!r} is not a shared memory object"
                    )
                if offset + byte_size > info.st_size:
                    raise errors.InvalidInput(
                        f"system shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                        f"is beyond the end of {key!r} ({info.st_size} bytes)"
                    )
            except BaseException:
                os.close(fd)
                raise
            region = Region(name=name, key=key, offset=offset, byte_size=byte_size, fd=fd)
            self._regions[name] = region
            return region

    def unregister(self, name: str = "") -> None:
        """Forget ``name`` (every region when empty). Unknown names are not an error."""
        with self._lock:
            if name:
                gone = [self._regions.pop(name)] if name in self._regions else []
            else:
                gone, self._regions = list(self._regions.values()), {}
        for region in gone:
            os.close(region.fd)

    def status(self, name: str = "") -> list[Region]:
        """The registered regions (just ``name`` when given; NotFound when it is not registered)."""
        with self._lock:
            if not name:
                return sorted(self._regions.values(), key=lambda r: r.name)
            if name not in self._regions:
                raise errors.NotFound(f"system shared memory region '{name}' is not registered")
            return [self._regions[name]]

    def close(self) -> None:
        self.unregister("")

    def __len__(self) -> int:
        return len(self._regions)

    # -- data ------------------------------------------------------------------------
    def _locate(self, where: Slice, what: str) -> tuple[int, int]:
        """(fd, absolute file offset) of a checked slice."""
        with self._lock:
            region = self._regions.get(where.region)
        if region is None:
            raise errors.InvalidInput(
                f"{what}: system shared memory region '{where.region}' is not registered "
                "(SystemSharedMemoryRegister it first)"
            )
        if where.offset < 0 or where.byte_size < 0 or where.offset + where.byte_size > region.byte_size:
            raise errors.InvalidInput(
                f"{what}: {where.byte_size} bytes at offset {where.offset} do not fit in system shared memory "
                f"region '{region.name}' ({region.byte_size} bytes)"
            )
        return region.fd, region.offset + where.offset

    def check(self, where: Slice, what: str) -> None:
        """Raise InvalidInput unless ``where`` lies inside a registered region."""
        self._locate(where, what)

    def read(self, where: Slice, dtype: str, shape: list[int], what: str) -> np.ndarray:
        """A fresh array of ``shape`` filled from the slice (one copy, no mapping)."""
        fd, position = self._locate(where, what)
        need = math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize
        if need != where.byte_size:  # before allocating: the shape is the client's
            raise errors.InvalidInput(
                f"{what}: shared_memory_byte_size is {where.byte_size} but shape {list(shape)} of {dtype} "
                f"needs {need} bytes"
            )
        out = np.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < out.nbytes:
            got = os.preadv(fd, [view[done:]], position + done)
            if got == 0:
                raise errors.InvalidInput(
                    f"{what}: system shared memory region '{where.region}' ended after {done} of "
                    f"{out.nbytes} bytes (the object was truncated after registration)"
                )
            done += got
        return out

    def write(self, where: Slice, data: bytes, what: str) -> None:
        """Write ``data`` at the start of the slice (it must fit)."""
        fd, position = self._locate(where, what)
        if len(data) > where.byte_size:
            raise errors.InvalidInput(
                f"{what}: the result is {len(data)} bytes but shared_memory_byte_size is {where.byte_size}"
            )
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, view[done:], position + done)
