"""--ktap writes KTAP version 1 that tells the truth (see pykvm/testing/ktap.py for the layout and
the conventions). Each test runs pytest on generated test files in a subprocess and reads the
file back with a KTAP v1 grammar checker written here, independent of the writer."""
import os
import re
import textwrap
import urllib.parse
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import List, Optional

import pytest

from pykvm.testing.ktap import escape_name

# --- a KTAP v1 grammar checker (Documentation/dev-tools/ktap.rst) -----------------------------

VERSION = "KTAP version 1"
PLAN = re.compile(r"1\.\.(0|[1-9][0-9]*)")
# <result> <number> [<description>][ # [<directive>] [<diagnostic data>]]; the description
# cannot contain '#'. Our writer only ever puts a directive after the '#'.
RESULT = re.compile(r"(ok|not ok) ([1-9][0-9]*)(?: ([^#]*[^#\s]))?"
                    r"(?: # (SKIP|XFAIL|XPASS|ERROR|TIMEOUT|TODO)(?: (\S.*))?)?")
DIAG = re.compile(r"#(?: .*)?")


@dataclass
class Result:
    ok: bool
    number: int
    name: str
    directive: Optional[str]
    data: Optional[str]
    diags: List[str]                         # the diagnostic lines directly before it
    sub: Optional["Block"] = None            # its subtest, when it has one


@dataclass
class Block:
    plan: int
    results: List[Result] = field(default_factory=list)
    trailing: List[str] = field(default_factory=list)   # diagnostics after the last result

    def __getitem__(self, name):
        found = [r for r in self.results if r.name == name]
        assert len(found) == 1, f"{name!r} is in {[r.name for r in self.results]}"
        return found[0]

    def names(self):
        return [r.name for r in self.results]


class KtapError(AssertionError):
    pass


def parse_ktap(text: str) -> Block:
    """Check ``text`` against KTAP v1 and return its tree. Strict: every line is a version
    line, a plan, a result or a diagnostic at the indentation of its level (no unknown
    lines, no blank lines); each level starts with a version line and a plan; results are
    numbered 1, 2, ... and as many as the plan says; a subtest (indented two more spaces)
    is followed by its parent's result line; a parent with a failing subtest fails."""
    if not text.endswith("\n"):
        raise KtapError("no newline at the end")
    lines = text[:-1].split("\n")
    block, i = _parse_block(lines, 0, 0)
    if i != len(lines):
        raise KtapError(f"line {i + 1}: stray line {lines[i]!r}")
    return block


def _parse_block(lines, i, depth):
    ind = "  " * depth
    if i >= len(lines) or lines[i] != ind + VERSION:
        raise KtapError(f"line {i + 1}: expected {ind + VERSION!r}")
    if i + 1 >= len(lines) or not lines[i + 1].startswith(ind) \
            or not PLAN.fullmatch(lines[i + 1][len(ind):]):
        raise KtapError(f"line {i + 2}: expected a plan at indentation {len(ind)}")
    block = Block(int(PLAN.fullmatch(lines[i + 1][len(ind):]).group(1)))
    i += 2
    diags, sub = [], None
    while i < len(lines):
        line = lines[i]
        level = len(line) - len(line.lstrip(" "))
        if level < len(ind):
            break                                    # the parent's line: this level ends
        if level > len(ind):
            if level != len(ind) + 2 or line.strip() != VERSION:
                raise KtapError(f"line {i + 1}: unexpected indentation: {line!r}")
            if sub is not None:
                raise KtapError(f"line {i + 1}: a second subtest before a result line")
            sub, i = _parse_block(lines, i, depth + 1)
            if i >= len(lines) or not lines[i].startswith(ind) or lines[i][len(ind):][:1] == " ":
                raise KtapError(f"subtest ending at line {i} has no parent result line")
            continue
        body = line[len(ind):]
        if DIAG.fullmatch(body):
            diags.append(body[2:])
        else:
            m = RESULT.fullmatch(body)
            if not m:
                raise KtapError(f"line {i + 1}: not a KTAP line: {line!r}")
            r = Result(m.group(1) == "ok", int(m.group(2)), m.group(3) or "", m.group(4),
                       m.group(5), diags, sub)
            if r.number != len(block.results) + 1:
                raise KtapError(f"line {i + 1}: result {r.number} after "
                                f"{len(block.results)} results")
            if r.directive in ("ERROR", "TIMEOUT") and r.ok:
                raise KtapError(f"line {i + 1}: {r.directive} must be 'not ok'")
            if sub is not None and r.ok and not all(s.ok for s in sub.results):
                raise KtapError(f"line {i + 1}: parent is ok but a subtest failed")
            block.results.append(r)
            diags, sub = [], None
        i += 1
    if sub is not None:
        raise KtapError("subtest without a parent result line")
    if len(block.results) != block.plan:
        raise KtapError(f"plan 1..{block.plan} at indentation {len(ind)} but "
                        f"{len(block.results)} results")
    block.trailing = diags
    return block, i


def leaves(block: Block):
    for r in block.results:
        yield from leaves(r.sub) if r.sub else [r]


# --- the checker checks -------------------------------------------------------------------------

GOOD = """\
KTAP version 1
1..3
  KTAP version 1
  1..2
    KTAP version 1
    1..1
    # deep: fine
    ok 1 deep
  ok 1 middle
  ok 2 other # SKIP not here
# outer: all good
ok 1 outer
# a diagnostic between results
not ok 2 flat # ERROR it broke: badly # really
ok 3 last # XFAIL
# Totals: whatever
"""


def test_checker_accepts_nested_ktap():
    top = parse_ktap(GOOD)
    assert top.plan == 3 and top.names() == ["outer", "flat", "last"]
    assert top["outer"].sub["middle"].sub["deep"].diags == ["deep: fine"]
    assert top["flat"].data == "it broke: badly # really" and not top["flat"].ok
    assert top["outer"].diags == ["outer: all good"] and top.trailing == ["Totals: whatever"]
    assert [r.name for r in leaves(top)] == ["deep", "other", "flat", "last"]


@pytest.mark.parametrize("bad", [
    GOOD.replace("1..3", "1..4"),                               # plan count
    GOOD.replace("  1..2", "  1..1"),                           # nested plan count
    GOOD.replace("ok 3 last", "ok 4 last"),                     # numbering
    GOOD.replace("  ok 1 middle\n", ""),                        # subtest without parent line
    GOOD.replace("    ok 1 deep", "   ok 1 deep"),              # odd indentation
    GOOD.replace("ok 1 outer", "ok 1 out#er"),                  # '#' in a name
    GOOD.replace("ok 1 outer", "ok 1 outer # SKIPPED"),         # not a directive
    GOOD.replace("not ok 2 flat", "ok 2 flat"),                 # ERROR but ok
    GOOD.replace("    ok 1 deep", "    not ok 1 deep"),         # failing subtest, ok parent
    GOOD.replace("# outer: all good", "outer: all good"),       # an unknown line
    GOOD.replace("1..3\n", "1..3\n\n"),                         # a blank line
    GOOD.replace("KTAP version 1\n1..3", "TAP version 13\n1..3"),
    GOOD.replace("  KTAP version 1\n  1..2\n", "  1..2\n"),     # subtest lacks version line
    GOOD.rstrip("\n"),
])
def test_checker_rejects(bad):
    with pytest.raises(KtapError):
        parse_ktap(bad)


# --- the writer -------------------------------------------------------------------------------

ALPHA = textwrap.dedent("""
    import pytest

    @pytest.fixture
    def broken_setup():
        raise RuntimeError("setup exploded")

    @pytest.fixture
    def broken_teardown():
        yield 1
        raise RuntimeError("teardown exploded")

    def test_pass():
        pass

    def test_fail():
        assert 1 + 1 == 3, "arithmetic # is\\nhard"

    def test_skip():
        pytest.skip("no widget here")

    @pytest.mark.skip(reason="marked skip")
    def test_skip_marker():
        pass

    @pytest.mark.xfail(reason="known bug 1", strict=False)
    def test_xfail():
        assert False

    @pytest.mark.xfail(reason="known bug 2", strict=True)
    def test_xfail_strict():
        assert False

    def test_xfail_imperative():
        pytest.xfail("flaky firmware")

    @pytest.mark.xfail(reason="fixed bug 3", strict=False)
    def test_xpass():
        pass

    @pytest.mark.xfail(reason="fixed bug 4", strict=True)
    def test_xpass_strict():
        pass

    def test_setup_error(broken_setup):
        pass

    def test_teardown_error(broken_teardown):
        pass

    def test_fail_and_teardown_error(broken_teardown):
        assert 0, "body failed too"

    @pytest.mark.parametrize("n", [1, 2, 3])
    def test_param(n):
        assert n != 2

    @pytest.mark.parametrize("s", [1, 2], ids=["hash#id", "50%"])
    def test_odd_ids(s):
        pass
""")

BETA = textwrap.dedent("""
    import pytest

    class TestGroup:
        def test_method(self):
            pass

    @pytest.mark.skipif(True, reason="not on this host")
    def test_skipif():
        pass

    @pytest.mark.parametrize("mode", ["real", "long"])
    def test_modes(mode):
        pass
""")

GAMMA = textwrap.dedent("""
    import pytest

    pytestmark = pytest.mark.skip(reason="whole module off")

    def test_a():
        pass

    def test_b():
        pass
""")


def _plugin_args():
    """Load the pykvm plugin in the child pytest unless its entry point already does."""
    registered = any(ep.value.startswith("pykvm.testing")
                     for ep in entry_points(group="pytest11"))
    if registered and not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return []
    return ["-p", "pykvm.testing.plugin"]


def run_ktap(pytester, *args):
    ktap = pytester.path / "out" / "results.ktap"
    ktap.parent.mkdir(exist_ok=True)          # --ktap makes no directory
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", *_plugin_args(),
                                        f"--ktap={ktap}", *args)
    text = ktap.read_text()
    return res, text, parse_ktap(text)


def test_ktap_tells_the_truth(pytester):
    pytester.makepyfile(test_alpha=ALPHA, test_beta=BETA, test_gamma=GAMMA)
    res, text, top = run_ktap(pytester)
    # pytest counts test_teardown_error as passed (its body) and as an error (its teardown)
    res.assert_outcomes(passed=9, failed=4, skipped=5, xfailed=3, xpassed=1, errors=3)

    # One subtest per module, in collection order; the top-level plan counts modules.
    assert top.plan == 3 and top.names() == ["test_alpha.py", "test_beta.py", "test_gamma.py"]
    alpha, beta, gamma = (r.sub for r in top.results)
    assert all(r.sub is not None for r in top.results)
    assert alpha.names() == [
        "test_pass", "test_fail", "test_skip", "test_skip_marker", "test_xfail",
        "test_xfail_strict", "test_xfail_imperative", "test_xpass", "test_xpass_strict",
        "test_setup_error", "test_teardown_error", "test_fail_and_teardown_error",
        "test_param[1]", "test_param[2]", "test_param[3]",
        "test_odd_ids[hash%23id]", "test_odd_ids[50%25]"]
    assert beta.names() == ["TestGroup::test_method", "test_skipif", "test_modes[real]",
                            "test_modes[long]"]

    def verdict(r):
        return ("ok" if r.ok else "not ok", r.directive, r.data)

    assert verdict(alpha["test_pass"]) == ("ok", None, None)
    assert verdict(alpha["test_fail"]) == ("not ok", None, None)
    # skip: ok # SKIP reason
    assert verdict(alpha["test_skip"]) == ("ok", "SKIP", "no widget here")
    assert verdict(alpha["test_skip_marker"]) == ("ok", "SKIP", "marked skip")
    assert verdict(beta["test_skipif"]) == ("ok", "SKIP", "not on this host")
    # xfail, strict or not: ok # XFAIL reason (kselftest's ksft_test_result_xfail)
    assert verdict(alpha["test_xfail"]) == ("ok", "XFAIL", "known bug 1")
    assert verdict(alpha["test_xfail_strict"]) == ("ok", "XFAIL", "known bug 2")
    assert verdict(alpha["test_xfail_imperative"]) == ("ok", "XFAIL", "flaky firmware")
    # xpass: ok # XPASS (kselftest's KSFT_XPASS); strict: pytest fails it, so not ok # XPASS
    assert verdict(alpha["test_xpass"]) == ("ok", "XPASS", "fixed bug 3")
    assert verdict(alpha["test_xpass_strict"]) == ("not ok", "XPASS", "fixed bug 4")
    # setup and teardown errors: not ok # ERROR phase: message
    assert verdict(alpha["test_setup_error"]) == (
        "not ok", "ERROR", "setup: RuntimeError: setup exploded")
    assert verdict(alpha["test_teardown_error"]) == (
        "not ok", "ERROR", "teardown: RuntimeError: teardown exploded")
    both = alpha["test_fail_and_teardown_error"]
    assert verdict(both) == ("not ok", "ERROR", "teardown: RuntimeError: teardown exploded")
    assert any("body failed too" in d for d in both.diags)
    assert any("teardown exploded" in d for d in both.diags)
    assert [alpha[f"test_param[{n}]"].ok for n in (1, 2, 3)] == [True, False, True]

    # Failure messages are diagnostic lines just before their result, one line each.
    fail = alpha["test_fail"]
    assert fail.diags[0].startswith("test_fail: call failed at test_alpha.py:")
    assert "AssertionError: arithmetic # is" in fail.diags
    assert any(d.strip() == "hard" for d in fail.diags)
    assert any("setup exploded" in d for d in alpha["test_setup_error"].diags)
    assert "Traceback" not in text and "\r" not in text

    # Parents: a failing subtest fails its module; all-skipped modules are skipped.
    assert verdict(top["test_alpha.py"])[0] == "not ok"
    assert verdict(top["test_beta.py"]) == ("ok", None, None)
    assert verdict(top["test_gamma.py"]) == ("ok", "SKIP", "all 2 tests skipped")
    assert [verdict(r) for r in gamma.results] == [("ok", "SKIP", "whole module off")] * 2

    # Names never carry '#'; their escapes undo to pytest's node ids.
    assert all("#" not in r.name for r in leaves(top))
    ids = {urllib.parse.unquote(f"{m.name}::{r.name}") for m in top.results
           for r in m.sub.results}
    assert {"test_alpha.py::test_odd_ids[hash#id]", "test_alpha.py::test_odd_ids[50%]"} <= ids

    # As many results as tests pytest reported; kselftest-style totals at the end.
    assert len(list(leaves(top))) == 17 + 4 + 2
    assert top.trailing[-2] == "Totals: pass:8 fail:2 xfail:3 xpass:2 skip:5 error:3"
    assert top.trailing[-1] == "pytest exit status 1 (TESTS_FAILED)"


def test_collection_error_is_not_ok_and_unrun_tests_are_counted(pytester):
    pytester.makepyfile(test_broken="import nonexistent_module_for_ktap\n",
                        test_good="def test_one():\n    pass\n\ndef test_two():\n    pass\n",
                        test_optional="import pytest\npytest.importorskip('no_such_dep_ktap')\n")
    res, text, top = run_ktap(pytester)
    assert res.ret == pytest.ExitCode.INTERRUPTED
    assert top.names() == ["test_broken.py", "test_good.py", "test_optional.py"]
    broken = top["test_broken.py"]
    assert not broken.ok and broken.directive == "ERROR" and broken.sub is None
    assert "No module named 'nonexistent_module_for_ktap'" in broken.data
    assert any("nonexistent_module_for_ktap" in d for d in broken.diags)
    opt = top["test_optional.py"]
    assert opt.ok and opt.directive == "SKIP" and "no_such_dep_ktap" in opt.data
    # pytest stops after the collection error: the good module's tests did not run.
    good = top["test_good.py"].sub
    assert [(r.ok, r.directive) for r in good.results] == [(True, "SKIP")] * 2
    assert all(r.data.startswith("not run") for r in good.results)
    assert top.trailing[-1] == "pytest exit status 2 (INTERRUPTED)"


def test_exitfirst_keeps_plan_equal_to_collected(pytester):
    pytester.makepyfile(test_x="def test_a():\n    assert 0\n\ndef test_b():\n    pass\n",
                        test_y="def test_c():\n    pass\n")
    res, text, top = run_ktap(pytester, "-x")
    res.assert_outcomes(failed=1)
    assert top.plan == 2
    x, y = top["test_x.py"], top["test_y.py"]
    assert not x.ok and [r.ok for r in x.sub.results] == [False, True]
    assert x.sub["test_b"].directive == "SKIP" and y.directive == "SKIP"


def test_fail_closed_skip_is_not_ok(pytester, monkeypatch, tmp_path):
    """Where /dev/kvm is usable the plugin turns a hardware test's unexplained skip into a
    failure; the KTAP file must say not ok, not SKIP. A read-write regular file stands in
    for /dev/kvm (the plugin only checks access), so this needs no KVM."""
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    monkeypatch.setenv("PYKVM_DEVICE", str(fake))
    pytester.makepyfile(test_hw=textwrap.dedent("""
        import pytest

        @pytest.mark.requires_kvm
        def test_skips_for_no_good_reason():
            pytest.skip("flaky, skipping")
    """))
    res, text, top = run_ktap(pytester)
    res.assert_outcomes(failed=1)
    r = top["test_hw.py"].sub["test_skips_for_no_good_reason"]
    assert not r.ok and r.directive is None
    assert any("fail-closed: hardware test skipped although" in d for d in r.diags)


def test_no_tests_is_an_empty_plan(pytester):
    pytester.makepyfile(test_empty="X = 1\n")
    res, text, top = run_ktap(pytester)
    assert text.startswith("KTAP version 1\n1..0\n") and top.results == []
    assert top.trailing[-1] == "pytest exit status 5 (NO_TESTS_COLLECTED)"


@pytest.mark.parametrize("raw,escaped", [
    ("test_a[x#y]", "test_a[x%23y]"),
    ("test_a[50%]", "test_a[50%25]"),
    ("test_a[line\nbreak\ttab]", "test_a[line%0Abreak%09tab]"),
    ("test_a[\x1b[0m]", "test_a[%1B[0m]"),
    ("plain::Class::test[1-2]", "plain::Class::test[1-2]"),
])
def test_escape_name(raw, escaped):
    assert escape_name(raw) == escaped
    assert urllib.parse.unquote(escaped) == raw
    assert RESULT.fullmatch(f"ok 1 {escaped}").group(3) == escaped
