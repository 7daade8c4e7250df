"""Test settings: no network, and outputs in a temporary folder so a test run never touches yours.

Set here, at import time, so the notebook kernels that nbval starts inherit them too.
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
    from helpers.models import build_twin

    return build_twin("tiny", tmp_path_factory.mktemp("twin") / "tiny")
