"""Userspace SBI services for ``KVM_EXIT_RISCV_SBI`` exits.

KVM handles most SBI calls in the kernel. Those it forwards to userspace
(exit reason 35) include the debug console (DBCN, once enabled), system
suspend (SUSP, once enabled) and anything in the experimental/vendor ranges,
such as pykvm's guest report call (EID 0x08504B56, see docs/guest-abi.md).

:class:`SbiServices` answers them. The exit object it is given needs
``extension_id``, ``function_id``, ``args`` (six ints) and
``set_return(error, value)`` (``pykvm.exits.RiscvSbi`` provides these); guest
memory needs ``read(gpa, n) -> bytes``.

System suspend, as KVM implements it: the SUSP call exits to userspace with
``args = (sleep_type, resume_addr, opaque)``; KVM has already checked the
sleep type, the resume address and that every other vCPU is stopped (else
the guest gets the error without an exit), and has queued the resume: on the
next KVM_RUN it resets the hart to pc = resume_addr, a0 = hart id, a1 =
opaque, all other GPRs zero, S-mode, satp = 0, whatever is answered here. So
pykvm does not judge a forwarded suspend again: it sleeps (the wait is the
time the machine "sleeps") and answers SBI_SUCCESS.

Argument widths: the SBI spec makes some arguments 32-bit (SUSP's
``sleep_type``, HSM's ``suspend_type``); on RV64 their upper 32 register bits
are ignored, as Linux's KVM does. :class:`SuspendEvent` records the sleep
type as those low 32 bits and the register as it came (``a0``).
"""

from __future__ import annotations

import threading
import time

from ..._record import Record
from .cpu import set_sbi_extension
from .extensions import (
    PYKVM_REPORT_EID, SBI_ERR_INVALID_PARAM, SBI_ERR_NOT_SUPPORTED, SBI_EXT_DBCN,
    SBI_EXT_SUSP, SBI_SUCCESS,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable

__all__ = [
    "DBCN_WRITE", "DBCN_READ", "DBCN_WRITE_BYTE", "SUSP_SYSTEM_SUSPEND",
    "SUSPEND_TO_RAM", "SRST_SYSTEM_RESET", "SRST_SHUTDOWN", "SRST_COLD_REBOOT",
    "SRST_WARM_REBOOT",
    "SuspendEvent", "SbiServices", "enable_sbi_extension", "u64_to_signed",
]

DBCN_WRITE = 0
DBCN_READ = 1
DBCN_WRITE_BYTE = 2
SUSP_SYSTEM_SUSPEND = 0
SUSPEND_TO_RAM = 0
SRST_SYSTEM_RESET = 0
SRST_SHUTDOWN = 0          # reset types
SRST_COLD_REBOOT = 1
SRST_WARM_REBOOT = 2

_MASK64 = 0xFFFFFFFFFFFFFFFF


def u64_to_signed(v: int) -> int:
    """A 64-bit register value as a signed number (SBI error codes are negative)."""
    v &= _MASK64
    return v - (1 << 64) if v & (1 << 63) else v


def enable_sbi_extension(vcpu, name: str) -> None:
    """Enable one of KVM's SBI extensions (``"dbcn"``, ``"susp"``, ...) through
    ONE_REG before the vCPU first runs. Debian kernels leave DBCN and SUSP off
    until asked. Raises the typed errors of :func:`cpu.set_sbi_extension`."""
    set_sbi_extension(vcpu, name, True)


class SuspendEvent(Record, frozen=True, slots=True):
    """One SBI system-suspend request. ``sleep_type``: the low 32 bits of a0 (a 32-bit SBI
    argument); ``a0``: the register as the guest passed it."""

    sleep_type: int
    resume_addr: int
    opaque: int
    requested_at: float          # time.monotonic()
    woken_at: float | None = None
    woken_early: bool = False
    a0: int | None = None


class SbiServices:
    """Dispatch SBI calls that KVM forwarded to userspace.

    ``mem``: guest memory (``read(gpa, n)``); ``console``: a bytearray that
    receives debug-console output (or any object with ``extend``), or a
    callable taking bytes; ``on_report(addr)``: called with the guest-physical
    address of a ``struct pykvm_report`` for the report call;
    ``suspend_seconds``: how long a system suspend lasts unless :meth:`wake`
    ends it early (default 0); ``max_write``: the most bytes one DBCN write
    accepts (a longer one is a short write, as the SBI spec allows).
    """

    def __init__(self, mem, *, console=None, on_report: Callable[[int], object] | None = None,
                 suspend_seconds: float = 0.0, max_write: int = 1 << 20,
                 on_suspend: Callable[[SuspendEvent], object] | None = None):
        self.mem = mem
        self.console = bytearray() if console is None else console
        self.on_report = on_report
        self.on_suspend = on_suspend
        self.suspend_seconds = suspend_seconds
        self.max_write = max_write
        self.suspends: list[SuspendEvent] = []
        self.unsupported: list[tuple[int, int]] = []
        self._wake = threading.Event()

    # -- public --------------------------------------------------------------

    def wake(self) -> None:
        """End the current (or the next) system suspend early; thread-safe."""
        self._wake.set()

    @property
    def console_text(self) -> str:
        """Debug-console output so far, decoded as UTF-8 ("" when it streams to a callable)."""
        data = bytes(self.console) if not callable(self.console) else b""
        return data.decode("utf-8", "replace")

    def handle(self, exit) -> str:
        """Answer one SBI exit: sets the return registers via
        ``exit.set_return`` and returns what it was: ``"dbcn"``, ``"suspend"``,
        ``"report"`` or ``"unsupported"``. Exceptions raised by ``on_report``
        propagate after the return registers are set."""
        eid = exit.extension_id & _MASK64
        fid = exit.function_id & _MASK64
        args = tuple(int(a) & _MASK64 for a in exit.args)
        args = args + (0,) * (6 - len(args))
        if eid == SBI_EXT_DBCN:
            err, val = self._dbcn(fid, args)
            exit.set_return(err, val)
            return "dbcn"
        if eid == SBI_EXT_SUSP and fid == SUSP_SYSTEM_SUSPEND:
            err, val = self._suspend(args)
            exit.set_return(err, val)
            return "suspend"
        if eid == PYKVM_REPORT_EID and fid == 0:
            exit.set_return(SBI_SUCCESS, 0)
            if self.on_report is not None:
                self.on_report(args[0])
            return "report"
        self.unsupported.append((eid, fid))
        exit.set_return(SBI_ERR_NOT_SUPPORTED, 0)
        return "unsupported"

    # -- services ------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        if callable(self.console):
            self.console(data)
        else:
            self.console.extend(data)

    def _dbcn(self, fid: int, args: tuple) -> tuple[int, int]:
        if fid == DBCN_WRITE:
            num, lo, hi = args[0], args[1], args[2]
            if hi != 0:               # rv64: the address is lo; hi must be 0
                return SBI_ERR_INVALID_PARAM, 0
            n = min(num, self.max_write)
            if n == 0:
                return SBI_SUCCESS, 0
            if lo + n > _MASK64 + 1:
                return SBI_ERR_INVALID_PARAM, 0
            try:
                data = bytes(self.mem.read(lo, n))
            except (ValueError, IndexError, OverflowError, LookupError):
                # GuestMemoryError is a ValueError: a bad range is the guest's error
                return SBI_ERR_INVALID_PARAM, 0
            if len(data) != n:
                return SBI_ERR_INVALID_PARAM, 0
            self._emit(data)
            return SBI_SUCCESS, n
        if fid == DBCN_READ:
            if args[2] != 0:
                return SBI_ERR_INVALID_PARAM, 0
            return SBI_SUCCESS, 0     # no console input: zero bytes read
        if fid == DBCN_WRITE_BYTE:
            self._emit(bytes([args[0] & 0xFF]))
            return SBI_SUCCESS, 0
        return SBI_ERR_NOT_SUPPORTED, 0

    def _suspend(self, args: tuple) -> tuple[int, int]:
        # KVM forwarded it, so KVM accepted it (sleep type on its low 32 bits, resume address,
        # other harts stopped) and queued the resume: sleep, never re-judge (module docstring).
        sleep_type = args[0] & 0xFFFFFFFF
        ev = SuspendEvent(sleep_type, args[1], args[2], time.monotonic(), a0=args[0])
        self.suspends.append(ev)          # visible to other threads at once
        slot = len(self.suspends) - 1
        if self.on_suspend is not None:
            self.on_suspend(ev)
        woken = False
        if self.suspend_seconds and self.suspend_seconds > 0:
            woken = self._wake.wait(self.suspend_seconds)
        elif self._wake.is_set():
            woken = True
        if woken:
            self._wake.clear()
        self.suspends[slot] = SuspendEvent(ev.sleep_type, ev.resume_addr, ev.opaque,
                                           ev.requested_at, time.monotonic(), woken, ev.a0)
        return SBI_SUCCESS, 0

