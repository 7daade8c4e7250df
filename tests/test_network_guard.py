import socket

import pytest

from conftest import NetworkAccessError


def test_tests_cannot_reach_the_network():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(NetworkAccessError):
        s.connect(("203.0.113.1", 443))  # TEST-NET-3: never reached, the guard stops it first
    s.close()


def test_loopback_is_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket()
    client.connect(server.getsockname())
    client.close()
    server.close()
