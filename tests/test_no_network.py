from __future__ import annotations

import socket
import urllib.request

import pytest


def test_a_connection_outside_this_machine_fails_loudly():
    with pytest.raises(OSError, match="sdkit tests run offline"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routable anyway
    with pytest.raises(OSError, match="offline"):
        urllib.request.urlopen("http://192.0.2.1/", timeout=1)


def test_loopback_still_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()
