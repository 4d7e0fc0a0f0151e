"""Issue 21 item 3: pytest as users expect. A failure the guest causes (a failed GUEST_ASSERT, a
guest exception, another report than the one expected, a bad report) is reported at the test's
own line, in pytest's traceback and in the KTAP "failed at" line, also under pytest-xdist; the
``requires_cpuid`` marker and :func:`pykvm.testing.require` follow the one skip rule."""
import re
import textwrap

import pytest

from pykvm.testing import LACKS, require

GUEST = r"""
#include "pykvm_guest.h"

void guest_main(void)
{
	switch (pykvm_params[0]) {
	case 0:                                   /* a failing assertion */
		GUEST_ASSERT_EQ(pykvm_params[1] + 1, 3);
		break;
	case 1:                                   /* an unexpected exception (#UD) */
		__asm__ volatile("ud2");
		break;
	case 2:                                   /* stage 2, where the test expects stage 1 */
		GUEST_SYNC(2, 7);
		break;
	case 3:                                   /* a report outside guest RAM: a GuestError */
		__asm__ volatile("outl %0, %1" : : "a"(0xfffff000u), "Nd"((uint16_t)PYKVM_REPORT_PORT));
		break;
	}
}
"""

# test name -> (the line's text, so its number can be found), one call into pykvm each
TESTS = """
    def test_guest_assert(guest_vm):
        m = guest_vm("g.c")
        m.set_params(0, 1)
        m.sync(stage=1)                 # assert-line

    def test_guest_exception(guest_vm):
        m = guest_vm("g.c")
        m.set_params(1)
        m.done()                        # exception-line

    def test_wrong_stage(guest_vm):
        m = guest_vm("g.c")
        m.set_params(2)
        m.sync(stage=1)                 # stage-line

    def test_done_expected(guest_vm):
        m = guest_vm("g.c")
        m.set_params(2)
        m.expect("done")                # expect-line

    def test_bad_report(guest_vm):
        m = guest_vm("g.c")
        m.set_params(3)
        m.step()                        # step-line
"""
TAGS = {"test_guest_assert": "assert-line", "test_guest_exception": "exception-line",
        "test_wrong_stage": "stage-line", "test_done_expected": "expect-line",
        "test_bad_report": "step-line"}

def _lines():
    """{test name: the 1-based line of its call into pykvm in test_g.py}."""
    text = textwrap.dedent(TESTS).lstrip("\n").splitlines()   # as pytester writes it
    return {name: next(i for i, line in enumerate(text, 1) if line.endswith("# " + tag))
            for name, tag in TAGS.items()}


def _run(pytester, *args):
    pytester.makefile(".c", g=GUEST)
    pytester.makepyfile(test_g=TESTS)
    ktap = pytester.path / "out.ktap"
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ktap", str(ktap), *args)
    res.assert_outcomes(failed=len(TAGS))
    return res.stdout.str(), ktap.read_text()


def _check(out, ktap):
    lines = _lines()
    for name, line in lines.items():
        # pytest's traceback ends at the call: "test_g.py:N: ExcType" (or, --tb=native,
        # Python's own 'File ".../test_g.py", line N, in test_x' right before the exception)
        assert re.search(rf"^test_g\.py:{line}: \w+|test_g\.py\", line {line}, in {name}\n"
                         rf"(    .*\n)*\S*(Error|Assertion): ", out, re.M), (name, line, out)
        assert f"# {name}: call failed at test_g.py:{line}\n" in ktap, (name, ktap)
    assert "/pykvm/" not in out and "machine.py" not in ktap, out      # no frame of pykvm's
    assert "guest assertion failed at g.c:" in out and "(left = 2 (0x2), right = 3" in out
    assert "guest synced stage 2, expected 1" in out
    assert "expected a guest done report from vCPU 0, got" in out
    assert "guest report at 0xfffff000 is outside guest RAM" in out


@pytest.mark.parametrize("tb", ["auto", "native"])
@pytest.mark.requires_kvm
@pytest.mark.requires_arch("x86_64")
def test_guest_failures_point_at_the_test_line(pytester, tb):
    out, ktap = _run(pytester, f"--tb={tb}")
    _check(out, ktap)


@pytest.mark.requires_kvm
@pytest.mark.requires_arch("x86_64")
def test_guest_failures_point_at_the_test_line_under_xdist(pytester):
    pytest.importorskip("xdist", reason=f"{LACKS} pytest-xdist (pip install '.[test]')")
    out, ktap = _run(pytester, "-n", "2")
    _check(out, ktap)
    assert "2 workers" in out or "created: 2/2 workers" in out, out
    # one KTAP document, by the controller, with every worker's results
    assert ktap.count("KTAP version 1") == 2 and ktap.count("not ok ") == len(TAGS) + 1, ktap


@pytest.mark.requires_kvm
@pytest.mark.requires_arch("x86_64")
def test_fulltrace_still_shows_pykvm_frames(pytester):
    out, _ = _run(pytester, "--fulltrace")
    assert "pykvm/machine.py" in out


def _present_and_absent():
    """A CPUID feature KVM offers here and one it does not (by name, or as a bit), read with
    pykvm's own helpers (not the plugin's path)."""
    from pykvm import Kvm
    from pykvm.arch.x86.regs import CPUID_FEATURES, cpuid_has, cpuid_lookup
    with Kvm() as k:
        entries = k.supported_cpuid()
    have = [n for n in CPUID_FEATURES if cpuid_has(entries, n)]
    lack = [n for n in CPUID_FEATURES if not cpuid_has(entries, n)]
    absent = repr(lack[0]) if lack else None
    if absent is None:                   # every named feature: find a clear bit of leaf 1 ECX
        ecx = cpuid_lookup(entries, 1).ecx
        bit = next(b for b in range(32) if not ecx >> b & 1)
        absent = f"leaf=1, reg='ecx', bit={bit}"
    return have[0], absent


@pytest.mark.requires_kvm
@pytest.mark.requires_arch("x86_64")
def test_requires_cpuid_marker(pytester):
    present, absent = _present_and_absent()
    pytester.makepyfile(test_cpuid=f"""
        import pytest

        @pytest.mark.requires_cpuid({present!r})
        def test_present():
            pass

        @pytest.mark.requires_cpuid(leaf=0x80000001, reg="edx", bit=29, name="lm")
        def test_long_mode_by_bit():
            pass

        @pytest.mark.requires_cpuid({absent})
        def test_absent():
            raise AssertionError("must not run")

        @pytest.mark.requires_cpuid("no-such-feature")
        def test_unknown_name():
            pass

        @pytest.mark.requires_cpuid(leaf=1, reg="exx", bit=3)
        def test_bad_register():
            pass
    """)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    res.assert_outcomes(passed=2, skipped=1, errors=2)
    out = res.stdout.str()
    assert re.search(r"SKIPPED .*pykvm: host lacks CPUID feature .*KVM_GET_SUPPORTED_CPUID", out)
    assert "requires_cpuid: unknown CPUID feature 'no-such-feature'" in out
    assert "requires_cpuid: needs leaf=<int>, reg= one of eax/ebx/ecx/edx" in out


@pytest.mark.requires_kvm
def test_skip_rule_for_fixture_users_and_require(pytester):
    """A test that uses a KVM fixture is a hardware test: its own pytest.skip fails closed;
    require() gives the one skip allowed."""
    pytester.makepyfile(test_rule="""
        import pytest
        from pykvm.testing import require

        def test_own_skip(kvm):
            pytest.skip("no rdtscp here")

        def test_require_false(kvm):
            require(False, "the widget")

        def test_require_true(kvm):
            require(kvm.check_extension("USER_MEMORY"), "KVM_CAP_USER_MEMORY")

        def test_plain_skip_without_kvm():
            pytest.skip("not a hardware test")
    """)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    res.assert_outcomes(passed=1, failed=1, skipped=2)
    out = res.stdout.str()
    assert "fail-closed: hardware test skipped although" in out and "no rdtscp here" in out
    assert "SKIPPED [1] test_rule.py:8: pykvm: host lacks the widget" in out


def test_require_needs_a_reason():
    with pytest.raises(ValueError, match="say what the host lacks"):
        require(True, " ")
    require(1, "anything")               # truthy: returns None
    with pytest.raises(pytest.skip.Exception, match="^pykvm: host lacks rdpid$"):
        require([], "rdpid")


@pytest.mark.requires_kvm
def test_a_guest_that_does_not_compile_fails_its_test_once(pytester):
    """guest_vm("bad.c") of a source that does not compile fails the test with the compiler's
    message once: not again as the context of pytest's own failure ("During handling of the
    above exception, another exception occurred")."""
    pytester.makefile(".c", bad="void guest_main(void) { this is not C; }\n")
    pytester.makepyfile(test_bad="def test_bad(guest_vm):\n    guest_vm('bad.c')\n")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert "During handling" not in out, out
    assert "building bad.c" in out and "error:" in out, out      # the compiler's message
