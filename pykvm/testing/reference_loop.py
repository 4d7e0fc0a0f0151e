"""The reference run loop: what :class:`pykvm.runloop.RunLoop` does in C, written plainly in
Python on top of :meth:`Vcpu.run` (one ``KVM_RUN`` per exit), for tests and tools that compare
the two or want to step through a run. Not part of the library's run path: a
:class:`~pykvm.machine.Machine` uses it only when given ``loop=ReferenceLoop`` (the CLI's
``--python-loop``).

It serves what its :class:`~pykvm.runloop.LoopConfig` names, in the C loop's order: the
isa-debug-exit range (an OUT ends the run with ``Stop("debug_exit", value=...)``, an IN reads
0), the debug console port (OUT bytes are console output, IN reads 0xE9), the 16550 at
``serial_base`` and, as MMIO, at ``uart_mmio_base``. The 16550 is not modelled here: both
windows reach the one C model (csrc/runloop.c) through
:class:`~pykvm.devices.uart16550.Uart16550`, on the config's
:class:`~pykvm.runloop.UartGroup` (the one the machine's C loops share) or on a group of its
own. Coalesced MMIO is drained from the ring after every exit; other exits go to
:meth:`~pykvm.runloop.LoopBase.resume`, :meth:`~pykvm.runloop.LoopBase.on` handlers, or end the
run, as in the C loop. It does not serve SBI DBCN (those exits reach Python's handlers).
"""
import threading
import time
from typing import Dict, Optional

from .. import abi
from ..abi import ffi
from ..devices.uart16550 import Uart16550
from ..errors import Busy, Closed, HostResourceError
from ..runloop import LoopBase, MmioRecord, Stop, UartGroup, coalesced_ring

_EXIT_IO = abi.EXIT_REASONS["IO"]
_EXIT_MMIO = abi.EXIT_REASONS["MMIO"]
_EXIT_INTR = abi.EXIT_REASONS["INTR"]


class ReferenceLoop(LoopBase):
    """The run loop in Python (see the module docstring). Same constructor, attributes and
    :meth:`run` contract as :class:`~pykvm.runloop.RunLoop`: ``vcpu``, ``config``
    (:class:`~pykvm.runloop.LoopConfig`, default: serve nothing), ``on_console(bytes)``,
    ``on_mmio(MmioRecord)``."""

    native = False

    def __init__(self, vcpu, config=None, on_console=None, on_mmio=None):
        super().__init__(vcpu, config, on_console, on_mmio)
        c = self.config
        self._counts: Dict[str, int] = {}
        self.exits_total = 0
        self.handled_in_c = 0         # exits resumed by the loop itself (resume()), as in C
        self.handled_in_python = 0
        self._kick = threading.Event()
        self._running = False         # inside run(): a handler cannot run the loop again
        self._ring, self._ring_entries = coalesced_ring(vcpu)
        self._uart_pio = self._uart_mmio = None
        group = c.uart_group
        if group is None and (c.serial_base or c.uart_mmio_base):
            group = UartGroup()                # a UART of its own, as a C loop has
        self.uart_group = group
        if group is None:
            return
        group.connect_irq(vcpu.vm, c.uart_irq)
        if c.serial_base:
            self._uart_pio = Uart16550(group, on_output=self._emit)
        if c.uart_mmio_base and 0 <= c.uart_mmio_shift <= 2:
            self._uart_mmio = Uart16550(group, regshift=c.uart_mmio_shift, mmio=True,
                                        on_output=self._emit)

    @property
    def counts(self) -> Dict[str, int]:
        """Exits seen by this loop, by reason name."""
        return dict(self._counts)

    def _drain_ring(self) -> None:
        if not self._ring:
            return
        ring = ffi.cast("struct kvm_coalesced_mmio_ring *", self._ring)
        first, last, mx = ring.first, ring.last, self._ring_entries
        if first >= mx or last >= mx:      # shared with the kernel: stay in bounds
            return
        while first != last:
            e = ring.coalesced_mmio[first]
            n = min(e.len, 8)
            self._record_mmio(MmioRecord(e.phys_addr, n, bool(e.pio),
                                         bytes(ffi.buffer(e.data, n))))
            first = (first + 1) % mx
            ring.first = first

    def _serve_io(self, ex) -> Optional[Stop]:
        """A port I/O exit: served (None), the debug exit (a Stop), or not ours
        (``Stop("exit")``)."""
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
        if self._uart_pio is not None and 0 <= port - c.serial_base < 8:
            uart, off, size = self._uart_pio, port - c.serial_base, ex.size
            if out:
                data = ex.data
                for i in range(ex.count):
                    uart.write(off, size, int.from_bytes(data[i * size:(i + 1) * size], "little"))
            else:
                ex.respond(b"".join(uart.read(off, size).to_bytes(size, "little")
                                    for _ in range(ex.count)))
            return None
        return Stop("exit", ex)

    def _serve_uart_mmio(self, ex) -> bool:
        """An MMIO exit on one of the ns16550a's registers: served (True), else False (an
        address between registers or outside the window is not ours, as in C)."""
        uart, base = self._uart_mmio, self.config.uart_mmio_base
        if uart is None:
            return False
        off = ex.phys_addr - base
        if not 0 <= off < uart.size or off & ((1 << uart.regshift) - 1):
            return False
        if ex.is_write:
            uart.write(off, 1, ex.data[0])
        else:
            ex.respond(uart.read(off, 1))
        return True

    def run(self, *, deadline: Optional[float] = None, budget: int = 0) -> Stop:
        """As :meth:`pykvm.runloop.RunLoop.run`, one ``Vcpu.run()`` per exit."""
        v = self.vcpu
        if self._running:                  # a handler of this loop: it is running already
            raise Busy("this run loop is running: its handlers cannot run it again")
        v._enter_run(self._kick_internal)
        self._running = True
        self.failed_exit = None
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
                if v._rs.closing:
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
                if ex.reason == _EXIT_IO:
                    stop = self._serve_io(ex)
                    if stop is not None and stop.kind == "exit":
                        stop = self._unserved(ex)
                    if stop is not None:
                        return stop
                elif ex.reason == _EXIT_MMIO and self.config.uart_mmio_base:
                    if not self._serve_uart_mmio(ex):
                        stop = self._unserved(ex)
                        if stop is not None:
                            return stop
                elif ex.reason != _EXIT_INTR:
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
            self._running = False
            v._leave_run()

    def _unserved(self, ex) -> Optional[Stop]:
        """An exit the loop does not serve: resumed (resume()), given to a handler (on()), or
        the end of the run."""
        n = ex._reason
        if 0 <= n < 64 and (self._resume_mask >> n) & 1:
            self.handled_in_c += 1
            return None
        h = self._handlers[n] if self._handlers is not None and 0 <= n < 64 else None
        if h is None or not self._handler_may_serve(ex):
            return Stop("exit", ex)
        try:
            r = h(ex)
        except BaseException:
            self.failed_exit = ex
            raise
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
        if self.vcpu._rs.closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        self._kick_internal()

    def clear_kick(self) -> None:
        """As :meth:`pykvm.runloop.RunLoop.clear_kick`."""
        if self.vcpu._rs.closing:
            raise Closed(f"vCPU {self.vcpu.id} is closed")
        self._kick.clear()
        self.vcpu.run_struct.immediate_exit = 0
