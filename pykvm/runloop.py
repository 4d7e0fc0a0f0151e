"""Run a vCPU until something Python must handle.

:class:`RunLoop` drives a vCPU through the C helper (``pykvm._native``): the ports and windows
its :class:`LoopConfig` names (a 16550, as port I/O or as MMIO, a debug console port, an
isa-debug-exit range), the SBI debug console, coalesced-MMIO drains, exit counting, a deadline
and an exit budget are all served in C with the GIL released. The loop knows no machine: a
platform says which ports and addresses it serves (the default config serves none).

Exit handlers in Python (:meth:`RunLoop.on`) are called from inside the C loop
(``run_handlers`` in csrc/pyexit.c, through the CPython C API: the GIL is taken back for the
handler only, and no Python code but the handler runs for an exit): the loop stays in C between
exits (no teardown, no new deadline timer, no return through :meth:`RunLoop.run`), and each
handler gets a reused exit object (:class:`~pykvm.exits.ExitCache`), filled in C, that reads only
the fields it asks for.
:meth:`RunLoop.resume` makes the C loop count and resume an exit (e.g. HLT) without Python.

There is one 16550 model, the C one (csrc/runloop.c): :class:`UartGroup` holds one UART's state
for every loop given it, and :class:`pykvm.devices.uart16550.Uart16550` reaches that same state
from Python (the reference loop in :mod:`pykvm.testing.reference_loop` serves the UART through
it). Console output is kept by :class:`ConsoleBuffer`.
"""
from __future__ import annotations

import mmap
import threading

from . import abi
from ._record import Record as _Record
from ._native import ffi as nffi, lib as nlib
from .abi import ffi
from .errors import Busy, Closed, GuestError
from ._loopstate import run_handlers as _run_handlers
from .exits import Exit, ExitCache, kvm_run_error, new_exit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Tuple, Union

    from .abi import CData

_STOP_EXIT = nlib.PYKVM_STOP_EXIT
_EXIT_IO = abi.EXIT_REASONS["IO"]
_EXIT_MMIO = abi.EXIT_REASONS["MMIO"]
_EXIT_SBI = abi.EXIT_REASONS["RISCV_SBI"]
_STOP_CALLBACK = nlib.PYKVM_STOP_CALLBACK
_STOP_AGAIN = (nlib.PYKVM_STOP_CONSOLE_FULL, nlib.PYKVM_STOP_MMIO_LOG_FULL, nlib.PYKVM_STOP_SIGNAL)
_STOP_FULL = (nlib.PYKVM_STOP_CONSOLE_FULL, nlib.PYKVM_STOP_MMIO_LOG_FULL)
_CONSOLE_START = 256          # bytes and records the C loop's buffers start with
_MMIO_LOG_START = 8
# buffers the C loop fills: not cleared when allocated (pages the loop never writes stay
# untouched, which keeps an idle Machine small)
_new_buffer = nffi.new_allocator(should_clear_after_alloc=False)

STOP_NAMES = {
    nlib.PYKVM_STOP_EXIT: "exit", nlib.PYKVM_STOP_DEBUG_EXIT: "debug_exit",
    nlib.PYKVM_STOP_DEADLINE: "deadline", nlib.PYKVM_STOP_BUDGET: "budget",
    nlib.PYKVM_STOP_KICK: "kick",
}


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
    """An exit reason number from ``"IO"``, ``"KVM_EXIT_IO"`` (any case) or an int. Raises
    ValueError for an unknown name, TypeError for anything but a str or an int."""
    if isinstance(reason, bool) or not isinstance(reason, (int, str)):
        raise TypeError(f"an exit reason is a name or a number, not {reason!r}")
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
    """What a run loop serves and how much it keeps. The defaults serve nothing: a platform
    names its ports and windows (the PC: ``serial_base=0x3F8, debugcon_port=0xE9,
    exit_port=0xF4, exit_port_size=4``; RISC-V virt: ``uart_mmio_base=0x10000000``).

    ``serial_base``: first of the 16550's eight I/O ports (0 = none). ``debugcon_port``: a
    Bochs/QEMU debug console port (writes are console bytes, reads return 0xE9; 0 = none).
    ``exit_port``/``exit_port_size``: QEMU's isa-debug-exit range (``iobase=0xf4,iosize=4``:
    ports 0xf4–0xf7; 0 = none). ``uart_mmio_base`` serves the same 16550 registers as MMIO (an
    ns16550a, as on QEMU's RISC-V ``virt`` machine; 0 = none). ``console_cap`` and
    ``mmio_log_cap`` are the most the C loop's buffers grow to (bytes, records; they start
    small and double each time a run fills them); ``console_limit`` (bytes) and
    ``mmio_log_limit`` (records) cap what the loop *retains* in :attr:`console` and
    :attr:`mmio_log` — older console bytes and newer MMIO records beyond them are counted in
    ``console_dropped``/``mmio_dropped`` and still streamed to ``on_console``/``on_mmio``.
    ``report_port`` (x86) and ``report_sbi_eid`` (RISC-V): pykvm's guest-report port and SBI
    extension (docs/guest-abi.md; 0 = none): those exits are never given to a handler of
    :meth:`RunLoop.on`, :meth:`RunLoop.run` returns them, so that the caller sees guest
    reports first. ``vmmio``: virtio-mmio windows' interrupt state kept in C
    (:class:`pykvm.devices.virtio.fastpath.MmioLine`, anything with an ``address``): the loop
    answers their 32-bit InterruptStatus reads and InterruptACK writes itself."""
    serial_base: int = 0             # 16550 base port (PC COM1: 0x3F8), 0 = none
    debugcon_port: int = 0           # debug console port (PC: 0xE9), 0 = none
    exit_port: int = 0               # isa-debug-exit first port (PC: 0xF4), 0 = none
    exit_port_size: int = 4          # ports in the isa-debug-exit range
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
    report_port: int = 0             # x86: guest-report port (0x1000), never a handler's
    report_sbi_eid: int = 0          # RISC-V: guest-report SBI extension, never a handler's
    vmmio: tuple = ()                # virtio-mmio lines (MmioLine) whose InterruptStatus and
                                     # InterruptACK the C loop serves (at most PYKVM_MAX_VMMIO)


class UartGroup:
    """One 16550 for every vCPU of a machine: give the same group to each loop's
    :class:`LoopConfig` (``uart_group``) and they share one register file, receiver and
    interrupt state; without a group each :class:`RunLoop` has its own UART.

    The state is a ``struct pykvm_loop`` of the group's own (:attr:`state`, used for nothing
    but the UART) that the C loops reach through ``uart_owner`` and Python code through
    :class:`~pykvm.devices.uart16550.Uart16550` (``pykvm_uart_access``), always under the
    UART's lock: the model is the C one (csrc/runloop.c), whose register behaviour
    :class:`~pykvm.devices.uart16550.Uart16550` documents. THR bytes go to one buffer of
    :data:`OUT_CAP` bytes in the order the vCPUs wrote them; a loop drains it whenever it
    returns to Python (a C writer returns when the oldest byte has waited ``console_flush`` or
    the buffer is nearly full); bytes finding it full are counted in :attr:`dropped`. The first
    loop that joins with a ``uart_irq`` connects the UART's interrupt output to that GSI of its
    VM (KVM_IRQ_LINE).

    Host input (:meth:`feed`, the console's keyboard) waits in a ring of :data:`IN_CAP` bytes and
    moves into the receiver (its 16-byte FIFO, or RBR with the FIFOs off) as the guest reads RBR,
    so nothing the ring accepted is lost or reordered, whatever the guest's pace."""

    OUT_CAP = 1 << 12                 # bytes; the writer hands over well before it fills
    IN_CAP = 1 << 12                  # bytes of host input waiting for the guest

    def __init__(self):
        self.state = nffi.new("struct pykvm_loop *")   # the UART alone (no vCPU, no buffers)
        # not cleared: the C writer fills it from the start and nothing reads past what it
        # wrote, so a machine whose guest never writes to the UART keeps none of it resident
        self._out = _new_buffer("uint8_t[]", self.OUT_CAP)
        self._take: Optional[CData] = None          # made by the first drain with output
        self.state.uart_out = int(nffi.cast("uintptr_t", self._out))
        self.state.uart_out_cap = self.OUT_CAP
        self.state.uart_irq_fd = -1
        self._in: Optional[CData] = None            # the input ring, made by the first feed
        self._drain_lock = threading.Lock()           # also guards the input ring's making

    @property
    def address(self) -> int:
        """The address of :attr:`state` (what a loop's ``uart_owner`` holds)."""
        return int(nffi.cast("uintptr_t", self.state))

    def connect_irq(self, vm, gsi: int) -> None:
        """Drive ``gsi`` of ``vm`` (:class:`~pykvm.vm.Vm`, KVM_IRQ_LINE) from the UART's
        interrupt output, unless a line is connected already (0 = none: nothing changes)."""
        s = self.state
        if gsi and not s.uart_irq:
            s.uart_irq_fd = vm.fd
            s.uart_irq = gsi

    def drain(self, emit: Callable[[bytes], None]) -> None:
        """Hand the THR output written so far to ``emit``, in order (any thread)."""
        if not self.state.uart_out_len:
            return
        with self._drain_lock:            # take and emit together: two drainers keep the order
            if self._take is None:
                self._take = _new_buffer("uint8_t[]", self.OUT_CAP)
            n = nlib.pykvm_uart_take(self.state, self._take, self.OUT_CAP)
            if n:
                emit(bytes(nffi.buffer(self._take, n)))


    @property
    def dropped(self) -> int:
        """THR bytes the shared output buffer had no room for."""
        return self.state.uart_out_dropped

    def feed(self, data: bytes) -> int:
        """Host input for the UART's receiver (``bytes``, ``bytearray`` or ``memoryview``):
        as much of ``data`` as the input ring has room for (:data:`IN_CAP` bytes less what still
        waits) is taken, in order, and moved into the receiver as it has room, raising the
        received-data interrupt as the guest's IER asks (``pykvm_uart_input`` in
        csrc/runloop.c). Returns the bytes taken, from 0 (the ring is full: call again once the
        guest has read some) to ``len(data)``; never blocks. Any thread, while vCPUs run.
        Raises TypeError for a ``str`` or other non-buffer."""
        if isinstance(data, str):
            raise TypeError("UART input is bytes, not str (encode it first)")
        view = memoryview(data).cast("B")
        if not len(view):
            return 0
        if self._in is None:
            with self._drain_lock:
                if self._in is None:
                    # not cleared: C reads only what it wrote; made here, not at start-up, so a
                    # machine nobody types into keeps none of it. The size is stored before
                    # the address, which is what tells the C side the ring exists
                    ring = _new_buffer("uint8_t[]", self.IN_CAP)
                    self.state.uart_in_cap = self.IN_CAP
                    self.state.uart_in = int(nffi.cast("uintptr_t", ring))
                    self._in = ring
        return nlib.pykvm_uart_input(self.state, nffi.from_buffer("uint8_t[]", view),
                                     len(view))

    @property
    def input_waiting(self) -> int:
        """Bytes of host input the guest has not yet taken into its receiver."""
        return self.state.uart_in_len

    @property
    def input_delivered(self) -> int:
        """Bytes of host input moved into the receiver so far."""
        return self.state.uart_in_delivered


class ConsoleWatch:
    """An ``on_console`` callback (``Machine(on_console=...)``) that notices ``text`` (bytes,
    or str taken as UTF-8) in console output given in pieces of any size: the text may
    straddle two or more pieces. The first time it appears, :attr:`hit` (a
    :class:`threading.Event`) is set and ``then()``, if given, is called once, in the thread
    that passed the bytes (a vCPU thread: ``then`` must not wait for the run, though it may
    call :meth:`pykvm.machine.Machine.stop`). Keeps ``len(text) - 1`` bytes between pieces.
    Thread-safe. Raises ValueError for an empty ``text``, TypeError for a ``text`` or a piece
    that is not str/bytes (a piece: bytes-like only)."""

    __slots__ = ("text", "then", "hit", "_tail", "_lock")

    def __init__(self, text: Union[str, bytes], then: Optional[Callable[[], None]] = None):
        if isinstance(text, str):
            self.text = text.encode()
        elif isinstance(text, (bytes, bytearray, memoryview)):
            self.text = bytes(text)
        else:
            raise TypeError(f"ConsoleWatch looks for str or bytes, not {type(text).__name__}")
        if not self.text:
            raise ValueError("ConsoleWatch needs a non-empty text to look for")
        if then is not None and not callable(then):
            raise TypeError(f"ConsoleWatch's then must be callable or None, not {then!r}")
        self.then = then
        self.hit = threading.Event()
        self._tail = b""
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"console output is bytes, not {type(data).__name__}")
        with self._lock:
            if self.hit.is_set():
                return
            seen = self._tail + bytes(data)
            found = self.text in seen
            if found:
                self.hit.set()
            self._tail = seen[-(len(self.text) - 1):] if len(self.text) > 1 else b""
        if found and self.then is not None:
            self.then()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) for the text; whether it came."""
        return self.hit.wait(timeout)


class ConsoleBuffer:
    """Console output as a machine or a run loop keeps it: the last ``limit`` bytes
    (:attr:`data`), a count of older bytes no longer held (:attr:`dropped`), and an optional
    ``on_data(bytes)`` callback that sees every byte, kept or not.

    :meth:`append` is thread-safe (vCPU threads append concurrently) and amortised O(1) per byte:
    the buffer grows to at most ``2 * limit`` bytes (plus one append) before the oldest bytes
    are cut off in one step. ``limit <= 0`` keeps nothing. ``on_data`` is called after the
    bytes are kept, outside the lock, in the appending thread; what it raises propagates to the
    caller of :meth:`append`."""

    __slots__ = ("limit", "on_data", "_buf", "_total", "_lock")

    def __init__(self, limit: int = 1 << 20, on_data: Optional[Callable[[bytes], None]] = None):
        self.limit = limit
        self.on_data = on_data
        self._buf = bytearray()
        self._total = 0
        self._lock = threading.Lock()

    def append(self, data: bytes) -> None:
        """Keep ``data`` (bytes-like) and stream it to ``on_data``."""
        if not data:
            return
        data = bytes(data)
        with self._lock:
            self._total += len(data)
            limit = self.limit
            if limit > 0:
                self._buf += data
                if len(self._buf) > 2 * limit:
                    del self._buf[:len(self._buf) - limit]
            elif self._buf:
                self._buf.clear()
        cb = self.on_data
        if cb is not None:
            cb(data)

    @property
    def data(self) -> bytes:
        """The last ``limit`` bytes appended."""
        with self._lock:
            limit = self.limit
            return bytes(self._buf[-limit:]) if limit > 0 else b""

    @property
    def total(self) -> int:
        """Bytes appended since creation (or :meth:`clear`)."""
        return self._total

    @property
    def dropped(self) -> int:
        """Bytes appended that :attr:`data` no longer holds."""
        with self._lock:
            return self._total - min(len(self._buf), max(self.limit, 0))

    @property
    def held(self) -> int:
        """Bytes held in memory now (at most ``2 * limit`` after an append of at most
        ``limit`` bytes)."""
        return len(self._buf)

    def clear(self) -> None:
        """Forget everything (data and counts)."""
        with self._lock:
            self._buf.clear()
            self._total = 0

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"ConsoleBuffer(limit={self.limit}, total={self._total})"


LoopConfig._fields = tuple(LoopConfig.__annotations__)
LoopConfig._defaults = {n: getattr(LoopConfig, n) for n in LoopConfig._fields}


def coalesced_ring(vcpu):
    """Host address and entry count of ``vcpu``'s coalesced-MMIO ring page (the page at
    KVM_COALESCED_MMIO_PAGE_OFFSET of its kvm_run mapping), or ``(0, 0)`` if KVM offers none."""
    if not vcpu.vm.kvm.check_extension("COALESCED_MMIO"):
        return 0, 0
    page = mmap.PAGESIZE
    off = abi.arch.COALESCED_MMIO_PAGE_OFFSET * page
    if vcpu.run_size < off + page:
        return 0, 0
    entries = (page - 8) // ffi.sizeof("struct kvm_coalesced_mmio")
    return vcpu.run_addr + off, entries


class LoopBase:
    """What every run loop shares: the configuration, exit handlers (:meth:`on`), resumed
    exits (:meth:`resume`), the console (:attr:`console_buffer`) and the coalesced-MMIO log.
    Subclasses: :class:`RunLoop` (C) and the reference loop of :mod:`pykvm.testing`."""

    def __init__(self, vcpu, config: Optional[LoopConfig] = None,
                 on_console: Optional[Callable[[bytes], None]] = None,
                 on_mmio: Optional[Callable[[MmioRecord], None]] = None):
        self.vcpu = vcpu
        self.config = config or LoopConfig()
        self.on_mmio = on_mmio
        self.console_buffer = ConsoleBuffer(self.config.console_limit, on_console)
        self.mmio_log: List[MmioRecord] = []
        self.mmio_dropped = 0             # coalesced records seen beyond mmio_log_limit
        # handlers by exit reason (None: no handler), as the C loop reads them; made by the
        # first on() (a loop without handlers keeps no per-loop list)
        self._handlers: Optional[List[Optional[Callable]]] = None
        self._resume_mask = 0
        self._exits = ExitCache(vcpu)
        self._guard: Tuple[Tuple[int, int], ...] = ()
        self.failed_exit: Optional[Exit] = None

    # -- exits handled without leaving the loop ------------------------------------------------
    def on(self, reason: Union[str, int], handler: Optional[Callable]) -> None:
        """Call ``handler(exit)`` for every exit of ``reason`` ("IO", "MMIO", "HLT", ... or a
        number) the loop does not serve itself: returning None resumes the guest, anything
        else ends the run with ``Stop("exit", exit, result=<that value>)``. What the handler
        raises ends the run and propagates from :meth:`run` (:attr:`failed_exit` is then that
        exit). ``handler=None`` removes it. Guest reports (``LoopConfig.report_port``,
        ``report_sbi_eid``) and MMIO exits in guarded RAM (:meth:`guard_ram`) never reach a
        handler: :meth:`run` returns them.

        The exit object is only valid during the call (and, if the handler stops the run, until
        the next run); it is reused for later exits unless the handler keeps a reference."""
        n = exit_reason(reason)
        if not 0 <= n < 64:
            raise ValueError(f"exit reason {n} cannot be handled here (0..63)")
        if handler is not None and not callable(handler):
            raise TypeError(f"an exit handler must be callable or None, not {handler!r}")
        if self._handlers is None:
            self._handlers = [None] * 64
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

    def guard_ram(self, ranges) -> None:
        """Never give a handler of :meth:`on` an MMIO exit inside these guest-physical ranges
        (``(gpa, size)`` pairs, bytes): :meth:`run` returns it. KVM exits for guest RAM only
        when the host could not back the page, which is the caller's to report, not a device
        access. More than ``PYKVM_MAX_GUARD`` (4) ranges are merged into covering ones (what
        falls between them is returned too). Raises ValueError for a negative or empty range."""
        rs = sorted((int(g), int(n)) for g, n in ranges)
        for g, n in rs:
            if g < 0 or n <= 0 or n >= 1 << 64 or g + n > 1 << 64:
                raise ValueError(f"bad guest RAM range gpa={g:#x} size={n:#x}")
        merged: List[List[int]] = []
        for g, n in rs:
            if merged and g <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], g + n)
            else:
                merged.append([g, g + n])
        while len(merged) > nlib.PYKVM_MAX_GUARD:   # close the smallest gap
            i = min(range(len(merged) - 1), key=lambda k: merged[k + 1][0] - merged[k][1])
            merged[i][1] = merged[i + 1][1]
            del merged[i + 1]
        # a merged range can reach 2**64; its size is kept below (the last byte left out)
        self._guard = tuple((lo, min(hi - lo, (1 << 64) - 1)) for lo, hi in merged)
        self._update_masks()

    def _handler_may_serve(self, ex: Exit) -> bool:
        """Whether an exit may go to its handler (see :meth:`guard_ram` and
        ``LoopConfig.report_port``); the C loop decides the same in handler_may_serve()."""
        r, c = ex.reason, self.config
        if r == _EXIT_IO:
            return not c.report_port or ex.port != c.report_port
        if r == _EXIT_MMIO:
            a = ex.phys_addr
            return not any(0 <= a - g < n for g, n in self._guard)
        if r == _EXIT_SBI:
            return not c.report_sbi_eid or ex.extension_id != c.report_sbi_eid
        return True

    @property
    def on_console(self) -> Optional[Callable[[bytes], None]]:
        """Called with every console byte string the guest writes (or None)."""
        return self.console_buffer.on_data

    @on_console.setter
    def on_console(self, fn: Optional[Callable[[bytes], None]]) -> None:
        self.console_buffer.on_data = fn

    @property
    def console(self) -> bytes:
        """The last ``config.console_limit`` bytes of console output (bytes)."""
        return self.console_buffer.data

    @property
    def console_dropped(self) -> int:
        """Console bytes seen that :attr:`console` no longer holds."""
        return self.console_buffer.dropped

    def _emit(self, data: bytes) -> None:
        self.console_buffer.append(data)

    def _record_mmio(self, rec: "MmioRecord") -> None:
        if len(self.mmio_log) < self.config.mmio_log_limit:
            self.mmio_log.append(rec)
        else:
            self.mmio_dropped += 1
        if self.on_mmio:
            self.on_mmio(rec)



# what the C loop gets for a loop that never had a handler (it reads it only to call one)
_NO_SLOTS: List[None] = [None] * 64


class RunLoop(LoopBase):
    """The C run loop. ``run()`` returns a :class:`Stop`."""

    native = True

    def __init__(self, vcpu, config=None, on_console=None, on_mmio=None):
        super().__init__(vcpu, config, on_console, on_mmio)
        c = self.config
        self._l = nffi.new("struct pykvm_loop *")
        self._address = int(nffi.cast("uintptr_t", self._l))      # what run_handlers takes
        # The buffers start small (an idle machine stays small) and grow when a run fills them.
        self._console_buf = _new_buffer("uint8_t[]", max(1, min(c.console_cap, _CONSOLE_START)))
        self._mmio_buf = _new_buffer("struct pykvm_mmio_record[]",
                                     max(1, min(c.mmio_log_cap, _MMIO_LOG_START)))
        self._error = None
        self._exit_slots: Optional[List[Optional[Exit]]] = None   # handlers' exits, by reason
        self._result = None
        self._last_exit = None
        self._grow = None             # (console full, MMIO log full) after the last C return
        cl = self._l
        cl.vcpu_fd = vcpu.fd
        cl.run_size = vcpu.run_size
        cl.run = vcpu.run_addr
        cl.ring, cl.ring_entries = coalesced_ring(vcpu)
        cl.console = int(nffi.cast("uintptr_t", self._console_buf))
        cl.console_cap = len(self._console_buf)
        cl.console_flush_ns = int(c.console_flush * 1e9) if on_console else 0
        cl.serial_base, cl.debugcon_port, cl.exit_port = c.serial_base, c.debugcon_port, c.exit_port
        cl.exit_port_size = c.exit_port_size if c.exit_port else 0
        cl.sbi_console = 1 if c.sbi_console else 0
        cl.uart_mmio_base, cl.uart_mmio_shift = c.uart_mmio_base, c.uart_mmio_shift
        cl.uart_irq, cl.uart_irq_fd = (c.uart_irq, vcpu.vm.fd) if c.uart_irq else (0, -1)
        self._ugroup = c.uart_group
        if c.uart_group is not None:
            c.uart_group.connect_irq(vcpu.vm, c.uart_irq)
            cl.uart_owner = c.uart_group.address
        regions = list(c.ram)[:nlib.PYKVM_MAX_RAM]
        cl.nram = len(regions)
        for i, (gpa, host, size) in enumerate(regions):
            cl.ram[i].gpa, cl.ram[i].host, cl.ram[i].size = gpa, host, size
        cl.mmio_log = int(nffi.cast("uintptr_t", self._mmio_buf))
        cl.mmio_log_cap = len(self._mmio_buf)
        cl.report_port, cl.report_sbi_eid = c.report_port, c.report_sbi_eid
        lines = list(c.vmmio)[:nlib.PYKVM_MAX_VMMIO]     # the rest stay with Python's bus
        cl.nvmmio = len(lines)
        for i, line in enumerate(lines):
            cl.vmmio[i] = line.address
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
        for n, h in enumerate(self._handlers or ()):
            if h is not None:
                mask |= 1 << n
        cl = self._l
        cl.callback_mask = mask
        cl.resume_mask = self._resume_mask
        cl.nguard = 0
        for i, (g, n) in enumerate(self._guard):
            cl.guard[i].gpa, cl.guard[i].size = g, n
        cl.nguard = len(self._guard)

    def _grow_buffers(self) -> None:
        """After a run that filled a buffer (drained since): double it, up to the config's cap."""
        cl, c = self._l, self.config
        console_full, mmio_full = self._grow
        self._grow = None
        if console_full and cl.console_cap < c.console_cap and not cl.console_len:
            self._console_buf = _new_buffer("uint8_t[]", min(c.console_cap, 2 * cl.console_cap))
            cl.console = int(nffi.cast("uintptr_t", self._console_buf))
            cl.console_cap = len(self._console_buf)
        if mmio_full and cl.mmio_log_cap < c.mmio_log_cap and not cl.mmio_log_len:
            self._mmio_buf = _new_buffer("struct pykvm_mmio_record[]",
                                         min(c.mmio_log_cap, 2 * cl.mmio_log_cap))
            cl.mmio_log = int(nffi.cast("uintptr_t", self._mmio_buf))
            cl.mmio_log_cap = len(self._mmio_buf)

    def _drain(self) -> None:
        n = self._l.console_len
        if n:
            self._emit(bytes(nffi.buffer(self._console_buf, n)))
            self._l.console_len = 0
        if self._ugroup is not None:
            self._ugroup.drain(self._emit)
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
        cl = self._l
        v = self.vcpu
        if cl.py_ctx:                      # a handler of this loop: it is running already
            raise Busy("this run loop is running: its handlers cannot run it again")
        v._enter_run(self._kick_internal)
        self.failed_exit = None
        if self._handlers is not None and self._exit_slots is None:
            self._exit_slots = [None] * 64
        args = (self._address, self._handlers or _NO_SLOTS, self._exit_slots or _NO_SLOTS, v,
                v._rs, self, new_exit)
        try:
            cl.deadline_ns = int(deadline * 1e9) if deadline else 0
            cl.budget = budget if budget > 0 else -1
            while True:
                if v._rs.closing:
                    return Stop("kick")
                v._rs.seq += 1
                r = _run_handlers(*args)
                if self._ugroup is not None:
                    self._ugroup.drain(self._emit)
                if cl.console_len or cl.mmio_log_len:
                    if r in _STOP_FULL:
                        self._grow = (cl.console_len >= cl.console_cap,
                                      cl.mmio_log_len >= cl.mmio_log_cap)
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
                    return Stop("debug_exit", value=cl.exit_value)
                return Stop(STOP_NAMES[r])
        finally:
            self._last_exit = self._result = self._error = None
            v._leave_run()

    def _kick_internal(self) -> None:
        nlib.pykvm_loop_kick(self._l)

    def kick(self) -> None:
        """Stop a running ``run()`` (or the next one) from any thread; takes no lock, so it is
        safe from a signal handler. Raises :class:`~pykvm.errors.Closed` once the vCPU is
        closed."""
        if self.vcpu._rs.closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        nlib.pykvm_loop_kick(self._l)

    def clear_kick(self) -> None:
        """Withdraw a kick that no run has taken yet (the next ``run()`` then runs the guest).
        For the owner of the loop, between runs. Raises :class:`~pykvm.errors.Closed` once
        the vCPU is closed. A vCPU another thread has claimed meanwhile (a snapshot's
        :meth:`~pykvm.vcpu.Vcpu.complete_io`) keeps its ``kvm_run.immediate_exit``: that run
        set it on purpose."""
        v = self.vcpu
        if v._rs.closing:
            raise Closed(f"vCPU {v.id} is closed")
        self._l.kick = 0
        with v._lock:
            if v._runner is None or v._runner == threading.get_ident():
                v.run_struct.immediate_exit = 0
