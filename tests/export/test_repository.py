"""Writing into a model repository: versions and atomicity (no half-written model.onnx, ever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from export import repository
from export.errors import ExportError

PAYLOAD = b"\x08\x07" + os.urandom(4096)  # the bytes are opaque to publish()


def _visible_models(root: Path) -> list[Path]:
    """What a repository reader sees: ``<name>/<decimal version>/model.onnx``."""
    return sorted(p for p in root.glob("*/*/model.onnx") if p.parent.name.isdigit())


def _litter(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.startswith("."))


def test_next_free_version_and_explicit_versions(tmp_path):
    first = repository.publish(tmp_path, "m", PAYLOAD)
    second = repository.publish(tmp_path, "m", PAYLOAD + b"2")
    assert first == tmp_path / "m" / "1" / "model.onnx" and second == tmp_path / "m" / "2" / "model.onnx"
    assert second.read_bytes() == PAYLOAD + b"2"
    (tmp_path / "m" / "7").mkdir()  # an empty version directory still counts as taken
    assert repository.publish(tmp_path, "m", PAYLOAD) == tmp_path / "m" / "8" / "model.onnx"
    assert repository.publish(tmp_path, "m", PAYLOAD, version=5) == tmp_path / "m" / "5" / "model.onnx"
    assert repository.versions(tmp_path / "m") == [1, 2, 5, 7, 8]
    assert _litter(tmp_path) == []
    # Readable by other users (the server may run as another uid), as umask allows.
    mask = os.umask(0o022)
    os.umask(mask)
    assert first.parent.stat().st_mode & 0o777 == 0o777 & ~mask
    assert first.stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_existing_version_is_not_replaced_without_overwrite(tmp_path):
    path = repository.publish(tmp_path, "m", PAYLOAD, version=3)
    with pytest.raises(ExportError, match="already exists"):
        repository.publish(tmp_path, "m", b"other", version=3)
    assert path.read_bytes() == PAYLOAD
    assert repository.publish(tmp_path, "m", b"other", version=3, overwrite=True) == path
    assert path.read_bytes() == b"other"
    assert path.stat().st_mode & 0o044 == 0o044
    assert _litter(tmp_path) == []


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../up", "x" * 200, "a..b", "abc\n", "-x"])
def test_bad_model_names(tmp_path, name):
    with pytest.raises(ExportError, match="not a valid model name"):
        repository.publish(tmp_path, name, PAYLOAD)
    assert list(tmp_path.iterdir()) == []


def test_the_exporter_and_the_server_share_one_layout(tmp_path):
    """Whatever the exporter accepts the server serves, and the other way round (service.layout)."""
    from service import layout
    from service.engine import loading

    for name in ("digits", "a.b-c_1", "x" * 128, "a..b", ".x", "x" * 129, "a/b", "é"):
        exporter_ok = True
        try:
            repository.check_name(name)
        except ExportError:
            exporter_ok = False
        try:
            loading.check_name(name)
            server_ok = True
        except Exception:
            server_ok = False
        assert exporter_ok == server_ok == layout.is_valid_name(name), name
    for version in ("1", "9223372036854775807", "99999999999999999999999", "\u00b2", "01", "0"):
        (tmp_path / "m" / version).mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(PAYLOAD)
    assert repository.versions(tmp_path / "m") == [1, 2**63 - 1]  # empty version directories count here
    assert loading.repository_versions(tmp_path / "m") == [1]  # the server needs a model file
    with pytest.raises(ExportError, match="--version: expected a decimal integer from 1 to"):
        repository.publish(tmp_path, "m", PAYLOAD, version=2**63)
    with pytest.raises(ExportError, match="no version left"):
        repository.publish(tmp_path, "m", PAYLOAD)


@pytest.mark.parametrize("version", [None, 4])
def test_a_failed_write_leaves_no_model_and_no_temporary_files(tmp_path, monkeypatch, version):
    def failing_write(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    if version is not None:
        repository.publish(tmp_path, "m", b"old", version=version)
    monkeypatch.setattr(repository, "_write_file", failing_write)
    with pytest.raises(ExportError, match="No space left on device"):
        repository.publish(tmp_path, "m", PAYLOAD, version=version, overwrite=True)
    expected = [] if version is None else [tmp_path / "m" / "4" / "model.onnx"]
    assert _visible_models(tmp_path) == expected
    if version is not None:
        assert expected[0].read_bytes() == b"old"
    assert _litter(tmp_path) == []


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from export import repository

    def stalled_write(path, data):
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        flag = Path(sys.argv[2])
        flag.with_suffix(".tmp").write_text(str(path))
        flag.with_suffix(".tmp").rename(flag)  # tell the test: half of the file is on disk
        threading.Event().wait()  # until SIGKILL

    repository._write_file = stalled_write
    repository.publish(Path(sys.argv[1]), "m", b"x" * 100000, version=None if sys.argv[3] == "-" else 2,
                       overwrite=True)
    """
)


@pytest.mark.parametrize("version", ["-", "2"])
def test_an_export_killed_mid_write_never_exposes_a_partial_model(tmp_path, version):
    repo, flag = tmp_path / "repo", tmp_path / "half-written"
    if version == "2":
        repository.publish(repo, "m", b"previous", version=2)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(repo), str(flag), version],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
        half = Path(flag.read_text())
        assert half.stat().st_size == 50000
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # What a reader sees: no model.onnx other than the complete previous one.
    visible = _visible_models(repo)
    assert visible == ([] if version == "-" else [repo / "m" / "2" / "model.onnx"])
    for path in visible:
        assert path.read_bytes() == b"previous"
    assert half.name.startswith(".") or half.parent.name.startswith(".")
    # The dead writer's staging entry is cleaned up by the next write into the model directory.
    assert _litter(repo)
    repository.publish(repo, "m", PAYLOAD)
    assert _litter(repo) == []


def test_resolve_model_file(tmp_path):
    one = repository.publish(tmp_path, "m", PAYLOAD)
    two = repository.publish(tmp_path, "m", PAYLOAD)
    assert repository.resolve_model_file(tmp_path / "m") == two
    assert repository.resolve_model_file(tmp_path / "m" / "1") == one
    assert repository.resolve_model_file(one) == one
    with pytest.raises(ExportError, match="no such model"):
        repository.resolve_model_file(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no model.onnx"):
        repository.resolve_model_file(tmp_path / "empty")
