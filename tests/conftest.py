import os
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def checkout():
    return ROOT


def pytest_collection_modifyitems(config, items):
    # Everything under tests/hw and tests/x86 needs the real /dev/kvm: mark it so the
    # fail-closed policy (skip = failure where /dev/kvm exists) applies.
    hw = tuple(f"{os.sep}tests{os.sep}{d}{os.sep}" for d in ("hw", "x86"))
    for item in items:
        if any(d in str(item.fspath) for d in hw):
            item.add_marker(pytest.mark.requires_kvm)


def _plugin_registered() -> bool:
    from importlib.metadata import entry_points
    try:
        eps = entry_points(group="pytest11")
    except TypeError:                      # Python < 3.10
        eps = entry_points().get("pytest11", [])
    return any(ep.value.startswith("pykvm.testing") for ep in eps)


# Inside the labs pykvm runs from PYTHONPATH (no installed entry point): load the plugin here.
pytest_plugins = ["pytester"] + ([] if _plugin_registered() else ["pykvm.testing.plugin"])


# Tests that run only inside a QEMU lab (tests/lab/test_labs.py boots the labs and checks their
# results): not collected on the host, so the host run has no skipped hardware tests.
_LAB_ONLY = [os.path.join(ROOT, "tests", d) for d in ("riscv", "nested", os.path.join("lab", "inner_smoke"))]


def _inside_lab() -> bool:
    return os.path.exists("/lab/lab.conf") or os.environ.get("PYKVM_INNER_TESTS") == "1"


def pytest_ignore_collect(collection_path, config):
    if _inside_lab():
        return None
    p = str(collection_path)
    if any(p == d or p.startswith(d + os.sep) for d in _LAB_ONLY):
        return True
    return None


class Leftovers:
    """What the code under test opened and left open since this was made: threads it started
    that are still alive and fds whose number or target is new. Threads and fds that existed
    before (an earlier test's, ending on their own schedule) are neither counted nor required
    to stay, so a count that drops while a test runs is not taken for a leak."""

    def __init__(self):
        self.threads = set(threading.enumerate())
        self.fds = self._fd_targets()

    @staticmethod
    def _fd_targets() -> dict:
        out = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                out[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:                 # the listing's own directory fd, closed by now
                pass
        return out

    def threads_left(self, wait: float = 5.0) -> list:
        """Names of threads started since and still alive after up to ``wait`` seconds."""
        new = [t for t in threading.enumerate() if t not in self.threads]
        end = time.monotonic() + wait
        for t in new:
            t.join(max(0.0, end - time.monotonic()))
        return sorted(t.name for t in new if t.is_alive())

    def fds_left(self) -> dict:
        """{fd: target} of fds open now that were not open (to the same target) before."""
        return {fd: t for fd, t in self._fd_targets().items() if self.fds.get(fd) != t}

    def check(self) -> None:
        assert self.fds_left() == {}, "fds left open"
        assert self.threads_left() == [], "threads left running"


@pytest.fixture
def leftovers():
    """``snap = leftovers()`` records the process's threads and fds; ``snap.check()`` asserts
    that nothing opened since is still open (see :class:`Leftovers`)."""
    return Leftovers
