"""cffi (API mode, out of line) builder for ``pykvm._rawbench``: the raw-C contender of
``pykvm bench`` (csrc/rawbench.c), bare ioctls on the kernel's own <linux/kvm.h>.

It is a module of its own so that ``pykvm._native``, the run loop every machine loads, carries
nothing that only the benchmark uses. Used by setup.py at install time (``cffi_modules``); the
declarations cffi needs are read from csrc/rawbench.h (the ``#define PYKVM_RAW_*`` lines become
integer constants of ``lib``).
"""
import os
import re

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))


def _cdef_from_header() -> str:
    """rawbench.h without comments and preprocessor lines, its ``#define PYKVM_`` constants as
    cffi's ``#define NAME ...`` (the C compiler gives their values)."""
    text = open(os.path.join(HERE, "rawbench.h")).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#define PYKVM_") and len(s.split()) >= 3:
            lines.append(f"#define {s.split()[1]} ...")
        elif s and not s.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef_from_header())
ffibuilder.set_source(
    "pykvm._rawbench",
    '#include "rawbench.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, "rawbench.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["rt"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
