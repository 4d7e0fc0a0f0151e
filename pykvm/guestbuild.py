"""Build a guest of your own: one C or assembler file linked with pykvm's guest runtime.

    from pykvm.guestbuild import build
    image = build("tests/my_guest.c")                    # x86_64 long mode on an x86 host
    image = build("boot.c", mode="real")                 # -> boot.bin (boot.elf beside it)
    image = build("hello.c", arch="riscv64")             # S-mode guest for RISC-V KVM

or ``pykvm guest build FILE`` on the command line, or ``guest_vm("my_guest.c")`` in a pytest
test (the path is relative to the test file).

The guest runtime (``pykvm_guest.h``, the start-up code, the report/printf helpers and the linker
scripts, the same files ``guests/`` builds pykvm's own guests from) ships inside the package as
``pykvm/guest_runtime``; in a source checkout ``guests/`` is used directly. The compiler and linker
options below are those of ``guests/Makefile`` and ``guests/riscv/guests.mk``: building a built-in
guest's source here gives the same bytes as ``make`` does (``tests/unit/test_guestbuild.py``).
Guests carry DWARF line tables (``-g1``: functions and lines, no variables), with the source paths
made relative as in ``__FILE__`` and the compile directory ".", so that an unexpected guest
exception names its function and ``file.c:line`` (:mod:`pykvm.boot.symbols`); the debug sections
are not loaded into guest RAM.

Modes (x86_64): ``long`` (64-bit ELF at 1 MiB, entry ``guest_main()``), ``protected``
(32-bit multiboot ELF, entry ``guest_main32(magic, info)``) and ``real`` (a flat binary at 0x8000,
entry ``guest_main16()``; the ELF is kept beside it for ``pykvm_params``). Without a mode the
source decides: a ``guest_main16`` means real, a ``guest_main32`` protected, anything else long.
A protected-mode source with a ``#define PYKVM_LINK_LOW`` line is linked at 0x8000, below 1 MiB
(``x86/rt32/link_low.ld``), instead of at 1 MiB. ``guests/Makefile`` sorts its sources by the
same rules.
RISC-V has one mode, ``supervisor`` (entry ``guest_main(hartid, dtb)``).

Results are cached by content: the key hashes the preprocessed source (so every header it
includes counts), the runtime's files, the options and the tools' identities. The cache is
``$PYKVM_CACHE/guests`` (default ``~/.cache/pykvm/guests``); entries are written to a temporary
directory and renamed into place, so parallel builds of one guest are safe. On failure
:class:`GuestBuildError` carries the compiler's own message.

Tools: ``gcc``, ``ld`` and ``objcopy`` for x86 on an x86_64 host (``x86_64-linux-gnu-*``
elsewhere); ``riscv64-linux-gnu-gcc`` for RISC-V (``gcc`` on a riscv64 host). The environment
variables ``PYKVM_X86_CC``, ``PYKVM_X86_LD``, ``PYKVM_X86_OBJCOPY`` and ``PYKVM_RISCV_CC``
override them.
"""
from __future__ import annotations

# The standard-library modules only a build needs (subprocess, shutil, tempfile, hashlib,
# concurrent.futures) are imported where a build uses them: pykvm.machine imports this module
# (through pykvm.guests), and `pykvm run` of an image file must not pay for them.
import errno
import os
import re
import stat

from ._host import host_arch
from .errors import PykvmError
from .outfile import ReportPathError, check_report_path, write_report

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["GuestBuildError", "build", "runtime_dir", "cache_dir", "host_arch", "ARCHES",
           "MODES", "RUNTIME_PARTS", "SOURCE_SUFFIXES"]

_HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGED_RUNTIME = os.path.join(_HERE, "guest_runtime")
CHECKOUT_RUNTIME = os.path.join(os.path.dirname(_HERE), "guests")

# What of guests/ makes up the runtime (setup.py copies the same list into the wheel).
RUNTIME_PARTS = ("include", "common", "x86/rt16", "x86/rt32", "x86/rt64", "x86/svm", "riscv/rt")

ARCHES = ("x86_64", "riscv64")
MODES = {"x86_64": ("long", "protected", "real"), "riscv64": ("supervisor",)}
SOURCE_SUFFIXES = (".c", ".S")
_FORMAT = 1                     # bump when the cache layout or the key's recipe changes

# -- options: guests/Makefile and guests/riscv/guests.mk ----------------------------------------
_COMMON_SRCS = ("common/report.c", "common/printf.c", "common/string.c", "common/params.c")
_X86_BASE_CFLAGS = (
    "-std=gnu11", "-Os", "-g1", "-Wall", "-Wextra", "-Werror=implicit-function-declaration",
    "-ffreestanding", "-fno-builtin", "-fno-pic", "-fno-pie", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fno-common",
    "-fno-tree-loop-distribute-patterns", "-fcf-protection=none",
    "-mgeneral-regs-only", "-mno-sse", "-mno-mmx", "-mno-80387")
_X86_LDFLAGS = ("-nostdlib", "-static", "--build-id=none", "-z", "noexecstack",
                "-z", "max-page-size=0x1000")
RM_BASE, RM_STACK_TOP = 0x8000, 0x7000        # guests/Makefile; pykvm.arch.x86.layout agrees


class _X86Mode:
    def __init__(self, cflags, ld_emulation, rt, rt_srcs, ld_extra=(), flat=False):
        self.cflags = _X86_BASE_CFLAGS + tuple(cflags)
        self.ldflags = ("-m", ld_emulation) + _X86_LDFLAGS + ("-T", f"x86/{rt}/link.ld") + \
            tuple(ld_extra)
        self.rt_srcs = tuple(f"x86/{rt}/{s}" for s in rt_srcs) + _COMMON_SRCS
        self.flat = flat


_X86_MODES = {
    "long": _X86Mode(("-m64", "-mno-red-zone", "-mcmodel=small"), "elf_x86_64", "rt64",
                     ("crt0.S", "isr.S", "runtime.c")),
    "protected": _X86Mode(("-m32", "-march=i686"), "elf_i386", "rt32", ("crt0.S",)),
    "real": _X86Mode(("-m16", "-march=i686", "-DPYKVM_REAL_MODE=1"), "elf_i386", "rt16",
                     ("crt0.S",), ld_extra=(f"--defsym=PYKVM_RM_BASE={RM_BASE:#x}",
                                            f"--defsym=PYKVM_RM_STACK_TOP={RM_STACK_TOP:#x}"),
                     flat=True),
}

_RISCV_CFLAGS = (
    "-std=gnu11", "-march=rv64imac_zicsr_zifencei", "-mabi=lp64", "-mcmodel=medany",
    "-ffreestanding", "-fno-builtin", "-nostdlib", "-static", "-fno-pic", "-fno-pie",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-unwind-tables",
    "-fno-common", "-fno-tree-loop-distribute-patterns",
    "-Os", "-g1", "-Wall", "-Wextra", "-Werror=implicit-function-declaration")
_RISCV_LDFLAGS = ("-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
                  "-Wl,-z,max-page-size=0x1000", "-Wl,-T,{rt}/riscv/rt/link.ld")
_RISCV_RT_SRCS = ("riscv/rt/crt0.S", "riscv/rt/runtime.c", "riscv/rt/fdt.c") + _COMMON_SRCS


class GuestBuildError(PykvmError):
    """A guest did not build. The first line says which and why in short; the rest is the
    compiler's (or linker's) own output and the command that produced it."""


# -- where things are ---------------------------------------------------------------------------


def runtime_dir() -> str:
    """The guest runtime: ``pykvm/guest_runtime`` in an installed package, else the checkout's
    ``guests/``."""
    for d in (PACKAGED_RUNTIME, CHECKOUT_RUNTIME):
        if os.path.isfile(os.path.join(d, "include", "pykvm_guest.h")):
            return d
    raise GuestBuildError(f"pykvm's guest runtime is missing: looked in {PACKAGED_RUNTIME} "
                          f"(an installed package) and {CHECKOUT_RUNTIME} (a source checkout)")


def cache_dir() -> str:
    """``$PYKVM_CACHE``, else ``$XDG_CACHE_HOME/pykvm``, else ``~/.cache/pykvm``."""
    env = os.environ.get("PYKVM_CACHE")
    if env:
        return os.path.abspath(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "pykvm")


def _tool(env: str, native: str, cross: str, arch: str) -> str:
    name = os.environ.get(env) or (native if host_arch() == arch else cross)
    import shutil
    found = shutil.which(name)
    if not found:
        hint = {"riscv64-linux-gnu-gcc": " (Debian/Ubuntu: apt-get install gcc-riscv64-linux-gnu)",
                "gcc": " (Debian/Ubuntu: apt-get install gcc binutils)",
                "ld": " (Debian/Ubuntu: apt-get install binutils)",
                "objcopy": " (Debian/Ubuntu: apt-get install binutils)"}.get(name, "")
        raise GuestBuildError(f"cannot build a {arch} guest: {name!r} is not on PATH{hint}; "
                              f"set ${env} to use another")
    return found


def _tool_id(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


_LD_HAS_NO_WARN_RWX: Dict[str, bool] = {}


def _no_warn_rwx(ld_help_cmd: List[str]) -> bool:
    """Whether the linker knows --no-warn-rwx-segments (binutils >= 2.39); the option only
    silences a warning, so it is not part of the cache key."""
    key = " ".join(ld_help_cmd)
    if key not in _LD_HAS_NO_WARN_RWX:
        import subprocess
        r = subprocess.run(ld_help_cmd, capture_output=True, text=True)
        _LD_HAS_NO_WARN_RWX[key] = "no-warn-rwx-segments" in (r.stdout + r.stderr)
    return _LD_HAS_NO_WARN_RWX[key]


# -- the build ----------------------------------------------------------------------------------
_LINK_LOW = re.compile(r"^[ \t]*#[ \t]*define[ \t]+PYKVM_LINK_LOW\b", re.M)


def _source_text(source: str) -> str:
    with open(source, "r", encoding="utf-8", errors="replace") as f:
        return f.read()


def _guess_mode(source: str) -> str:
    text = _source_text(source)
    if re.search(r"\bguest_main16\b", text):
        return "real"
    if re.search(r"\bguest_main32\b", text):
        return "protected"
    return "long"


def _check_args(source: str, arch: Optional[str], mode: Optional[str]) -> Tuple[str, str, str]:
    source = os.path.abspath(os.fspath(source))
    if not source.endswith(SOURCE_SUFFIXES):
        raise GuestBuildError(f"{source}: a guest source is a .c or .S file")
    if not os.path.isfile(source):
        raise GuestBuildError(f"no such guest source: {source}")
    arch = arch or host_arch()
    if arch not in ARCHES:
        raise GuestBuildError(f"pykvm builds guests for {' and '.join(ARCHES)}, not {arch!r}")
    if mode is None:
        mode = _guess_mode(source) if arch == "x86_64" else "supervisor"
    if mode not in MODES[arch]:
        raise GuestBuildError(f"{arch} guests have mode {', '.join(MODES[arch])}, not {mode!r}")
    return source, arch, mode


_PROBLEM = re.compile(r"\berror:|undefined reference|multiple definition|No such file|"
                      r"cannot find|will not fit|ASSERT")


def _failure(what: str, cmd: Sequence[str], rc: int, out: str) -> GuestBuildError:
    """The error for a failed tool run: the first line that names the problem, then the tool's
    whole output and the command."""
    out = out.strip()
    lines = out.splitlines()
    first = next((ln for ln in lines if _PROBLEM.search(ln)), lines[0] if lines else "")
    first = first or f"{os.path.basename(cmd[0])} exited {rc}"
    return GuestBuildError(f"{what} failed: {first}\n{out}\n(command: {' '.join(cmd)})")


def _run(cmd: Sequence[str], what: str, cwd: Optional[str] = None) -> None:
    import subprocess
    r = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise _failure(what, cmd, r.returncode, r.stderr + r.stdout)


def _hash_runtime(h, rt: str, arch: str) -> None:
    parts = [p for p in RUNTIME_PARTS if p.split("/")[0] in
             (("include", "common", "x86") if arch == "x86_64" else ("include", "common", "riscv"))]
    for part in parts:
        top = os.path.join(rt, part)
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for f in sorted(files):
                if f.endswith((".o", ".d", ".pyc")):
                    continue
                p = os.path.join(root, f)
                h.update(os.path.relpath(p, rt).encode() + b"\0")
                with open(p, "rb") as fh:
                    h.update(fh.read())
                h.update(b"\0")


class _Plan:
    """Everything one build needs: tools, options, runtime sources and the cache key."""

    def __init__(self, source: str, arch: str, mode: str, cflags: Sequence[str],
                 source_root: Optional[str]):
        self.source, self.arch, self.mode = source, arch, mode
        self.name = os.path.splitext(os.path.basename(source))[0]
        self.rt = runtime_dir()
        root = os.path.abspath(source_root) if source_root else os.path.dirname(source)
        self.root = root
        self.what = f"building {os.path.basename(source)} ({arch}, {mode} mode)"
        # the debug map first: the compile directory (DW_AT_comp_dir, the runtime directory:
        # compiles run there, as make's do) reads ".", and the file map after it wins for files
        maps = [f"-fdebug-prefix-map={self.rt}=.", f"-ffile-prefix-map={self.rt}/="]
        if root != self.rt:
            maps.append(f"-ffile-prefix-map={root}/=")
        self.user_cflags = tuple(cflags)
        if arch == "x86_64":
            m = _X86_MODES[mode]
            self.cc = _tool("PYKVM_X86_CC", "gcc", "x86_64-linux-gnu-gcc", arch)
            self.ld = _tool("PYKVM_X86_LD", "ld", "x86_64-linux-gnu-ld", arch)
            self.objcopy = _tool("PYKVM_X86_OBJCOPY", "objcopy", "x86_64-linux-gnu-objcopy",
                                 arch) if m.flat else None
            self.rt_cflags = m.cflags + tuple(maps) + (f"-I{self.rt}/include",)
            script = "link.ld"
            if mode == "protected" and _LINK_LOW.search(_source_text(source)):
                script = "link_low.ld"             # linked at 0x8000 (guests/Makefile agrees)
            self.ldflags = tuple(f"{self.rt}/{a[:-len('link.ld')]}{script}"
                                 if a.endswith("link.ld") else a for a in m.ldflags)
            self.rt_srcs = tuple(os.path.join(self.rt, s) for s in m.rt_srcs)
            self.flat = m.flat
            tools = [self.cc, self.ld] + ([self.objcopy] if self.objcopy else [])
        else:
            self.cc = _tool("PYKVM_RISCV_CC", "gcc", "riscv64-linux-gnu-gcc", arch)
            self.ld = self.objcopy = None
            self.rt_cflags = _RISCV_CFLAGS + tuple(maps) + (f"-I{self.rt}/include",
                                                            f"-I{self.rt}/riscv/rt")
            self.ldflags = tuple(a.format(rt=self.rt) for a in _RISCV_LDFLAGS)
            self.rt_srcs = tuple(os.path.join(self.rt, s) for s in _RISCV_RT_SRCS)
            self.flat = False
            tools = [self.cc]
        # the user's file also sees the runtime's arch directory (x86: "svm/svm.c")
        extra_inc = (f"-I{self.rt}/x86",) if arch == "x86_64" else ()
        self.cflags = self.rt_cflags + extra_inc + self.user_cflags
        self.tools = tools

    def key(self) -> str:
        import hashlib
        h = hashlib.sha256()
        h.update(f"pykvm-guest {_FORMAT} {self.arch} {self.mode} {self.name}\0".encode())
        for t in self.tools:
            h.update(_tool_id(t).encode() + b"\0")
        # options, with this install's paths taken out (they are only in prefix maps/includes)
        for a in self.cflags + ("--",) + self.ldflags:
            h.update(a.replace(self.rt, "<rt>").replace(self.root, "<src>").encode() + b"\0")
        _hash_runtime(h, self.rt, self.arch)
        # the source as the compiler sees it: every header it includes, __FILE__ as mapped
        cmd = [self.cc] + list(self.cflags) + ["-E", "-P", self.source]
        import subprocess
        r = subprocess.run(cmd, capture_output=True)
        if r.returncode != 0:
            raise _failure(self.what, cmd, r.returncode, r.stderr.decode("utf-8", "replace"))
        h.update(r.stdout)
        return h.hexdigest()

    def outputs(self) -> List[str]:
        return [self.name + ".bin", self.name + ".elf"] if self.flat else [self.name + ".elf"]

    def build_into(self, d: str) -> None:
        what = self.what
        elf = os.path.join(d, self.name + ".elf")
        if self.arch == "riscv64":
            ld = list(self.ldflags)
            if _no_warn_rwx([self.cc, "-Wl,--help"]):
                ld.append("-Wl,--no-warn-rwx-segments")
            # one driver call, as guests/riscv/guests.mk does: runtime first, then the guest
            _run([self.cc] + list(self.cflags) + ld + ["-o", elf] + list(self.rt_srcs) +
                 [self.source], what, cwd=self.rt)
            return
        objs = []
        jobs = []
        obj = os.path.join(d, "obj")       # object names end up in the symbol table (.S
        for s in self.rt_srcs:                # files): name them as guests/Makefile does
            o = os.path.join(obj, os.path.relpath(s, self.rt) + ".o")
            os.makedirs(os.path.dirname(o), exist_ok=True)
            objs.append(o)
            jobs.append(([self.cc] + list(self.rt_cflags) + ["-c", s, "-o", o],
                         f"{what}: runtime {os.path.relpath(s, self.rt)}"))
        user_o = os.path.join(obj, "guest", os.path.basename(self.source) + ".o")
        os.makedirs(os.path.dirname(user_o), exist_ok=True)
        jobs.append(([self.cc] + list(self.cflags) + ["-c", self.source, "-o", user_o], what))
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as ex:
            for f in [ex.submit(_run, cmd, w, self.rt) for cmd, w in jobs]:
                f.result()
        ld = list(self.ldflags)
        if _no_warn_rwx([self.ld, "--help"]):
            ld.append("--no-warn-rwx-segments")
        _run([self.ld] + ld + ["-o", elf] + objs + [user_o], what + ": link")
        if self.flat:
            _run([self.objcopy, "-O", "binary", elf, os.path.join(d, self.name + ".bin")],
                 what + ": objcopy")
        import shutil
        shutil.rmtree(obj)


def build(source, *, arch: Optional[str] = None, mode: Optional[str] = None,
          out: Optional[str] = None, cflags: Sequence[str] = (), cache: Optional[str] = None,
          source_root: Optional[str] = None) -> str:
    """Compile ``source`` (a ``.c`` or ``.S`` file) with pykvm's guest runtime and return the
    image's path: an ELF, or for ``mode="real"`` a flat ``.bin`` with its ``.elf`` beside it.

    ``arch``: "x86_64" (default on x86 hosts) or "riscv64". ``mode``: see the module doc.
    ``cflags``: extra compiler options for the guest's own file (``-DNAME=1``, ``-Idir``).
    ``out``: also copy the image there, and return that path; a real-mode flat binary is
    written as ``OUT.bin`` with its ELF beside it as ``OUT.elf``, OUT being ``out`` without
    a ``.bin`` suffix it may have (see :func:`check_output`). ``cache``: the cache directory (default :func:`cache_dir`).
    ``source_root``: the directory whose prefix is stripped from ``__FILE__`` (default: the
    source's own directory, so a guest assertion reads ``my_guest.c:12``).

    Raises :class:`GuestBuildError` (with the compiler's message) when the build fails, and
    :class:`pykvm.outfile.ReportPathError` (before compiling) for an ``out`` that
    :func:`check_output` refuses, or when writing it fails."""
    src, arch, mode = _check_args(source, arch, mode)
    outs = check_output(src, out, arch=arch, mode=mode) if out else None   # before compiling
    plan = _Plan(src, arch, mode, cflags, source_root)
    key = plan.key()
    base = os.path.abspath(os.path.join(cache or cache_dir(), "guests"))   # compiles run in
                                                                            # the runtime dir
    final = os.path.join(base, f"{plan.name}-{arch}-{mode}-{key[:20]}")
    names = plan.outputs()
    if not all(os.path.isfile(os.path.join(final, n)) for n in names):
        os.makedirs(base, exist_ok=True)
        import shutil
        import tempfile
        tmp = tempfile.mkdtemp(prefix=f".{plan.name}-", dir=base)
        try:
            plan.build_into(tmp)
            try:
                os.rename(tmp, final)
            except OSError:            # another process finished the same build first
                if not all(os.path.isfile(os.path.join(final, n)) for n in names):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    image = os.path.join(final, names[0])
    if outs:
        if plan.flat:
            with open(os.path.join(final, names[1]), "rb") as f:
                write_report(outs[1], f.read(), "the image's ELF")
        with open(image, "rb") as f:
            write_report(outs[0], f.read(), "the image")
        image = outs[0]
    return image


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (hard links and symlinks included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:                    # one of them does not exist (yet): not the same file
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(source, out, *, arch: Optional[str] = None,
                 mode: Optional[str] = None) -> List[str]:
    """The paths ``build(source, out=out)`` writes, as absolute paths: ``[out]`` (an ELF), or
    for a real-mode flat binary ``[OUT.bin, OUT.elf]``, where OUT is ``out`` without a
    ``.bin`` suffix it may have (``-o boot`` and ``-o boot.bin`` both write ``boot.bin`` and
    ``boot.elf``). Checked before anything is compiled, as gcc's ``-o``: an output that names
    the source itself (by any path: a symlink, a hard link) is refused, as is an output in a
    directory that does not exist (gcc: "No such file or directory"), a directory, socket or
    block device (see :func:`pykvm.outfile.check_report_path`), and a real-mode ``out``
    named ``*.elf`` (the flat binary's ELF has that name).

    Raises :class:`pykvm.outfile.ReportPathError` (an OSError, one line) for a path refused;
    :class:`GuestBuildError` when ``source``, ``arch`` or ``mode`` is not usable."""
    src, arch, mode = _check_args(source, arch, mode)
    out = os.fspath(out)
    o = os.path.abspath(out)
    outs = [o]
    if arch == "x86_64" and _X86_MODES[mode].flat:
        # a flat binary is run by its suffix (no header says what it is): OUT.bin, and the ELF
        # (for pykvm_params and symbols) beside it as OUT.elf; an OUT already ending in .bin
        # is that name
        if o.endswith(".elf"):
            raise ReportPathError(errno.EINVAL, f"cannot write the image to {out}: a real-mode "
                                  "guest is a flat binary; name it OUT or OUT.bin (written as "
                                  "OUT.bin, its ELF beside it as OUT.elf)", out)
        stem = o[:-len(".bin")] if o.endswith(".bin") else o
        outs = [stem + ".bin", stem + ".elf"]
    for p in outs:
        shown = out if p == o else p
        if _same_file(p, src):
            raise ReportPathError(errno.EINVAL, f"cannot write the image to {shown}: it is the "
                                  f"input file {source}", shown)
        parent = os.path.dirname(p)
        try:
            st = os.stat(parent)
            err = 0 if stat.S_ISDIR(st.st_mode) else errno.ENOTDIR
        except OSError as e:                   # missing, a symlink loop, no permission ...
            err = e.errno or errno.ENOENT
        if err:
            raise ReportPathError(err, f"cannot write the image to {shown}: "
                                  f"{os.strerror(err)}: {os.path.dirname(shown) or parent}",
                                  shown)
        check_report_path(p, "the image")
    return outs
