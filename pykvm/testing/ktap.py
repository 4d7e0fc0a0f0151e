"""Write pytest results as KTAP version 1 (the format kselftest and KUnit print, and KernelCI
and LAVA read): ``pytest --ktap FILE``.

Structure
---------
One subtest per test module (more exactly, per pytest node id before the first ``::``), each
with its own version line and plan; the top-level plan counts the modules::

    KTAP version 1
    1..2
      KTAP version 1
      1..3
      ok 1 test_pass
      # test_fail: call failed at test_a.py:7
      # assert (1 + 1) == 3
      not ok 2 test_fail
      ok 3 test_param[50%25] # SKIP no widget here
    # test_a.py: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0
    not ok 1 test_a.py
      KTAP version 1
      1..1
      ok 1 TestGroup::test_method
    # test_b.py: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0
    ok 2 test_b.py
    # Totals: pass:2 fail:1 xfail:0 xpass:0 skip:1 error:0
    # pytest exit status 1 (TESTS_FAILED)

A subtest's lines are indented by two spaces, from its version line to its last result; its
parent result line follows at the outer level (ktap.rst, "Nested tests"). A subtest's result
name is the rest of the node id (``Class::test[param]``); parametrised cases are siblings.
Each plan is the count of the result lines that follow it at that level, because the file is
written once, at the end of the session, from what actually happened.

A module is ``not ok`` when any of its tests is ``not ok``; ``ok ... # SKIP all N tests
skipped`` when every test in it was skipped; ``ok`` otherwise (ktap.rst: a failing subtest
fails the parent; skips do not). A module that fails to import (a collection error) is a
result with no subtests: ``not ok N test_x.py # ERROR collection failed: ...``; a module
skipped at import (``pytest.importorskip``) is ``ok N test_x.py # SKIP reason``.

Results and directives
----------------------
One result line per test, from all three of pytest's phases (setup, call, teardown):

==============================  ========================================================
pytest outcome                  KTAP result line
==============================  ========================================================
passed                          ``ok N name``
failed (the test body)          ``not ok N name``
skipped (marker, pytest.skip)   ``ok N name # SKIP reason``
xfailed (strict or not)         ``ok N name # XFAIL reason``
xpassed (not strict)            ``ok N name # XPASS reason``
xpassed, strict (a failure)     ``not ok N name # XPASS reason``
error in setup or teardown      ``not ok N name # ERROR setup: message`` (or teardown)
collected but never run         ``ok N name # SKIP not run (...)``
==============================  ========================================================

Sources: ``SKIP``, ``XFAIL`` and ``ERROR`` are directives of ktap.rst (Documentation/dev-tools),
which says ``ERROR`` goes with ``not ok``; ``ok N # SKIP`` and ``ok N # XFAIL`` are what
kselftest.h's ``ksft_test_result_skip()`` and ``ksft_test_result_xfail()`` print, and its
``ksft_test_result_code()`` prints ``ok N name # XPASS`` for ``KSFT_XPASS``: an unexpected
pass is ``ok`` in kselftest. pytest agrees for a non-strict xfail mark (an XPASS does not fail
the run) but fails the test when the mark is ``strict=True``; there the verdict follows
pytest (``not ok``) and the directive still says why. ktap.rst tells parsers that meet a
directive they do not know (``XPASS`` is not in its list) to fall back to ``ok``/``not ok``,
so the verdict alone is always the truth. An error in setup or teardown makes the test
``not ok # ERROR`` whatever the body did (so a passing test whose fixture teardown raises
is not ``ok``); pytest's own xfail handling (an xfail-marked test whose setup raises is
xfailed) is kept.

Names and diagnostics
---------------------
ktap.rst: a description "can't include #". Names are escaped: ``#``, ``%`` and control
characters become ``%XX`` (their UTF-8 bytes, like a URL), so ``test[a#b]`` is written
``test[a%23b]`` and the escape can be undone. A directive's diagnostic data is one line
(whitespace runs collapsed, cut at 200 characters). Failure details are diagnostic lines
(``# ...``) directly before the result they belong to, at its indentation: where and in which
phase it failed, then the exception message, one diagnostic line per line of it (at most 20),
never a raw traceback. The module summary and the kselftest-style ``# Totals:`` line count
tests by kind; the last line gives pytest's exit status.
"""
import errno
import os
import sys

import pytest

from ..outfile import ReportPathError, check_report_path, write_report
from .._ktap import escape_name

INDENT = "  "
MAX_DIAG_LINES = 20
MAX_DATA = 200
KINDS = ("pass", "fail", "xfail", "xpass", "skip", "error")


def _printable(line: str) -> str:
    return "".join(ch if ch == " " or ch.isprintable() else f"\\x{ord(ch) & 0xFF:02x}"
                   for ch in line.expandtabs(4)).rstrip()


def _one_line(text: str) -> str:
    """Diagnostic data for a result line: one line, bounded."""
    text = _printable(" ".join(str(text).split()))
    return text if len(text) <= MAX_DATA else text[:MAX_DATA - 3] + "..."


def _say(line: str) -> None:
    """One line on stderr, even where stderr is closed or full (then nothing is said)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


class Outcome:
    """One KTAP result: kind (one of KINDS), verdict, directive and its data, and the
    diagnostic lines that go directly before the result line."""

    def __init__(self, kind, directive=None, data="", diags=(), ok=None):
        self.kind = kind
        self.ok = kind not in ("fail", "error") if ok is None else ok
        self.directive = directive
        self.data = _one_line(data) if data else ""
        self.diags = list(diags)

    def line(self, number: int, name: str) -> str:
        """The KTAP result line for this outcome: ok|not ok N name [# DIRECTIVE reason]."""
        s = f"{'ok' if self.ok else 'not ok'} {number} {escape_name(name)}"
        if self.directive:
            s += f" # {self.directive}" + (f" {self.data}" if self.data else "")
        return s


class KtapWriter:
    """Collects every phase's report and writes the KTAP file when the session finishes."""

    def __init__(self, path: str):
        """``path``: where the KTAP document goes (see :func:`pykvm.outfile.write_report`).
        A path that can never take it (a directory, socket or block device, or a file in a
        directory that does not exist: no directory is made, as ``pykvm guest build -o`` and
        ``pykvm run --snapshot`` make none) raises :class:`pykvm.outfile.ReportPathError` at
        once, before any test runs."""
        check_report_path(path, "KTAP")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ReportPathError(errno.ENOENT, f"cannot write KTAP to {path}: "
                                  f"{os.strerror(errno.ENOENT)}: {parent}", path)
        self.path = os.path.abspath(path)      # as given: symlinks are followed when written
        self.tests = {}        # nodeid -> {when: TestReport}, in the order tests first reported
        self.collected = {}    # nodeid -> failed or skipped CollectReport
        self.order = {}        # module (node id before "::") -> rank, in collection order
        self.rootdir = None

    # -- hooks ------------------------------------------------------------------------------

    def pytest_runtest_logreport(self, report):
        self.order.setdefault(report.nodeid.partition("::")[0], len(self.order))
        if report.when == "setup" or report.nodeid not in self.tests:
            self.tests[report.nodeid] = {}       # a rerun starts afresh at its setup
        self.tests[report.nodeid][report.when] = report

    def pytest_collectreport(self, report):
        self.order.setdefault(report.nodeid.partition("::")[0], len(self.order))
        if report.failed or report.skipped:
            self.collected[report.nodeid] = report

    def pytest_sessionfinish(self, session, exitstatus):
        """Write the KTAP file (see :mod:`pykvm.outfile`: a regular file is replaced atomically;
        a symlink, character device or FIFO is written through, never replaced). A file that
        cannot be written is one line on stderr and a failing pytest status (the session's own
        failure status if it had one, else INTERNAL_ERROR), never a traceback: pytest's summary
        still follows."""
        self.rootdir = str(getattr(session.config, "rootpath", "") or "")
        text = self.render(getattr(session, "items", None) or [], exitstatus)
        try:
            write_report(self.path, text, "KTAP")
        except OSError as e:
            _say(f"pykvm: {e}")
            if int(session.exitstatus) in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    # -- outcomes ---------------------------------------------------------------------------

    def _where(self, rep):
        crash = getattr(rep.longrepr, "reprcrash", None)
        if crash is None:
            loc = getattr(rep, "location", None)
            return f"{loc[0]}:{loc[1] + 1}" if loc and loc[1] is not None else rep.nodeid
        path = str(crash.path)
        if self.rootdir and path.startswith(self.rootdir + os.sep):
            path = os.path.relpath(path, self.rootdir)
        return f"{path}:{crash.lineno}"

    @staticmethod
    def _message_lines(rep):
        """The failure's message, as a list of lines: the exception's own text when pytest
        kept it (reprcrash), else the ``E`` lines of the report, else its last lines."""
        lr = rep.longrepr
        crash = getattr(lr, "reprcrash", None)
        if crash is not None and crash.message:
            lines = str(crash.message).splitlines()
        elif isinstance(lr, tuple) and len(lr) == 3:
            lines = str(lr[2]).splitlines()
        else:
            text = lr if isinstance(lr, str) else getattr(rep, "longreprtext", "") or str(lr)
            lines = str(text).splitlines()
            marked = [line[1:].strip() for line in lines if line.startswith("E ")]
            lines = marked or [line for line in lines if line.strip()][-MAX_DIAG_LINES:]
        lines = [_printable(line) for line in lines if line.strip()] or ["(no message)"]
        if len(lines) > MAX_DIAG_LINES:
            lines = lines[:MAX_DIAG_LINES - 1] + [f"... ({len(lines) - MAX_DIAG_LINES + 1} "
                                                  "more lines)"]
        return lines

    def _failure_diags(self, name, phase, rep):
        return [f"{name}: {phase} failed at {self._where(rep)}"] + self._message_lines(rep)

    @staticmethod
    def _skip_reason(rep):
        lr = rep.longrepr
        reason = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr or "")
        for prefix in ("Skipped: ", "Skipped"):
            if reason.startswith(prefix):
                reason = reason[len(prefix):]
                break
        return reason

    def test_outcome(self, name, phases):
        """Fold a test's setup/call/teardown reports into one Outcome."""
        setup, call, teardown = (phases.get(w) for w in ("setup", "call", "teardown"))
        outcome = None
        errors, diags = [], []             # setup/teardown errors: "phase: message", diagnostics
        if setup is not None and setup.failed:
            diags += self._failure_diags(name, "setup", setup)
            errors.append(f"setup: {self._message_lines(setup)[0]}")
        else:
            rep = call if setup is None or setup.passed else setup
            outcome = self._body_outcome(name, rep) if rep is not None else \
                Outcome("skip", "SKIP", "not run (no call phase)")  # e.g. --setup-only
        if teardown is not None and teardown.failed:
            diags = (outcome.diags if outcome else []) + diags
            diags += self._failure_diags(name, "teardown", teardown)
            errors.append(f"teardown: {self._message_lines(teardown)[0]}")
        elif (teardown is not None and teardown.skipped and outcome is not None
              and outcome.kind in ("pass", "xpass")
              and getattr(teardown, "wasxfail", None) is not None):   # pytest calls it xfailed
            outcome = Outcome("xfail", "XFAIL", teardown.wasxfail,
                              self._failure_diags(name, "teardown (expected)", teardown))
        if errors:
            return Outcome("error", "ERROR", "; ".join(errors), diags)
        return outcome

    def _body_outcome(self, name, rep):
        """The Outcome of a setup report that did not fail, or of a call report."""
        xfail = getattr(rep, "wasxfail", None)
        if rep.skipped and xfail is not None:
            return Outcome("xfail", "XFAIL", xfail,
                           [f"{name}: expected failure in {rep.when} at {self._where(rep)}"]
                           + self._message_lines(rep))
        if rep.skipped:
            return Outcome("skip", "SKIP", self._skip_reason(rep))
        if rep.failed and str(rep.longrepr).startswith("[XPASS(strict)]"):
            return Outcome("xpass", "XPASS", str(rep.longrepr)[len("[XPASS(strict)]"):].strip(),
                           [f"{name}: passed although marked xfail(strict=True)"], ok=False)
        if rep.failed:
            return Outcome("fail", None, "", self._failure_diags(name, rep.when, rep))
        if xfail is not None:
            return Outcome("xpass", "XPASS", xfail)
        return Outcome("pass")

    def collect_outcome(self, name, rep):
        """The :class:`Outcome` of a collection report for ``name`` (a module that failed to import
        or was skipped)."""
        if rep.skipped:
            return Outcome("skip", "SKIP", self._skip_reason(rep))
        msg = self._message_lines(rep)
        return Outcome("error", "ERROR", f"collection failed: {msg[0]}",
                       [f"{name}: collection failed"] + msg)

    # -- output -----------------------------------------------------------------------------

    def render(self, items=(), exitstatus=0) -> str:
        """The whole KTAP v1 document for the collected items and pytest's exitstatus (str)."""
        groups = {}     # top-level name -> {"children": {name: Outcome}, "self": Outcome|None}

        def group(nodeid):
            top, sep, rest = nodeid.partition("::")
            g = groups.setdefault(top, {"children": {}, "self": None})
            return g, (rest if sep else None)

        for nodeid, phases in self.tests.items():
            g, rest = group(nodeid)
            g["children"][rest or nodeid] = self.test_outcome(rest or nodeid, phases)
        for nodeid, rep in self.collected.items():
            g, rest = group(nodeid)
            if rest is None:
                g["self"] = self.collect_outcome(nodeid, rep)
            else:
                g["children"][rest] = self.collect_outcome(rest, rep)
        stopped = f"pytest stopped, exit status {int(exitstatus)}"
        for item in items:
            if item.nodeid not in self.tests:
                g, rest = group(item.nodeid)
                g["children"][rest or item.nodeid] = Outcome("skip", "SKIP", f"not run ({stopped})")

        ranked = sorted(groups.items(), key=lambda kv: self.order.get(kv[0], len(self.order)))
        lines = ["KTAP version 1", f"1..{len(groups)}"]
        totals = dict.fromkeys(KINDS, 0)
        for number, (top, g) in enumerate(ranked, 1):
            top = top or "<session>"                      # e.g. a failing rootdir conftest
            children = g["children"]
            if g["self"] is not None and children:        # a collector error beside tests
                children = {**children, "<collection>": g["self"]}
            elif g["self"] is not None:
                totals[g["self"].kind] += 1
                lines += [f"# {_printable(d)}" for d in g["self"].diags]
                lines.append(g["self"].line(number, top))
                continue
            counts = dict.fromkeys(KINDS, 0)
            lines += [INDENT + "KTAP version 1", f"{INDENT}1..{len(children)}"]
            for n, (name, o) in enumerate(children.items(), 1):
                counts[o.kind] += 1
                lines += [f"{INDENT}# {_printable(d)}" for d in o.diags]
                lines.append(INDENT + o.line(n, name))
            for k in KINDS:
                totals[k] += counts[k]
            lines.append(f"# {_one_line(top)}: " + " ".join(f"{k}:{counts[k]}" for k in KINDS))
            if all(o.ok for o in children.values()) and counts["skip"] == len(children):
                parent = Outcome("skip", "SKIP", f"all {len(children)} tests skipped")
            else:
                parent = Outcome("pass" if all(o.ok for o in children.values()) else "fail")
            lines.append(parent.line(number, top))
        lines.append("# Totals: " + " ".join(f"{k}:{totals[k]}" for k in KINDS))
        try:
            name = f" ({pytest.ExitCode(int(exitstatus)).name})"
        except ValueError:                              # a plugin's own exit status
            name = ""
        lines.append(f"# pytest exit status {int(exitstatus)}{name}")
        return "\n".join(lines) + "\n"
