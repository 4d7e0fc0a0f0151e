"""pykvm's hardware tests as a kselftest install, for KernelCI, LAVA or a lab's own CI.

``pykvm kselftest-install DIR`` (:func:`install`) writes a directory laid out as the kernel's
``make -C tools/testing/selftests install`` lays out its own::

    DIR/run_kselftest.sh        the runner (options as the kernel's: -l, -t, -c, -s, -p, -o, ...)
    DIR/kselftest-list.txt      one "collection:test" line per test
    DIR/<collection>/settings   kselftest's per-collection settings: timeout=, and heartbeat=
    DIR/<collection>/<test>     an executable: one pytest file under pykvm's plugin, exit status
                                0 pass, 4 skip (KSFT_SKIP), 1 fail (KSFT_FAIL)
    DIR/<collection>/<test>.py  the pytest file, with the guest sources and helpers beside it

Each test is one pytest file of pykvm's own suite (:data:`COLLECTIONS`), run with
``python -m pytest`` by the Python that ran the install (written into the scripts) or
``$PYKVM_PYTHON``; that Python must have pykvm and pytest installed (pykvm's pytest plugin,
:mod:`pykvm.testing.plugin`, gives the markers, fixtures and the ``--ktap`` report). The tests
come from the installed package (a wheel carries them in ``pykvm/kselftest_src``) or, in a
source checkout, from ``tests/``.

The runner (``run_kselftest.sh``, which starts this module as ``python -m
pykvm.testing.kselftest run DIR ...``) prints what the kernel's ``kselftest/runner.sh`` prints,
one TAP 13 block per collection::

    TAP version 13
    1..2
    # timeout set to 120
    # selftests: pykvm_selftests: test_sel_cpuid
    # ... the test's output, each line after "# " ...
    ok 1 selftests: pykvm_selftests: test_sel_cpuid
    # selftests: pykvm_selftests: test_sel_xss_msr
    ok 2 selftests: pykvm_selftests: test_sel_xss_msr # SKIP pykvm: host lacks CPUID feature xsaves

A test that runs past its timeout is killed (its whole process group) and reported
``not ok N selftests: C: T # TIMEOUT S seconds``; any other failure ``# exit=STATUS`` (pytest's
status). Every ``heartbeat`` seconds of a running test the runner prints ``# heartbeat: C:T
running for N s`` on stdout (with ``-s`` too), so a CI that watches for output sees progress.
``-j N`` (pykvm's addition; default 1, ``0``/``auto``: :func:`cpu_count`) keeps up to N tests
running at once, each under its own timeout and heartbeat; each test's lines are printed
together when it ends, in list order (a test that ends early waits for those before it), so
the TAP is what a serial run prints, heartbeats aside. SIGTERM, SIGHUP or SIGINT kills every
running test's process group and exits 128 + the signal number.
The run ends with kselftest's ``# Totals:`` line and one ``# FAILED: C:T (why)`` line per
failed test (``# FAILED: none`` when none failed); its exit status is 1 when a test failed
(0 with ``-f``), as the kernel's. A test whose every case was skipped is ``ok ... # SKIP`` with
the skip reasons ("pykvm: host lacks ..."); one whose every case was an expected failure is
``ok ... # XFAIL`` with the reasons (kselftest.h's ``ksft_test_result_xfail``).

:func:`host_tags` gives the strings ``pykvm caps --json`` lists under ``tags``: what a scheduler
matches hosts on. docs/kselftest.md describes all of it for a LAVA or KernelCI job.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # .../pykvm
PACKAGED = os.path.join(PKG_DIR, "kselftest_src")    # where a wheel carries the tests
CHECKOUT_TESTS = os.path.join(os.path.dirname(PKG_DIR), "tests")
MARK = "written by pykvm kselftest-install"          # in every run_kselftest.sh we write
DEFAULT_TIMEOUT = 45        # kselftest/runner.sh: a collection without settings gets 45 s
DEFAULT_HEARTBEAT = 30      # seconds between heartbeat lines
KILL_GRACE = 5              # seconds between SIGTERM and SIGKILL of a timed-out test
KSFT_PASS, KSFT_FAIL, KSFT_SKIP = 0, 1, 4            # kselftest.h exit statuses


class Collection:
    """One installable collection: the pytest files of ``tests/<source>`` (all ``test_*.py``,
    or only ``tests`` when given), its kselftest ``timeout`` (seconds per test) and
    ``heartbeat`` (seconds), and what it checks (``about``)."""

    def __init__(self, source: str, about: str, tests: Optional[Tuple[str, ...]] = None,
                 timeout: int = 120, heartbeat: int = DEFAULT_HEARTBEAT):
        self.source, self.about, self.tests = source, about, tests
        self.timeout, self.heartbeat = timeout, heartbeat


#: the collections ``pykvm kselftest-install`` can write, by collection name
COLLECTIONS: Dict[str, Collection] = {
    "pykvm_selftests": Collection(
        "selftests", "ports of the kernel's KVM selftests (tests/selftests, docs/selftests.md)"),
    "pykvm_x86": Collection(
        "x86", "KVM uAPI checks on x86: clock and feature MSRs, vCPU state ioctls, dirty ring "
        "and guest_memfd, the guest library, guests of their own, the ioctl table",
        tests=("test_clock_feature_msrs", "test_vcpu_state_ioctls", "test_dirty_ring_gmem",
               "test_guest_library", "test_x86_guests", "test_ioctl_table")),
}


class KselftestError(ValueError):
    """Bad input to :func:`install` (an unknown collection, a pattern that matches no test, a
    target that is not ours to write), or no test sources with this pykvm; one line."""


# -- install -----------------------------------------------------------------------------------

def source_root() -> str:
    """The directory holding the test sources: ``pykvm/kselftest_src`` in an installed wheel,
    else ``tests/`` of the source checkout this pykvm runs from. Raises
    :class:`KselftestError` when neither exists."""
    for root in (PACKAGED, CHECKOUT_TESTS):
        if all(os.path.isdir(os.path.join(root, c.source)) for c in COLLECTIONS.values()):
            return root
    raise KselftestError(f"this pykvm ({PKG_DIR}) carries no test sources: neither {PACKAGED} "
                         f"nor a checkout's {CHECKOUT_TESTS} (reinstall pykvm from its wheel "
                         "or sdist)")


def available(root: Optional[str] = None) -> List[Tuple[str, str]]:
    """Every installable (collection, test) pair, tests named by their file's stem
    (``("pykvm_selftests", "test_sel_cpuid")``), in collection and name order. ``root``: the
    sources (default :func:`source_root`)."""
    root = root or source_root()
    out = []
    for name in sorted(COLLECTIONS):
        c = COLLECTIONS[name]
        files = sorted(f[:-3] for f in os.listdir(os.path.join(root, c.source))
                       if f.startswith("test_") and f.endswith(".py"))
        out += [(name, t) for t in files if c.tests is None or t in c.tests]
    return out


def select_tests(collections: Sequence[str] = (), patterns: Sequence[str] = (),
                 root: Optional[str] = None) -> List[Tuple[str, str]]:
    """The (collection, test) pairs of the named ``collections`` (all when empty) whose test
    matches one of the shell ``patterns`` (all when empty): a pattern is matched against the
    test's name (``test_sel_*``) and against ``collection:test``. Raises
    :class:`KselftestError` for an unknown collection or a pattern that matches nothing."""
    for c in collections:
        if c not in COLLECTIONS:
            raise KselftestError(f"no collection {c!r} (pykvm has: {', '.join(sorted(COLLECTIONS))})")
    pairs = [p for p in available(root) if not collections or p[0] in collections]
    if not patterns:
        return pairs
    chosen = set()
    for pat in patterns:
        hits = {p for p in pairs if fnmatch.fnmatchcase(p[1], pat)
                or fnmatch.fnmatchcase(f"{p[0]}:{p[1]}", pat)}
        if not hits:
            raise KselftestError(f"no test matches {pat!r} (tests are named like "
                                 f"{pairs[0][1] if pairs else 'test_x'}; "
                                 f"collections: {', '.join(sorted(COLLECTIONS))})")
        chosen |= hits
    return [p for p in pairs if p in chosen]


def _check_target(dest: str) -> None:
    """Refuse a target that exists and is neither empty nor an install of ours."""
    if not os.path.lexists(dest):
        return
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise KselftestError(f"{dest} exists and is not a directory")
    if not os.listdir(dest):
        return
    try:
        with open(os.path.join(dest, "run_kselftest.sh")) as f:
            ours = MARK in f.read()
    except OSError:
        ours = False
    if not ours:
        raise KselftestError(f"{dest} is not empty and holds no pykvm kselftest install: "
                             "give an empty or new directory")


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _runner_script(python: str) -> str:
    return f"""#!/bin/sh
# Run pykvm's installed tests as the kernel's run_kselftest.sh runs kselftests
# ({MARK}; options: run_kselftest.sh -h; pykvm's docs/kselftest.md).
# The Python that runs them is $PYKVM_PYTHON, else the one that made this install; it needs
# pykvm and pytest.
BASE_DIR=$(cd "$(dirname "$0")" && pwd -P) || exit 1
PY=${{PYKVM_PYTHON:-{shlex.quote(python)}}}
if ! command -v "$PY" >/dev/null 2>&1; then
	echo "$0: no Python at $PY (set PYKVM_PYTHON to one with pykvm and pytest)" >&2
	exit 1
fi
cd "$BASE_DIR" || exit 1
exec "$PY" -m pykvm.testing.kselftest run "$BASE_DIR" "$@"
"""


def _test_script(python: str, test: str) -> str:
    return f"""#!/bin/sh
# {test}.py under pytest with pykvm's plugin ({MARK}).
# Exit 0 pass, 4 skip, 1 fail; extra arguments go to pytest. Python: $PYKVM_PYTHON, else the
# one that made this install.
cd "$(dirname "$0")" || exit 1
exec "${{PYKVM_PYTHON:-{shlex.quote(python)}}}" -m pykvm.testing.kselftest one {test}.py "$@"
"""


def install(dest: str, collections: Sequence[str] = (), patterns: Sequence[str] = (),
            python: Optional[str] = None) -> List[str]:
    """Write a kselftest install of pykvm's tests into ``dest`` (a new or empty directory, or
    an earlier install of this function's, whose collections are replaced). ``collections``
    and ``patterns`` choose the tests as :func:`select_tests` does; ``python``: the
    interpreter the scripts run (default ``sys.executable``). Returns the ``collection:test``
    entries of ``kselftest-list.txt``. Raises :class:`KselftestError` for bad input (nothing
    written) and OSError for a write that fails."""
    python = os.path.abspath(python or sys.executable)
    root = source_root()
    pairs = select_tests(collections, patterns, root)
    dest = os.path.abspath(dest)
    _check_target(dest)
    os.makedirs(dest, exist_ok=True)
    for name in COLLECTIONS:                      # an earlier install's collections
        old = os.path.join(dest, name)
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
    for name in sorted({c for c, _ in pairs}):
        c = COLLECTIONS[name]
        src, out = os.path.join(root, c.source), os.path.join(dest, name)
        os.makedirs(out)
        tests = [t for cn, t in pairs if cn == name]
        for f in sorted(os.listdir(src)):
            path = os.path.join(src, f)
            if not os.path.isfile(path) or f.endswith((".pyc", ".o")):
                continue
            if f.startswith("test_") and f.endswith(".py") and f[:-3] not in tests:
                continue
            shutil.copy2(path, os.path.join(out, f))   # the tests, helpers and guest sources
        for t in tests:
            _write(os.path.join(out, t), _test_script(python, t), 0o755)
        _write(os.path.join(out, "settings"),
               f"# kselftest settings of {name} ({MARK}).\n"
               "# timeout: seconds per test (run_kselftest.sh -o overrides); heartbeat:\n"
               "# seconds between heartbeat lines while a test runs (0: none)\n"
               f"timeout={c.timeout}\nheartbeat={c.heartbeat}\n")
        _write(os.path.join(out, "pytest.ini"),
               f"# {MARK}: this directory is its own pytest root (no ini file or conftest.py\n"
               "# above it applies)\n[pytest]\naddopts = -p no:cacheprovider\n")
    entries = [f"{c}:{t}" for c, t in pairs]
    _write(os.path.join(dest, "kselftest-list.txt"), "".join(e + "\n" for e in entries))
    _write(os.path.join(dest, "run_kselftest.sh"), _runner_script(python), 0o755)
    return entries


# -- host tags ---------------------------------------------------------------------------------

VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd", "HygonGenuine": "hygon"}
#: capabilities that pykvm's installable tests ask for, tagged ``cap:NAME`` when offered
NOTABLE_CAPS = ("NESTED_STATE", "SYNC_REGS", "DIRTY_LOG_RING", "MANUAL_DIRTY_LOG_PROTECT2",
                "GUEST_MEMFD", "USER_MEMORY2", "MEMORY_ATTRIBUTES", "X86_USER_SPACE_MSR",
                "X86_MSR_FILTER", "GET_MSR_FEATURES", "BINARY_STATS_FD", "XSAVE2", "SREGS2",
                "EXIT_ON_EMULATION_FAILURE", "ENFORCE_PV_FEATURE_CPUID", "SET_GUEST_DEBUG")


def _param(value: object) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def host_tags(info: dict, release: Optional[str] = None) -> List[str]:
    """The tags ``pykvm caps --json`` lists, from its other keys (``info``:
    :meth:`pykvm.kvm.Kvm.info`) and the running kernel's ``release`` (default
    ``os.uname().release``): sorted ``key:value`` strings a scheduler matches hosts on.

    ``arch:<uname machine>``, ``kvm-api:<KVM_GET_API_VERSION>``, ``kernel:<release>``; on x86
    ``vendor:<intel|amd|...>`` (KVM_GET_SUPPORTED_CPUID leaf 0),
    ``kvm-module:<kvm_intel|kvm_amd|...>`` (the vendor module loaded),
    ``kvm-backend:<vmx|svm|module>``,
    ``nested:<vmx|svm|none>`` (``none`` unless nested virtualization is available: module
    parameter on, VMX/SVM in supported CPUID, KVM_CAP_NESTED_STATE) and
    ``param:<module>.<name>=<value>`` for the vendor module's parameters pykvm reads (booleans
    as 0/1); on RISC-V ``riscv-satp:<mode>``; and ``cap:<NAME>`` for each of
    :data:`NOTABLE_CAPS` this KVM offers (KVM_CHECK_EXTENSION non-zero)."""
    tags = {f"arch:{info.get('arch')}", f"kvm-api:{info.get('api_version')}",
            f"kernel:{release or os.uname().release}"}
    nested = info.get("nested")
    if isinstance(nested, dict):
        vendor = nested.get("vendor")
        if vendor:
            tags.add(f"vendor:{VENDORS.get(vendor, vendor.strip().lower() or 'unknown')}")
        module = nested.get("module")
        if module:
            tags.add(f"kvm-module:{module}")
            for k, v in sorted((nested.get("switches") or {}).items()):
                if v is not None:
                    tags.add(f"param:{module}.{k}={_param(v)}")
        tags.add(f"kvm-backend:{nested.get('backend') or 'none'}")
        tags.add(f"nested:{nested.get('backend') if nested.get('available') else 'none'}")
    riscv = info.get("riscv")
    if isinstance(riscv, dict) and riscv.get("satp_mode"):
        tags.add(f"riscv-satp:{riscv['satp_mode']}")
    caps = info.get("caps") or {}
    tags.update(f"cap:{c}" for c in NOTABLE_CAPS if caps.get(c))
    return sorted(tags)


# -- one test: pytest, its KTAP and the kselftest verdict -------------------------------------

def _plugin_registered() -> bool:
    """Whether pytest loads pykvm's plugin by itself (its pytest11 entry point is installed)."""
    from importlib import metadata
    eps: Any = metadata.entry_points()
    group = eps.select(group="pytest11") if hasattr(eps, "select") else \
        eps.get("pytest11", [])            # Python < 3.10: a dict of groups
    return any(ep.value.startswith("pykvm.testing") for ep in group)


def pytest_command(test_file: str, ktap: str, extra: Sequence[str] = ()) -> List[str]:
    """The command that runs one installed pytest file (in its collection's directory) with
    pykvm's plugin under this Python, writing its KTAP report to ``ktap``."""
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-rfEsxX", "--tb=short",
           "--ktap", ktap]
    if not _plugin_registered():           # pykvm on PYTHONPATH, not installed
        cmd[3:3] = ["-p", "pykvm.testing.plugin"]
    return cmd + list(extra)


_RESULT = re.compile(r"^\s*(?:not )?ok \d+ .*? # (SKIP|XFAIL)(?: (.*))?$")
_TOTALS = re.compile(r"^# Totals: (.*)$", re.M)


def verdict(status: int, ktap: str) -> Tuple[str, str]:
    """(kind, directive) of one test from pytest's exit ``status`` and its KTAP report text:
    ``("pass", "")``; ``("skip", "SKIP reasons")`` when every case was skipped;
    ``("xfail", "XFAIL reasons")`` when every case that was not skipped failed as expected;
    ``("fail", "exit=N")`` for any failing status (pytest's 5, no tests collected, too)."""
    if status != 0:
        return "fail", f"exit={status}"
    m = _TOTALS.search(ktap)
    counts = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(1))} if m else {}
    if not m or counts.get("pass", 0) or counts.get("xpass", 0):
        return "pass", ""
    kind = "xfail" if counts.get("xfail", 0) else "skip" if counts.get("skip", 0) else ""
    if not kind:
        return "pass", ""
    reasons: List[str] = []
    for line in ktap.splitlines():
        r = _RESULT.match(line)
        if r and r.group(1) == kind.upper() and line.startswith(" ") and r.group(2) \
                and r.group(2) not in reasons:
            reasons.append(r.group(2))
    text = "; ".join(reasons)
    text = text if len(text) <= 200 else text[:197] + "..."
    return kind, f"{kind.upper()} {text}".rstrip()


def _ktap_file() -> str:
    fd, path = tempfile.mkstemp(prefix="pykvm-kselftest-", suffix=".ktap")
    os.close(fd)
    return path


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def missing_pytest() -> Optional[str]:
    """One line saying that this Python (``sys.executable``) cannot import pytest, which every
    installed test needs, or None when it can."""
    if importlib.util.find_spec("pytest") is not None:
        return None
    return (f"{sys.executable} has no pytest: install it there (python -m pip install pytest) "
            "or set PYKVM_PYTHON to a Python that has pykvm and pytest")


def run_one(test_file: str, extra: Sequence[str] = ()) -> int:
    """A test's own executable (``DIR/<collection>/<test>``): run ``test_file`` with pytest in
    the current directory, its output passed through; returns kselftest's status: 0 pass (an
    XFAIL too), 4 all skipped (the reasons on the last line), 1 failed (also when this Python
    has no pytest: one line on stderr says so)."""
    why = missing_pytest()
    if why is not None:
        sys.stderr.write(f"{test_file}: {why}\n")
        return KSFT_FAIL
    ktap = _ktap_file()
    try:
        status = subprocess.call(pytest_command(test_file, ktap, extra))
        kind, directive = verdict(status, _read(ktap))
    finally:
        os.unlink(ktap)
    if directive:
        print(f"# {directive}", flush=True)
    return {"pass": KSFT_PASS, "xfail": KSFT_PASS, "skip": KSFT_SKIP}.get(kind, KSFT_FAIL)


# -- the runner --------------------------------------------------------------------------------

class _Test:
    """One entry of a run: where it stands (``proc`` while it runs, ``done`` once it ended),
    its limits, and the lines it has printed that still wait for their turn."""

    def __init__(self, coll: str, test: str, num: int, plan: int):
        self.coll, self.test, self.num = coll, test, num
        self.plan = plan                   # the block's test count, on a collection's first test
        self.label, self.header = f"{coll}:{test}", f"selftests: {coll}: {test}"
        self.proc: "Optional[subprocess.Popen[bytes]]" = None
        self.ktap = ""
        self.log: Optional[TextIO] = None  # its own log file (-p)
        self.waiting: List[Tuple[bool, str]] = []      # (a stdout line?, line) not yet printed
        self.timeout = 0
        self.start = 0.0
        self.deadline: Optional[float] = None
        self.beat: Optional[float] = None
        self.kill_at: Optional[float] = None
        self.every = 0                     # seconds between its heartbeats
        self.eof, self.timed_out, self.done, self.headed = False, False, False, False
        self.pending = b""
        self.kind, self.directive = "", ""


class _Printer:
    """Where the runner writes: result, header and heartbeat lines on stdout; a test's output
    and its timeout note on the log (stdout, ``output.log`` with -s, one file per test with
    -p). ``live`` (one test at a time) prints a test's lines as they come; otherwise a test's
    lines wait until it ended and every test before it was printed (:meth:`release`)."""

    def __init__(self, live: bool, log: Optional[TextIO]):
        self.live, self.log, self.next = live, log, 0

    @staticmethod
    def stdout(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def _log(self, line: str) -> None:
        if self.log is None:
            self.stdout(line)
        else:
            self.log.write(line + "\n")
            self.log.flush()

    def say(self, t: _Test, line: str) -> None:
        if self.live:
            self.stdout(line)
        else:
            t.waiting.append((True, line))

    def note(self, t: _Test, line: str) -> None:
        if t.log is not None:
            t.log.write(line + "\n")
            t.log.flush()
        elif self.live:
            self._log(line)
        else:
            t.waiting.append((False, line))

    def release(self, tests: Sequence[_Test]) -> None:
        """Print the ended tests whose turn it is, in list order, then the TAP header of the
        next block when the next test is a collection's first."""
        while True:
            if self.next < len(tests) and tests[self.next].plan and \
                    not tests[self.next].headed:
                tests[self.next].headed = True
                self.stdout("TAP version 13")
                self.stdout(f"1..{tests[self.next].plan}")
            if self.next >= len(tests) or not tests[self.next].done:
                return
            for to_stdout, line in tests[self.next].waiting:
                (self.stdout if to_stdout else self._log)(line)
            tests[self.next].waiting = []
            self.next += 1


def read_settings(path: str) -> Dict[str, str]:
    """A kselftest ``settings`` file: ``field=value`` lines, ``#`` comments skipped; {} when
    the file cannot be read."""
    out = {}
    for line in _read(path).splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        k, _, v = line.partition("=")
        out[k.strip()] = v.strip()
    return out


def _seconds(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise SystemExit(f"run_kselftest.sh: {what} must be a whole number of seconds >= 0, "
                         f"not {text!r}")
    return n


def cpu_count() -> int:
    """The CPUs this process may run on (``sched_getaffinity``; ``os.cpu_count()`` where that
    is missing), at least 1: what ``-j 0`` and ``-j auto`` mean."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    n = len(getaffinity(0)) if getaffinity is not None else os.cpu_count()
    return max(1, n or 1)


def jobs_of(text: str) -> int:
    """The number of tests ``-j``/``--jobs`` lets run at once: a whole number >= 1, or ``0`` /
    ``auto`` for :func:`cpu_count`. Exits with one line for anything else."""
    if text.strip().lower() == "auto":
        return cpu_count()
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n == 0:
        return cpu_count()
    if n < 0:
        raise SystemExit(f"run_kselftest.sh: --jobs must be a whole number >= 0 or 'auto', "
                         f"not {text!r}")
    return n


def _stop(proc: "subprocess.Popen[bytes]", sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _args_of(test: str) -> List[str]:
    """Extra arguments from ``$KSELFTEST_<TEST>_ARGS`` (kselftest's convention: the test's name
    upper-cased, every character other than a letter, digit or _ made _)."""
    key = re.sub(r"[^A-Z0-9_]", "_", re.sub(r"[\s\x00-\x1f]", "", test).upper())
    return shlex.split(os.environ.get(f"KSELFTEST_{key}_ARGS", ""))


def _start(base: str, t: _Test, pr: _Printer, override: Optional[int],
           heartbeat_override: Optional[int]) -> None:
    """Print a test's header and start it in a process group of its own, its output on a pipe;
    a test whose file is missing ends at once (``not ok``)."""
    settings = read_settings(os.path.join(base, t.coll, "settings"))
    timeout = _seconds(settings.get("timeout", str(DEFAULT_TIMEOUT)), "timeout in settings")
    heartbeat = _seconds(settings.get("heartbeat", str(DEFAULT_HEARTBEAT)),
                         "heartbeat in settings")
    if heartbeat_override is not None:
        heartbeat = heartbeat_override
    if override is not None:
        timeout = override
        pr.note(t, f"# overriding timeout to {timeout}")
    else:
        pr.note(t, f"# timeout set to {timeout}")
    pr.say(t, f"# {t.header}")
    cwd, py = os.path.join(base, t.coll), f"{t.test}.py"
    if not os.path.isfile(os.path.join(cwd, py)):
        pr.say(t, f"# Warning: file {t.coll}/{py} is missing!")
        pr.say(t, f"not ok {t.num} {t.header}")
        t.kind, t.directive, t.done = "fail", "missing", True
        return
    t.ktap = _ktap_file()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t.proc = subprocess.Popen(pytest_command(py, t.ktap, _args_of(t.test)), cwd=cwd, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    t.timeout, t.every, t.start = timeout, heartbeat, time.monotonic()
    t.deadline = t.start + timeout if timeout else None
    t.beat = t.start + heartbeat if heartbeat else None


def _read_output(t: _Test, pr: _Printer) -> None:
    """Pass what the test wrote to its log, line by line, "# " before each."""
    assert t.proc is not None and t.proc.stdout is not None
    chunk = os.read(t.proc.stdout.fileno(), 65536)
    if not chunk:
        t.eof, t.beat = True, None
        if t.pending:
            pr.note(t, "# " + t.pending.decode("utf-8", "replace"))
        return
    *lines, t.pending = (t.pending + chunk).split(b"\n")
    for line in lines:
        text = line.decode("utf-8", "replace").rstrip("\r")
        pr.note(t, "#" + (" " + text if text else ""))


def _tick(t: _Test, now: float, pr: _Printer) -> None:
    """A running test's clock: a heartbeat line every ``every`` seconds; past its timeout,
    SIGTERM to its process group, and SIGKILL KILL_GRACE seconds later."""
    assert t.proc is not None
    if t.deadline is not None and now >= t.deadline:
        t.timed_out, t.deadline, t.beat, t.kill_at = True, None, None, now + KILL_GRACE
        _stop(t.proc, signal.SIGTERM)
    if t.beat is not None and now >= t.beat:
        pr.stdout(f"# heartbeat: {t.label} running for {int(now - t.start)} s")
        t.beat += t.every
    if t.kill_at is not None and now >= t.kill_at:
        t.kill_at = None
        _stop(t.proc, signal.SIGKILL)


def _finish(t: _Test, pr: _Printer) -> None:
    """A test whose output ended and whose process exited: its KTAP report to the log, then
    its result line."""
    assert t.proc is not None
    if t.timed_out:
        _stop(t.proc, signal.SIGKILL)      # anything of its group still alive
    t.proc.wait()
    if t.proc.stdout is not None:
        t.proc.stdout.close()
    report = _read(t.ktap)
    os.unlink(t.ktap)
    t.ktap = ""
    for line in report.splitlines():
        pr.note(t, "# " + line if line else "#")
    if t.timed_out:
        pr.say(t, "#")
        t.kind, t.directive = "fail", f"TIMEOUT {t.timeout} seconds"
    else:
        t.kind, t.directive = verdict(t.proc.returncode, report)
    ok = "not ok" if t.kind == "fail" else "ok"
    pr.say(t, f"{ok} {t.num} {t.header}" + (f" # {t.directive}" if t.directive else ""))
    t.done = True


def _abandon(t: _Test) -> None:
    """End a test that is still running when the runner stops: SIGKILL to its process group,
    its report file removed."""
    if t.proc is not None and t.proc.returncode is None:
        _stop(t.proc, signal.SIGKILL)
        t.proc.wait()
    if t.proc is not None and t.proc.stdout is not None:
        t.proc.stdout.close()
    if t.ktap:
        os.unlink(t.ktap)
        t.ktap = ""


POLL = 0.05     # seconds between looks at a test whose output ended but whose process lives on


def _run_tests(base: str, tests: List[_Test], jobs: int, pr: _Printer, override: Optional[int],
               heartbeat: Optional[int], per_test_log: Optional[str]) -> None:
    """Run ``tests`` with up to ``jobs`` at once, starting them in list order; each ends by
    itself or at its own timeout, and is printed in its turn. On any exception (SIGTERM,
    Ctrl-C) every running test's process group is killed before it goes on."""
    started = 0
    running: List[_Test] = []
    try:
        pr.release(tests)
        while started < len(tests) or running:
            while started < len(tests) and len(running) < jobs:
                t = tests[started]
                started += 1
                if per_test_log is not None:          # made (or refused) before any TAP line
                    t.log = open(os.path.join(per_test_log, t.test), "w", encoding="utf-8",
                                 errors="backslashreplace")
                running.append(t)
                _start(base, t, pr, override, heartbeat)
                if t.done:
                    running.remove(t)
                    if t.log is not None:
                        t.log.close()
                        t.log = None
                    pr.release(tests)
            if not running:
                continue
            now = time.monotonic()
            reading = {t.proc.stdout.fileno(): t for t in running
                       if not t.eof and t.proc is not None and t.proc.stdout is not None}
            waits = [w - now for t in running for w in (t.deadline, t.beat, t.kill_at)
                     if w is not None]
            if len(reading) < len(running):
                waits.append(POLL)
            ready, _, _ = select.select(list(reading), [], [],
                                        max(0.0, min(waits)) if waits else None)
            for fd in ready:
                _read_output(reading[fd], pr)
            now = time.monotonic()
            for t in list(running):
                _tick(t, now, pr)
                if t.eof and t.proc is not None and t.proc.poll() is not None:
                    _finish(t, pr)
                    running.remove(t)
                    if t.log is not None:
                        t.log.close()
                        t.log = None
            pr.release(tests)
    finally:
        for t in running:
            _abandon(t)
            if t.log is not None:
                t.log.close()


USAGE = """Usage: run_kselftest.sh [OPTIONS]
  -s | --summary                Print the test output into output.log, only results here
  -p | --per-test-log [DIR]     Print each test's output into DIR/<test> (default /tmp)
  -t | --test COLLECTION:TEST   Run TEST from COLLECTION
  -S | --skip COLLECTION:TEST   Skip TEST from COLLECTION
  -c | --collection COLLECTION  Run all tests from COLLECTION
  -l | --list                   List the available collection:test entries
  -d | --dry-run                Don't actually run any tests
  -f | --no-error-on-fail       Don't exit with an error just because tests failed
  -n | --netns                  Accepted; ignored (pykvm's tests use no network namespace)
  -o | --override-timeout SECS  Number of seconds after which a test times out (0: never)
  -b | --heartbeat SECS         Seconds between heartbeat lines (0: none; default: settings)
  -j | --jobs N                 Run up to N tests at once (default 1; 0 or auto: one per CPU);
                                each test's lines are printed together when it ends, in order
  -h | --help                   Show this usage info
Environment: PYKVM_PYTHON (the Python to run), KSELFTEST_<TEST>_ARGS (extra pytest arguments)."""


class _Usage(argparse.ArgumentParser):
    def error(self, message: str):              # argparse's hook: one line, then usage
        sys.stderr.write(f"run_kselftest.sh: {message}\n{USAGE}\n")
        raise SystemExit(1)


def _runner_parser() -> argparse.ArgumentParser:
    p = _Usage(prog="run_kselftest.sh", add_help=False)
    p.add_argument("-s", "--summary", action="store_true")
    p.add_argument("-p", "--per-test-log", nargs="?", const="/tmp", default=None)
    p.add_argument("-t", "--test", action="append", default=[])
    p.add_argument("-S", "--skip", action="append", default=[])
    p.add_argument("-c", "--collection", action="append", default=[])
    p.add_argument("-l", "--list", action="store_true")
    p.add_argument("-d", "--dry-run", action="store_true")
    p.add_argument("-f", "--no-error-on-fail", action="store_true")
    p.add_argument("-n", "--netns", action="store_true")
    p.add_argument("-o", "--override-timeout", default=None)
    p.add_argument("-b", "--heartbeat", default=None)
    p.add_argument("-j", "--jobs", default="1")
    p.add_argument("-h", "--help", action="store_true")
    return p


def run(base: str, argv: Sequence[str]) -> int:
    """``run_kselftest.sh`` in install directory ``base`` with options ``argv`` (see
    :data:`USAGE`; the kernel's options and meanings, and ``-j``). Returns the exit status: 1
    when a test failed (0 with -f) or for bad options, else 0."""
    a = _runner_parser().parse_args(list(argv))
    if a.help:
        print(USAGE)
        return 0
    listing = os.path.join(base, "kselftest-list.txt")
    if not os.access(listing, os.R_OK):
        sys.stderr.write(f"run_kselftest.sh: Could not find list of tests to run ({listing})\n")
    entries = [e for e in _read(listing).split() if ":" in e]
    if a.list:
        print("\n".join(entries))
        return 0
    override = None if a.override_timeout is None else _seconds(a.override_timeout,
                                                                 "--override-timeout")
    heartbeat = None if a.heartbeat is None else _seconds(a.heartbeat, "--heartbeat")
    jobs = jobs_of(a.jobs)
    chosen = list(a.test)
    for c in a.collection:
        found = [e for e in entries if e.split(":", 1)[0] == c]
        if not found:
            sys.stderr.write(f"No such collection '{c}'\n")
            return 1
        chosen += found
    for t in chosen:
        if t not in entries:
            sys.stderr.write(f"No such test '{t}'\n")
            return 1
    selected = [e for e in (chosen or entries) if e not in a.skip]
    tests: List[_Test] = []
    for coll in sorted({e.split(":", 1)[0] for e in selected}):
        names = [e.split(":", 1)[1] for e in selected if e.split(":", 1)[0] == coll]
        if a.dry_run:
            _Printer.stdout(f"# dry run: {coll}: {' '.join(names)}")
            continue
        tests += [_Test(coll, name, num, len(names) if num == 1 else 0)
                  for num, name in enumerate(names, 1)]
    if a.dry_run:
        return 0
    why = missing_pytest()                       # before any TAP line: one line, not N failures
    if why is not None:
        sys.stderr.write(f"run_kselftest.sh: {why}\n")
        return 1
    if a.per_test_log is not None:               # before any TAP line: one line if it cannot be
        try:
            os.makedirs(a.per_test_log, exist_ok=True)
        except OSError as e:
            sys.stderr.write(f"--per-test-log {a.per_test_log}: {e.strerror or e}\n")
            return 1
    log: Optional[TextIO] = None
    if a.summary:
        log = open(os.path.join(base, "output.log"), "w", encoding="utf-8",
                   errors="backslashreplace")
    pr = _Printer(jobs == 1, log)
    if a.netns:
        pr.stdout("# --netns: ignored (pykvm's tests use no network namespace)")
    try:
        _run_tests(base, tests, jobs, pr, override, heartbeat, a.per_test_log)
    finally:
        if log is not None:
            log.close()
    counts = {"pass": 0, "fail": 0, "xfail": 0, "skip": 0}
    for t in tests:
        counts[t.kind] += 1
    pr.stdout(f"# Totals: pass:{counts['pass']} fail:{counts['fail']} xfail:{counts['xfail']} "
              f"xpass:0 skip:{counts['skip']} error:0")
    failed = [t for t in tests if t.kind == "fail"]
    for t in failed:
        pr.stdout(f"# FAILED: {t.label} ({t.directive})")
    if not failed:
        pr.stdout("# FAILED: none")
    return 1 if failed and not a.no_error_on_fail else 0


class _Ended(Exception):
    """SIGTERM or SIGHUP reached the runner (every running test's group is ended as it unwinds)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise _Ended(signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m pykvm.testing.kselftest run DIR [OPTIONS]`` (what ``run_kselftest.sh``
    starts) or ``... one FILE.py [PYTEST ARGS]`` (what a test's executable starts)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "run":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)
        for stream in (sys.stdout, sys.stderr):    # a test's UTF-8 under any locale
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(errors="backslashreplace")
        try:
            return run(args[1], args[2:])
        except (KeyboardInterrupt, _Ended) as e:
            signum = e.signum if isinstance(e, _Ended) else signal.SIGINT
            sys.stderr.write(f"run_kselftest.sh: interrupted by {signal.Signals(signum).name}\n")
            return 128 + signum
    if len(args) >= 2 and args[0] == "one":
        return run_one(args[1], args[2:])
    sys.stderr.write("usage: python -m pykvm.testing.kselftest run DIR [OPTIONS] | "
                     "one FILE.py [PYTEST ARGS]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
