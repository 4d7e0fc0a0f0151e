"""Flat binaries: the file's bytes at a given guest-physical address, entered there (or at a
given entry) in the boot mode asked for."""
from __future__ import annotations

from .image import ARCHES, LoadError, LoadPlan, Segment, _as_bytes, _check_int, _load_errors_only

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional


@_load_errors_only
def parse_flat(data: bytes, addr: int, *, mode: str = "real", entry: Optional[int] = None,
               arch: str = "x86_64") -> LoadPlan:
    """A plan for a flat binary loaded at ``addr`` (entry defaults to ``addr``)."""
    if arch not in ARCHES:
        raise LoadError(f"unknown architecture {arch!r} (known: {', '.join(ARCHES)})")
    if mode not in ("real", "protected", "long", "riscv"):
        raise LoadError(f"unknown boot mode {mode!r} for a flat binary")
    _check_int("load address", addr)
    data = _as_bytes(data)
    if not data:
        raise LoadError("flat binary is empty")
    if addr < 0 or addr + len(data) > 1 << 64:
        raise LoadError(f"bad load address {addr:#x} for a {len(data):#x}-byte image")
    entry = addr if entry is None else entry
    _check_int("entry point", entry)
    seg = Segment(addr, memoryview(data), len(data))
    if not seg.addr <= entry < seg.end:
        raise LoadError(f"entry point {entry:#x} is outside the image [{seg.addr:#x}, "
                        f"{seg.end:#x})")
    if mode == "real" and seg.end > 0x100000:
        raise LoadError(f"real-mode image [{seg.addr:#x}, {seg.end:#x}) does not fit below 1 MiB")
    return LoadPlan("flat", arch, mode, entry, [seg])

