"""Python start-up hook for runs against the sanitized C helper (csrc/build_sanitized.py).

It is on ``PYTHONPATH`` only in processes that ``build_sanitized.runtime_env`` sets up (the
sanitizer test's child pytest and every Python process started from it), and does two things:

* ``$PYKVM_SANITIZED_NATIVE`` set: a meta-path finder resolves ``pykvm._native`` to that file, so
  ``from ._native import lib`` in pykvm needs no change and the normal
  ``pykvm/_native.abi3.so`` is never loaded. A missing file is an ImportError, never a fallback.
* gcc's libubsan, running next to libasan ("plugin" mode), ignores ``UBSAN_OPTIONS=log_path``
  and writes its reports to stderr, where a test that captures a subprocess's output would hide
  them; we hand it the ``log_path`` ourselves (``__sanitizer_set_report_path`` of libubsan).
"""
import importlib.machinery
import importlib.util
import os
import sys

_NAME = "pykvm._native"
_PATH = os.environ.get("PYKVM_SANITIZED_NATIVE")


class _SanitizedNativeFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != _NAME:
            return None
        if not os.path.isfile(_PATH):
            raise ImportError(f"PYKVM_SANITIZED_NATIVE={_PATH}: no such file", name=name)
        loader = importlib.machinery.ExtensionFileLoader(name, _PATH)
        return importlib.util.spec_from_file_location(name, _PATH, loader=loader)

    @staticmethod
    def invalidate_caches():
        pass


def _ubsan_log_path():
    opts = dict(kv.split("=", 1) for kv in os.environ.get("UBSAN_OPTIONS", "").split(":") if "=" in kv)
    libs = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if "libubsan" in os.path.basename(p)]
    if opts.get("log_path") and libs:
        import ctypes
        ctypes.CDLL(libs[0]).__sanitizer_set_report_path(os.fsencode(opts["log_path"]))


if _PATH and not any(isinstance(f, _SanitizedNativeFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SanitizedNativeFinder())
_ubsan_log_path()
