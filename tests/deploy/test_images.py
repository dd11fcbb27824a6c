"""What the Dockerfiles do, checked without docker (which cannot run here).

The serving install itself is proven by test_serving_install.py, which runs
the same script on the same lock file; these tests pin down the rest: the
lock files satisfy pyproject.toml, the final stage is the small, non-root,
torch-free runtime the Kubernetes manifests assume, and signals reach the
server.
"""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service import config as cfg
from tests.deploy import dockerfile
from tests.deploy import manifests as m

IMAGES = {"Dockerfile": ("cpu", "requirements-cpu.txt"), "Dockerfile.gpu": ("gpu", "requirements-gpu.txt")}
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "git", "cmake")


def lock(filename: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a hash-locked requirements file."""
    text = (m.DOCKER / filename).read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split(" --hash=")
        req = Requirement(spec.strip())
        (specifier,) = req.specifier
        assert specifier.operator == "==", f"{filename}: {spec} is not an exact pin"
        pins[canonicalize_name(req.name)] = (specifier.version, [o.strip() for o in options])
    return pins


@pytest.mark.parametrize("image", list(IMAGES))
def test_lock_satisfies_pyproject_and_is_hashed(image):
    extra, filename = IMAGES[image]
    pins = lock(filename)
    project = tomllib.loads((m.ROOT / "pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"][extra]]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{filename} lacks {req.name} ({text}); run python deploy/docker/lock.py"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{filename}: {name}=={pins[name][0]} vs {text}"
        )
    for name, (_, hashes) in pins.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    assert "torch" not in pins and "torchvision" not in pins
    other = "onnxruntime" if extra == "gpu" else "onnxruntime-gpu"
    assert other not in pins, "onnxruntime and onnxruntime-gpu ship the same module"


@pytest.mark.parametrize("image", list(IMAGES))
def test_build_stage_runs_the_tested_install(image):
    extra, filename = IMAGES[image]
    build, final = dockerfile.stages(m.DOCKER / image)[0], dockerfile.stages(m.DOCKER / image)[-1]
    installs = [w for w in dockerfile.run_words(build) if "install-serving.sh" in " ".join(w)]
    assert len(installs) == 1
    words = installs[0]
    script = next(i for i, w in enumerate(words) if w.endswith("install-serving.sh"))
    venv, lockfile, src, given_extra = words[script + 1 : script + 5]
    assert lockfile.endswith("/" + filename) and given_extra == extra
    copied = " ".join(build.all("COPY"))
    assert f"deploy/docker/{filename}" in copied and "deploy/docker/install-serving.sh" in copied
    # The final stage takes the venv as built, and installs nothing with pip.
    assert any(c.startswith("--from=build") and venv in c for c in final.all("COPY"))
    assert not any("pip" in w for words in dockerfile.run_words(final) for w in words)
    assert final.base == build.base, "the venv's interpreter must be the final stage's"


@pytest.mark.parametrize("image", list(IMAGES))
def test_final_stage_is_a_non_root_runtime_with_signal_handling(image):
    final = dockerfile.stages(m.DOCKER / image)[-1]
    assert final.name == "serve"
    for words in dockerfile.run_words(final):
        assert not set(words) & set(BUILD_TOOLS), f"build tools in the final stage: {words}"
    user = final.one("USER")
    uid = int(user.split(":")[0])
    assert uid > 0, "USER must be numeric and non-root so runAsNonRoot can verify it"
    for target in m.WORKLOAD_TARGETS:
        pod = m.pod_spec(m.find(m.rendered(target), "Deployment"))["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"]) == tuple(int(x) for x in user.split(":"))
    entrypoint = dockerfile.exec_form(final.one("ENTRYPOINT"))
    # tini as PID 1 forwards SIGTERM to the server; exec form, so no shell sits in between.
    assert entrypoint[0].endswith("tini") and entrypoint[-2:] == ["svertka", "serve"]
    assert final.one("STOPSIGNAL") == "SIGTERM"
    exposed = sorted(int(p) for p in final.one("EXPOSE").split())
    assert exposed == sorted([cfg.DEFAULT_GRPC_PORT, cfg.DEFAULT_METRICS_PORT])
    env = " ".join(final.all("ENV"))
    assert "SVERTKA_MODEL_REPOSITORY=/models" in env and final.one("VOLUME") == '["/models"]'
    assert healthcheck(image)[:2] == ["svertka", "health"]


def healthcheck(image: str) -> list[str]:
    """The final stage's HEALTHCHECK command (exec form)."""
    health = dockerfile.stages(m.DOCKER / image)[-1].one("HEALTHCHECK")
    return dockerfile.exec_form(health.split(" CMD ", 1)[1])


@pytest.mark.parametrize("image", list(IMAGES))
def test_healthcheck_is_svertka_health_within_dockers_timeout(image):
    """The command parses as `svertka health` (test_healthcheck.py runs it against real servers),
    and its own deadline ends before Docker's, so a slow server reads unhealthy, not a timeout."""
    from service import cli, health_cli

    args = cli.build_parser().parse_args(healthcheck(image)[1:])
    assert args.handler is health_cli.run_health
    options = dict(
        re.findall(r"--([a-z-]+)=(\d+)s", dockerfile.stages(m.DOCKER / image)[-1].one("HEALTHCHECK"))
    )
    assert args.timeout_s + 1 < int(options["timeout"])


def test_model_baking_defaults_to_an_empty_repository():
    for image in IMAGES:
        final = dockerfile.stages(m.DOCKER / image)[-1]
        default = next(a for a in final.all("ARG") if a.startswith("MODEL_DIR="))
        directory = m.ROOT / default.split("=", 1)[1]
        assert directory.is_dir() and not list(directory.rglob("*.onnx"))
        assert any(c.endswith("${MODEL_DIR}/ /models/") for c in final.all("COPY"))


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {line.strip() for line in (m.ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests"} <= ignored
    needed = {"pyproject.toml", "README.md", "service", "export", "deploy/docker", "models"}
    assert not needed & ignored


@pytest.mark.parametrize("image", list(IMAGES))
def test_image_settings_are_serve_settings(image):
    """SVERTKA_* variables baked into the image are ones `svertka serve` reads."""
    import argparse

    from service import server_cli

    parser = argparse.ArgumentParser()
    server_cli.add_serve_arguments(parser)
    known = {
        cfg.ENV_PREFIX + option[2:].replace("-", "_").upper()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and not option.startswith("--no-")
    }
    final = dockerfile.stages(m.DOCKER / image)[-1]
    baked = set(re.findall(r"\b(SVERTKA_[A-Z_]+)", " ".join(final.all("ENV") + final.all("HEALTHCHECK"))))
    assert baked and baked <= known, sorted(baked - known)
