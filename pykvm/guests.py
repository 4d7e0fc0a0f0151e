"""Find (and, in a source checkout, build) pykvm's built-in guests.

Guests are searched in order:

1. ``$PYKVM_GUESTS_DIR/<arch dir>`` when that variable is set;
2. ``pykvm/guests_bin/<arch dir>`` inside the package: a wheel built by ``setup.py`` carries the
   built-in guests there (compiled from ``guests/`` with the host toolchain when the wheel was
   built);
3. ``<checkout>/build/guests/<arch dir>`` in a source checkout (an editable install), built from
   ``guests/`` with ``make`` when missing or older than their sources.

``<arch dir>`` is ``x86`` or ``riscv``. A name ending in ``.c`` or ``.S`` is a guest source of
your own: it is compiled with the packaged guest runtime (see :mod:`pykvm.guestbuild`).
"""
from __future__ import annotations

import os
import re
import threading

from . import guestbuild
from ._host import HOST_ARCH
from .errors import PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.join(_HERE, "guests_bin")
CHECKOUT = os.path.dirname(_HERE)
SOURCE_DIR = os.path.join(CHECKOUT, "guests")
BUILD_DIR = os.path.join(CHECKOUT, "build", "guests")
_ARCH_DIR = {"x86_64": "x86", "riscv64": "riscv"}
_lock = threading.Lock()
_built = False




class GuestNotFound(PykvmError):
    """No built-in guest of that name; the message lists the directories searched."""


def _newest_source() -> float:
    newest = 0.0
    for root, _, files in os.walk(SOURCE_DIR):
        for f in files:
            newest = max(newest, os.path.getmtime(os.path.join(root, f)))
    return newest


def build(out: str = BUILD_DIR, *, force: bool = False) -> str:
    """Build the guests from ``guests/`` into ``out`` (make is incremental). Only in a source
    checkout: an installed wheel carries its guests already built (``pykvm/guests_bin``)."""
    global _built
    with _lock:
        if _built and not force:
            return out
        if not os.path.isdir(SOURCE_DIR):
            where = (f"this pykvm carries its guests prebuilt in {PACKAGE_DIR}"
                     if os.path.isdir(PACKAGE_DIR) else
                     f"this pykvm ({_HERE}) was installed without built-in guests")
            raise GuestNotFound(f"no guests/ source directory next to this pykvm ({SOURCE_DIR}): "
                                f"{where}; building them works only in a source checkout")
        import shutil                  # (build-time modules: see pykvm.guestbuild)
        import subprocess
        if not shutil.which("make"):
            raise PykvmError("building guests needs 'make' (and gcc, binutils) on PATH")
        r = subprocess.run(["make", "-s", "-C", SOURCE_DIR, f"OUT={out}",
                            f"-j{os.cpu_count() or 1}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise PykvmError(f"building guests failed:\n{r.stderr[-4000:]}")
        _built = True
        return out


def _in_checkout() -> bool:
    return os.path.isdir(SOURCE_DIR) or os.path.isdir(BUILD_DIR)


def guest_dirs(arch: Optional[str] = None) -> List[str]:
    """The directories searched for built-in ``arch`` guests (default: the host's), in order."""
    sub = _ARCH_DIR.get(arch or HOST_ARCH, arch or HOST_ARCH)
    dirs = []
    env = os.environ.get("PYKVM_GUESTS_DIR")
    if env:
        dirs.append(os.path.join(env, sub))
    dirs.append(os.path.join(PACKAGE_DIR, sub))
    if _in_checkout():
        dirs.append(os.path.join(BUILD_DIR, sub))
    return dirs


def _find(d: str, name: str) -> Optional[str]:
    for ext in (".bin", ".elf"):   # a flat binary is the real image when both exist
        p = os.path.join(d, name + ext)
        if os.path.exists(p):
            return p
    return None


def _not_found(name: str, arch: str) -> GuestNotFound:
    looked = []
    for d in guest_dirs(arch):
        state = "" if os.path.isdir(d) else " (absent)"
        looked.append(d + state)
    hint = ""
    if not _in_checkout() and not os.path.isdir(os.path.join(PACKAGE_DIR, _ARCH_DIR.get(arch, arch))):
        hint = ("; this installation has no built-in guests for it (a wheel carries those "
                "its build machine's toolchain could build)")
    else:
        hint = "; `pykvm guests` lists the built-in guests"
    return GuestNotFound(f"no built-in {arch} guest named {name!r} (looked in "
                         f"{', '.join(looked)}){hint}")


def path(name: str, arch: Optional[str] = None) -> str:
    """The image file of built-in guest ``name`` (``hello``, ``msr``, ...). A path is returned
    as it is; a ``.c``/``.S`` source is built (see :func:`pykvm.guestbuild.build`) and its
    image returned."""
    if name.endswith((".c", ".S")):
        return guestbuild.build(name, arch=arch)
    if os.sep in name or name.endswith((".elf", ".bin")):
        return name
    arch = arch or HOST_ARCH
    sub = _ARCH_DIR.get(arch, arch)
    checkout_dir = os.path.join(BUILD_DIR, sub)
    for d in guest_dirs(arch):
        if d == checkout_dir:
            continue
        p = _find(d, name)
        if p:
            return p
    if _in_checkout():
        import shutil
        can_build = os.path.isdir(SOURCE_DIR) and shutil.which("make")
        newest = _newest_source() if can_build else 0.0
        p = _find(checkout_dir, name)
        if p and os.path.getmtime(p) >= newest:
            return p
        if can_build:
            build()
            p = _find(checkout_dir, name)
        if p:
            return p
    raise _not_found(name, arch)


def available(arch: Optional[str] = None) -> List[str]:
    """The names of the built-in guests found for ``arch`` (default: the host's)."""
    names = set()
    for d in guest_dirs(arch):
        if os.path.isdir(d):
            names |= {f.rsplit(".", 1)[0] for f in os.listdir(d) if f.endswith((".elf", ".bin"))}
    return sorted(names)


def about(name: str, arch: Optional[str] = None) -> str:
    """One line on what the built-in guest ``name`` does: the first sentence of its source's
    leading comment, without the ``name:`` it may start with (the source beside the image in a
    wheel, or ``guests/<arch dir>/<name>.c`` in a checkout); "" when there is none."""
    sub = _ARCH_DIR.get(arch or HOST_ARCH, "")
    for d in [*guest_dirs(arch), os.path.join(SOURCE_DIR, sub)]:
        try:
            with open(os.path.join(d, f"{name}.c"), encoding="utf-8", errors="replace") as f:
                text = f.read(4096)
        except OSError:
            continue
        m = re.match(r"\s*/\*(.*?)\*/", text, re.S)
        if not m:
            return ""
        words = " ".join(w.strip(" *") for w in m.group(1).splitlines()).split()
        line = " ".join(words)
        line = re.sub(rf"^{re.escape(name)}\s*:\s*", "", line)
        end = re.search(r"(?<=[\w)\]])\.(\s|$)", line)
        line = line[:end.start() + 1] if end else line
        if len(line) > 100:
            line = line[:97].rsplit(" ", 1)[0] + "..."
        return line[0].upper() + line[1:] if line else ""
    return ""


DEFAULT_GUEST = "hello"
