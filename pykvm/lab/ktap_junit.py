"""The lab's merged JUnit XML as KTAP version 1: ``<out>/<lab>.ktap`` beside ``<out>/<lab>.xml``.

:func:`qemu.merge_junit <pykvm.lab.qemu.merge_junit>` writes both; ``python -m
pykvm.lab.ktap_junit FILE.xml`` prints the KTAP of a JUnit file an earlier lab wrote.

Structure
---------
One subtest per boot and module-parameter combination, in the order the JUnit file holds them;
the top-level plan counts the subtests::

    KTAP version 1
    1..2
      KTAP version 1
      1..3
      ok 1 tests/nested/test_nested.py::test_a[kvm_amd.npt=0]
      # AssertionError: L2 read a stale translation
      not ok 2 tests/nested/test_svm_tlb.py::test_b[kvm_amd.npt=0]
      ok 3 tests/nested/test_svm_tlb.py::test_c[kvm_amd.npt=0] # SKIP pykvm: host lacks ...
    # nested[kvm_amd.npt=0]: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0
    not ok 1 nested[kvm_amd.npt=0]
      KTAP version 1
      ...
    # nested[kvm_amd.npt=1]: pass:3 fail:0 xfail:0 xpass:0 skip:0 error:0
    ok 2 nested[kvm_amd.npt=1]
    # Totals: pass:4 fail:1 xfail:0 xpass:0 skip:1 error:0

A subtest's name is its boot's (the testsuite's ``hostname``, which ``merge_junit`` sets:
``nested``, ``nested-qemu``, ``riscv-rv64``, ``riscv-max``...; the lab's name when it is
missing), followed by ``[combination]`` when the suite has the ``lab_combination`` property
(:mod:`pykvm.lab.matrix`). Suites with the same subtest name are one subtest.

A result's name is the testcase's pytest node id, rebuilt from JUnit's dotted ``classname``
(``tests.nested.test_nested`` -> ``tests/nested/test_nested.py``; the components after the
last ``test_*``/``*_test`` module are classes, joined with ``::``) and its ``name``, which
keeps the combination and boot suffixes JUnit gives it (``test_x[kvm_amd.npt=0]``). A
testcase whose classname names no test module (the lab's own ``lab.nested::boot`` when a boot
failed) keeps the classname as it is.

Results follow the rules of :mod:`pykvm.testing.ktap` (``pytest --ktap``), as far as JUnit
tells them:

=================================  ===============================================
JUnit testcase                     KTAP result line
=================================  ===============================================
no failure, error or skipped       ``ok N name``
``<failure message=M>``            ``# M's first line``, then ``not ok N name``
``<error message=M>``              ``# M's first line``, then ``not ok N name # ERROR``
``<skipped type="pytest.xfail">``  ``ok N name # XFAIL message``
``<skipped message=M>``            ``ok N name # SKIP M``
=================================  ===============================================

(JUnit has no XPASS: a non-strict unexpected pass is a pass there, a strict one a failure.)
A subtest is ``not ok`` when one of its results is; ``ok ... # SKIP all N tests skipped``
when every one was skipped; ``ok ... # SKIP no tests`` when it has none; else ``ok``. A
summary line by kind (``# name: pass:...``) comes before each subtest's result line, and the
kselftest-style ``# Totals:`` line last. Names are escaped as ``pykvm.testing.ktap`` escapes
them (``#``, ``%`` and control characters as ``%XX`` of their UTF-8 bytes); a comment or
directive's text is one line, whitespace runs collapsed, cut at 200 characters. Standard
library only: the lab runs on hosts without pytest.
"""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .._ktap import escape_name

INDENT = "  "
MAX_DATA = 200
KINDS = ("pass", "fail", "xfail", "xpass", "skip", "error")
PROP_COMBO = "lab_combination"         # pykvm.lab.matrix's suite and testcase property


def one_line(text: str) -> str:
    """Diagnostic text: one line (whitespace runs made one space), printable, at most
    :data:`MAX_DATA` characters."""
    text = "".join(ch if ch == " " or ch.isprintable() else f"\\x{ord(ch) & 0xFF:02x}"
                   for ch in " ".join(str(text).split()))
    return text if len(text) <= MAX_DATA else text[:MAX_DATA - 3] + "..."


def first_line(el: ET.Element) -> str:
    """The first non-blank line of a failure, error or skipped element's ``message``, else of
    its text; "" when it has neither."""
    for text in (el.get("message") or "", el.text or ""):
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return ""


def _prop(el: ET.Element, name: str) -> str | None:
    props = el.find("properties")
    if props is None:
        return None
    return next((p.get("value") for p in props.findall("property") if p.get("name") == name), None)


def subtest_name(suite: ET.Element, lab: str) -> str:
    """``boot`` or ``boot[combination]`` for a testsuite of the lab's merged JUnit."""
    name = suite.get("hostname") or lab
    combo = _prop(suite, PROP_COMBO)
    return f"{name}[{combo}]" if combo else name


def node_id(tc: ET.Element) -> str:
    """A testcase's pytest node id from its JUnit ``classname`` (and ``file``, when pytest's
    xunit1 family wrote one) and ``name``."""
    name = tc.get("name") or "?"
    classname = tc.get("classname") or ""
    parts = classname.split(".") if classname else []
    module = max((i for i, p in enumerate(parts) if p.startswith("test_") or p.endswith("_test")),
                 default=-1)
    if module < 0:
        return f"{classname}::{name}" if classname else name
    path = tc.get("file") or "/".join(parts[:module + 1]) + ".py"
    return "::".join([path, *parts[module + 1:], name])


def result(tc: ET.Element) -> tuple[str, list[str], str]:
    """(kind, comment lines, directive) of one testcase: kind one of :data:`KINDS`."""
    bad = [el for el in tc if el.tag in ("failure", "error")]
    if bad:
        notes = [one_line(first_line(el)) or f"{el.tag} (no message)" for el in bad]
        if any(el.tag == "error" for el in bad):
            return "error", notes, "ERROR"
        return "fail", notes, ""
    skipped = tc.find("skipped")
    if skipped is not None:
        why = one_line(first_line(skipped))
        if skipped.get("type") == "pytest.xfail":
            return "xfail", [], f"XFAIL {why}".rstrip()
        return "skip", [], f"SKIP {why}".rstrip()
    return "pass", [], ""


def _counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{counts[k]}" for k in KINDS)


def junit_to_ktap(root: ET.Element, lab: str) -> str:
    """The KTAP text (ending in a newline) of ``root``: the lab's merged ``<testsuites>`` (or
    one ``<testsuite>``), ``lab`` naming suites without a ``hostname``. See the module's
    docstring for the layout."""
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    groups: dict[str, list[ET.Element]] = {}
    for s in suites:
        groups.setdefault(subtest_name(s, lab), []).extend(s.iter("testcase"))
    lines = ["KTAP version 1", f"1..{len(groups)}"]
    totals = dict.fromkeys(KINDS, 0)
    for num, (name, cases) in enumerate(groups.items(), 1):
        counts = dict.fromkeys(KINDS, 0)
        lines += [INDENT + "KTAP version 1", f"{INDENT}1..{len(cases)}"]
        for n, tc in enumerate(cases, 1):
            kind, notes, directive = result(tc)
            counts[kind] += 1
            lines += [f"{INDENT}# {note}" for note in notes]
            ok = "not ok" if kind in ("fail", "error") else "ok"
            lines.append(f"{INDENT}{ok} {n} {escape_name(node_id(tc))}"
                         + (f" # {directive}" if directive else ""))
        for k in KINDS:
            totals[k] += counts[k]
        lines.append(f"# {escape_name(name)}: {_counts(counts)}")
        if counts["fail"] or counts["error"]:
            lines.append(f"not ok {num} {escape_name(name)}")
        elif not cases:
            lines.append(f"ok {num} {escape_name(name)} # SKIP no tests")
        elif counts["skip"] == len(cases):
            lines.append(f"ok {num} {escape_name(name)} # SKIP all {len(cases)} tests skipped")
        else:
            lines.append(f"ok {num} {escape_name(name)}")
    lines.append(f"# Totals: {_counts(totals)}")
    return "\n".join(lines) + "\n"


def ktap_path(xml: Path) -> Path:
    """Where the KTAP of the JUnit file ``xml`` goes: beside it, ``.ktap`` for its suffix."""
    return Path(xml).with_suffix(".ktap")


def main(argv: list[str] | None = None) -> int:
    """``python -m pykvm.lab.ktap_junit FILE.xml [LAB]``: print FILE's KTAP (LAB, default the
    file's stem, names suites without a hostname). Status 0, or 2 with one line on stderr for
    a file that cannot be read or parsed."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or args[0].startswith("-"):
        sys.stderr.write("usage: python -m pykvm.lab.ktap_junit FILE.xml [LAB]\n")
        return 2
    try:
        root = ET.parse(args[0]).getroot()
    except (OSError, ET.ParseError) as e:
        sys.stderr.write(f"ktap_junit: cannot read JUnit XML from {args[0]}: {e}\n")
        return 2
    sys.stdout.write(junit_to_ktap(root, args[1] if len(args) > 1 else Path(args[0]).stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
