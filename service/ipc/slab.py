"""A frontend's shared memory slab: where it puts request rows for the engine to read.

Each frontend process creates one slab, a POSIX shared memory object
(``/dev/shm/<name>``), with its pages reserved up front (``posix_fallocate``:
a ``/dev/shm`` too small fails here, at start-up, with a message that names
the fix, instead of a SIGBUS on a later write). The engine maps it by name
when the frontend connects; the frontend then unlinks the name, so the
memory lives exactly as long as one of the two maps it: a frontend killed
with SIGKILL leaves nothing in ``/dev/shm``.

Inside the slab the frontend hands out byte ranges (:class:`Ranges`) for the
rows of one request at a time; a range is given back when the engine's answer
for it has arrived, never earlier (the engine may be reading it in a batch).
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets

import numpy as np

SHM_DIR = "/dev/shm"
#: Ranges start on cache-line boundaries.
ALIGN = 64


class SlabError(OSError):
    """The slab cannot be made or mapped (the message says what to change)."""


class Slab:
    """One mapped shared memory object: ``buf`` is its bytes."""

    def __init__(self, name: str, size: int, fd: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self._fd = fd
        self.buf = mapping
        self._unlinked = False

    @classmethod
    def create(cls, prefix: str, size: int, shm_dir: str = SHM_DIR) -> Slab:
        """A new slab of ``size`` bytes with every page reserved."""
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(shm_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                free = os.statvfs(shm_dir)
                raise SlabError(
                    f"{shm_dir} has no room for a {size >> 20} MiB frontend slab "
                    f"({free.f_bavail * free.f_frsize >> 20} MiB free): give {shm_dir} more space "
                    "(in Kubernetes an emptyDir with medium: Memory mounted there, sized for "
                    "frontends x --frontend-shm-mib), or lower --frontend-shm-mib / --frontends"
                ) from None
            raise
        return cls(name, size, fd, mmap.mmap(fd, size))

    @classmethod
    def attach(cls, name: str, size: int, shm_dir: str = SHM_DIR) -> Slab:
        """Map an existing slab (the engine's side)."""
        if "/" in name or name.startswith("."):
            raise SlabError(f"not a slab name: {name!r}")
        fd = os.open(os.path.join(shm_dir, name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size < size:
                raise SlabError(f"slab {name} is smaller than {size} bytes")
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, size, fd, mapping)

    def unlink(self, shm_dir: str = SHM_DIR) -> None:
        """Remove the name (the mappings stay valid until closed)."""
        if not self._unlinked:
            self._unlinked = True
            try:
                os.unlink(os.path.join(shm_dir, self.name))
            except FileNotFoundError:
                pass

    def rows(self, offset: int, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
        """An array of ``shape`` and ``dtype`` viewing the slab at ``offset`` (no copy)."""
        count = int(np.prod(shape))
        if offset < 0 or offset % ALIGN or offset + count * np.dtype(dtype).itemsize > self.size:
            raise SlabError(f"rows of shape {list(shape)} at offset {offset} do not fit the slab")
        return np.frombuffer(self.buf, dtype, count, offset).reshape(shape)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass  # an array still views it: the mapping goes when that array does
        os.close(self._fd)


class Ranges:
    """First-fit ranges of a slab, for one event loop (not thread-safe)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted, coalesced
        self._taken: dict[int, int] = {}

    @property
    def in_use(self) -> int:
        return sum(self._taken.values())

    def take(self, nbytes: int) -> int | None:
        """The offset of a free range of ``nbytes`` (aligned), or None when none is free."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (offset, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, length - need)
                self._taken[offset] = need
                return offset
        return None

    def give_back(self, offset: int) -> None:
        length = self._taken.pop(offset)
        free = self._free
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, (offset, length))
        # Coalesce with the neighbours.
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i] = (free[i][0], free[i][1] + free[i + 1][1])
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            del free[i]
