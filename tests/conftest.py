"""Test settings: no network, and outputs in a temporary folder so a test run never touches yours.

Set here, at import time, so the notebook kernels that nbval starts inherit them too.

Two suites from one tree. ``pytest`` (``make test``) is the quick suite: every module of ``helpers``,
every notebook once, and one representative of each end-to-end path. ``RUN_SLOW=1 pytest``
(``make test-all``, what CI runs) adds the tests marked ``slow``: sweeps over more sizes, formats and
strategies on a path the quick suite already walks, benchmarks, real-process runs of signals, workers
and children, and the shipped twin's drawing check. ``RUN_BIG=1`` adds what builds the medium twin.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

# Nothing outside this machine is reachable in CI, and no test may try: the hub libraries are told
# they are offline, and any socket connection to a non-local address fails the test.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("FLUX_OUTPUTS", tempfile.mkdtemp(prefix="flux-test-outputs-"))
os.environ.setdefault("FLUX_MODEL", "tiny")


#: the full suite: the tests marked ``slow`` run too
FULL = bool(os.environ.get("RUN_SLOW"))


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_collection_finish(session):
    """What the imports made (torch, diffusers, transformers: 600,000 objects) lives to the end of the
    session: set it apart from the garbage collector, whose full collections otherwise scanned it all
    each time (0.3 s each, 74 of them: 15% of the quick suite's time). Nothing the tests make is
    frozen, and full collections come 10 times less often (what the libraries import lazily during the
    tests is scanned by each); a test that needs memory back collects it (free_memory, remove_folder)."""
    import gc

    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 100)


def pytest_report_header(config):
    return ("full suite (RUN_SLOW=1): the tests marked slow run too" if FULL else
            "quick suite: the tests marked slow are deselected (RUN_SLOW=1, or make test-all, runs them)")


# The browser test needs Chromium and a JupyterLab server: `make test-browser` runs it on purpose.
collect_ignore = [] if os.environ.get("FLUX_BROWSER_TESTS") else ["browser"]


class NetworkAccessError(RuntimeError):
    """A test tried to reach a non-local address."""


_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")
_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    if self.family == socket.AF_UNIX:
        return _real_connect(self, address)
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host.startswith(_LOCAL):
        return _real_connect(self, address)
    raise NetworkAccessError(f"test tried to reach {address!r}; tests must not use the network")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny twin built once for the session, in its own folder."""
    from helpers.twins.builder import build_twin

    return build_twin("tiny", tmp_path_factory.mktemp("twin") / "tiny")


@pytest.fixture(scope="session")
def klein_folder(tmp_path_factory) -> Path:
    """FLUX.2 [klein]'s tiny twin built once for the session, in its own folder."""
    from helpers.twins.builder import build_twin

    return build_twin("klein-tiny", tmp_path_factory.mktemp("twin") / "klein-tiny")
