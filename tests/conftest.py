"""Shared fixtures: tests never touch the network or the user's models."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A speed measurement of its own (none at first): the user's saved one neither changes tests nor gets overwritten.
os.environ["SDKIT_CACHE"] = tempfile.mkdtemp(prefix="sdkit-test-cache-")
atexit.register(shutil.rmtree, os.environ["SDKIT_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny random sd1/sd2/sdxl checkpoints in their real key layouts, written once per test session."""
    from sdkit.testing import write_tiny

    folder = tmp_path_factory.mktemp("checkpoints")
    files = {family: folder / f"tiny-{family}.safetensors" for family in ("sd1", "sd2", "sdxl")}
    for family, path in files.items():
        write_tiny(family, path)
    return files


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Every test runs with connections outside this machine refused: a hidden hub or telemetry call fails loudly."""
    import ipaddress
    import socket

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def local(address) -> bool:
        if isinstance(address, (str, bytes)):  # a Unix socket
            return True
        host = address[0]
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def connect(self, address):
        if not local(address):
            raise OSError(f"sdkit tests run offline: a connection to {address!r} was attempted")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not local(address):
            raise OSError(f"sdkit tests run offline: a connection to {address!r} was attempted")
        return real_connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    yield
    socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex
