"""A sanitized build of the C helper (AddressSanitizer + UndefinedBehaviorSanitizer), out of tree.

The normal ``pykvm/_native.abi3.so`` is never touched. :func:`build` takes the cffi builder of
``csrc/build_native.py`` as it is now (same cdef, same sources, same flags and libraries), adds
the sanitizer flags and compiles it afresh into ``OUT/pykvm/_native*.so`` (OUT is
``build/asan/native`` by default; the module is still named ``pykvm._native``, so its init
function is ``PyInit__native``). :func:`runtime_env` gives the environment a process needs to
use it:

* ``LD_PRELOAD`` of gcc's libasan and libubsan (the ASan runtime must come first in a process
  whose interpreter was not built with it);
* ``PYTHONPATH`` starting with ``csrc/sanitize_site``, whose ``sitecustomize`` installs an import
  hook that resolves ``pykvm._native`` to the file named by ``PYKVM_SANITIZED_NATIVE`` (in every
  Python process started with this environment, subprocesses included; no pykvm module changes)
  and points libubsan's reports at ``log_path`` (gcc's libubsan ignores it next to libasan);
* ``ASAN_OPTIONS``/``UBSAN_OPTIONS``: stop at the first error and write every report to
  ``LOG_DIR/asan.<pid>`` / ``LOG_DIR/ubsan.<pid>``, so reports from processes whose output is
  captured (``pykvm run`` subprocesses, pytester) are still seen; leak detection is off (CPython
  does not free everything at exit by design);
* ``PYTHONMALLOC=malloc``, so buffers Python and cffi allocate get ASan redzones.

Run something against it by hand::

    .venv/bin/python csrc/build_sanitized.py -- .venv/bin/python -m pytest tests/hw
    .venv/bin/python csrc/build_sanitized.py --plain --out build/plain -- ...   # control run
"""
import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SITE_DIR = os.path.join(HERE, "sanitize_site")
DEFAULT_OUT = os.path.join(ROOT, "build", "asan", "native")
DEFAULT_REPORTS = os.path.join(ROOT, "build", "asan", "reports")
ENV_VAR = "PYKVM_SANITIZED_NATIVE"

SANITIZE_CFLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                   "-fno-sanitize-recover=undefined", "-O1", "-g"]
SANITIZE_LDFLAGS = ["-fsanitize=address,undefined"]
# A small quarantine (freed memory held back to catch use-after-free) keeps resident memory near
# what an unsanitized run uses, so the tests that bound RSS growth still mean something.
# handle_segv=0: a SIGSEGV stays a SIGSEGV (the fuzzer's crash detection is tested by a worker
# that kills itself with one); a real one still kills the process and fails its test.
ASAN_OPTIONS = ("detect_leaks=0:abort_on_error=0:halt_on_error=1:exitcode=86:quarantine_size_mb=8:"
                "handle_segv=0")
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"


def _normal_builder():
    """A fresh copy of csrc/build_native.py's ffibuilder (loaded from cwd = checkout root, since
    it names its sources relative to the current directory)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        spec = importlib.util.spec_from_file_location("_pykvm_build_native_for_sanitizers",
                                                      os.path.join(HERE, "build_native.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        ffi = mod.ffibuilder
        # cffi keeps set_source()'s arguments here (since cffi 1.0); we reuse them as they are
        module_name, source, ext, kwds = ffi._assigned_source
        kwds = dict(kwds)
        for key in ("sources", "include_dirs", "library_dirs"):
            if key in kwds:
                kwds[key] = [os.path.abspath(p) for p in kwds[key]]
    finally:
        os.chdir(cwd)
    return ffi, module_name, source, ext, kwds


def build(out_dir: str = DEFAULT_OUT, verbose: bool = False, sanitize: bool = True) -> str:
    """Compile the helper from the current csrc/ into a fresh ``out_dir`` with the sanitizer
    flags (``sanitize=False``: without them, a control build to tell sanitizer-made failures
    from plain ones); returns the path of the extension module."""
    ffi, module_name, source, ext, kwds = _normal_builder()
    if module_name != "pykvm._native":
        raise RuntimeError(f"csrc/build_native.py builds {module_name!r}, expected 'pykvm._native'")
    if sanitize:
        kwds["extra_compile_args"] = list(kwds.get("extra_compile_args", [])) + SANITIZE_CFLAGS
        kwds["extra_link_args"] = list(kwds.get("extra_link_args", [])) + SANITIZE_LDFLAGS
    ffi._assigned_source = (module_name, source, ext, kwds)
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    ffi.compile(tmpdir=out_dir, verbose=verbose)
    built = glob.glob(os.path.join(out_dir, "pykvm", "_native*.so"))
    if len(built) != 1:
        raise RuntimeError(f"the build produced {built!r} in {out_dir}")
    return built[0]


def runtime_libs() -> list:
    """gcc's ASan and UBSan runtimes (what LD_PRELOAD needs), checked to exist."""
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        p = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                           text=True, check=True).stdout.strip()
        if not os.path.isabs(p) or not os.path.exists(p):
            raise RuntimeError(f"gcc has no {name} (install libasan8/libubsan1 with gcc)")
        libs.append(os.path.realpath(p))
    return libs


def runtime_env(native_so, log_dir: str, base=None, sanitize: bool = True) -> dict:
    """The environment for a process (and its children) that must use ``native_so`` as
    ``pykvm._native`` under the sanitizers, reporting into ``log_dir``. ``native_so=None``: the
    sanitizer runtime without the import hook (the toolchain self-check); ``sanitize=False``:
    the import hook alone (for a control build)."""
    env = dict(os.environ if base is None else base)
    paths = [SITE_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if native_so:
        env[ENV_VAR] = os.path.abspath(native_so)
    if sanitize:
        os.makedirs(log_dir, exist_ok=True)
        preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
        env["LD_PRELOAD"] = ":".join(runtime_libs() + preload)
        env["ASAN_OPTIONS"] = f"{ASAN_OPTIONS}:log_path={os.path.join(log_dir, 'asan')}"
        env["UBSAN_OPTIONS"] = f"{UBSAN_OPTIONS}:log_path={os.path.join(log_dir, 'ubsan')}"
        env["PYTHONMALLOC"] = "malloc"
    return env


def reports(log_dir: str) -> dict:
    """Sanitizer report files written under ``log_dir``: {file name: text}."""
    found = {}
    for p in sorted(glob.glob(os.path.join(log_dir, "*san.*"))):
        with open(p, errors="replace") as f:
            found[os.path.basename(p)] = f.read()
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="build directory (emptied first)")
    ap.add_argument("--reports", default=DEFAULT_REPORTS, help="sanitizer report directory")
    ap.add_argument("--plain", action="store_true",
                    help="build and run without the sanitizers (a control run)")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("command", nargs="*", help="a command to run against the build")
    a = ap.parse_args(argv)
    so = build(a.out, a.verbose, sanitize=not a.plain)
    print(f"{'plain' if a.plain else 'sanitized'} pykvm._native: {so}")
    if not a.command:
        return 0
    logs = os.path.abspath(a.reports)
    for old in reports(logs):
        os.unlink(os.path.join(logs, old))
    rc = subprocess.run(a.command, env=runtime_env(so, logs, sanitize=not a.plain)).returncode
    for name, text in reports(logs).items():
        print(f"==== {name}\n{text}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
