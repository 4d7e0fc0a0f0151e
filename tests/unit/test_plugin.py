"""Issue 9: the pytest plugin costs nothing where no test uses it, and never errors on a host that
cannot run KVM tests (no usable /dev/kvm, or an architecture pykvm does not support)."""
import os
import re
import subprocess
import sys
import textwrap


from pykvm.bench import importtime_lines, pykvm_cost_us
from plugin_modules import NEW_MODULES, OWN

HEAVY = ("cffi", "_cffi_backend", "pycparser", "pykvm.abi", "pykvm._native", "pykvm.kvm",
         "pykvm.machine", "elftools")


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pyc")     # compiled once, as an install would be
    return env


def test_importtime_parser():
    rows = importtime_lines(textwrap.dedent("""\
        import time:       100 |        100 |     cffi.model
        import time:       200 |        300 |   pykvm.abi
        import time:        50 |        350 | pykvm.testing.plugin
        import time:        10 |         10 | pykvm.status
    """))
    assert pykvm_cost_us(rows) == 360


def test_plugin_loads_only_its_own_small_modules(tmp_path):
    """What the plugin costs a pytest run that uses none of it, as facts that hold on any host:
    the modules it brings in. Its import time is a figure of `pykvm bench`
    (``plugin_import_vs_pytest``, against pytest's own import in the same run): a test never
    holds wall-clock time to a limit."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = _env(tmp_path)
    cmd = [sys.executable, "-X", "importtime", "-m", "pytest", "--co", "-q"]
    r = subprocess.run(cmd, cwd=empty, env=env, capture_output=True, text=True)
    assert r.returncode == 5, r.stdout + r.stderr                       # 5: no tests collected
    rows = importtime_lines(r.stderr)
    assert rows, r.stderr[-2000:]
    heavy = [n for _, _, n in rows if n.split(".")[0] in HEAVY or n in HEAVY]
    assert not heavy, f"a pytest run without pykvm tests imported {heavy}"
    # everything the plugin's import adds to what pytest has loaded: pykvm's three small modules
    # and the plugin (os, sys and time are pytest's already), nothing from the core
    r = subprocess.run([sys.executable, "-c", NEW_MODULES], cwd=empty, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr(OWN)
    # and what a whole collection run leaves loaded
    r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, pytest
        pytest.main(["--co", "-q", "-p", "no:cacheprovider"])
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("pykvm", "cffi", "_cffi_backend")))
    """)], cwd=empty, env=env, capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == repr(OWN)


TESTS = """
    import sys
    import pytest

    def test_plain():
        pass

    @pytest.mark.requires_kvm
    def test_marked():
        pass

    @pytest.mark.requires_cap("IRQCHIP")
    def test_cap():
        pass

    @pytest.mark.requires_arch("x86_64")
    def test_arch():
        pass

    def test_kvm_fixture(kvm):
        pass

    def test_guest(guest_vm):
        guest_vm("hello")

    def test_core_was_never_loaded():
        assert "pykvm.abi" not in sys.modules and "cffi" not in sys.modules
"""


def test_host_without_kvm_skips_pykvm_tests(pytester, monkeypatch):
    monkeypatch.setenv("PYKVM_DEVICE", str(pytester.path / "no-such-kvm"))
    pytester.makepyfile(test_hw=TESTS)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    res.assert_outcomes(passed=2, skipped=5)
    out = res.stdout.str()
    assert re.search(r"SKIPPED \[5\] .*pykvm: host lacks a usable .*no-such-kvm", out), out


def test_unsupported_architecture_skips_not_errors(pytester):
    # /dev/kvm may well exist here: the fail-closed rule must accept "host lacks" skips
    pytester.makeconftest("""
        import pykvm.testing.plugin as plugin
        plugin.host_arch = lambda: "s390x"
    """)
    pytester.makepyfile(test_hw=TESTS)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    res.assert_outcomes(passed=2, skipped=5)
    out = res.stdout.str()
    assert "host lacks architecture x86_64 (this is s390x)" in out
    assert re.search(r"SKIPPED \[4\] .*host lacks an architecture pykvm supports \(x86_64 or "
                     r"riscv64; this is s390x\)", out), out


def test_guest_image_needs_no_kvm(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("PYKVM_DEVICE", str(pytester.path / "no-such-kvm"))
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path / "cache"))
    pytester.makefile(".c", g='#include "pykvm_guest.h"\nvoid guest_main(void) {}\n')
    pytester.makepyfile(test_img="""
        def test_img(guest_image):
            assert guest_image("g.c").endswith("g.elf")
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
