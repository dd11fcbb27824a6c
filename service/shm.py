"""System shared memory regions: tensor data that a same-host client passes by reference.

Triton's system-shared-memory extension (Triton's docs/protocol/extension_shared_memory.md,
and docs/api.md here): a client
creates a POSIX shared memory object (``shm_open``; on Linux a file in
``/dev/shm``), registers a byte range of it under a region name, and then
names that region in an input's or output's parameters instead of sending the
bytes through gRPC. For a 224x224 FP32 image that is 588 KiB per request the
client does not serialize and the server does not receive, parse and copy.

The server only ever reads and writes registered objects with ``pread`` /
``pwrite`` on a file descriptor it opened; nothing is ``mmap``-ed. A client
that shrinks its object after registering it therefore gets a short read
reported as INVALID_ARGUMENT, never a SIGBUS that would take the server down.
It is still a door into the server's memory for any process that can write to
``/dev/shm`` as the client's user: off unless the server is started with
``--allow-shared-memory``, like Triton's ``--allow-client-shm``.

Two halves, so that registrations can be server-wide when the server is
several processes (``svertka serve --frontends N``, service/ipc/shared_memory.py):

* :class:`Registrations`, *the registrations*: name -> (key, offset,
  byte_size), the checks a registration passes and the region cap. One per
  server: in its one process, or in the engine process.
* :class:`OpenRegions`, *the opened regions*: the descriptor this process
  holds for each registered region, and the reads and writes of tensor data.
  One per process that serves requests.

:class:`Registry` is both in one process. Every check and message of the
extension is here, whichever process applies it.

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
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from service import errors

#: Where Linux keeps POSIX shared memory objects: ``shm_open("/name")`` is ``/dev/shm/name``.
SHM_DIR = "/dev/shm"
#: Regions one server holds at most (each keeps one file descriptor open in every process that
#: serves requests) ...
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
    #: Which object was checked at registration (``st_dev``, ``st_ino``; 0: not yet opened). A
    #: process that opens the region later (a frontend) opens that object or none: an object
    #: deleted and made again under the same name after registration is refused.
    device: int = dataclasses.field(default=0, compare=False, repr=False)
    inode: int = dataclasses.field(default=0, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Slice:
    """Where one tensor's bytes are: ``byte_size`` bytes at ``offset`` inside ``region``."""

    region: str
    offset: int
    byte_size: int


def is_region_name(name: str) -> bool:
    """Whether ``name`` could be registered (1-MAX_NAME_CHARS characters, no NUL)."""
    return bool(_NAME_RE.fullmatch(name or ""))


def check_registration(name: str, key: str, byte_size: int) -> str:
    """The checks a registration passes before any lookup; the object's file name in the shm dir."""
    if not is_region_name(name):
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
    return match.group(1)


def open_region(region: Region, shm_dir: str = SHM_DIR) -> int:
    """A descriptor of ``region``'s object, opened for reading and writing; InvalidInput unless it
    is a shared memory object (no symlink followed, a regular file) that holds the region."""
    path = os.path.join(shm_dir, check_registration(region.name, region.key, region.byte_size))
    name, key = region.name, region.key
    try:
        # O_NONBLOCK: an object under a file lease (fcntl F_SETLEASE) would otherwise block this
        # open for the kernel's lease-break time (45 s by default), with the event loop in it; a
        # regular file's reads and writes do not block either way.
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except BlockingIOError:
        raise errors.InvalidInput(
            f"system shared memory region '{name}': {key!r} is leased or locked by another process "
            "(it cannot be opened without waiting); release it and register again"
        ) from None
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
        if region.inode and (info.st_dev, info.st_ino) != (region.device, region.inode):
            raise errors.InvalidInput(
                f"system shared memory region '{name}': {key!r} is not the object that was registered "
                "(it was deleted and made again); unregister the region and register it again"
            )
        if not stat.S_ISREG(info.st_mode):
            raise errors.InvalidInput(
                f"system shared memory region '{name}': {key!r} is not a shared memory object"
            )
        if region.offset + region.byte_size > info.st_size:
            raise errors.InvalidInput(
                f"system shared memory region '{name}': offset {region.offset} + byte_size "
                f"{region.byte_size} is beyond the end of {key!r} ({info.st_size} bytes)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_registered(name: str) -> errors.NotFound:
    """What SystemSharedMemoryStatus says about a name that is not registered."""
    return errors.NotFound(f"system shared memory region '{name}' is not registered")


def _unknown_region(what: str, name: str) -> errors.InvalidInput:
    """What a tensor that names a region that is not registered gets."""
    return errors.InvalidInput(
        f"{what}: system shared memory region '{name}' is not registered (SystemSharedMemoryRegister it first)"
    )


class Registrations:
    """The server's registered regions, by name, and their cap. Safe to call from any thread.

    Holds no descriptor: ``register`` hands the one it opened to check the object to its caller.
    """

    def __init__(self, shm_dir: str = SHM_DIR, max_regions: int | None = None) -> None:
        self._dir = shm_dir
        #: Read when the registrations are made: after ``serve`` has raised the descriptor limit.
        self._max = region_cap() if max_regions is None else max_regions
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> tuple[Region, int]:
        """Check ``key`` and hold ``[offset, offset + byte_size)`` of it under ``name``: the region,
        and a descriptor of its object that the caller keeps or closes."""
        check_registration(name, key, byte_size)
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
            region = Region(name=name, key=key, offset=offset, byte_size=byte_size)
            fd = open_region(region, self._dir)
            info = os.fstat(fd)
            region = dataclasses.replace(region, device=info.st_dev, inode=info.st_ino)
            self._regions[name] = region
            return region, fd

    def unregister(self, name: str = "") -> list[Region]:
        """Forget ``name`` (every region when empty): the regions forgotten. Unknown names are not
        an error."""
        with self._lock:
            if name:
                return [self._regions.pop(name)] if name in self._regions else []
            gone, self._regions = list(self._regions.values()), {}
            return gone

    def status(self, name: str = "") -> list[Region]:
        """The registered regions (just ``name`` when given; NotFound when it is not registered)."""
        with self._lock:
            if not name:
                return sorted(self._regions.values(), key=lambda r: r.name)
            if name not in self._regions:
                raise not_registered(name)
            return [self._regions[name]]

    def __len__(self) -> int:
        return len(self._regions)


@dataclasses.dataclass
class _Opened:
    region: Region
    fd: int | None  # None: opening it failed; tried again when a request names the region


class OpenRegions:
    """The registered regions as this process reads and writes them: one descriptor each."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self._dir = shm_dir
        self._opened: dict[str, _Opened] = {}
        self._lock = threading.Lock()

    def add(self, region: Region, fd: int | None = None) -> None:
        """Serve ``region`` from ``fd``; without one, open its object now (if that fails, the
        first request that names the region tries again and gets the reason)."""
        if fd is None:
            try:
                fd = open_region(region, self._dir)
            except errors.InvalidInput:
                fd = None
        with self._lock:
            old = self._opened.pop(region.name, None)
            self._opened[region.name] = _Opened(region, fd)
        if old is not None and old.fd is not None:
            os.close(old.fd)

    def remove(self, names: Iterable[str]) -> None:
        with self._lock:
            gone = [self._opened.pop(name) for name in names if name in self._opened]
        for opened in gone:
            if opened.fd is not None:
                os.close(opened.fd)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._opened)

    def close(self) -> None:
        self.remove(self.names())

    def __len__(self) -> int:
        return len(self._opened)

    def _locate(self, where: Slice, what: str) -> tuple[int, int]:
        """(fd, absolute file offset) of a checked slice."""
        with self._lock:
            opened = self._opened.get(where.region)
        if opened is None:
            raise _unknown_region(what, where.region)
        region = opened.region
        if where.offset < 0 or where.byte_size < 0 or where.offset + where.byte_size > region.byte_size:
            raise errors.InvalidInput(
                f"{what}: {where.byte_size} bytes at offset {where.offset} do not fit in system shared memory "
                f"region '{region.name}' ({region.byte_size} bytes)"
            )
        fd = opened.fd if opened.fd is not None else self._open_late(opened, what)
        return fd, region.offset + where.offset

    def _open_late(self, opened: _Opened, what: str) -> int:
        """Open a region whose object could not be opened when it was added."""
        try:
            fd = open_region(opened.region, self._dir)
        except errors.InvalidInput as exc:
            raise errors.InvalidInput(f"{what}: {exc.message}") from None
        with self._lock:
            if self._opened.get(opened.region.name) is opened and opened.fd is None:
                opened.fd = fd
                return fd
            current = opened.fd if self._opened.get(opened.region.name) is opened else None
        os.close(fd)  # another thread opened it first, or it was unregistered meanwhile
        if current is None:
            raise _unknown_region(what, opened.region.name)
        return current

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


class SharedMemory(Protocol):
    """What the tensor API serves the extension from: :class:`Registry` in one process, a
    frontend's registry whose registrations live in the engine process with several
    (service.ipc.shared_memory.FrontendRegistry)."""

    async def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None: ...

    async def unregister_region(self, name: str) -> None: ...

    async def region_status(self, name: str) -> list[Region]: ...

    def check(self, where: Slice, what: str) -> None: ...

    def read(self, where: Slice, dtype: str, shape: list[int], what: str) -> np.ndarray: ...

    def write(self, where: Slice, data: bytes, what: str) -> None: ...

    def close(self) -> None: ...


class Registry:
    """The server's regions when it is one process: its registrations and their descriptors."""

    def __init__(self, shm_dir: str = SHM_DIR, max_regions: int | None = None) -> None:
        self.registrations = Registrations(shm_dir, max_regions)
        self.opened = OpenRegions(shm_dir)

    # -- registration -------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Open ``key`` and hold ``[offset, offset + byte_size)`` of it under ``name``."""
        region, fd = self.registrations.register(name, key, offset, byte_size)
        self.opened.add(region, fd)
        return region

    def unregister(self, name: str = "") -> None:
        """Forget ``name`` (every region when empty). Unknown names are not an error."""
        self.opened.remove(r.name for r in self.registrations.unregister(name))

    def status(self, name: str = "") -> list[Region]:
        """The registered regions (just ``name`` when given; NotFound when it is not registered)."""
        return self.registrations.status(name)

    def close(self) -> None:
        self.unregister("")

    def __len__(self) -> int:
        return len(self.registrations)

    # -- the extension's calls (SharedMemory) -------------------------------------------
    async def register_region(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self.register(name, key, offset, byte_size)

    async def unregister_region(self, name: str) -> None:
        self.unregister(name)

    async def region_status(self, name: str) -> list[Region]:
        return self.status(name)

    # -- data ------------------------------------------------------------------------
    def check(self, where: Slice, what: str) -> None:
        """Raise InvalidInput unless ``where`` lies inside a registered region."""
        self.opened.check(where, what)

    def read(self, where: Slice, dtype: str, shape: list[int], what: str) -> np.ndarray:
        """A fresh array of ``shape`` filled from the slice (one copy, no mapping)."""
        return self.opened.read(where, dtype, shape, what)

    def write(self, where: Slice, data: bytes, what: str) -> None:
        """Write ``data`` at the start of the slice (it must fit)."""
        self.opened.write(where, data, what)
