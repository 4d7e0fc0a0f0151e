"""The pytest11 entry point of pykvm (see :mod:`pykvm.testing`)."""
import os

import pytest

from .. import abi
from ..kvm import DEFAULT_PATH

LACKS = "pykvm: host lacks"          # prefix of the only skips allowed where /dev/kvm exists


def kvm_path() -> str:
    return os.environ.get("PYKVM_DEVICE", DEFAULT_PATH)


def kvm_usable() -> bool:
    return os.access(kvm_path(), os.R_OK | os.W_OK)


def pytest_addoption(parser):
    g = parser.getgroup("pykvm")
    g.addoption("--ktap", metavar="FILE", default=None,
                help="write test results in KTAP format to FILE")


def pytest_configure(config):
    for line in ("requires_kvm: needs a usable /dev/kvm",
                 "requires_cap(name): needs KVM_CAP_<name> (implies requires_kvm)",
                 "requires_arch(name): runs only on this host architecture (implies requires_kvm)"):
        config.addinivalue_line("markers", line)
    path = config.getoption("--ktap")
    if path:
        from .ktap import KtapWriter
        config._pykvm_ktap = KtapWriter(path)
        config.pluginmanager.register(config._pykvm_ktap, "pykvm-ktap")


def _is_hw(item) -> bool:
    return any(item.get_closest_marker(m) for m in ("requires_kvm", "requires_cap", "requires_arch"))


def pytest_runtest_setup(item):
    if not _is_hw(item):
        return
    for m in item.iter_markers("requires_arch"):
        if abi.ARCH not in m.args:
            pytest.skip(f"{LACKS} architecture {'/'.join(m.args)} (this is {abi.ARCH})")
    if not kvm_usable():
        pytest.skip(f"{LACKS} a usable {kvm_path()}")
    caps = [c for m in item.iter_markers("requires_cap") for c in m.args]
    if caps:
        from ..kvm import Kvm
        with Kvm() as k:
            for c in caps:
                if not k.check_extension(c):
                    pytest.skip(f"{LACKS} KVM_CAP_{c}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _is_hw(item) and kvm_usable() and not getattr(rep, "wasxfail", None):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not reason.startswith(("Skipped: " + LACKS, LACKS)):
            rep.outcome = "failed"
            rep.longrepr = (f"fail-closed: hardware test skipped although {kvm_path()} exists "
                            f"({reason})")


@pytest.fixture
def kvm():
    """An open :class:`pykvm.Kvm` on the host's /dev/kvm (closed after the test)."""
    if not kvm_usable():
        pytest.skip(f"{LACKS} a usable {kvm_path()}")
    from ..kvm import Kvm
    with Kvm() as k:
        yield k


@pytest.fixture
def guest_vm(kvm):
    """A factory: ``guest_vm("msr", vcpus=1, **machine_options)`` → a started-up
    :class:`pykvm.machine.Machine` running the named built-in guest (or an image path).
    Every machine is closed after the test. Drive it selftest-style::

        m = guest_vm("msr")
        m.set_params(0xC0000081, 0x1234)
        assert m.sync(stage=1) == (...)
        m.done()

    A failing GUEST_ASSERT in the guest raises :class:`pykvm.report.GuestAssertion` (an
    AssertionError) whose message has the guest's expression, file:line and values."""
    from ..machine import Machine
    made = []

    def factory(guest, **kw):
        m = Machine(guest, kvm=kvm, **kw)
        made.append(m)
        return m
    yield factory
    for m in made:
        m.close()
