"""cffi (API mode, out of line) builder for ``pykvm._native``: the KVM ABI, the ioctl wrapper and
the C run loop (the raw-C benchmark contender is pykvm._rawbench, csrc/build_rawbench.py).

The module carries the *compiled* KVM ABI: our own struct declarations (``pykvm/abi/common.py``
and ``pykvm/abi/<arch>.py``, the same text ``pykvm.abi`` describes) are given to cffi's cdef *and*
compiled as C into the module, so ``pykvm._native.ffi`` knows every struct's layout without
parsing any C when it is imported. ``pykvm.abi`` uses that ``ffi`` when the text compiled in
(``pykvm_abi_text()``) is the text of the Python sources, and parses the sources itself only when
the build is stale (``pykvm.abi.COMPILED`` says which; ``tests/unit/test_abi_proof.py`` fails on
a stale build).

It carries the ioctl request numbers too (``pykvm_ioctl_text()``): every row of
``pykvm/abi/ioctl_rows.py`` that exists on the variant's architecture, its number computed here
with ``ioctl_opt.IOC`` (so ioctl-opt is a build requirement) over the argument's size as this
builder's cffi declarations give it (``ffi.sizeof``: our declarations have no ``...``, so cffi
lays them out itself, on any host, without running code built for the target). Each of those
sizes is also compiled as a ``_Static_assert`` next to the declarations, so the C compiler of the
target (the labs cross-compile for riscv64) refuses a build whose layout differs from the one
the numbers were computed with. ``pykvm.abi.ioctls`` takes the numbers from there when the build
is current and imports ioctl-opt (and ctypes) only otherwise; ``tests/unit/test_ioctl_opt.py``
recomputes every one with ioctl-opt.

Used by setup.py at install time (``cffi_modules``), by ``csrc/build_sanitized.py`` (the same
builder with sanitizer flags) and by the labs, which emit the C with ``ffibuilder.emit_c_code()``
and cross-compile it: the emitted file holds one variant per architecture (x86_64, riscv64) and
the C compiler's target picks one, so the host that emits it need not be the target.
"""
import importlib.util
import os
import platform
import re
import tempfile

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
ABI_DIR = os.path.join(os.path.dirname(HERE), "pykvm", "abi")
ARCHES = {"x86_64": "defined(__x86_64__)",
          "riscv64": "defined(__riscv) && __riscv_xlen == 64"}


def _abi_module(name: str):
    """pykvm/abi/<name>.py loaded on its own (those files import nothing), without importing the
    pykvm package (whose ABI needs the module being built)."""
    spec = importlib.util.spec_from_file_location(f"_pykvm_build_abi_{name}",
                                                  os.path.join(ABI_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def abi_text(arch: str) -> str:
    """The ABI declarations for ``arch``, in the order pykvm.abi.abi_text() joins them."""
    common, a = _abi_module("common"), _abi_module(arch)
    return common.CDEF + a.CDEF + common.KVM_RUN_CDEF


def ioctl_numbers(ffi: cffi.FFI, arch: str) -> list:
    """[(row key, request number, argument type or None, its size in bytes)] for every ioctl row
    that exists on ``arch``: the number is ``ioctl_opt.IOC(dir, KVMIO, nr, ffi.sizeof(arg))``
    over ``ffi``, a builder that has been given ``arch``'s ABI declarations. Raises ValueError
    for an argument too large for the number's size field."""
    import ioctl_opt
    rows, common = _abi_module("ioctl_rows"), _abi_module("common")
    dirs = {rows.NONE: ioctl_opt.IOC_NONE, rows.W: ioctl_opt.IOC_WRITE,
            rows.R: ioctl_opt.IOC_READ, rows.WR: ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}
    size_max = ioctl_opt.IOCSIZE_MASK >> ioctl_opt.IOCSIZE_SHIFT
    out = []
    for name, _fd, direction, nr, arg, _cap, arches in rows.ROWS:
        if arch not in arches:
            continue
        size = ffi.sizeof(arg) if arg else 0
        if size > size_max:
            raise ValueError(f"{name}: {arg} is {size} bytes, more than an ioctl number holds")
        number = int(ioctl_opt.IOC(dirs[direction], common.KVMIO, nr, size))
        out.append((rows.ioctl_key(name, direction, nr, common.KVMIO, arg), number, arg, size))
    return out


def _cdef_from_header() -> str:
    """The declarations cffi needs, taken from our own header (the #define lines become
    integer constants, the struct and prototypes are given as they are, except pykvm_py_call():
    the loop's call into Python, made with the CPython C API in csrc/pyexit.c)."""
    text = open(os.path.join(HERE, "pykvm_native.h")).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#define PYKVM_") and len(s.split()) >= 3:
            lines.append(f"#define {s.split()[1]} ...")
        elif s.startswith("#") or not s or s.startswith("int pykvm_py_"):
            continue
        else:
            lines.append(line)
    return "\n".join(lines)


def _c_string(text: str) -> str:
    """``text`` as a C string literal (one source line per line of text)."""
    lines = text.split("\n")
    return "\n".join('"' + line.replace("\\", "\\\\").replace('"', '\\"')
                     + ("\\n" if i < len(lines) - 1 else "") + '"'
                     for i, line in enumerate(lines))


def _source(arch: str, numbers: list) -> str:
    """The C that cffi puts in front of its generated code: our header, then our own ABI
    declarations compiled as they are (cffi takes every layout from the C compiler), and the text
    itself so that pykvm.abi can tell a stale build; then the ioctl table (``numbers``, from
    :func:`ioctl_numbers`) as text, one "<key> <number in hex>" line a row, after the compiler
    has checked each argument size the numbers encode."""
    text = abi_text(arch)
    asserts = "".join(f'_Static_assert(sizeof({arg}) == {size}, "pykvm ioctl table: '
                      f'sizeof({arg}) is not the {size} bytes its request numbers encode");\n'
                      for arg, size in sorted({(a, n) for _k, _v, a, n in numbers if a}))
    table = "\n".join(f"{key} {number:#x}" for key, number, _a, _n in numbers)
    return ("#include <stdint.h>\n#include <stddef.h>\n#include \"pykvm_native.h\"\n\n"
            f"/* ---- the KVM ABI as pykvm declares it ({arch}) ---- */\n{text}\n"
            "static const char pykvm_abi_text_[] =\n" + _c_string(text) + ";\n"
            "const char *pykvm_abi_text(void) { return pykvm_abi_text_; }\n\n"
            "/* ---- the ioctl request numbers, computed with ioctl_opt.IOC by "
            "csrc/build_native.py ---- */\n" + asserts +
            "static const char pykvm_ioctl_text_[] =\n" + _c_string(table) + ";\n"
            "const char *pykvm_ioctl_text(void) { return pykvm_ioctl_text_; }\n")


class _Builder(cffi.FFI):
    """An FFI whose emit_c_code() writes one variant per architecture (see the module doc)."""

    def emit_c_code(self, filename):
        module_name, _source_text, _ext, _kwds = self._assigned_source
        parts = ["/* pykvm._native, generated by csrc/build_native.py: one variant per "
                 "architecture, the compiler's target picks it */"]
        with tempfile.TemporaryDirectory() as d:
            for i, (arch, cond) in enumerate(ARCHES.items()):
                ffi = make_builder(arch, _Builder=cffi.FFI)
                c_file = os.path.join(d, f"{arch}.c")
                from cffi import recompiler
                recompiler.make_c_source(ffi, module_name, ffi._assigned_source[1], c_file)
                with open(c_file) as f:
                    parts.append(f"#{'el' if i else ''}if {cond}\n{f.read()}")
        parts.append('#else\n#error "pykvm._native: no KVM ABI description for this '
                     'architecture"\n#endif\n')
        text = "\n".join(parts)
        try:
            with open(filename) as f:
                if f.read() == text:
                    return
        except OSError:
            pass
        with open(filename, "w") as f:
            f.write(text)


def make_builder(arch: str, _Builder=_Builder) -> cffi.FFI:
    """The cffi builder of pykvm._native for ``arch`` ("x86_64" or "riscv64")."""
    b = _Builder()
    b.cdef(_cdef_from_header())
    b.cdef(abi_text(arch))
    b.cdef("const char *pykvm_abi_text(void);\nconst char *pykvm_ioctl_text(void);")
    b.set_source(
        "pykvm._native",
        _source(arch, ioctl_numbers(b, arch)),
        sources=[os.path.relpath(os.path.join(HERE, f))
                 for f in ("runloop.c", "pyexit.c", "virtio_blk.c", "virtio_irq.c",
                           "rewind.c")],
        include_dirs=[os.path.relpath(HERE)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        libraries=["rt", "pthread"],
    )
    return b


def host_arch() -> str:
    m = platform.machine()
    return "x86_64" if m in ("x86_64", "amd64") else m


ffibuilder = make_builder(host_arch() if host_arch() in ARCHES else "x86_64")

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
