"""pykvm's pytest support: fixtures, hardware markers and guest-report assertions.

Registered as a ``pytest11`` plugin (:mod:`pykvm.testing.plugin`), so any project that installs
pykvm gets:

* markers ``requires_kvm``, ``requires_cap("NAME")``, ``requires_arch("x86_64")`` and
  ``requires_cpuid("rdtscp", ...)`` (or one bit: ``requires_cpuid(leaf=0x7, sub=0, reg="ebx",
  bit=9)``), each checked against this host's KVM before the test runs;
* fixtures ``kvm`` (an open :class:`pykvm.Kvm`), ``guest_vm`` (a factory for a VM running a
  built-in guest, an image, or a guest source of your own beside the test:
  ``guest_vm("my_guest.c")``), ``fresh_vm`` (the same, but one machine per test module,
  returned to its checkpoint before each test by ``Machine.reset()``, in microseconds) and
  ``guest_image`` (just the build: the image's path);
* :func:`require`, the skip for a host feature a test finds missing at run time;
* fail-closed skipping (see "Skips" below);
* failures at the test's own line: a failing ``m.sync()``, ``m.done()`` or ``m.expect()`` (a
  guest assertion, a guest exception, another report or exit than the one expected) and a
  :class:`~pykvm.errors.GuestError` are reported at the line of the test that called pykvm,
  in pytest's traceback and in the KTAP "failed at" line, with pykvm's own frames hidden
  (``--fulltrace`` shows them);
* ``--ktap FILE``: write the results as KTAP;
* pytest-xdist (``pytest -n 2``, ``-n auto``): the fixtures keep no state between tests that
  workers would share unsafely (guest builds are cached by content and renamed into place),
  and ``--ktap`` is written once, by the controller, with every worker's results.

Skips
-----
The one rule: **where the KVM device is usable, a hardware test skips only because this host
lacks something it needs, and says what** — the skip reason starts with ``pykvm: host lacks``.
Any other skip of a hardware test (a test with a pykvm marker, or one using the ``kvm`` or
``guest_vm`` fixture) is reported as a failure ("fail-closed: hardware test skipped although
/dev/kvm exists"), so a test cannot quietly stop testing. The markers skip this way
themselves; inside a test, use :func:`require`::

    from pykvm.testing import require

    def test_tsc_aux(guest_vm, kvm):
        require(kvm.check_extension("X86_USER_SPACE_MSR"), "KVM_CAP_X86_USER_SPACE_MSR")
        ...

Never skip for a failure of your own (a probe that raised, a guest that misbehaved, a flaky
result): let it fail. An expected failure is ``pytest.mark.xfail`` with its reason; xfail is
not a skip. Where no usable KVM device exists at all (a laptop without KVM, a CI runner on
another architecture), every hardware test skips with "pykvm: host lacks a usable /dev/kvm".

Loading the plugin costs pytest next to nothing: neither this package nor the plugin module
imports pykvm's core (the plugin adds ``pykvm``, ``pykvm._host``, this package and itself to
what pytest loads); the fixtures do, when a test uses them. ``pykvm bench`` measures the import
against pytest's own (``plugin_import_vs_pytest``). Tests that need KVM are skipped,
not errored, on a host without a usable ``/dev/kvm`` (``$PYKVM_DEVICE``) or on an architecture
pykvm does not support.
"""
import time

LACKS = "pykvm: host lacks"          # the prefix of every skip the rule above allows


def require(condition, what: str) -> None:
    """Skip the running test unless ``condition`` (any value; its truth is what counts), with
    the reason ``"pykvm: host lacks <what>"``, the only skip a hardware test may take where
    KVM is usable (see "Skips" in :mod:`pykvm.testing`). ``what`` (str) names what this host
    lacks: a capability, a CPU feature, a tool ("KVM_CAP_DIRTY_LOG_RING", "the rdpid
    instruction", "virtiofsd"). Returns None when ``condition`` holds; raises pytest's
    ``Skipped`` otherwise, and :class:`ValueError` for an empty ``what`` (a skip must say why).
    Call it before the test asserts anything: a skip after a failed check would hide it."""
    __tracebackhide__ = True         # the skip is reported at the test's line
    if not isinstance(what, str) or not what.strip():
        raise ValueError("require(): say what the host lacks (a non-empty str)")
    if condition:
        return
    import pytest                    # only where a test skips: pykvm.testing works without it
    pytest.skip(f"{LACKS} {what.strip()}")


def wait_until(condition, what: str, timeout: float = 30.0, interval: float = 0.01) -> None:
    """Poll ``condition()`` (a callable; its result's truth is what counts) every ``interval``
    seconds until it holds, for at most ``timeout`` seconds; then raise AssertionError
    "gave up waiting: <what>" (``what``: str, what the test was waiting for). For a test that
    waits for a guest or a thread to make progress: the limit is a hang guard, generous on a
    loaded host, never a claim about speed (tests assert no durations). Returns None; raises
    ValueError for a ``timeout`` that is not finite and >= 0 or an ``interval`` that is not
    finite and > 0 (NaN would never end)."""
    __tracebackhide__ = True
    if not (isinstance(timeout, (int, float)) and 0 <= timeout < float("inf")):
        raise ValueError(f"wait_until: timeout must be finite seconds >= 0, not {timeout!r}")
    if not (isinstance(interval, (int, float)) and 0 < interval < float("inf")):
        raise ValueError(f"wait_until: interval must be finite seconds > 0, not {interval!r}")
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= end:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(interval)
