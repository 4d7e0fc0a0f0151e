"""Find (and, in a source checkout, build) pykvm's built-in guests.

Guests are searched in order: ``$PYKVM_GUESTS_DIR``, then ``<checkout>/build/guests`` (built
from ``guests/`` with ``make`` when missing or older than their sources).
"""
import os
import shutil
import subprocess
import threading
from typing import List, Optional

from . import abi
from .errors import PykvmError

_HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(_HERE)
SOURCE_DIR = os.path.join(CHECKOUT, "guests")
BUILD_DIR = os.path.join(CHECKOUT, "build", "guests")
_ARCH_DIR = {"x86_64": "x86", "riscv64": "riscv"}
_lock = threading.Lock()
_built = False


class GuestNotFound(PykvmError):
    pass


def _newest_source() -> float:
    newest = 0.0
    for root, _, files in os.walk(SOURCE_DIR):
        for f in files:
            newest = max(newest, os.path.getmtime(os.path.join(root, f)))
    return newest


def build(out: str = BUILD_DIR, *, force: bool = False) -> str:
    """Build the guests from ``guests/`` into ``out`` (make is incremental)."""
    global _built
    with _lock:
        if _built and not force:
            return out
        if not os.path.isdir(SOURCE_DIR):
            raise GuestNotFound("no guests/ source directory next to this pykvm")
        r = subprocess.run(["make", "-s", "-C", SOURCE_DIR, f"OUT={out}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise PykvmError(f"building guests failed:\n{r.stderr[-4000:]}")
        _built = True
        return out


def guest_dirs(arch: str = abi.ARCH) -> List[str]:
    sub = _ARCH_DIR.get(arch, arch)
    dirs = []
    env = os.environ.get("PYKVM_GUESTS_DIR")
    if env:
        dirs.append(os.path.join(env, sub))
    dirs.append(os.path.join(BUILD_DIR, sub))
    return dirs


def path(name: str, arch: str = abi.ARCH) -> str:
    """The image file of built-in guest ``name`` (``hello``, ``msr``, ...)."""
    if os.sep in name or name.endswith((".elf", ".bin")):
        return name
    can_build = os.path.isdir(SOURCE_DIR) and shutil.which("make")
    newest = _newest_source() if can_build else 0.0
    for attempt in range(2):
        for d in guest_dirs(arch):
            for ext in (".bin", ".elf"):   # a flat binary is the real image when both exist
                p = os.path.join(d, name + ext)
                if os.path.exists(p) and (attempt or os.path.getmtime(p) >= newest):
                    return p
        if attempt == 0 and can_build:
            build()
    raise GuestNotFound(f"no built-in {arch} guest named {name!r} (looked in "
                        f"{', '.join(guest_dirs(arch))})")


def available(arch: str = abi.ARCH) -> List[str]:
    names = set()
    for d in guest_dirs(arch):
        if os.path.isdir(d):
            names |= {f.rsplit(".", 1)[0] for f in os.listdir(d) if f.endswith((".elf", ".bin"))}
    return sorted(names)


DEFAULT_GUEST = "hello"


def default_path() -> Optional[str]:
    return path(DEFAULT_GUEST)
