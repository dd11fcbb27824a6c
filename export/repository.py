"""Writing into a model repository (``<repo>/<name>/<version>/model.onnx``) atomically.

A reader (the server polling the repository, or a person) must never see a
half-written ``model.onnx``. A new version is staged as a hidden directory
``<repo>/<name>/.tmp-<pid>-<random>/`` and renamed to ``<version>/`` in one
``rename(2)``; replacing an existing version's file (``overwrite``) writes a
hidden temporary file next to it and ``os.replace``-s it. If the process is
killed mid-write, only the hidden staging entry is left; the next write into
the same model directory removes staging entries whose process is gone.
Readers skip names that are not version numbers. The layout rules (model names,
version directories, file names) are :mod:`service.layout`'s, the same the server
applies, so whatever this writes the server serves.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from export.errors import ExportError
from service import layout
from service.errors import shown

MODEL_FILENAME = layout.MODEL_FILE
_STAGING_RE = re.compile(r"^\.(?:tmp|model\.onnx\.tmp)-(\d+)-")


def check_name(name: str) -> str:
    if not layout.is_valid_name(name):
        raise ExportError(f"--name: {shown(name)} is not a valid model name ({layout.NAME_RULE})")
    return name


def check_version(version: int | None) -> None:
    if version is not None and not layout.is_version(version):
        raise ExportError(f"--version: expected {layout.VERSION_RULE}, got {version}")


def versions(model_dir: Path) -> list[int]:
    """Version numbers present in a model directory (version directories, empty ones too), ascending."""
    return layout.versions(model_dir, with_model=False)


def model_path(repository: Path, name: str, version: int) -> Path:
    return layout.model_path(repository, name, version)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(model_dir: Path) -> list[Path]:
    """Delete staging entries left by processes that no longer exist in a model directory and its versions."""
    removed: list[Path] = []
    if not model_dir.is_dir():
        return removed
    entries = list(model_dir.iterdir())
    for version_dir in [e for e in entries if e.is_dir() and layout.parse_version(e.name) is not None]:
        entries.extend(version_dir.iterdir())
    for entry in entries:
        m = _STAGING_RE.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync, so the rename that publishes it publishes complete bytes."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_target(repository: Path, name: str, version: int | None, overwrite: bool) -> None:
    """Fail fast, before any work, when :func:`publish` would refuse these arguments."""
    check_name(name)
    check_version(version)
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportError(f"{repository}: not a directory")
    if version is not None and not overwrite and model_path(repository, name, version).exists():
        raise ExportError(
            f"{model_path(repository, name, version)} already exists (pass --overwrite to replace it, or omit --version)"
        )


def publish(
    repository: Path, name: str, data: bytes, version: int | None = None, overwrite: bool = False
) -> Path:
    """Write ``data`` as ``repository/name/<version>/model.onnx``; the next free version by default."""
    check_target(repository, name, version, overwrite)
    model_dir = Path(repository) / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{model_dir}: cannot create the model directory ({exc.strerror})") from None
    remove_stale_staging(model_dir)
    if version is not None:
        target = model_path(repository, name, version)
        if target.parent.is_dir():
            return replace_file(target, data)
    candidate = version if version is not None else (max(versions(model_dir), default=0) + 1)
    while True:
        if candidate > layout.MAX_VERSION:
            raise ExportError(f"{model_dir}: no version left after {layout.MAX_VERSION}; pass --version")
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=model_dir))
        try:
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; a version dir is for all readers
            _write_file(staging / MODEL_FILENAME, data)
            os.rename(staging, model_dir / str(candidate))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            # Another writer took this version between our scan and the rename.
            if version is None and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                candidate += 1
                continue
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise ExportError(f"{model_dir / str(candidate)} appeared while writing; try again") from None
            raise ExportError(f"{model_dir}: cannot write the model ({exc.strerror})") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(model_dir)
        return model_dir / str(candidate) / MODEL_FILENAME


def replace_file(target: Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` over ``target`` atomically (a temporary file beside it, fsync'd, renamed), with
    ``mode``, by default what ``open`` would give a new file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)  # mkstemp makes it 0600
        _write_file(tmp, data)
        os.replace(tmp, target)
    except OSError as exc:
        raise ExportError(f"{target}: cannot write the model ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return target


def resolve_model_file(path: str | os.PathLike[str]) -> Path:
    """A model file from a path: the file itself, a version directory, or a model directory (newest)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / MODEL_FILENAME).is_file():
            return path / MODEL_FILENAME
        found = versions(path)
        for v in reversed(found):
            if (path / str(v) / MODEL_FILENAME).is_file():
                return path / str(v) / MODEL_FILENAME
        raise ExportError(f"{path}: no {MODEL_FILENAME} here or in a version directory under it")
    raise ExportError(f"{path}: no such model file or directory")
