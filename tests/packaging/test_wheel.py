"""Issue 9: pykvm as a new user gets it — an sdist, a wheel built from it, installed (with pytest)
into a fresh virtualenv outside the repository. Everything below runs there, from a directory
that is not the checkout: the built-in guests, the command line, a user's own guest beside the
user's test, the README's test example verbatim, and the plugin's cost.

One virtualenv serves the whole module: building the sdist and the wheel and installing it take
about 45 s here, the checks a few seconds each."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from pykvm.bench import importtime_lines
from plugin_modules import NEW_MODULES, OWN
from readme_example import write_example

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 "*.pyc", "*.so", "*.o", ".pytest_cache", "out")


def _run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 600)
    return subprocess.run(cmd, **kw)


def _copy_source(dst):
    """The checkout's files as git sees them (tracked, or new and not ignored)."""
    r = _run(["git", "-C", ROOT, "ls-files", "-z", "-co", "--exclude-standard"]) \
        if shutil.which("git") and os.path.isdir(os.path.join(ROOT, ".git")) else None
    if r is None or r.returncode != 0:
        shutil.copytree(ROOT, dst, ignore=_IGNORE)
        return
    for rel in filter(None, r.stdout.split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def _build_requires(pyproject):
    try:
        import tomllib                                   # Python >= 3.11
    except ImportError:
        import ast
        import re
        text = open(pyproject).read()
        return ast.literal_eval(re.search(r"^requires\s*=\s*(\[.*?\])", text, re.M | re.S).group(1))
    with open(pyproject, "rb") as f:
        return tomllib.load(f)["build-system"]["requires"]


class Venv:
    def __init__(self, root):
        self.root = root
        self.bin = os.path.join(root, "venv", "bin")
        self.home = os.path.join(root, "home")            # the user's directory: not the checkout
        self.cache = os.path.join(root, "cache")
        os.makedirs(self.home)

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_", "PYKVM_")) and k not in
               ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONDONTWRITEBYTECODE",
                "PYTHONPYCACHEPREFIX")}
        env["PATH"] = self.bin + os.pathsep + env.get("PATH", "")
        env["PYKVM_CACHE"] = self.cache
        env.update(extra)
        return env

    def run(self, *cmd, cwd=None, env=None, **kw):
        return _run(list(cmd), cwd=cwd or self.home, env=env or self.env(), **kw)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("wheel"))
    assert not root.startswith(ROOT + os.sep)
    src, dist = os.path.join(root, "src"), os.path.join(root, "dist")
    _copy_source(src)
    base = getattr(sys, "_base_executable", None) or sys.executable
    # the sdist, then a wheel built from it, by the standard front end (PEP 517); the project's
    # own build (setup.py) builds the guests and copies the guest runtime. The front end runs
    # environments), in a virtualenv of its own that holds the build requirements once
    tools = os.path.join(root, "buildtools")
    r = _run([base, "-m", "venv", tools])
    assert r.returncode == 0, r.stderr
    requires = _build_requires(os.path.join(src, "pyproject.toml"))
    r = _run([os.path.join(tools, "bin", "python"), "-m", "pip", "install", "-q", "build",
              *requires])
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run([os.path.join(tools, "bin", "python"), "-m", "build", "--no-isolation",
              "--outdir", dist, src], cwd=root)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert any(f.endswith(".tar.gz") for f in os.listdir(dist)), os.listdir(dist)
    wheel = [os.path.join(dist, f) for f in os.listdir(dist) if f.endswith(".whl")]
    assert len(wheel) == 1, os.listdir(dist)
    r = _run([base, "-m", "venv", os.path.join(root, "venv")])
    assert r.returncode == 0, r.stderr
    v = Venv(root)
    r = v.run(os.path.join(v.bin, "python"), "-m", "pip", "install", "-q", wheel[0], "pytest")
    assert r.returncode == 0, r.stdout + r.stderr
    v.wheel = wheel[0]
    return v


def test_wheel_carries_guests_and_runtime(venv):
    import zipfile
    names = zipfile.ZipFile(venv.wheel).namelist()
    assert "pykvm/guests_bin/x86/hello.elf" in names and "pykvm/guests_bin/x86/hello16.bin" in names
    for f in ("include/pykvm_guest.h", "x86/rt64/crt0.S", "x86/rt64/link.ld", "x86/rt32/link.ld",
              "x86/rt16/link.ld", "common/report.c", "riscv/rt/link.ld"):
        assert f"pykvm/guest_runtime/{f}" in names, f
    if shutil.which("riscv64-linux-gnu-gcc"):
        assert "pykvm/guests_bin/riscv/hello.elf" in names
    # every module of the package (boot/, devices/, platform/, fuzz/, testing/ ...) and both
    # compiled modules: the run loop and the benchmark's raw-C contender
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for dirpath, _, files in os.walk(os.path.join(root, "pykvm")):
        for f in files:
            if f.endswith(".py") and "__pycache__" not in dirpath:
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                assert rel in names, f"{rel} is not in the wheel"
    for mod in ("_native", "_rawbench"):
        assert any(n.startswith(f"pykvm/{mod}.") and n.endswith(".so") for n in names), mod
    r = venv.run("python", "-c", "import pykvm, os; print(os.path.dirname(pykvm.__file__))")
    assert r.stdout.strip().startswith(os.path.join(venv.root, "venv")), r.stdout + r.stderr


def test_pykvm_guests_lists_the_builtin_guests(venv):
    r = venv.run("pykvm", "guests")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    for g in ("hello", "hello16", "hello32", "msr", "cpuid", "assert_fail"):
        assert g in listed, r.stdout


@pytest.mark.requires_kvm
def test_pykvm_run_boots_the_default_guest(venv):
    r = venv.run("pykvm", "run", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello from pykvm guest!\nmode: long (64-bit)\n"), r.stdout
    r = venv.run("pykvm", "run", "hello16", timeout=120)
    assert r.returncode == 0 and "mode: real (16-bit)" in r.stdout, r.stdout + r.stderr
    r = venv.run("pykvm", "run", "--machine", "pc", "--pc-device", "edu", timeout=120)
    assert r.returncode == 0 and "Hello from pykvm guest!" in r.stdout, r.stdout + r.stderr


@pytest.mark.requires_kvm
def test_pykvm_bench_finds_its_guest(venv):
    r = venv.run("pykvm", "bench", "--quick", "--exits", "500", "--json", timeout=600)
    res = json.loads(r.stdout)          # it ran every measurement from the installed package
    # 0, or 10 exactly when a ratio stayed over its limit on this host (measured twice)
    assert r.returncode == (10 if res["over_limit"] else 0), r.stderr[-2000:]


USER_GUEST = r"""
    #include "pykvm_guest.h"

    void guest_main(void)
    {
        uint64_t n = pykvm_params[0];

        GUEST_PRINTF("counting to %d\n", (int)n);
        GUEST_SYNC(1, n * (n + 1) / 2);
        GUEST_ASSERT_EQ(n, 10);
    }
"""

USER_TEST = r"""
    def test_my_guest(guest_vm):
        m = guest_vm("guests/count.c")
        m.set_params(10)
        assert m.sync(stage=1) == (55,)
        m.done()
        assert b"counting to 10" in m.console
"""


@pytest.mark.requires_kvm
def test_users_own_guest_beside_the_users_test(venv):
    proj = os.path.join(venv.home, "myproject")
    os.makedirs(os.path.join(proj, "tests", "guests"))
    with open(os.path.join(proj, "tests", "guests", "count.c"), "w") as f:
        f.write(textwrap.dedent(USER_GUEST))
    with open(os.path.join(proj, "tests", "test_count.py"), "w") as f:
        f.write(textwrap.dedent(USER_TEST))
    r = venv.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=proj,
                 timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    # and on the command line
    r = venv.run("pykvm", "guest", "build", "tests/guests/count.c", cwd=proj)
    assert r.returncode == 0 and r.stdout.strip().startswith(venv.cache), r.stdout + r.stderr
    r = venv.run("pykvm", "run", r.stdout.strip(), cwd=proj, timeout=120)
    assert (r.returncode, r.stdout) == (4, "counting to 0\n")          # n = 0: its assert fails
    assert "guest assertion failed at count.c:10: n == 10" in r.stderr, r.stderr


@pytest.mark.requires_kvm
def test_readme_example_verbatim(venv):
    d = os.path.join(venv.home, "readme")
    os.makedirs(d)
    write_example(d)
    r = venv.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=d, timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr


def test_no_kvm_skips_and_the_plugin_costs_nothing(venv):
    d = os.path.join(venv.home, "nokvm")
    os.makedirs(d)
    with open(os.path.join(d, "test_hw.py"), "w") as f:
        f.write(textwrap.dedent("""
            import sys

            def test_vm(guest_vm):
                guest_vm("hello")

            def test_plain():
                assert "pykvm.abi" not in sys.modules
        """))
    env = venv.env(PYKVM_DEVICE=os.path.join(d, "no-such-kvm"))
    r = venv.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", cwd=d, env=env)
    assert r.returncode == 0 and "1 passed, 1 skipped" in r.stdout, r.stdout + r.stderr
    assert "pykvm: host lacks a usable" in r.stdout
    empty = os.path.join(venv.home, "empty")
    os.makedirs(empty)
    r = venv.run("python", "-X", "importtime", "-m", "pytest", "--co", "-q", cwd=empty)
    assert r.returncode == 5, r.stdout + r.stderr
    rows = importtime_lines(r.stderr)
    assert rows and not [n for _, _, n in rows if n.split(".")[0] in ("cffi", "_cffi_backend")]
    # what importing the installed plugin adds to pytest's modules (its import time is a
    # `pykvm bench` figure, plugin_import_vs_pytest; tests hold no wall-clock time to a limit)
    r = venv.run("python", "-c", NEW_MODULES, cwd=empty)
    assert r.returncode == 0 and r.stdout.strip() == repr(OWN), r.stdout + r.stderr


@pytest.mark.requires_kvm
def test_kselftest_install_runs_from_the_wheel(venv):
    """Issue 22 item 5: the kselftest install is made from the wheel's own copy of the tests and
    its runner runs them with the venv's pykvm (docs/kselftest.md)."""
    d = os.path.join(venv.home, "kselftest")
    r = venv.run("pykvm", "kselftest-install", d, "--tests", "test_sel_get_msr_index_features")
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(d, "pykvm_selftests", "test_zz_where.py"), "w") as f:
        f.write("import os, pykvm\n\ndef test_where():\n"
                f"    assert os.path.dirname(pykvm.__file__).startswith({venv.root!r})\n")
    with open(os.path.join(d, "kselftest-list.txt"), "a") as f:
        f.write("pykvm_selftests:test_zz_where\n")
    r = venv.run("sh", os.path.join(d, "run_kselftest.sh"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok 1 selftests: pykvm_selftests: test_sel_get_msr_index_features\n" in r.stdout
    assert "ok 2 selftests: pykvm_selftests: test_zz_where\n" in r.stdout, r.stdout


@pytest.mark.requires_kvm
def test_snapshot_restore_and_gdb_from_the_wheel(venv):
    """Issue 23 from the installed package: a snapshot written by one `pykvm run` is continued
    by `pykvm restore` in another process, and Debian's gdb breaks, reads and continues a
    built-in guest through `pykvm run --gdb` (both with the guests the wheel carries)."""
    snap = os.path.join(venv.home, "s.snap")
    full = venv.run("pykvm", "run", "snap_counter", "--no-input", "--timeout", "120",
                    timeout=300)
    assert full.returncode == 0, full.stderr
    a = venv.run("pykvm", "run", "snap_counter", "--no-input", "--timeout", "120",
                 "--snapshot-at", "console:cpu0 count=300 ", "--snapshot", snap, timeout=300)
    assert a.returncode == 0 and f"snapshot written to {snap}" in a.stderr, a.stderr
    b = venv.run("pykvm", "restore", snap, "--no-input", "--timeout", "120", timeout=300)
    assert b.returncode == 0, b.stderr
    lines = [ln for ln in (a.stdout + b.stdout).splitlines() if ln.startswith("snap cpu0 ")]
    assert lines == [ln for ln in full.stdout.splitlines() if ln.startswith("snap cpu0 ")]
    gdb = shutil.which("gdb")
    assert gdb, "gdb is not installed (Debian: apt install gdb)"
    r = venv.run("python", "-c", "from pykvm import guests; print(guests.path('gdb_target'))")
    elf = os.path.splitext(r.stdout.strip())[0] + ".elf"
    assert r.returncode == 0 and os.path.isfile(elf), r.stdout + r.stderr
    p = subprocess.Popen([os.path.join(venv.bin, "pykvm"), "run", "--gdb", "tcp:127.0.0.1:0",
                          "--gdb-wait", "--no-input", elf], cwd=venv.home, env=venv.env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    try:
        head = ""
        while "listening on" not in head:
            line = p.stderr.readline()
            assert line, f"pykvm did not start its gdb server: {head!r}"
            head += line
        port = head.split("listening on", 1)[1].split()[0].rsplit(":", 1)[1]
        g = subprocess.run([gdb, "-batch", "-nx", "-ex", f"target remote :{port}",
                            "-ex", "break gdb_tick", "-ex", "continue", "-ex", "print gdb_counter",
                            "-ex", "delete", "-ex", "continue", elf],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        out = g.stdout + g.stderr
        assert "Breakpoint 1, gdb_tick" in out and "$1 = 0" in out, out
        assert "exited normally" in out, out
        assert p.wait(timeout=120) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
