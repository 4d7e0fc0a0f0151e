"""The guest → host report channel (docs/guest-abi.md): decode a ``struct pykvm_report`` from
guest memory, bounds-checked, into a :class:`Report`."""
from __future__ import annotations

import struct

from ._record import Record
from .errors import GuestError, GuestMemoryError, PykvmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

SYNC, ASSERT_FAILED, DONE, PRINT, EXCEPTION, TRAP = 1, 2, 3, 4, 5, 6
NAMES = {SYNC: "sync", ASSERT_FAILED: "assert", DONE: "done", PRINT: "print",
         EXCEPTION: "exception", TRAP: "trap"}
REPORT_SIZE = 80
MAX_STRING = 4096
X86_VECTORS = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
               8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
               17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}


class Report(Record, slots=True):
    """One guest report, decoded (:func:`decode`). ``kind``: "sync", "assert", "done", "print",
    "exception" or "trap"; ``args``: its integer arguments; ``text``, ``file``, ``line``,
    ``values``, ``message``: what an assertion (or a print) carries; ``vcpu``: the vCPU index
    that sent it."""
    kind: str                         # sync, assert, done, print, exception, trap
    args: Tuple[int, ...] = ()
    text: str = ""                    # print: the text; assert: the expression
    file: str = ""
    line: int = 0
    values: Optional[Tuple[int, int]] = None
    message: str = ""
    vcpu: int = 0
    where: str = ""                   # exception/trap: "function (file.c:12)" (see locate)

    @property
    def pc(self) -> Optional[int]:
        """Where an exception (RIP, args[2]) or a trap (sepc, args[1]) happened; None for
        other kinds."""
        i = {"exception": 2, "trap": 1}.get(self.kind)
        return self.args[i] if i is not None and len(self.args) > i else None

    def locate(self, symbols) -> str:
        """Fill :attr:`where` for an exception or trap from ``symbols`` (an object with
        ``symbol(addr) -> (name, offset) | None`` and ``place(addr) -> (file, line) | None``,
        such as :class:`pykvm.boot.symbols.Symbols`, which reads the image's symbol table and
        DWARF line table): ``"guest_main (my_guest.c:12)"``, the known parts of it, or "".
        For code inlined from a header (``wrmsr()`` of pykvm_guest.h) the line is that of the
        call in the function's own file. Returns :attr:`where`; a look-up that fails leaves
        it ""."""
        pc = self.pc
        if pc is None or symbols is None:
            return self.where
        try:
            sym, ln = symbols.symbol(pc), symbols.place(pc)
        except Exception:                 # noqa: BLE001 — the report stays without a place
            return self.where
        parts = []
        if sym is not None:
            parts.append(sym[0])
        if ln is not None:
            parts.append(f"({ln[0]}:{ln[1]})")
        self.where = " ".join(parts)
        return self.where

    @property
    def stage(self) -> Optional[int]:
        """SYNC: the stage number (args[0]); None for other kinds."""
        return self.args[0] if self.kind == "sync" and self.args else None

    @property
    def values_list(self) -> Tuple[int, ...]:
        """SYNC: the values after the stage."""
        return self.args[1:] if self.kind == "sync" else self.args

    def describe(self) -> str:
        """One line describing the report, e.g. ``guest assertion failed at file.c:12: x == 1``
        or ``unexpected guest exception #GP (vector 13) error code 0x0 at RIP 0x10183f in
        guest_main (my_guest.c:12)`` (the place when :meth:`locate` found one)."""
        if self.kind == "assert":
            s = f"guest assertion failed at {self.file}:{self.line}: {self.text}"
            if self.values is not None:
                a, b = self.values
                s += f" (left = {a} ({a:#x}), right = {b} ({b:#x}))"
            if self.message:
                s += f": {self.message}"
            return s
        if self.kind == "exception":
            vec, err, rip, cr2 = (list(self.args) + [0] * 4)[:4]
            name = X86_VECTORS.get(vec, f"vector {vec}")
            at = f" in {self.where}" if self.where else ""
            return (f"unexpected guest exception {name} (vector {vec}) error code {err:#x} "
                    f"at RIP {rip:#x}{at}" + (f", CR2 {cr2:#x}" if vec == 14 else ""))
        if self.kind == "trap":
            cause, epc, tval = (list(self.args) + [0] * 3)[:3]
            at = f" in {self.where}" if self.where else ""
            return (f"unexpected guest trap scause {cause:#x} sepc {epc:#x}{at} "
                    f"stval {tval:#x}")
        return f"{self.kind} {[hex(a) for a in self.args]}"


class GuestAssertion(PykvmError, AssertionError):
    """A guest's GUEST_ASSERT failed, or the guest took an unexpected exception."""

    def __init__(self, report: Report):
        self.report = report
        super().__init__(report.describe())


def decode(mem, gpa: int, vcpu: int = 0) -> Report:
    """Read the report at guest-physical ``gpa``. Never touches memory outside guest RAM."""
    try:
        raw = mem.read(gpa, REPORT_SIZE)
    except GuestMemoryError as e:
        raise GuestError(f"guest report at {gpa:#x} is outside guest RAM") from e
    cmd, nargs, *args = struct.unpack("<10Q", raw)
    kind = NAMES.get(cmd)
    if kind is None:
        raise GuestError(f"guest report at {gpa:#x} has unknown command {cmd}")
    args = tuple(args[:min(nargs, 8)])
    full = struct.unpack("<10Q", raw)[2:]

    def s(addr):
        if not addr:
            return ""
        try:
            return mem.read_cstring(addr, MAX_STRING)
        except GuestMemoryError:
            return f"<bad guest string at {addr:#x}>"

    if kind == "print":
        n = min(full[1], MAX_STRING) if full[1] else MAX_STRING
        try:
            text = mem.read(full[0], n).split(b"\0", 1)[0].decode("utf-8", "replace")
        except GuestMemoryError:
            text = f"<bad guest string at {full[0]:#x}>"
        return Report("print", args, text=text, vcpu=vcpu)
    if kind == "assert":
        values = (full[4], full[5]) if full[3] & 1 else None
        return Report("assert", args, text=s(full[0]), file=s(full[1]), line=full[2],
                      values=values, message=s(full[6]), vcpu=vcpu)
    return Report(kind, args, vcpu=vcpu)
