"""The pytest11 entry point of pykvm (see :mod:`pykvm.testing`).

pytest loads this module in every run of an environment where pykvm is installed, so it imports
nothing of pykvm's core (no ``pykvm.abi``, no cffi, no C helper) and checks no hardware when it
is loaded: the checks run in hooks, only for tests that use a pykvm marker or fixture, and the
core is imported only by those fixtures. On a host pykvm does not support, or without a usable
``/dev/kvm``, such tests are skipped ("pykvm: host lacks ..."), never errors.
"""
import os

import pytest

from .._host import host_arch

LACKS = "pykvm: host lacks"          # prefix of the only skips allowed where /dev/kvm exists
DEFAULT_PATH = "/dev/kvm"            # pykvm.kvm.DEFAULT_PATH, without importing pykvm.kvm
SUPPORTED_ARCHES = ("x86_64", "riscv64")
HW_MARKERS = ("requires_kvm", "requires_cap", "requires_arch")
HW_FIXTURES = ("kvm", "guest_vm")    # fixtures that need KVM (and those built on them)
SOURCE_SUFFIXES = (".c", ".S")       # pykvm.guestbuild.SOURCE_SUFFIXES


def kvm_path() -> str:
    """The KVM device the tests use: ``$PYKVM_DEVICE``, else ``/dev/kvm``."""
    return os.environ.get("PYKVM_DEVICE", DEFAULT_PATH)


def kvm_usable() -> bool:
    """Whether :func:`kvm_path` can be opened for reading and writing."""
    return os.access(kvm_path(), os.R_OK | os.W_OK)




def _lacks_host() -> str:
    """Why this host cannot run pykvm hardware tests ("" when it can)."""
    arch = host_arch()
    if arch not in SUPPORTED_ARCHES:
        return (f"{LACKS} an architecture pykvm supports ({' or '.join(SUPPORTED_ARCHES)}; "
                f"this is {arch})")
    if not kvm_usable():
        return f"{LACKS} a usable {kvm_path()}"
    return ""


def pytest_addoption(parser):
    """``--ktap FILE``."""
    g = parser.getgroup("pykvm")
    g.addoption("--ktap", metavar="FILE", default=None,
                help="write test results in KTAP format to FILE (a regular file is replaced "
                "atomically; a symlink, device or FIFO is written through)")


def pytest_configure(config):
    """Register the markers; with ``--ktap``, the KTAP writer. A ``--ktap`` path that can never
    take the report (empty, a directory, a socket, a block device) is a usage error (pytest
    status 4, one line) before any test runs."""
    for line in ("requires_kvm: needs a usable /dev/kvm",
                 "requires_cap(name): needs KVM_CAP_<name> (implies requires_kvm)",
                 "requires_arch(name): runs only on this host architecture (implies requires_kvm)"):
        config.addinivalue_line("markers", line)
    path = config.getoption("--ktap")
    if path is not None:
        from .ktap import KtapWriter
        try:
            config._pykvm_ktap = KtapWriter(path)
        except OSError as e:       # a directory, socket, block device: refused before any test
            raise pytest.UsageError(f"--ktap: {e}") from None
        config.pluginmanager.register(config._pykvm_ktap, "pykvm-ktap")


def _is_hw(item) -> bool:
    return any(item.get_closest_marker(m) for m in HW_MARKERS)


def _uses_kvm(item) -> bool:
    return _is_hw(item) or any(f in getattr(item, "fixturenames", ()) for f in HW_FIXTURES)


def pytest_runtest_setup(item):
    """Skip a test that uses a pykvm marker or a KVM fixture where the host lacks what it needs
    (architecture, a usable KVM device, a capability), with a "pykvm: host lacks" reason."""
    if not _uses_kvm(item):
        return
    for m in item.iter_markers("requires_arch"):
        if host_arch() not in m.args:
            pytest.skip(f"{LACKS} architecture {'/'.join(m.args)} (this is {host_arch()})")
    why = _lacks_host()
    if why:
        pytest.skip(why)
    caps = [c for m in item.iter_markers("requires_cap") for c in m.args]
    if caps:
        from ..kvm import Kvm
        with Kvm() as k:
            for c in caps:
                if not k.check_extension(c):
                    pytest.skip(f"{LACKS} KVM_CAP_{c}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail closed: where the KVM device is usable, a marked hardware test that skips for any
    reason other than "pykvm: host lacks ..." is reported as failed."""
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
    why = _lacks_host()
    if why:
        pytest.skip(why)
    from ..kvm import Kvm
    with Kvm() as k:
        yield k


def _beside_test(request, path):
    """``path`` as given when it exists (or is absolute), else relative to the test's file."""
    p = os.fspath(path)
    if os.path.isabs(p) or os.path.exists(p):
        return p
    here = os.path.join(os.path.dirname(str(request.path)), p)
    return here if os.path.exists(here) else p


def _build_source(request, source, mode=None, arch=None, cflags=()):
    from ..guestbuild import GuestBuildError, build
    path = _beside_test(request, source)
    try:
        return build(path, arch=arch, mode=mode, cflags=cflags)
    except GuestBuildError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def guest_image(request):
    """A factory: ``guest_image("my_guest.c", mode=None, arch=None, cflags=())`` → the path of
    the image built from a guest source beside the test file (a ``.c`` or ``.S`` file linked
    with pykvm's guest runtime; see :mod:`pykvm.guestbuild`). Builds are cached by content.
    A compile error fails the test with the compiler's own message. Needs no KVM."""
    def factory(source, *, mode=None, arch=None, cflags=()):
        return _build_source(request, source, mode, arch, cflags)
    return factory


@pytest.fixture
def guest_vm(request, kvm):
    """A factory: ``guest_vm(guest, vcpus=1, **machine_options)`` → a started-up
    :class:`pykvm.machine.Machine` running ``guest``: the name of a built-in guest (``"msr"``),
    an image path, or a guest source of your own (``"my_guest.c"``, ``"boot.S"``) that is built
    with pykvm's guest runtime and cached by content. Relative paths are taken relative to the
    test's own file, so the guest lives beside its test. For a source, ``mode=`` ("long",
    "protected", "real"; default: what the source's entry point says) and ``cflags=`` go to the
    build. Every machine is closed after the test. Drive it selftest-style::

        m = guest_vm("msr_guest.c")
        m.set_params(0xC0000081, 0x1234)
        assert m.sync(stage=1) == (...)
        m.done()

    A failing GUEST_ASSERT in the guest raises :class:`pykvm.report.GuestAssertion` (an
    AssertionError) whose message has the guest's expression, file:line and values; a guest
    that does not compile fails the test with the compiler's message."""
    from ..machine import Machine
    made = []

    def factory(guest, *, mode=None, cflags=(), **kw):
        if isinstance(guest, (str, os.PathLike)) and os.fspath(guest).endswith(SOURCE_SUFFIXES):
            guest = _build_source(request, guest, mode, None, cflags)
        else:
            if mode is not None or cflags:
                raise ValueError("mode= and cflags= apply to a guest source (.c or .S)")
            if isinstance(guest, os.PathLike) or (isinstance(guest, str) and (
                    os.sep in guest or guest.endswith((".elf", ".bin")))):
                guest = _beside_test(request, guest)
        m = Machine(guest, kvm=kvm, **kw)
        made.append(m)
        return m
    yield factory
    for m in made:
        m.close()
