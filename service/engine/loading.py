"""The files of a model repository, as loading reads them: names, versions, fingerprints, sessions.

Blocking functions run in the repository's loader thread; none keeps state.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from pathlib import Path

import numpy as np

from service import config, errors, layout
from service.engine import runtime

log = logging.getLogger(__name__)

MODEL_FILE = layout.MODEL_FILE
#: Hex digits of the model file's sha256 that identify the weights being served.
FINGERPRINT_CHARS = 12
#: Largest difference between an input's output alone and in a batch, relative to the largest output,
#: that still counts as the same answer (runtime.Session.warm_up measures it). Numerical noise between
#: kernels chosen for different batch sizes is far below it (float32: about 1e-6; float16: about
#: 1e-3); a model whose rows depend on each other (a BatchNorm exported in training mode normalises
#: with the batch's own statistics) is off by the order of the outputs themselves.
INVARIANCE_TOLERANCE = 1e-2


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (service.layout), else raise ModelNotFound (it can't exist)."""
    if not layout.is_valid_name(name):
        raise errors.ModelNotFound(f"invalid model name {errors.shown(name)}: expected {layout.NAME_RULE}")
    return name


def repository_versions(model_dir: Path) -> list[int]:
    """Versions present on disk: version directories (service.layout) holding a model.onnx."""
    return layout.versions(model_dir)


def relative_to(repository: Path, text: str) -> str:
    """``text`` with the repository's own path taken out: clients see paths inside it only."""
    for root in {str(repository), str(repository.resolve())}:
        text = text.replace(root + "/", "").replace(root, "<repository>")
    return text


def model_names(repository: Path) -> list[str]:
    """The model directories of ``repository`` (valid names; hidden entries and files skipped)."""
    names = []
    for child in sorted(repository.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if not layout.is_valid_name(child.name):
            log.warning("ignoring %s: not a valid model name (%s)", child, layout.NAME_RULE)
            continue
        names.append(child.name)
    return names


def file_fingerprint(path: Path) -> str:
    """The first FINGERPRINT_CHARS hex digits of the file's sha256 (blocking: run it off the loop)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def load_sessions(
    path: Path, settings: config.ModelSettings, cpu_budget: int, trt_cache_dir: Path | None = None
) -> tuple[list[runtime.Session], str]:
    """The loader thread's work: the file's fingerprint, then the warmed-up sessions."""
    try:
        sha256 = file_fingerprint(path)
    except OSError as exc:
        raise runtime.ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    sessions = runtime.load_instances(path, settings, cpu_budget, trt_cache_dir)
    warn_if_batch_dependent(sessions[0], settings.max_batch_size)
    return sessions, sha256


def warn_if_batch_dependent(session: runtime.Session, max_batch_size: int) -> None:
    """A WARNING when an input's output at warm-up depended on the other rows of its batch."""
    difference = session.batch_difference
    if max_batch_size > 1 and not difference <= INVARIANCE_TOLERANCE:  # NaN included
        log.warning(
            "%s: not batch-invariant: an input's output alone and in a batch of %d differ by %.3g of the "
            "largest output (tolerance %g), so each answer depends on the other requests batched with it. "
            "The classic cause is a BatchNorm exported in training mode (call model.eval() before "
            "torch.onnx.export); the model is served as it is",
            session.path, max_batch_size, difference, INVARIANCE_TOLERANCE,
        )  # fmt: skip


def close_loaded(future: concurrent.futures.Future) -> None:
    """Close the sessions of a load nobody waits for any more (runs in the loader thread)."""
    if future.cancelled() or future.exception() is not None:
        return
    sessions, _ = future.result()
    for session in sessions:
        session.close()


def parse_version(name: str, version: str | int) -> int:
    if isinstance(version, np.integer):
        version = int(version)
    parsed = version if layout.is_version(version) else layout.parse_version(version)
    if parsed is None:
        raise errors.ModelNotFound(
            f"model '{name}' has no version {errors.shown(version)} (a version is {layout.VERSION_RULE})"
        )
    return parsed


def config_stamp(directory: Path) -> tuple:
    stamps = []
    for fname in layout.CONFIG_FILES:
        try:
            st = (directory / fname).stat()
        except OSError:
            continue
        stamps.append((fname, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def desired_fingerprint(directory: Path) -> tuple:
    """What the repository currently asks to serve: (version, model file stamp, config stamp).

    Polling reloads a model when this changes, and does not retry a failed
    load until it changes (a half-copied file is retried once it is complete).
    """
    versions = repository_versions(directory)
    try:
        settings = config.ModelSettings.load(directory)
        wanted: int | str | None = settings.version or (versions[-1] if versions else None)
    except Exception:  # config.ConfigError, or anything else a broken file raises: same outcome
        wanted = "bad config"
    stamp = None
    if isinstance(wanted, int):
        try:
            st = (directory / str(wanted) / MODEL_FILE).stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
    return (wanted, stamp, config_stamp(directory))
