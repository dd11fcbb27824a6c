"""The suite's two tiers, told apart by the ``integration`` marker (README, "Tests").

* **unit** (no marker): fakes, or the tiny real ONNX model and onnxruntime in
  this process; no svertka server is started. ``make test-unit`` runs these.
* **integration**: a real svertka server, in this process on a loopback port
  (``InProcessServer``) or as a subprocess (``svertka serve``, ``make bench``,
  a Prometheus scraping it).

A test is integration when it requests one of :data:`SERVER_FIXTURES`, directly
or through another fixture (``stub``, ``channel``, ...): the hook below marks
it; a test that starts a server in its own body carries the mark itself
(``pytestmark`` or ``@pytest.mark.integration``). ``slow`` is independent of
the tier: both have slow tests.
"""

from __future__ import annotations

import pytest

#: Fixtures that start a real server (tests/api/conftest.py, tests/triton/conftest.py, and modules' own).
SERVER_FIXTURES = frozenset({"server", "make_server", "srv", "shm_server"})


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
