"""The pytest11 entry point of pykvm (see :mod:`pykvm.testing`).

pytest loads this module in every run of an environment where pykvm is installed, so it imports
nothing of pykvm's core (no ``pykvm.abi``, no cffi, no C helper) and checks no hardware when it
is loaded: the checks run in hooks, only for tests that use a pykvm marker or fixture, and the
core is imported only by those fixtures. On a host pykvm does not support, or without a usable
``/dev/kvm``, such tests are skipped ("pykvm: host lacks ..."), never errors.
"""
import os
import time
import sys

import pytest

from .._host import host_arch
from . import LACKS                  # prefix of the only skips allowed where /dev/kvm exists

DEFAULT_PATH = "/dev/kvm"            # pykvm.kvm.DEFAULT_PATH, without importing pykvm.kvm
SUPPORTED_ARCHES = ("x86_64", "riscv64")
HW_MARKERS = ("requires_kvm", "requires_cap", "requires_arch", "requires_cpuid")
CPUID_REGS = ("eax", "ebx", "ecx", "edx")
PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../pykvm
HW_FIXTURES = ("kvm", "guest_vm", "fresh_vm")   # fixtures that need KVM (and those built on them)
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
                "atomically; a symlink, device or FIFO is written through; FILE's directory "
                "must exist)")


def pytest_configure(config):
    """Register the markers; with ``--ktap``, the KTAP writer. A ``--ktap`` path that can never
    take the report (empty, a directory, a socket, a block device, in a directory that does
    not exist) is a usage error (pytest status 4, one line) before any test runs."""
    for line in ("requires_kvm: needs a usable /dev/kvm",
                 "requires_cap(name): needs KVM_CAP_<name> (implies requires_kvm)",
                 "requires_arch(name): runs only on this host architecture (implies requires_kvm)",
                 "requires_cpuid(*features, leaf=, sub=0, reg=, bit=): needs these CPUID "
                 "features in KVM_GET_SUPPORTED_CPUID (x86; implies requires_kvm)"):
        config.addinivalue_line("markers", line)
    path = config.getoption("--ktap")
    if path is not None and not _is_worker(config):     # under xdist: the controller only
        from .ktap import KtapWriter
        try:
            config._pykvm_ktap = KtapWriter(path)
        except OSError as e:       # a directory, socket, block device: refused before any test
            raise pytest.UsageError(f"--ktap: {e}") from None
        config.pluginmanager.register(config._pykvm_ktap, "pykvm-ktap")


def _is_worker(config) -> bool:
    """Whether this process is a pytest-xdist worker (the controller sees every report)."""
    return hasattr(config, "workerinput")


def _cpuid_wants(marker):
    """[(label, leaf, sub-leaf, register, bit)] that a ``requires_cpuid`` marker asks for: each
    positional argument a feature name in QEMU's spelling (``"rdtscp"``,
    :data:`pykvm.arch.x86.regs.CPUID_FEATURES`), and/or one bit given as ``leaf=, sub=0, reg=,
    bit=`` (``name=`` labels it in the skip reason). Raises ValueError for an unknown name or a
    malformed bit."""
    from ..arch.x86.regs import cpuid_feature_bit
    wants = [(str(n), *cpuid_feature_bit(n)) for n in marker.args]
    kw = dict(marker.kwargs)
    if kw:
        leaf, sub, reg, bit = kw.pop("leaf", None), kw.pop("sub", 0), kw.pop("reg", None), \
            kw.pop("bit", None)
        name = kw.pop("name", None)
        if kw:
            raise ValueError(f"unknown argument {', '.join(sorted(kw))} "
                             "(takes leaf=, sub=, reg=, bit=, name=)")
        if not (isinstance(leaf, int) and isinstance(sub, int) and reg in CPUID_REGS
                and isinstance(bit, int) and 0 <= bit < 32):
            raise ValueError(f"needs leaf=<int>, reg= one of {'/'.join(CPUID_REGS)}, "
                             f"bit=0..31 (sub= defaults to 0); got leaf={leaf!r}, sub={sub!r}, "
                             f"reg={reg!r}, bit={bit!r}")
        wants.append((name or f"CPUID.{leaf:#x}.{sub}:{reg.upper()}[{bit}]", leaf, sub, reg, bit))
    if not wants:
        raise ValueError("names no feature (requires_cpuid(\"rdtscp\") or "
                         "requires_cpuid(leaf=, reg=, bit=))")
    return wants


_SUPPORTED_CPUID: dict = {}          # KVM device path -> KVM_GET_SUPPORTED_CPUID entries


def _supported_cpuid():
    """This host's KVM_GET_SUPPORTED_CPUID (read once per device path per process)."""
    path = kvm_path()
    if path not in _SUPPORTED_CPUID:
        from ..kvm import Kvm
        with Kvm() as k:
            _SUPPORTED_CPUID[path] = k.supported_cpuid()
    return _SUPPORTED_CPUID[path]


def _check_cpuid(item) -> None:
    """Skip ("pykvm: host lacks CPUID feature ...") unless KVM offers every CPUID feature the
    item's ``requires_cpuid`` markers name; a malformed marker fails the test."""
    markers = list(item.iter_markers("requires_cpuid"))
    if not markers:
        return
    try:
        wants = [w for m in markers for w in _cpuid_wants(m)]
    except ValueError as e:
        pytest.fail(f"requires_cpuid: {e}", pytrace=False)
    if host_arch() != "x86_64":
        pytest.skip(f"{LACKS} x86 CPUID (this is {host_arch()})")
    from ..arch.x86.regs import cpuid_lookup
    entries = _supported_cpuid()
    for label, leaf, sub, reg, bit in wants:
        entry = cpuid_lookup(entries, leaf, sub)
        if entry is None or not getattr(entry, reg) >> bit & 1:
            pytest.skip(f"{LACKS} CPUID feature {label} (KVM_GET_SUPPORTED_CPUID "
                        f"{leaf:#x}.{sub}:{reg.upper()}[{bit}] is clear)")


def _is_hw(item) -> bool:
    return any(item.get_closest_marker(m) for m in HW_MARKERS)


def _uses_kvm(item) -> bool:
    return _is_hw(item) or any(f in getattr(item, "fixturenames", ()) for f in HW_FIXTURES)


def pytest_runtest_setup(item):
    """Skip a test that uses a pykvm marker or a KVM fixture where the host lacks what it needs
    (architecture, a usable KVM device, a capability, a CPUID feature), with a "pykvm: host
    lacks" reason."""
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
    _check_cpuid(item)


def _guest_caused(excinfo) -> bool:
    """Whether the exception is the guest's doing as pykvm reports it: a
    :class:`~pykvm.report.GuestAssertion` (a failed GUEST_ASSERT or an unexpected guest
    exception) or a :class:`~pykvm.errors.GuestError`. Costs nothing where pykvm's core was
    never imported (then no such exception can exist)."""
    errors = sys.modules.get("pykvm.errors")
    if errors is None:
        return False
    e = excinfo.value
    return isinstance(e, errors.PykvmError) and isinstance(e, (AssertionError, errors.GuestError))


def _in_pykvm(tb) -> bool:
    """Whether traceback entry ``tb`` (a :class:`types.TracebackType`) runs pykvm's code."""
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PKG_DIR + os.sep)


def _hide_pykvm_frames(item, call) -> None:
    """Cut the frames inside pykvm from the end of the traceback of an exception the guest
    caused (or of one raised through a pykvm entry point that hides itself with
    ``__tracebackhide__``, e.g. ``sync``'s "guest synced stage 2, expected 1"), so that
    pytest's traceback (every ``--tb`` style, ``native`` too), its crash line and the KTAP
    "failed at" line end at the test's own line: the call into pykvm. The exception's own
    traceback is cut (pytest rebuilds its view from it), and a cause or context raised wholly inside pykvm is left out (one whose
    traceback passes through the test's code, e.g. an exit handler of its own, is kept).
    ``--fulltrace`` and ``--pdb`` keep every frame; so does an exception whose traceback is all
    pykvm's."""
    excinfo = call.excinfo
    opt = item.config.getoption
    if excinfo is None or opt("fulltrace", False) or opt("usepdb", False):
        return
    last, t = None, excinfo.tb                 # the last entry outside pykvm, walking inwards
    while t is not None:
        if not _in_pykvm(t):
            last = t
        t = t.tb_next
    if last is None or last.tb_next is None or not _in_pykvm(last.tb_next):
        return
    if not (_guest_caused(excinfo) or last.tb_next.tb_frame.f_locals.get("__tracebackhide__")):
        return
    last.tb_next = None
    excinfo.traceback = type(excinfo.traceback)(excinfo.tb)
    e = excinfo.value
    cause = e.__cause__ if e.__cause__ is not None else e.__context__
    t = getattr(cause, "__traceback__", None)
    while t is not None and _in_pykvm(t):
        t = t.tb_next
    if cause is not None and t is None:       # pykvm's own detail (no frame of the test's)
        e.__cause__, e.__suppress_context__ = None, True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail closed: where the KVM device is usable, a hardware test (one with a pykvm marker or
    a KVM fixture) that skips for any reason other than "pykvm: host lacks ..." is reported as
    failed (the rule: :mod:`pykvm.testing`, "Skips"). A failure the guest caused is reported at
    the test's own line (see :func:`_hide_pykvm_frames`)."""
    _hide_pykvm_frames(item, call)
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and _uses_kvm(item) and kvm_usable() and not getattr(rep, "wasxfail", None):
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
        failure = str(e)
    # outside the except block: the compiler's message once, not again as the context of
    # pytest's own exception ("During handling of the above exception...")
    pytest.fail(failure, pytrace=False)


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


@pytest.fixture(scope="module")
def _pykvm_fresh_machines():
    """The machines :func:`fresh_vm` keeps for a test module: {key: Machine}, closed (with
    the /dev/kvm they opened) when the module's tests are done."""
    made: dict = {}
    yield made
    for m in made.values():
        m.close()


@pytest.fixture
def fresh_vm(request, _pykvm_fresh_machines):
    """A factory: ``fresh_vm(guest, setup=None, **machine_options)`` → a
    :class:`pykvm.machine.Machine` running ``guest`` (a built-in guest's name, an image path or
    a guest source beside the test, as :func:`guest_vm` takes it) that is fresh for this test,
    made once per test module and returned to the same checkpoint before every test by
    :meth:`~pykvm.machine.Machine.reset` (microseconds, where making a machine costs
    milliseconds).

    The first call in a module makes the machine, calls ``setup(machine)`` if given (bring the
    guest to the point every test starts from, e.g. ``lambda m: m.sync(stage=0)``) and takes
    the checkpoint (:meth:`~pykvm.machine.Machine.checkpoint`); each later call with the same
    arguments resets that machine: RAM, vCPU, VM and device state as they were at the
    checkpoint, console output and reports empty; exit handlers of
    :meth:`~pykvm.machine.Machine.on`, ``trace`` and ``on_console`` set by an earlier test are
    removed; a run an earlier test left going (in a thread) is stopped first. A machine a test
    closed, or whose ``setup`` raised, is made again (``setup`` runs again). Different arguments give different
    machines (``setup`` counts as itself: define it once, at module level, so that every test
    gets the same machine)::

        def at_start(m):
            m.sync(stage=0)

        @pytest.fixture
        def counter_vm(fresh_vm):
            return fresh_vm("counter.c", setup=at_start)
 Machines with virtio devices
    cannot be reset (:class:`~pykvm.errors.PykvmError`); use :func:`guest_vm` for them.
    Raises what :class:`~pykvm.machine.Machine` raises; a guest that does not compile fails
    the test with the compiler's message."""
    from ..machine import Machine
    made = _pykvm_fresh_machines

    def factory(guest, *, setup=None, mode=None, cflags=(), **kw):
        if isinstance(guest, (str, os.PathLike)) and os.fspath(guest).endswith(SOURCE_SUFFIXES):
            image = _build_source(request, guest, mode, None, cflags)
        else:
            if mode is not None or cflags:
                raise ValueError("mode= and cflags= apply to a guest source (.c or .S)")
            image = guest
            if isinstance(guest, os.PathLike) or (isinstance(guest, str) and (
                    os.sep in guest or guest.endswith((".elf", ".bin")))):
                image = _beside_test(request, guest)
        key = repr((image if isinstance(image, (str, bytes)) else os.fspath(image), setup,
                    sorted(kw.items())))
        m = made.get(key)
        if m is not None and not m.closed and m.running:
            # a run an earlier test left going (in a thread of its own): end it first; a run
            # that does not end in 10 s costs the machine, made again below
            m.stop("fresh_vm: the run an earlier test left going")
            end = time.monotonic() + 10
            while m.running and time.monotonic() < end:
                time.sleep(0.005)
            if m.running:
                m.close()
        if m is not None and not m.closed:
            for name in list(m.handlers):
                m.on(name, None)
            m.trace = None
            m.on_console = None
            for owner in m.holders:        # an earlier test's pause or debugger stop
                m.release(owner)
            m.reset()
            return m
        made.pop(key, None)
        m = Machine(image, **kw)
        try:
            if setup is not None:
                setup(m)
            m.checkpoint()
            m.reset()                          # the console and reports of setup() go too
        except BaseException:
            m.close()                          # a setup that failed: the next test starts over
            raise
        made[key] = m
        return m
    return factory
