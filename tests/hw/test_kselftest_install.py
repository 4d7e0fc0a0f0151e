"""Issue 22 item 5 (fleet-ready): ``pykvm kselftest-install DIR`` writes a kselftest install whose
``run_kselftest.sh`` runs pykvm's tests as the kernel's runner runs kselftests (TAP 13 lines,
timeouts, heartbeats, a summary naming the failures), from outside the checkout; and ``pykvm
caps --json`` lists the tags a scheduler matches hosts on (docs/kselftest.md).

The runs use this venv's Python with the checkout kept off ``sys.path`` (no PYTHONPATH, the
working directory outside it); tests/packaging/test_wheel.py runs an install made from a wheel.
"""
import json
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pykvm.testing.kselftest import COLLECTIONS, host_tags, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ("test_sel_get_msr_index_features", "test_sel_userspace_io")   # one builds its guest
COLL = "pykvm_selftests"


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYKVM_PYTHON") and not k.startswith("KSELFTEST_")}
    env.update(extra)
    return env


def _run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=kw.pop("timeout", 600), **kw)


def _add_test(d, name, body):
    """An installed test of our own: its file, its executable (the installer's, for FAST[0],
    with the name changed) and its line in kselftest-list.txt."""
    with open(os.path.join(d, COLL, f"{name}.py"), "w") as f:
        f.write(textwrap.dedent(body))
    with open(os.path.join(d, COLL, FAST[0])) as f:
        script = f.read().replace(FAST[0], name)
    with open(os.path.join(d, COLL, name), "w") as f:
        f.write(script)
    os.chmod(os.path.join(d, COLL, name), 0o755)
    with open(os.path.join(d, "kselftest-list.txt"), "a") as f:
        f.write(f"{COLL}:{name}\n")


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("kselftest"))
    assert not home.startswith(ROOT + os.sep)
    d = os.path.join(home, "inst")
    r = _run([sys.executable, "-m", "pykvm", "kselftest-install", d, "--tests", *FAST,
              "test_ioctl_table"], cwd=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"3 tests in {d}:"), r.stdout
    return home, d


def test_install_lists_its_tests_as_the_kernel_runner_does(install):
    home, d = install
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-l"], cwd=home)
    want = [f"{COLL}:{t}" for t in FAST] + ["pykvm_x86:test_ioctl_table"]
    assert (r.returncode, r.stdout.split()) == (0, want), r.stdout + r.stderr
    with open(os.path.join(d, "kselftest-list.txt")) as f:
        assert f.read().split() == want
    for entry in want:
        coll, test = entry.split(":")
        assert os.access(os.path.join(d, coll, test), os.X_OK), entry
        assert os.path.isfile(os.path.join(d, coll, test + ".py")), entry
        with open(os.path.join(d, coll, "settings")) as f:
            assert f"timeout={COLLECTIONS[coll].timeout}\n" in f.read()
    assert os.path.isfile(os.path.join(d, COLL, "sel_userspace_io.c"))    # its guest source
    assert not os.path.exists(os.path.join(d, COLL, "test_sel_cpuid.py"))  # not chosen


def test_run_prints_ktap_and_names_the_failures(install):
    home, d = install
    _add_test(d, "test_zz_where", f"""
        import os, sys
        def test_outside_the_checkout():
            assert {ROOT!r} not in [os.path.abspath(p or ".") for p in sys.path]
            assert os.path.realpath(__file__).startswith({os.path.realpath(d)!r})
    """)
    _add_test(d, "test_zz_skip", """
        import pytest
        @pytest.mark.requires_arch("s390x")
        def test_elsewhere():
            pass
    """)
    _add_test(d, "test_zz_fails", """
        def test_fails():
            assert 1 + 1 == 3, "made to fail"
    """)
    tests = [*FAST, "test_zz_where", "test_zz_skip", "test_zz_fails"]
    args = [a for t in tests for a in ("-t", f"{COLL}:{t}")]
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), *args], cwd=home)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    lines = out.splitlines()
    assert lines[:3] == ["TAP version 13", "1..5", "# timeout set to 120"], lines[:3]
    results = [line for line in lines if re.match(r"(not )?ok \d", line)]
    assert results == [f"ok {n} selftests: {COLL}: {t}" for n, t in
                       enumerate([*FAST, "test_zz_where"], 1)] + [
        f"ok 4 selftests: {COLL}: test_zz_skip # SKIP pykvm: host lacks architecture s390x "
        f"(this is {platform.machine()})",
        f"not ok 5 selftests: {COLL}: test_zz_fails # exit=1"], out
    for t in tests:
        assert f"# selftests: {COLL}: {t}" in lines, t
    # each test's own KTAP report follows its output, after "# "
    assert "#   ok 1 test_get_msr_index_features" in lines, out
    assert "#   # AssertionError: made to fail" in lines, out
    assert lines[-2:] == ["# Totals: pass:3 fail:1 xfail:0 xpass:0 skip:1 error:0",
                          f"# FAILED: {COLL}:test_zz_fails (exit=1)"], out
    # a test's own executable: kselftest's statuses (4: KSFT_SKIP), the reasons last
    r = _run([os.path.join(d, COLL, "test_zz_skip")], cwd=home)
    assert r.returncode == 4 and r.stdout.splitlines()[-1] == \
        f"# SKIP pykvm: host lacks architecture s390x (this is {platform.machine()})", r.stdout
    # -f: a failure does not fail the run
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-f", "-t", f"{COLL}:test_zz_fails"],
             cwd=home)
    assert r.returncode == 0 and f"not ok 1 selftests: {COLL}: test_zz_fails # exit=1\n" in \
        r.stdout, r.stdout + r.stderr
    # -c picks a collection, -S drops a test from it, -d runs nothing
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-c", COLL, "-S", f"{COLL}:{FAST[1]}",
              "-d"], cwd=home)
    assert (r.returncode, r.stdout) == (0, f"# dry run: {COLL}: {FAST[0]} test_zz_where "
                                           "test_zz_skip test_zz_fails\n"), r.stdout + r.stderr


def test_a_test_past_its_timeout_is_killed_with_a_heartbeat(install):
    home, d = install
    _add_test(d, "test_zz_slow", """
        import time
        def test_slow():
            time.sleep(600)
    """)
    coll_dir = os.path.realpath(os.path.join(d, COLL))
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-t", f"{COLL}:test_zz_slow",
              "-o", "2", "--heartbeat", "1", "-s"], cwd=home)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    beats = [line for line in lines if line.startswith("# heartbeat:")]
    # -s: the results and heartbeats here, the test's output in output.log
    assert lines == ["TAP version 13", "1..1", f"# selftests: {COLL}: test_zz_slow", *beats,
                     "#", f"not ok 1 selftests: {COLL}: test_zz_slow # TIMEOUT 2 seconds",
                     "# Totals: pass:0 fail:1 xfail:0 xpass:0 skip:0 error:0",
                     f"# FAILED: {COLL}:test_zz_slow (TIMEOUT 2 seconds)"], r.stdout
    assert beats and all(re.fullmatch(rf"# heartbeat: {COLL}:test_zz_slow running for \d+ s", b)
                         for b in beats), beats
    with open(os.path.join(d, "output.log")) as f:
        assert f.read().startswith("# overriding timeout to 2\n")
    left = []                                                  # its process group is gone
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == coll_dir:
                left.append(pid)
        except OSError:
            pass
    assert left == []


def test_bad_selections_are_one_line(install, tmp_path):
    home, d = install
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-t", f"{COLL}:nope"], cwd=home)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"No such test '{COLL}:nope'\n")
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-c", "nope"], cwd=home)
    assert (r.returncode, r.stderr) == (1, "No such collection 'nope'\n")
    (tmp_path / "afile").write_text("")              # a --per-test-log that cannot be a directory
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-p", str(tmp_path / "afile" / "logs"),
              "-c", COLL], cwd=home)
    assert (r.returncode, r.stdout) == (1, "") and r.stderr.startswith("--per-test-log "), r
    assert len(r.stderr.splitlines()) == 1, r.stderr
    for args, why in (([str(tmp_path / "a"), "--collection", "kvm"], "no collection 'kvm'"),
                      ([str(tmp_path / "b"), "--tests", "nope*"], "no test matches 'nope*'")):
        r = _run([sys.executable, "-m", "pykvm", "kselftest-install", *args], cwd=home)
        assert r.returncode == 2 and r.stderr.startswith(f"pykvm: {why}"), r.stderr
        assert len(r.stderr.splitlines()) == 1 and not os.path.exists(args[0])
    again = str(tmp_path / "again")                  # an earlier install is replaced
    for pattern in ("pykvm_x86:test_ioctl_table", "test_sel_xss_msr"):
        r = _run([sys.executable, "-m", "pykvm", "kselftest-install", again, "--tests",
                  pattern], cwd=home)
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(again)) == ["kselftest-list.txt", COLL, "run_kselftest.sh"]
    with open(os.path.join(again, "kselftest-list.txt")) as f:
        assert f.read() == f"{COLL}:test_sel_xss_msr\n"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = _run([sys.executable, "-m", "pykvm", "kselftest-install", str(tmp_path / "mine")],
             cwd=home)
    assert r.returncode == 2 and "is not empty" in r.stderr, r.stderr
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_setup_py_packs_every_collections_sources():
    with open(os.path.join(ROOT, "setup.py")) as f:
        parts = re.search(r"^KSELFTEST_PARTS = \((.*?)\)", f.read(), re.M | re.S).group(1)
    assert sorted(re.findall(r'"([^"]+)"', parts)) == \
        sorted({c.source for c in COLLECTIONS.values()})


def test_a_python_without_pytest_is_one_line_before_any_tap(install):
    """The system Python has pykvm (through PYTHONPATH) but no pytest: the runner and a test's
    own executable each say so in one line instead of failing every test with a traceback."""
    home, d = install
    py = "/usr/bin/python3"
    if not os.path.exists(py) or subprocess.run([py, "-c", "import pytest"],
                                                capture_output=True).returncode == 0:
        pytest.skip(f"host lacks a Python without pytest at {py}")
    env = _env(PYKVM_PYTHON=py, PYTHONPATH=ROOT)
    r = subprocess.run(["sh", os.path.join(d, "run_kselftest.sh"), "-c", COLL], cwd=home,
                       env=env, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (1, ""), r
    assert r.stderr == (f"run_kselftest.sh: {py} has no pytest: install it there (python -m pip "
                        "install pytest) or set PYKVM_PYTHON to a Python that has pykvm and "
                        "pytest\n"), r.stderr
    r = subprocess.run([os.path.join(d, COLL, FAST[0])], cwd=home, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.startswith(f"{FAST[0]}.py: {py} has no pytest") and \
        len(r.stderr.splitlines()) == 1, r.stderr


def test_caps_json_lists_the_tags(kvm):
    r = _run([sys.executable, "-m", "pykvm", "caps", "--json"], cwd="/")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert list(info)[:5] == ["path", "api_version", "arch", "vcpu_mmap_size", "caps"]
    tags = info["tags"]
    assert tags == sorted(set(tags)) and all(isinstance(t, str) and ":" in t for t in tags)
    assert f"arch:{platform.machine()}" in tags
    assert f"kvm-api:{kvm.api_version}" in tags
    assert f"kernel:{os.uname().release}" in tags
    for c in ("SYNC_REGS", "NESTED_STATE", "DIRTY_LOG_RING"):
        assert (f"cap:{c}" in tags) == bool(kvm.check_extension(c)), c
    nested = info.get("nested")
    if nested is not None:                                 # x86: from the nested report
        assert f"kvm-backend:{nested['backend']}" in tags
        assert f"nested:{nested['backend'] if nested['available'] else 'none'}" in tags
        if nested["module"]:
            assert f"kvm-module:{nested['module']}" in tags
    r = _run([sys.executable, "-m", "pykvm", "caps"], cwd="/")
    assert f"tags: {' '.join(tags)}\n" in r.stdout


def test_tags_of_an_svm_host_with_nested():
    info = {"arch": "x86_64", "api_version": 12, "caps": {"NESTED_STATE": 8192, "SYNC_REGS": 7,
                                                          "GUEST_MEMFD": 0},
            "nested": {"available": True, "backend": "svm", "vendor": "AuthenticAMD",
                       "module": "kvm_amd", "switches": {"nested": True, "npt": False,
                                                         "avic": None, "vls": 1}}}
    assert host_tags(info, release="6.12.9") == [
        "arch:x86_64", "cap:NESTED_STATE", "cap:SYNC_REGS", "kernel:6.12.9", "kvm-api:12",
        "kvm-backend:svm", "kvm-module:kvm_amd", "nested:svm", "param:kvm_amd.nested=1",
        "param:kvm_amd.npt=0", "param:kvm_amd.vls=1", "vendor:amd"]


def test_verdicts_from_pytest_status_and_ktap():
    skip = ("  ok 1 a # SKIP pykvm: host lacks X\n  ok 2 b # SKIP pykvm: host lacks X\n"
            "ok 1 t.py # SKIP all 2 tests skipped\n"
            "# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:2 error:0\n")
    assert verdict(0, skip) == ("skip", "SKIP pykvm: host lacks X")
    xfail = "  ok 1 a # XFAIL known\n# Totals: pass:0 fail:0 xfail:1 xpass:0 skip:0 error:0\n"
    assert verdict(0, xfail) == ("xfail", "XFAIL known")
    assert verdict(0, xfail.replace("pass:0", "pass:1", 1)) == ("pass", "")
    assert verdict(0, "") == ("pass", "")
    assert verdict(1, skip) == ("fail", "exit=1")
    assert verdict(5, "") == ("fail", "exit=5")       # pytest: no tests collected


def _par_test(d, name, marks, waits_for):
    """An installed test that writes ``<marks>/<name>.start`` (its start time), waits (at most
    60 s) until the file ``waits_for`` exists, then writes ``<marks>/<name>.end``."""
    _add_test(d, name, f"""
        import os, time
        def test_meets_the_other():
            with open(os.path.join({str(marks)!r}, "{name}.start"), "w") as f:
                f.write(repr(time.time()))
            for _ in range(600):
                if os.path.exists({str(waits_for)!r}):
                    break
                time.sleep(0.1)
            with open(os.path.join({str(marks)!r}, "{name}.end"), "w") as f:
                f.write(repr(time.time()))
    """)


def _times(marks, name):
    return [float((marks / f"{name}.{e}").read_text()) for e in ("start", "end")]


def test_jobs_run_tests_at_once_and_print_each_whole_in_order(install, tmp_path):
    """-j 2: the first test waits until the second has ended, so the second ends first; the
    output still gives each test's lines together, in list order, numbered 1..N."""
    home, d = install
    marks = tmp_path / "marks"
    marks.mkdir()
    _par_test(d, "test_zz_par_first", marks, marks / "test_zz_par_second.end")
    _par_test(d, "test_zz_par_second", marks, marks / "test_zz_par_first.start")
    _add_test(d, "test_zz_par_fails", """
        def test_fails():
            assert 1 + 1 == 3, "made to fail"
    """)
    tests = ["test_zz_par_first", "test_zz_par_second", "test_zz_par_fails"]
    args = [a for t in tests for a in ("-t", f"{COLL}:{t}")]
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-j", "2", "-b", "1", *args], cwd=home)
    assert r.returncode == 1, r.stdout + r.stderr
    # both ran at once: each started before the other ended
    (s1, e1), (s2, e2) = _times(marks, tests[0]), _times(marks, tests[1])
    assert s1 < e2 and s2 < e1 and e2 <= e1, (s1, e1, s2, e2)
    lines = [line for line in r.stdout.splitlines() if not line.startswith("# heartbeat: ")]
    assert lines[:2] == ["TAP version 13", "1..3"], r.stdout
    results = [line for line in lines if re.match(r"(not )?ok \d", line)]
    assert results == [f"ok 1 selftests: {COLL}: {tests[0]}", f"ok 2 selftests: {COLL}: {tests[1]}",
                       f"not ok 3 selftests: {COLL}: {tests[2]} # exit=1"], r.stdout
    # each test's lines in one piece: its header, its output, its result, then the next test's
    starts = [lines.index(f"# selftests: {COLL}: {t}") for t in tests]
    ends = [lines.index(line) for line in results]
    assert starts[0] < ends[0] < starts[1] < ends[1] < starts[2] < ends[2], r.stdout
    for i, t in enumerate(tests):
        own = lines[starts[i]:ends[i]]
        assert not any(o in line for line in own for o in tests if o != t), own
    for i in (0, 1):                                  # with its own KTAP report
        assert "#   ok 1 test_meets_the_other" in lines[starts[i]:ends[i]], r.stdout
    assert lines[ends[2] + 1:] == ["# Totals: pass:2 fail:1 xfail:0 xpass:0 skip:0 error:0",
                                   f"# FAILED: {COLL}:{tests[2]} (exit=1)"], r.stdout
    r = _run(["sh", os.path.join(d, "run_kselftest.sh"), "-j", "many"], cwd=home)
    assert (r.returncode, r.stdout) == (1, "") and r.stderr == \
        "run_kselftest.sh: --jobs must be a whole number >= 0 or 'auto', not 'many'\n", r.stderr


def _default_sigint() -> None:
    """In the runner's child before exec: SIGINT as a terminal's Ctrl-C finds it. A suite run as
    a background job inherits SIGINT ignored, and Python then leaves it ignored (as shells do for
    background jobs), so the runner would rightly not see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_every_running_test(install, tmp_path, sig, status):
    home, d = install
    marks, tmp = tmp_path / "marks", tmp_path / "tmp"
    marks.mkdir()
    tmp.mkdir()
    tests = [f"test_zz_stop_{n}" for n in ("a", "b")]
    for t in tests:                                   # each waits for a file that never comes
        _par_test(d, t, marks, marks / "never")
    proc = subprocess.Popen(
        ["sh", os.path.join(d, "run_kselftest.sh"), "-j", "auto", "-b", "0", "-o", "0",
         *[a for t in tests for a in ("-t", f"{COLL}:{t}")]],
        cwd=home, env=_env(TMPDIR=str(tmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=_default_sigint)
    try:
        for _ in range(600):                          # both started: they run at once
            if all((marks / f"{t}.start").exists() for t in tests) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert all((marks / f"{t}.start").exists() for t in tests)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, out + err
    assert err == f"run_kselftest.sh: interrupted by {signal.Signals(sig).name}\n", err
    assert out.splitlines() == ["TAP version 13", "1..2"], out
    assert not any((marks / f"{t}.end").exists() for t in tests)
    coll_dir = os.path.realpath(os.path.join(d, COLL))
    left = []                                                  # their process groups are gone
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.realpath(os.readlink(f"/proc/{pid}/cwd")) == coll_dir:
                left.append(pid)
        except OSError:
            pass
    assert left == []
    assert [f for f in os.listdir(tmp) if not f.startswith("pytest-of-")] == []
