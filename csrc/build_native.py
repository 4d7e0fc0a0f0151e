"""cffi (API mode) builder for ``pykvm._native``: the ioctl wrapper and the C run loop.

Used by setup.py at install time (``cffi_modules``) and by the RISC-V lab, which emits the C with
``ffibuilder.emit_c_code()`` and cross-compiles it.
"""
import os
import re

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef_from_header() -> str:
    """The declarations cffi needs, taken from our own header (the #define lines become
    integer constants, the struct and prototypes are given as they are)."""
    text = open(os.path.join(HERE, "pykvm_native.h")).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#define PYKVM_") and len(s.split()) >= 3:
            lines.append(f"#define {s.split()[1]} ...")
        elif s.startswith("#") or not s:
            continue
        else:
            lines.append(line)
    return "\n".join(lines)


ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef_from_header())
ffibuilder.set_source(
    "pykvm._native",
    '#include "pykvm_native.h"',
    sources=[os.path.relpath(os.path.join(HERE, "runloop.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["rt", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
