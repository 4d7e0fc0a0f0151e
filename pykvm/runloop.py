"""Run a vCPU until something Python must handle.

:class:`RunLoop` drives a vCPU through the C helper (``pykvm._native``): console ports (a 16550
and the 0xe9 debug port), an ns16550a as MMIO (RISC-V), the SBI debug console, the
isa-debug-exit port, coalesced-MMIO drains, exit counting, a deadline and an exit budget are all
served in C with the GIL released. :class:`PyRunLoop` does
exactly the same in Python on top of :meth:`Vcpu.run`, so the two can be compared.

Exit handlers in Python (:meth:`RunLoop.on`) are called from inside the C loop (a cffi
``extern "Python"`` callback, ``pykvm_py_exit``): the loop stays in C between exits (no teardown,
no new deadline timer, no return through :meth:`RunLoop.run`), and each handler gets a reused
exit object (:class:`~pykvm.exits.ExitCache`) that reads only the fields it asks for.
:meth:`RunLoop.resume` makes the C loop count and resume an exit (e.g. HLT) without Python.
"""
import collections
import threading
import time
from typing import Callable, Dict, List, Optional, Union

from . import abi
from ._native import ffi as nffi, lib as nlib
from .abi import ffi
from .errors import Closed, GuestError, HostResourceError
from .exits import Exit, ExitCache, decode_exit, kvm_run_error, new_exit
from sys import getrefcount as _refs

_CB_RESUME = nlib.PYKVM_CB_RESUME
_CB_STOP_EXIT = nlib.PYKVM_CB_STOP_EXIT
_CB_STOP = nlib.PYKVM_CB_STOP
_STOP_EXIT = nlib.PYKVM_STOP_EXIT
_STOP_CALLBACK = nlib.PYKVM_STOP_CALLBACK
_STOP_AGAIN = (nlib.PYKVM_STOP_CONSOLE_FULL, nlib.PYKVM_STOP_MMIO_LOG_FULL, nlib.PYKVM_STOP_SIGNAL)
_STOP_FULL = (nlib.PYKVM_STOP_CONSOLE_FULL, nlib.PYKVM_STOP_MMIO_LOG_FULL)
_CONSOLE_START = 256          # bytes and records the C loop's buffers start with
_MMIO_LOG_START = 8
# buffers the C loop fills: not cleared when allocated (pages the loop never writes stay
# untouched, which keeps an idle Machine small)
_new_buffer = nffi.new_allocator(should_clear_after_alloc=False)

COM1 = 0x3F8
DEBUGCON = 0xE9
DEBUG_EXIT = 0xF4

STOP_NAMES = {
    nlib.PYKVM_STOP_EXIT: "exit", nlib.PYKVM_STOP_DEBUG_EXIT: "debug_exit",
    nlib.PYKVM_STOP_DEADLINE: "deadline", nlib.PYKVM_STOP_BUDGET: "budget",
    nlib.PYKVM_STOP_KICK: "kick",
}


class _Record:
    """A small record class (what ``@dataclass`` writes, without its cost at import): fields
    from ``_fields``, keyword or positional, ``==`` and ``repr``."""
    __slots__ = ()
    _fields: tuple = ()
    _defaults: dict = {}

    def __init__(self, *args, **kw):
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} arguments")
        for name, value in zip(names, args):
            setattr(self, name, value)
        for name in names[len(args):]:
            if name in kw:
                setattr(self, name, kw.pop(name))
            elif name in self._defaults:
                setattr(self, name, self._defaults[name])
            else:
                raise TypeError(f"{type(self).__name__} needs {name!r}")
        if kw:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(kw))!r}")

    def __repr__(self):
        return f"{type(self).__name__}(" + ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self._fields) + ")"

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None


class Stop(_Record):
    """Why a run returned: ``kind`` is "exit" (``exit`` holds the typed exit), "debug_exit"
    (``value`` = what the guest wrote to the exit port), "deadline", "budget" or "kick".
    ``result``: for an "exit" that a handler (:meth:`RunLoop.on`) ended, what it returned."""
    __slots__ = _fields = ("kind", "exit", "value", "result")
    _defaults = {"exit": None, "value": None, "result": None}

    def __init__(self, kind: str, exit: Optional[Exit] = None, value: Optional[int] = None,
                 result: object = None):
        self.kind, self.exit, self.value, self.result = kind, exit, value, result


def exit_reason(reason: Union[str, int]) -> int:
    """An exit reason number from ``"IO"``, ``"KVM_EXIT_IO"`` or an int."""
    if isinstance(reason, int):
        return reason
    name = reason.upper()
    if name.startswith("KVM_EXIT_"):
        name = name[len("KVM_EXIT_"):]
    try:
        return abi.EXIT_REASONS[name]
    except KeyError:
        raise ValueError(f"unknown exit reason {reason!r}") from None


class MmioRecord(_Record):
    """One coalesced MMIO (or PIO) write: ``phys_addr``, ``len``, ``pio``, ``data``."""
    __slots__ = _fields = ("phys_addr", "len", "pio", "data")

    def __init__(self, phys_addr: int, len: int, pio: bool, data: bytes):
        self.phys_addr, self.len, self.pio, self.data = phys_addr, len, pio, data


class LoopConfig(_Record):
    """What a run loop serves and how much it keeps.

    Ports are x86 I/O port numbers (0 = none). ``uart_mmio_base`` serves the same 16550
    registers as MMIO (an ns16550a, as on QEMU's RISC-V ``virt`` machine; 0 = none). ``exit_port``/``exit_port_size`` give QEMU's
    isa-debug-exit range (``iobase=0xf4,iosize=4``: ports 0xf4–0xf7). ``console_cap`` and
    ``mmio_log_cap`` are the most the C loop's buffers grow to (bytes, records; they start
    small and double each time a run fills them); ``console_limit`` (bytes) and
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
    uart_irq: int = 0                # GSI the UART's interrupt drives (x86 COM1: 4), 0 = none
    uart_group: object = None        # a UartGroup: one UART for all the loops given it


class UartGroup:
    """One 16550 for every vCPU of a machine: give the same group to each loop's
    :class:`LoopConfig` (``uart_group``) and they share one register file and interrupt state
    (the C loop under a lock, as ``uart_owner``); without a group each loop has its own.

    The UART (csrc/runloop.c and :class:`PyRunLoop` alike): the transmitter is always empty;
    a THR-empty interrupt is pending after a THR write and when IER.THRI is turned on, and an IIR
    read reporting it (0x02) clears it; with ``uart_irq`` the interrupt output (IER.THRI and
    pending) drives that GSI through KVM_IRQ_LINE; in loopback (MCR bit 4) MSR mirrors MCR and
    THR bytes go to the receiver instead of the console (RBR returns them, LSR.DR; FIFOs off, a
    byte arriving while DR is set overwrites RBR and sets LSR.OE; FIFOs on, a 16-byte FIFO whose
    overflow is lost and sets LSR.OE; an LSR read clears OE); IIR reports receiver line status,
    received data (0x04 at the FIFO trigger level, the character timeout 0x0c below it) and THR
    empty, in that priority, with bits 7:6 set while the FIFOs are on (the 16550 data sheet,
    QEMU's serial.c). The C loops of a group write THR bytes to one buffer (in
    the order the vCPUs wrote them), which any of them drains when it returns to Python (the
    writer returns when the oldest byte has waited ``console_flush`` or the buffer is nearly
    full); :class:`PyRunLoop` emits each byte as it comes."""

    OUT_CAP = 1 << 12                 # bytes; the writer hands over well before it fills

    def __init__(self):
        self._owner = None            # the first native loop's struct (kept alive here)
        self._out = self._take = None
        self._drain_lock = threading.Lock()
        self.regs = bytearray(8)      # PyRunLoop's shared state
        self.dl = bytearray(2)
        self.thre = False
        self.rbr = 0                  # receiver buffer (FIFOs off)
        self.lsr = 0                  # LSR bits DR and OE (THRE, TEMT always read set)
        self.fcr = 0                  # FCR as kept: bits 0, 3, 7:6
        self.rx = collections.deque()  # receive FIFO (at most 16 bytes)
        self.level = 0
        self.lock = threading.Lock()

    def _join(self, l) -> int:
        """The address a native loop's ``uart_owner`` gets (0 for the first, the owner)."""
        if self._owner is None:
            self._owner = l
            self._out = nffi.new("uint8_t[]", self.OUT_CAP)
            self._take = nffi.new("uint8_t[]", self.OUT_CAP)
            l.uart_out, l.uart_out_cap = int(nffi.cast("uintptr_t", self._out)), self.OUT_CAP
            return 0
        return int(nffi.cast("uintptr_t", self._owner))

    def _drain(self, emit) -> None:
        """Hand the shared output written so far to ``emit``, in order (any loop's thread)."""
        if self._owner is None or not self._owner.uart_out_len:
            return
        with self._drain_lock:            # take and emit together: two drainers keep the order
            n = nlib.pykvm_uart_take(self._owner, self._take, self.OUT_CAP)
            if n:
                emit(bytes(nffi.buffer(self._take, n)))

    @property
    def dropped(self) -> int:
        """THR bytes the C loops' shared buffer had no room for."""
        return self._owner.uart_out_dropped if self._owner is not None else 0


LoopConfig._fields = tuple(LoopConfig.__annotations__)
LoopConfig._defaults = {n: getattr(LoopConfig, n) for n in LoopConfig._fields}


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
        self._handlers: Dict[int, Callable] = {}
        self._resume_mask = 0
        self._exits = ExitCache(vcpu)

    # -- exits handled without leaving the loop ------------------------------------------------
    def on(self, reason: Union[str, int], handler: Optional[Callable]) -> None:
        """Call ``handler(exit)`` for every exit of ``reason`` ("IO", "MMIO", "HLT", ... or a
        number) the loop does not serve itself: returning None resumes the guest, anything
        else ends the run with ``Stop("exit", exit, result=<that value>)``. What the handler
        raises ends the run and propagates from :meth:`run`. ``handler=None`` removes it.

        The exit object is only valid during the call (and, if the handler stops the run, until
        the next run); it is reused for later exits unless the handler keeps a reference."""
        n = exit_reason(reason)
        if not 0 <= n < 64:
            raise ValueError(f"exit reason {n} cannot be handled here (0..63)")
        if handler is None:
            self._handlers.pop(n, None)
        else:
            self._handlers[n] = handler
        self._update_masks()

    def resume(self, reason: Union[str, int], on: bool = True) -> None:
        """Count exits of ``reason`` and resume the guest at once, in the loop (e.g. "HLT"
        for a guest that halts between timer interrupts served by a device in Python)."""
        n = exit_reason(reason)
        if not 0 <= n < 64:
            raise ValueError(f"exit reason {n} cannot be resumed here (0..63)")
        self._resume_mask = (self._resume_mask | (1 << n)) if on else \
            (self._resume_mask & ~(1 << n))
        self._update_masks()

    def _update_masks(self) -> None:
        pass

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



# The loops inside pykvm_loop_run() now, by loop_id → (handlers, exit objects, vCPU, loop): the
# C loop's Python callback finds them here (registered for the duration of RunLoop.run() only, so
# nothing is kept alive by it).
_LOOPS: Dict[int, tuple] = {}
_next_id = iter(range(1, 1 << 31)).__next__


@nffi.def_extern(error=_CB_STOP)
def pykvm_py_exit(loop_id, reason, info, a, b):
    """Called by the C loop (GIL held) for an exit in its callback_mask, with the exit's fields
    decoded (see py_exit() in csrc/runloop.c): find the handler, fill a reused exit object, call
    the handler, tell C what to do. Kept in one function: this runs for every such exit."""
    try:
        handlers, objs, v, loop = _LOOPS[loop_id]
    except KeyError:
        return _CB_STOP_EXIT
    try:
        if info & 0x80000000:
            loop._drain()                  # the handler sees the console up to its exit
        h = handlers.get(reason)
        if h is None:
            return _CB_STOP_EXIT
        ex = objs.get(reason)
        if ex is None or _refs(ex) > 3:    # kept by someone: leave it, use a new one
            ex = objs[reason] = new_exit(v, reason)
        ex._seq = v.run_seq
        ex._info = info
        ex._a = a
        ex._b = b
        r = h(ex)
        if r is not None:
            loop._result, loop._last_exit = r, ex
            return _CB_STOP_EXIT
        if v._closing:
            return _CB_STOP
        v.run_seq += 1                     # the exit is gone once the guest runs again
        return _CB_RESUME
    except BaseException as e:             # handler errors, KeyboardInterrupt: run() raises
        loop._error = e
        return _CB_STOP


class RunLoop(_LoopBase):
    """The C run loop. ``run()`` returns a :class:`Stop`."""

    native = True

    def __init__(self, vcpu, config=None, on_console=None, on_mmio=None):
        super().__init__(vcpu, config, on_console, on_mmio)
        c = self.config
        self._l = nffi.new("struct pykvm_loop *")
        # The buffers start small (an idle machine stays small) and grow when a run fills them.
        self._console_buf = _new_buffer("uint8_t[]", max(1, min(c.console_cap, _CONSOLE_START)))
        self._mmio_buf = _new_buffer("struct pykvm_mmio_record[]",
                                     max(1, min(c.mmio_log_cap, _MMIO_LOG_START)))
        self._id = _next_id()
        self._error = None
        self._result = None
        self._last_exit = None
        self._grow = None             # (console full, MMIO log full) after the last C return
        l = self._l
        l.loop_id = self._id
        l.vcpu_fd = vcpu.fd
        l.run_size = vcpu.run_size
        l.run = vcpu.run_addr
        l.ring, l.ring_entries = _ring_address(vcpu)
        l.console = int(nffi.cast("uintptr_t", self._console_buf))
        l.console_cap = len(self._console_buf)
        l.console_flush_ns = int(c.console_flush * 1e9) if on_console else 0
        l.serial_base, l.debugcon_port, l.exit_port = c.serial_base, c.debugcon_port, c.exit_port
        l.exit_port_size = c.exit_port_size if c.exit_port else 0
        l.sbi_console = 1 if c.sbi_console else 0
        l.uart_mmio_base, l.uart_mmio_shift = c.uart_mmio_base, c.uart_mmio_shift
        l.uart_irq, l.uart_irq_fd = (c.uart_irq, vcpu.vm.fd) if c.uart_irq else (0, -1)
        self._ugroup = c.uart_group
        if c.uart_group is not None:
            l.uart_owner = c.uart_group._join(l)
        regions = list(c.ram)[:nlib.PYKVM_MAX_RAM]
        l.nram = len(regions)
        for i, (gpa, host, size) in enumerate(regions):
            l.ram[i].gpa, l.ram[i].host, l.ram[i].size = gpa, host, size
        l.mmio_log = int(nffi.cast("uintptr_t", self._mmio_buf))
        l.mmio_log_cap = len(self._mmio_buf)
        nlib.pykvm_kick_signal()

    @property
    def counts(self) -> Dict[str, int]:
        """Exits seen by this loop, by reason name."""
        return {abi.EXIT_NAMES.get(i, f"EXIT_{i}"): self._l.counts[i]
                for i in range(nlib.PYKVM_MAX_EXIT_REASON) if self._l.counts[i]}

    @property
    def exits_total(self) -> int:
        """Exits this loop has seen (served in C, by handlers, or returned)."""
        return self._l.exits_total

    @property
    def handled_in_c(self) -> int:
        """Exits the C loop served or resumed itself."""
        return self._l.handled_in_c

    @property
    def handled_in_python(self) -> int:
        """Exits a handler (:meth:`on`) resumed from inside the loop."""
        return self._l.handled_in_py

    def _update_masks(self) -> None:
        mask = 0
        for n in self._handlers:
            mask |= 1 << n
        self._l.callback_mask = mask
        self._l.resume_mask = self._resume_mask

    def _grow_buffers(self) -> None:
        """After a run that filled a buffer (drained since): double it, up to the config's cap."""
        l, c = self._l, self.config
        console_full, mmio_full = self._grow
        self._grow = None
        if console_full and l.console_cap < c.console_cap and not l.console_len:
            self._console_buf = _new_buffer("uint8_t[]", min(c.console_cap, 2 * l.console_cap))
            l.console = int(nffi.cast("uintptr_t", self._console_buf))
            l.console_cap = len(self._console_buf)
        if mmio_full and l.mmio_log_cap < c.mmio_log_cap and not l.mmio_log_len:
            self._mmio_buf = _new_buffer("struct pykvm_mmio_record[]",
                                         min(c.mmio_log_cap, 2 * l.mmio_log_cap))
            l.mmio_log = int(nffi.cast("uintptr_t", self._mmio_buf))
            l.mmio_log_cap = len(self._mmio_buf)

    def _drain(self) -> None:
        n = self._l.console_len
        if n:
            self._emit(bytes(nffi.buffer(self._console_buf, n)))
            self._l.console_len = 0
        if self._ugroup is not None:
            self._ugroup._drain(self._emit)
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
        _LOOPS[self._id] = (self._handlers, self._exits._by_reason, v, self)   # until it ends
        try:
            l.deadline_ns = int(deadline * 1e9) if deadline else 0
            l.budget = budget if budget > 0 else -1
            while True:
                if v._closing:
                    return Stop("kick")
                v.run_seq += 1
                r = nlib.pykvm_loop_run(l)
                if self._ugroup is not None:
                    self._ugroup._drain(self._emit)
                if l.console_len or l.mmio_log_len:
                    if r in _STOP_FULL:
                        self._grow = (l.console_len >= l.console_cap,
                                      l.mmio_log_len >= l.mmio_log_cap)
                    self._drain()
                if r == _STOP_EXIT:
                    ex, self._last_exit = self._last_exit, None
                    result, self._result = self._result, None
                    if ex is None:
                        ex = self._exits.get(v.run_struct.exit_reason)
                    return Stop("exit", ex, result=result)
                if r in _STOP_AGAIN:
                    if self._grow is not None:
                        self._grow_buffers()
                    continue                       # Python got to run signal handlers; go on
                if r == _STOP_CALLBACK:
                    err, self._error = self._error, None
                    if err is not None:
                        raise err
                    return Stop("kick")            # the vCPU was closed from a handler
                if r < 0:
                    raise kvm_run_error(v, -r)
                if r == nlib.PYKVM_STOP_BAD_EXIT:
                    raise GuestError("kvm_run described an I/O outside the shared page")
                if r == nlib.PYKVM_STOP_DEBUG_EXIT:
                    return Stop("debug_exit", value=l.exit_value)
                return Stop(STOP_NAMES[r])
        finally:
            _LOOPS.pop(self._id, None)
            self._last_exit = self._result = self._error = None
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

    def clear_kick(self) -> None:
        """Withdraw a kick that no run has taken yet (the next ``run()`` then runs the guest).
        For the owner of the loop, between runs. Raises :class:`~pykvm.errors.Closed` once
        the vCPU is closed."""
        if self.vcpu._closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        self._l.kick = 0
        self.vcpu.run_struct.immediate_exit = 0


class PyRunLoop(_LoopBase):
    """The same loop in Python (one ``Vcpu.run()`` per exit). For comparison and debugging."""

    native = False
    _UART_LSR = 0x60

    def __init__(self, vcpu, config=None, on_console=None, on_mmio=None):
        super().__init__(vcpu, config, on_console, on_mmio)
        self._counts: Dict[str, int] = {}
        self.exits_total = 0
        self.handled_in_c = 0
        self.handled_in_python = 0
        self._ug = self.config.uart_group or UartGroup()   # the UART state (shared or own)
        self._kick = threading.Event()
        self._ring, self._ring_entries = _ring_address(vcpu)

    @property
    def counts(self) -> Dict[str, int]:
        """Exits seen by this loop, by reason name."""
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
            # QEMU's serial_io_ops: 1-byte registers; a wider access is one access per byte at
            # consecutive registers, the register number taken mod 8 (serial_ioport_*: addr & 7)
            reg, size = port - c.serial_base, ex.size
            if out:
                data = ex.data
                for i in range(ex.count):
                    for j in range(size):
                        self._uart_write((reg + j) & 7, data[i * size + j])
            else:
                ex.respond(bytes(self._uart_read((reg + j) & 7)
                                 for _ in range(ex.count) for j in range(size)))
            return None
        return Stop("exit", ex)

    # the 16550 register file, shared by the port UART and the MMIO one (as in csrc/runloop.c;
    # see UartGroup)
    _UART_TRIGGER = (1, 4, 8, 14)

    def _uart_iir(self, u) -> int:
        ier, fe = u.regs[1], u.fcr & 0x01
        if ier & 0x04 and u.lsr & 0x1E:
            iid = 0x06                                  # receiver line status
        elif ier & 0x01 and u.lsr & 0x01:
            iid = 0x0C if fe and len(u.rx) < self._UART_TRIGGER[u.fcr >> 6] else 0x04
        elif ier & 0x02 and u.thre:
            iid = 0x02
        else:
            iid = 0x01
        return iid | (0xC0 if fe else 0)

    def _uart_irq(self, u) -> None:
        level = 0 if self._uart_iir(u) & 0x01 else 1
        if self.config.uart_irq and level != u.level:
            u.level = level
            self.vcpu.vm.irq_line(self.config.uart_irq, level)

    def _uart_receive(self, u, b: int) -> None:
        if u.fcr & 0x01:
            if len(u.rx) >= 16:
                u.lsr |= 0x02                           # overrun: the byte is lost
            else:
                u.rx.append(b)
        else:
            if u.lsr & 0x01:
                u.lsr |= 0x02                           # overrun: RBR overwritten
            u.rbr = b
        u.lsr |= 0x01

    def _uart_write(self, reg: int, b: int) -> None:
        u = self._ug
        with u.lock:
            if u.regs[3] & 0x80 and reg <= 1:
                u.dl[reg] = b
            elif reg == 0:
                if u.regs[4] & 0x10:                    # loopback: to the receiver
                    self._uart_receive(u, b)
                else:
                    self._emit(bytes([b]))
                u.thre = True
            elif reg == 1:
                if (b ^ u.regs[1]) & 0x02:
                    u.thre = bool(b & 0x02)
                u.regs[1] = b & 0x0F
            elif reg == 2:                              # FCR
                if (b ^ u.fcr) & 0x01:
                    b |= 0x06                           # FIFOs flushed on enable/disable
                if b & 0x02:
                    u.lsr &= ~0x01
                    u.rx.clear()
                if b & 0x04:
                    u.thre = True
                u.fcr = b & 0xC9
            elif reg == 4:
                u.regs[4] = b & 0x1F
            elif reg not in (5, 6):
                u.regs[reg] = b
            self._uart_irq(u)

    def _uart_read(self, reg: int) -> int:
        u = self._ug
        with u.lock:
            if u.regs[3] & 0x80 and reg <= 1:
                return u.dl[reg]
            if reg == 0:
                if u.fcr & 0x01:
                    v = u.rx.popleft() if u.rx else 0
                    if not u.rx:
                        u.lsr &= ~0x01
                else:
                    v = u.rbr
                    u.lsr &= ~0x01
                self._uart_irq(u)
                return v
            if reg == 2:
                v = self._uart_iir(u)
                if v & 0x0F == 0x02:
                    u.thre = False
                    self._uart_irq(u)
                return v
            if reg == 5:
                v = u.lsr | self._UART_LSR
                if u.lsr & 0x1E:
                    u.lsr &= ~0x1E                      # OE clears when read
                    self._uart_irq(u)
                return v
            if reg == 6:
                mcr = u.regs[4]
                if mcr & 0x10:
                    return ((mcr & 1) << 5) | ((mcr & 2) << 3) | ((mcr & 4) << 4) | ((mcr & 8) << 4)
                return 0xB0
            return u.regs[reg]

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
                # the timer only interrupts KVM_RUN; the loop itself sees the deadline pass
                # (so a timer firing as the run ends leaves no kick behind for the next run)
                timer = threading.Timer(max(0.0, deadline - time.monotonic()),
                                        v._kick_thread)
                timer.daemon = True
                try:
                    timer.start()
                except RuntimeError as e:      # "can't start new thread"
                    raise HostResourceError(f"cannot start the deadline timer thread of vCPU "
                                            f"{v.id}: {e}", "threads") from e
            left = budget
            while True:
                if v._closing:
                    return Stop("kick")
                if self._kick.is_set():
                    self._kick.clear()
                    return Stop("kick")
                if deadline and time.monotonic() >= deadline:
                    return Stop("deadline")
                ex = v.run()
                self.exits_total += 1
                self._counts[ex.name] = self._counts.get(ex.name, 0) + 1
                self._drain_ring()
                if ex.reason == abi.EXIT_REASONS["IO"]:
                    stop = self._serve_io(ex)
                    if stop is not None and stop.kind == "exit":
                        stop = self._unserved(ex)
                    if stop is not None:
                        return stop
                elif ex.reason == abi.EXIT_REASONS["MMIO"] and self.config.uart_mmio_base:
                    if not self._serve_uart_mmio(ex):
                        stop = self._unserved(ex)
                        if stop is not None:
                            return stop
                elif ex.reason != abi.EXIT_REASONS["INTR"]:
                    stop = self._unserved(ex)
                    if stop is not None:
                        return stop
                if budget:
                    left -= 1
                    if left == 0:
                        return Stop("budget")
        finally:
            if timer:
                timer.cancel()
                timer.join()                   # its kick, if it fired, has landed
            v.run_struct.immediate_exit = 0    # not meant for the next run (as in C)
            v._leave_run()

    def _unserved(self, ex) -> Optional[Stop]:
        """An exit the loop does not serve: resumed (resume()), given to a handler (on()), or
        the end of the run."""
        n = ex._reason
        if 0 <= n < 64 and (self._resume_mask >> n) & 1:
            self.handled_in_c += 1
            return None
        h = self._handlers.get(n)
        if h is None:
            return Stop("exit", ex)
        r = h(ex)
        if r is not None:
            return Stop("exit", ex, result=r)
        self.handled_in_python += 1
        return None

    def _kick_internal(self) -> None:
        self._kick.set()
        self.vcpu._kick_thread()

    def kick(self) -> None:
        """Stop a running ``run()`` (or the next one) from any thread. Raises
        :class:`~pykvm.errors.Closed` once the vCPU is closed."""
        if self.vcpu._closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        self._kick_internal()

    def clear_kick(self) -> None:
        """As :meth:`RunLoop.clear_kick`."""
        if self.vcpu._closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        self._kick.clear()
        self.vcpu.run_struct.immediate_exit = 0


def make_loop(vcpu, *, native: bool = True, **kw):
    """A :class:`RunLoop` (C) or :class:`PyRunLoop` (Python) for ``vcpu``."""
    return (RunLoop if native else PyRunLoop)(vcpu, **kw)
