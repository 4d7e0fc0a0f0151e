"""The lab's KTAP (issue 22 item 2): ``<out>/<lab>.ktap`` beside the merged JUnit, one subtest per
boot and module-parameter combination (pykvm/lab/ktap_junit.py). On JUnit written here by hand and
by a real pytest run; nothing boots QEMU."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from pykvm.lab import ktap_junit as kj
from pykvm.lab import matrix as mx
from pykvm.lab import qemu as q
from pykvm.testing import ktap

COMBO = ('<properties><property name="lab_combination" value="{c}" />'
         '<property name="lab_module_params" value="kvm_amd.nested=1 {c}" /></properties>')
TC_COMBO = '<properties><property name="lab_combination" value="{c}" /></properties>'

# what merge_junit writes for two boots: `nested` under --param kvm_amd.npt=0,1 (its names end
# in [combination][boot]) and `nested-qemu`, which timed out
MERGED = f"""<?xml version='1.0' encoding='utf-8'?>
<testsuites name="pykvm-lab-nested" tests="7" failures="1" errors="1" skipped="2">
<testsuite name="pytest[kvm_amd.npt=0][nested]" hostname="nested" tests="4" failures="0" errors="0"
 skipped="2">{COMBO.format(c="kvm_amd.npt=0")}
<testcase classname="tests.nested.test_svm_tlb" name="test_tlb_control[flush-all][kvm_amd.npt=0][nested]"
 time="1.0">{TC_COMBO.format(c="kvm_amd.npt=0")}</testcase>
<testcase classname="tests.nested.test_svm_tlb.TestInvlpga" name="test_one_address[kvm_amd.npt=0][nested]"
 time="0.5" />
<testcase classname="tests.nested.test_nested" name="test_needs_two_cpus[kvm_amd.npt=0][nested]">
<skipped type="pytest.skip" message="pykvm: host lacks a second CPU">tests/nested/test_nested.py:40: pykvm: host
 lacks a second CPU</skipped></testcase>
<testcase classname="tests.nested.test_nested" name="test_known_gap[kvm_amd.npt=0][nested]">
<skipped type="pytest.xfail" message="QEMU's TLB model flushes   everything" /></testcase>
</testsuite>
<testsuite name="pytest[kvm_amd.npt=1][nested]" hostname="nested" tests="2" failures="1" errors="0"
 skipped="0">{COMBO.format(c="kvm_amd.npt=1")}
<testcase classname="tests.nested.test_svm_tlb" name="test_tlb_control[flush-all][kvm_amd.npt=1][nested]">
<failure message="AssertionError: L2 read a stale translation&#10;assert 4369 == 8738">def test_tlb_control():
&gt;   assert 4369 == 8738
E   AssertionError: L2 read a stale translation</failure></testcase>
<testcase classname="tests.nested.test_nested" name="test_odd[a#b%c][kvm_amd.npt=1][nested]" />
</testsuite>
<testsuite name="nested-qemu" hostname="nested-qemu" tests="1" failures="0" errors="1" skipped="0">
<testcase classname="lab.nested-qemu" name="boot[nested-qemu]" time="900.0">
<error message="nested-qemu: timed out after 900 s">nested-qemu: timed out after 900 s</error></testcase>
</testsuite>
</testsuites>
"""

WANT = """\
KTAP version 1
1..3
  KTAP version 1
  1..4
  ok 1 tests/nested/test_svm_tlb.py::test_tlb_control[flush-all][kvm_amd.npt=0][nested]
  ok 2 tests/nested/test_svm_tlb.py::TestInvlpga::test_one_address[kvm_amd.npt=0][nested]
  ok 3 tests/nested/test_nested.py::test_needs_two_cpus[kvm_amd.npt=0][nested] # SKIP pykvm: host lacks a second CPU
  ok 4 tests/nested/test_nested.py::test_known_gap[kvm_amd.npt=0][nested] # XFAIL QEMU's TLB model flushes everything
# nested[kvm_amd.npt=0]: pass:2 fail:0 xfail:1 xpass:0 skip:1 error:0
ok 1 nested[kvm_amd.npt=0]
  KTAP version 1
  1..2
  # AssertionError: L2 read a stale translation
  not ok 1 tests/nested/test_svm_tlb.py::test_tlb_control[flush-all][kvm_amd.npt=1][nested]
  ok 2 tests/nested/test_nested.py::test_odd[a%23b%25c][kvm_amd.npt=1][nested]
# nested[kvm_amd.npt=1]: pass:1 fail:1 xfail:0 xpass:0 skip:0 error:0
not ok 2 nested[kvm_amd.npt=1]
  KTAP version 1
  1..1
  # nested-qemu: timed out after 900 s
  not ok 1 lab.nested-qemu::boot[nested-qemu] # ERROR
# nested-qemu: pass:0 fail:0 xfail:0 xpass:0 skip:0 error:1
not ok 3 nested-qemu
# Totals: pass:3 fail:1 xfail:1 xpass:0 skip:1 error:1
"""


def test_a_matrix_a_failure_a_skip_and_a_failed_boot():
    assert kj.junit_to_ktap(ET.fromstring(MERGED.encode()), "nested") == WANT


def test_subtests_all_skipped_empty_and_without_a_hostname():
    doc = ET.fromstring(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.riscv.test_aia" name="test_a"><skipped message="pykvm: host lacks AIA" />'
        '</testcase><testcase classname="tests.riscv.test_aia" name="test_b">'
        '<skipped message="">tests/riscv/test_aia.py:9: no reason given</skipped></testcase>'
        '</testsuite><testsuite name="pytest" hostname="riscv-max" /></testsuites>')
    assert kj.junit_to_ktap(doc, "riscv") == """\
KTAP version 1
1..2
  KTAP version 1
  1..2
  ok 1 tests/riscv/test_aia.py::test_a # SKIP pykvm: host lacks AIA
  ok 2 tests/riscv/test_aia.py::test_b # SKIP tests/riscv/test_aia.py:9: no reason given
# riscv: pass:0 fail:0 xfail:0 xpass:0 skip:2 error:0
ok 1 riscv # SKIP all 2 tests skipped
  KTAP version 1
  1..0
# riscv-max: pass:0 fail:0 xfail:0 xpass:0 skip:0 error:0
ok 2 riscv-max # SKIP no tests
# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:2 error:0
"""


def test_names_escape_as_pytest_ktap_does():
    for name in ("test_x[a#b]", "100%", "tab\there", "line\nbreak", "  ", "é\u2028", "plain[1-2]"):
        assert kj.escape_name(name) == ktap.escape_name(name), name


BODY = """import pytest
def test_pass(): pass
def test_fail(): assert 1 + 1 == 3, "made to fail"
def test_skip(): pytest.skip("pykvm: host lacks a widget")
@pytest.mark.xfail(reason="known gap")
def test_xfail(): assert False
class TestGroup:
    def test_method(self): pass
"""


def test_merge_junit_writes_the_ktap_beside_the_xml(tmp_path):
    """A real pytest run's JUnit, renamed per combination as the lab's matrix does, then merged
    with a boot that failed: merge_junit writes nested.ktap beside nested.xml."""
    inner = tmp_path / "tests" / "nested"
    inner.mkdir(parents=True)
    (inner / "test_inner.py").write_text(BODY)
    junit = tmp_path / "inner.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "no:pykvm", "--rootdir", str(tmp_path), f"--junitxml={junit}",
                        "tests/nested/test_inner.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    suites = []
    for c in ("kvm_amd.npt=0", "kvm_amd.npt=1"):
        suites += mx.tag_suites(junit.read_bytes(), c, f"kvm_amd.nested=1 {c}", "")
    results = [q.BootResult("nested", 1, "", junit=mx.merge_suites(suites)),
               q.BootResult("nested-qemu", 4, "nested-qemu: timed out after 900 s")]
    root = q.merge_junit(results, tmp_path / "out" / "nested.xml", "nested")
    text = (tmp_path / "out" / "nested.ktap").read_text()
    assert text == kj.junit_to_ktap(root, "nested")
    assert text == kj.junit_to_ktap(ET.parse(tmp_path / "out" / "nested.xml").getroot(), "nested")
    lines = text.splitlines()
    assert lines[:2] == ["KTAP version 1", "1..3"]
    assert [line for line in lines if not line.startswith(" ")] == [
        "KTAP version 1", "1..3",
        "# nested[kvm_amd.npt=0]: pass:2 fail:1 xfail:1 xpass:0 skip:1 error:0",
        "not ok 1 nested[kvm_amd.npt=0]",
        "# nested[kvm_amd.npt=1]: pass:2 fail:1 xfail:1 xpass:0 skip:1 error:0",
        "not ok 2 nested[kvm_amd.npt=1]",
        "# nested-qemu: pass:0 fail:0 xfail:0 xpass:0 skip:0 error:1",
        "not ok 3 nested-qemu",
        "# Totals: pass:4 fail:2 xfail:2 xpass:0 skip:2 error:1"]
    p = "tests/nested/test_inner.py::"
    first = lines[2:lines.index("not ok 1 nested[kvm_amd.npt=0]") - 1]
    assert first[:2] == ["  KTAP version 1", "  1..5"]
    assert first[2:] == [                           # pytest's order, the JUnit file's
        f"  ok 1 {p}test_pass[kvm_amd.npt=0][nested]",
        "  # AssertionError: made to fail",
        f"  not ok 2 {p}test_fail[kvm_amd.npt=0][nested]",
        f"  ok 3 {p}test_skip[kvm_amd.npt=0][nested] # SKIP pykvm: host lacks a widget",
        f"  ok 4 {p}test_xfail[kvm_amd.npt=0][nested] # XFAIL known gap",
        f"  ok 5 {p}TestGroup::test_method[kvm_amd.npt=0][nested]"]
    assert "  not ok 1 lab.nested-qemu::boot[nested-qemu] # ERROR" in lines


def test_the_command_prints_an_older_runs_ktap(tmp_path, capsys):
    xml = tmp_path / "nested.xml"
    xml.write_text(MERGED)
    assert kj.main([str(xml)]) == 0
    assert capsys.readouterr().out == WANT
    assert kj.main([str(tmp_path / "none.xml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ktap_junit: cannot read JUnit XML from {tmp_path / 'none.xml'}: ")
    assert len(err.splitlines()) == 1
    assert kj.ktap_path(Path("/x/out/riscv.xml")) == Path("/x/out/riscv.ktap")
