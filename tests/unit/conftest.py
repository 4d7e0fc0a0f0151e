"""Fixtures several unit-test files share."""
import os
import time

import pytest


@pytest.fixture
def sockdir():
    """A fresh directory for Unix sockets (mode 0700, a short path under /tmp: a socket's path
    is limited to 107 bytes), emptied and removed after the test."""
    d = f"/tmp/pykvm-u{os.getpid()}-{time.monotonic_ns() % 10**6}"
    os.mkdir(d, 0o700)
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
