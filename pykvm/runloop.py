"""Run a vCPU until something Python must handle.

:class:`RunLoop` drives a vCPU through the C helper (``pykvm._native``): console ports (a 16550
and the 0xe9 debug port), an ns16550a as MMIO (RISC-V), the SBI debug console, the
isa-debug-exit port, coalesced-MMIO drains, exit counting, a deadline and an exit budget are all
served in C with the GIL released. :class:`PyRunLoop` does
exactly the same in Python on top of :meth:`Vcpu.run`, so the two can be compared.
"""
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from . import abi
from ._native import ffi as nffi, lib as nlib
from .abi import ffi
from .errors import Closed, GuestError, kvm_error
from .exits import Exit, decode_exit

COM1 = 0x3F8
DEBUGCON = 0xE9
DEBUG_EXIT = 0xF4

STOP_NAMES = {
    nlib.PYKVM_STOP_EXIT: "exit", nlib.PYKVM_STOP_DEBUG_EXIT: "debug_exit",
    nlib.PYKVM_STOP_DEADLINE: "deadline", nlib.PYKVM_STOP_BUDGET: "budget",
    nlib.PYKVM_STOP_KICK: "kick",
}


@dataclass
class Stop:
    """Why a run returned: ``kind`` is "exit" (``exit`` holds the typed exit), "debug_exit"
    (``value`` = what the guest wrote to the exit port), "deadline", "budget" or "kick"."""
    kind: str
    exit: Optional[Exit] = None
    value: Optional[int] = None


@dataclass
class MmioRecord:
    phys_addr: int
    len: int
    pio: bool
    data: bytes


@dataclass
class LoopConfig:
    """What a run loop serves and how much it keeps.

    Ports are x86 I/O port numbers (0 = none). ``uart_mmio_base`` serves the same 16550
    registers as MMIO (an ns16550a, as on QEMU's RISC-V ``virt`` machine; 0 = none). ``exit_port``/``exit_port_size`` give QEMU's
    isa-debug-exit range (``iobase=0xf4,iosize=4``: ports 0xf4–0xf7). ``console_cap`` and
    ``mmio_log_cap`` size the C loop's buffers (bytes, records); ``console_limit`` (bytes) and
    ``mmio_log_limit`` (records) cap what the loop *retains* in :attr:`console` and
    :attr:`mmio_log` — older console bytes and newer MMIO records beyond them are counted in
    ``console_dropped``/``mmio_dropped`` and still streamed to ``on_console``/``on_mmio``."""
    serial_base: int = COM1
    debugcon_port: int = DEBUGCON
    exit_port: int = DEBUG_EXIT
    exit_port_size: int = 4
    console_cap: int = 1 << 14
    mmio_log_cap: int = 512
    console_limit: int = 1 << 20
    mmio_log_limit: int = 1 << 16
    console_flush: float = 0.05      # seconds console bytes may wait before Python sees them
    sbi_console: bool = False        # RISC-V: serve SBI DBCN writes in the loop
    ram: tuple = ()                  # (gpa, host address, size) regions the loop may read
    uart_mmio_base: int = 0          # an ns16550a as MMIO here (RISC-V virt: 0x10000000), 0 = none
    uart_mmio_shift: int = 0         # its register stride: register N at base + (N << shift)


def _ring_address(vcpu):
    """Address and entry count of the coalesced-MMIO ring page, if KVM offers one."""
    if not vcpu.vm.kvm.check_extension("COALESCED_MMIO"):
        return 0, 0
    import mmap
    page = mmap.PAGESIZE
    off = abi.arch.COALESCED_MMIO_PAGE_OFFSET * page
    if vcpu.run_size < off + page:
        return 0, 0
    entries = (page - 8) // ffi.sizeof("struct kvm_coalesced_mmio")
    return vcpu.run_addr + off, entries


class _LoopBase:
    def __init__(self, vcpu, config: Optional[LoopConfig] = None,
                 on_console: Optional[Callable[[bytes], None]] = None,
                 on_mmio: Optional[Callable[[MmioRecord], None]] = None):
        self.vcpu = vcpu
        self.config = config or LoopConfig()
        self.on_console = on_console
        self.on_mmio = on_mmio
        self._console = bytearray()
        self._console_total = 0
        self.mmio_log: List[MmioRecord] = []
        self.mmio_dropped = 0             # coalesced records seen beyond mmio_log_limit

    @property
    def console(self) -> bytes:
        """The last ``config.console_limit`` bytes of console output (bytes)."""
        limit = self.config.console_limit
        return bytes(self._console[-limit:]) if limit > 0 else b""

    @property
    def console_dropped(self) -> int:
        """Console bytes seen that :attr:`console` no longer holds."""
        return self._console_total - min(len(self._console), max(self.config.console_limit, 0))

    def _emit(self, data: bytes) -> None:
        if data:
            self._console += data
            self._console_total += len(data)
            limit = self.config.console_limit
            if len(self._console) > 2 * limit:       # trim in amortised O(1)
                del self._console[:len(self._console) - limit]
            if self.on_console:
                self.on_console(bytes(data))

    def _record_mmio(self, rec: "MmioRecord") -> None:
        if len(self.mmio_log) < self.config.mmio_log_limit:
            self.mmio_log.append(rec)
        else:
            self.mmio_dropped += 1
        if self.on_mmio:
            self.on_mmio(rec)



class RunLoop(_LoopBase):
    """The C run loop. ``run()`` returns a :class:`Stop`."""

    native = True

    def __init__(self, vcpu, config=None, on_console=None, on_mmio=None):
        super().__init__(vcpu, config, on_console, on_mmio)
        c = self.config
        self._l = nffi.new("struct pykvm_loop *")
        self._console_buf = nffi.new("uint8_t[]", c.console_cap)
        self._mmio_buf = nffi.new("struct pykvm_mmio_record[]", c.mmio_log_cap)
        l = self._l
        l.vcpu_fd = vcpu.fd
        l.run_size = vcpu.run_size
        l.run = vcpu.run_addr
        l.ring, l.ring_entries = _ring_address(vcpu)
        l.console = int(nffi.cast("uintptr_t", self._console_buf))
        l.console_cap = c.console_cap
        l.console_flush_ns = int(c.console_flush * 1e9) if on_console else 0
        l.serial_base, l.debugcon_port, l.exit_port = c.serial_base, c.debugcon_port, c.exit_port
        l.exit_port_size = c.exit_port_size if c.exit_port else 0
        l.sbi_console = 1 if c.sbi_console else 0
        l.uart_mmio_base, l.uart_mmio_shift = c.uart_mmio_base, c.uart_mmio_shift
        regions = list(c.ram)[:nlib.PYKVM_MAX_RAM]
        l.nram = len(regions)
        for i, (gpa, host, size) in enumerate(regions):
            l.ram[i].gpa, l.ram[i].host, l.ram[i].size = gpa, host, size
        l.mmio_log = int(nffi.cast("uintptr_t", self._mmio_buf))
        l.mmio_log_cap = c.mmio_log_cap
        nlib.pykvm_kick_signal()

    @property
    def counts(self) -> Dict[str, int]:
        """Exits seen by this loop, by reason name."""
        return {abi.EXIT_NAMES.get(i, f"EXIT_{i}"): self._l.counts[i]
                for i in range(nlib.PYKVM_MAX_EXIT_REASON) if self._l.counts[i]}

    @property
    def exits_total(self) -> int:
        return self._l.exits_total

    @property
    def handled_in_c(self) -> int:
        return self._l.handled_in_c

    def _drain(self) -> None:
        n = self._l.console_len
        if n:
            self._emit(bytes(nffi.buffer(self._console_buf, n)))
            self._l.console_len = 0
        n = self._l.mmio_log_len
        for i in range(n):
            r = self._mmio_buf[i]
            self._record_mmio(MmioRecord(r.phys_addr, r.len, bool(r.pio),
                                         bytes(nffi.buffer(r.data, r.len))))
        self._l.mmio_log_len = 0

    def run(self, *, deadline: Optional[float] = None, budget: int = 0) -> Stop:
        """Run until a stop and return it (:class:`Stop`).

        ``deadline``: a ``time.monotonic()`` value (seconds) after which the run stops with
        "deadline". ``budget``: the most exits this call handles (0 = no cap), counted across the
        loop's internal returns to Python (console streaming, full buffers, signals).
        Raises :class:`~pykvm.errors.Closed` once the vCPU is closed (a close during the run
        makes it return "kick" first), :class:`~pykvm.errors.Busy` if another thread runs the
        vCPU, :class:`~pykvm.errors.GuestError` if ``kvm_run`` describes I/O outside its page, and
        a :class:`~pykvm.errors.KvmError` if KVM_RUN fails."""
        l = self._l
        v = self.vcpu
        v._enter_run(self._kick_internal)
        try:
            l.deadline_ns = int(deadline * 1e9) if deadline else 0
            l.budget = budget if budget > 0 else -1
            while True:
                if v._closing:
                    return Stop("kick")
                v.run_seq += 1
                r = nlib.pykvm_loop_run(l)
                self._drain()
                if r < 0:
                    raise kvm_error("KVM_RUN", -r, f"vcpu {v.id}")
                if r in (nlib.PYKVM_STOP_CONSOLE_FULL, nlib.PYKVM_STOP_MMIO_LOG_FULL,
                         nlib.PYKVM_STOP_SIGNAL):
                    continue                       # Python got to run signal handlers; go on
                if r == nlib.PYKVM_STOP_BAD_EXIT:
                    raise GuestError("kvm_run described an I/O outside the shared page")
                if r == nlib.PYKVM_STOP_EXIT:
                    ex = decode_exit(v)
                    return Stop("exit", ex)
                if r == nlib.PYKVM_STOP_DEBUG_EXIT:
                    return Stop("debug_exit", value=l.exit_value)
                return Stop(STOP_NAMES[r])
        finally:
            v._leave_run()

    def _kick_internal(self) -> None:
        nlib.pykvm_loop_kick(self._l)

    def kick(self) -> None:
        """Stop a running ``run()`` (or the next one) from any thread; takes no lock, so it is
        safe from a signal handler. Raises :class:`~pykvm.errors.Closed` once the vCPU is
        closed."""
        if self.vcpu._closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        nlib.pykvm_loop_kick(self._l)


class PyRunLoop(_LoopBase):
    """The same loop in Python (one ``Vcpu.run()`` per exit). For comparison and debugging."""

    native = False
    _UART_LSR = 0x60

    def __init__(self, vcpu, config=None, on_console=None, on_mmio=None):
        super().__init__(vcpu, config, on_console, on_mmio)
        self._counts: Dict[str, int] = {}
        self.exits_total = 0
        self.handled_in_c = 0
        self._uart = bytearray(8)
        self._dl = bytearray(2)
        self._kick = threading.Event()
        self._ring, self._ring_entries = _ring_address(vcpu)

    @property
    def counts(self) -> Dict[str, int]:
        return dict(self._counts)

    def _drain_ring(self) -> None:
        if not self._ring:
            return
        ring = ffi.cast("struct kvm_coalesced_mmio_ring *", self._ring)
        first, last, mx = ring.first, ring.last, self._ring_entries
        if first >= mx or last >= mx:
            return
        while first != last:
            e = ring.coalesced_mmio[first]
            n = min(e.len, 8)
            self._record_mmio(MmioRecord(e.phys_addr, n, bool(e.pio),
                                         bytes(ffi.buffer(e.data, n))))
            first = (first + 1) % mx
            ring.first = first

    def _serve_io(self, ex) -> Optional[Stop]:
        c = self.config
        port, out = ex.port, ex.is_out
        if c.exit_port and 0 <= port - c.exit_port < c.exit_port_size:
            if out:
                return Stop("debug_exit", value=int.from_bytes(ex.data[:ex.size], "little"))
            ex.respond(0)
            return None
        if c.debugcon_port and port == c.debugcon_port:
            if out:
                self._emit(ex.data[::ex.size])
            else:
                ex.respond(0xE9)
            return None
        if c.serial_base and c.serial_base <= port < c.serial_base + 8:
            reg = port - c.serial_base
            if out:
                for b in ex.data[::ex.size]:
                    self._uart_write(reg, b)
            else:
                ex.respond(bytes([self._uart_read(reg)] + [0] * (ex.size - 1)) * ex.count)
            return None
        return Stop("exit", ex)

    # the 16550 register file, shared by the port UART and the MMIO one (as in csrc/runloop.c)
    def _uart_write(self, reg: int, b: int) -> None:
        if self._uart[3] & 0x80 and reg <= 1:
            self._dl[reg] = b
        elif reg == 0:
            self._emit(bytes([b]))
        elif reg not in (2, 5, 6):
            self._uart[reg] = b

    def _uart_read(self, reg: int) -> int:
        if self._uart[3] & 0x80 and reg <= 1:
            return self._dl[reg]
        return {0: 0, 2: 0x01, 5: self._UART_LSR, 6: 0xB0}.get(reg, self._uart[reg])

    def _serve_uart_mmio(self, ex) -> bool:
        """An MMIO exit inside the ns16550a window: served (True), else False."""
        c = self.config
        base, shift = c.uart_mmio_base, c.uart_mmio_shift
        off = ex.phys_addr - base
        if not base or shift > 2 or not 0 <= off < 8 << shift or off & ((1 << shift) - 1):
            return False
        reg = off >> shift
        if ex.is_write:
            self._uart_write(reg, ex.data[0])
        else:
            ex.respond(self._uart_read(reg))
        return True

    def run(self, *, deadline: Optional[float] = None, budget: int = 0) -> Stop:
        """As :meth:`RunLoop.run`, one ``Vcpu.run()`` per exit."""
        v = self.vcpu
        v._enter_run(self._kick_internal)
        timer = None
        try:
            if deadline:
                timer = threading.Timer(max(0.0, deadline - time.monotonic()),
                                        self._kick_internal)
                timer.daemon = True
                timer.start()
            left = budget
            while True:
                if v._closing:
                    return Stop("kick")
                if self._kick.is_set():
                    self._kick.clear()
                    return Stop("deadline" if deadline and time.monotonic() >= deadline else "kick")
                ex = v.run()
                self.exits_total += 1
                self._counts[ex.name] = self._counts.get(ex.name, 0) + 1
                self._drain_ring()
                if ex.reason == abi.EXIT_REASONS["IO"]:
                    stop = self._serve_io(ex)
                    if stop is not None:
                        return stop
                elif ex.reason == abi.EXIT_REASONS["MMIO"] and self.config.uart_mmio_base:
                    if not self._serve_uart_mmio(ex):
                        return Stop("exit", ex)
                elif ex.reason != abi.EXIT_REASONS["INTR"]:
                    return Stop("exit", ex)
                if budget:
                    left -= 1
                    if left == 0:
                        return Stop("budget")
        finally:
            if timer:
                timer.cancel()
            v._leave_run()

    def _kick_internal(self) -> None:
        self._kick.set()
        self.vcpu._kick_thread()

    def kick(self) -> None:
        """Stop a running ``run()`` (or the next one) from any thread. Raises
        :class:`~pykvm.errors.Closed` once the vCPU is closed."""
        if self.vcpu._closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        self._kick_internal()


def make_loop(vcpu, *, native: bool = True, **kw):
    """A :class:`RunLoop` (C) or :class:`PyRunLoop` (Python) for ``vcpu``."""
    return (RunLoop if native else PyRunLoop)(vcpu, **kw)
