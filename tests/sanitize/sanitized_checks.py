"""Checks run only inside the sanitizer child run (tests/sanitize/test_sanitizers.py passes this
file explicitly; its name keeps normal runs from collecting it): pykvm really uses the sanitized
C helper, with the sanitizer runtimes loaded, in the child pytest and in Python subprocesses."""
import os
import subprocess
import sys


def _mapped(maps: str):
    """Real paths of the pykvm._native builds mapped into a process, and whether the ASan and
    UBSan runtimes are."""
    files = {ln.split()[-1] for ln in maps.splitlines() if len(ln.split()) >= 6}
    native = {os.path.realpath(f) for f in files if os.path.basename(f).startswith("_native")}
    return native, any("libasan" in f for f in files), any("libubsan" in f for f in files)


def _expected():
    so = os.environ.get("PYKVM_SANITIZED_NATIVE", "")
    assert so and os.path.isfile(so), "PYKVM_SANITIZED_NATIVE names no file"
    return os.path.realpath(so)


def test_pykvm_uses_the_sanitized_helper():
    import pykvm
    import pykvm._native
    import pykvm.machine  # (the modules that use the helper)
    import pykvm.runloop
    want = _expected()
    assert os.path.realpath(pykvm._native.__file__) == want
    assert _mapped(open("/proc/self/maps").read()) == ({want}, True, True)


def test_python_subprocesses_use_it_too():
    # tests/hw and tests/x86 start `python -m pykvm ...` and pytester subprocesses: they inherit
    # the hook
    probe = ("import pykvm, pykvm.runloop, pykvm._native as n; "
             "print(n.__file__); print(open('/proc/self/maps').read())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    first, _, maps = out.partition("\n")
    want = _expected()
    assert os.path.realpath(first) == want
    assert _mapped(maps) == ({want}, True, True)
