"""The 16550 UART as a bus device, backed by pykvm's one 16550 model: the C one in
``csrc/runloop.c`` that the C run loop serves port and MMIO accesses with. Python code that
needs the UART (the reference run loop in :mod:`pykvm.testing.reference_loop`, a platform)
reaches that same state through ``pykvm_uart_access``; there is no second model to keep in step.

The UART (register names from the TI PC16550D data sheet, behaviour as QEMU's
``hw/char/serial.c``), registers 0-7:

====  ==================  ==================================================================
reg   read                write
====  ==================  ==================================================================
0     RBR (DLAB: DLL)     THR (DLAB: DLL)
1     IER (DLAB: DLM)     IER, bits 3:0 kept (DLAB: DLM)
2     IIR                 FCR
3     LCR                 LCR (bit 7 = DLAB)
4     MCR                 MCR, bits 4:0 kept
5     LSR                 ignored
6     MSR                 ignored
7     SCR                 SCR
====  ==================  ==================================================================

* The transmitter is always empty (output is instant): LSR.THRE and LSR.TEMT always read set.
  A THR write is console output, or, in loopback, a received byte.
* THR-empty interrupt: pending after a THR write, when IER.THRI (bit 1) is turned on, and when
  FCR clears the transmit FIFO; an IIR read that reports it (IIR = 0x02) clears it.
* Interrupt identification (IIR), highest priority first (data sheet table 4, QEMU's
  ``serial_update_irq``): receiver line status (IER bit 2 and LSR.OE: 0x06); received data
  (IER bit 0 and LSR.DR: 0x04 at the receive FIFO's trigger level of 1, 4, 8 or 14 bytes
  (FCR bits 7:6), below it the character timeout 0x0C at once, since no further character is
  coming); THR empty (IER bit 1: 0x02); none (0x01). With the FIFOs on, IIR bits 7:6 read set.
* The interrupt output (any source in IIR pending) drives a GSI through KVM_IRQ_LINE when the
  :class:`~pykvm.runloop.UartGroup` has one connected (x86 COM1: IRQ 4 of the in-kernel
  irqchip); without one a driver polls IIR/LSR (RISC-V ``virt`` without a PLIC).
* Loopback (MCR bit 4): MSR mirrors MCR (DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD, as Linux's 8250
  probe checks) and each THR byte goes to the receiver instead of the console. FIFOs off
  (FCR bit 0 clear): the byte lands in RBR and sets LSR.DR; one arriving while DR is set
  overwrites RBR and sets LSR.OE. FIFOs on: bytes queue in a 16-byte receive FIFO; one arriving
  when it is full is lost and sets LSR.OE. Reading RBR takes the oldest byte (0 when empty) and
  clears DR once nothing is left; reading LSR clears OE. Outside loopback MSR reads 0xB0
  (DCD, DSR, CTS).
* FCR: turning the FIFOs on or off clears both; bit 1 clears the receive FIFO (and DR), bit 2
  the transmit FIFO (THR empty pending again); bits 0, 3 and 7:6 are kept.
* Host input (:meth:`Uart16550.feed`, :meth:`pykvm.runloop.UartGroup.feed`; the machine's
  :meth:`~pykvm.machine.Machine.send_console`): bytes wait in the group's input ring
  (:data:`~pykvm.runloop.UartGroup.IN_CAP`, 4 KiB) and move into the receiver whenever it has
  room — the FIFO up to 16 bytes, or RBR while LSR.DR is clear with the FIFOs off — at once and
  after each RBR read. Host input therefore never overruns the receiver: a guest that reads
  RBR while LSR.DR is set gets every byte in order, and a full ring makes ``feed`` take fewer
  bytes instead. The received-data interrupt (and the character timeout below the trigger
  level) follows as above. Nothing moves in while in loopback; a FIFO flush (FCR) drops what
  the receiver held, as on the chip, and refills it from the ring.

Register N sits at offset ``N << regshift``. Two access models, as QEMU's two memory-region ops:

* port I/O (``mmio=False``, QEMU's ``serial_io_ops``; ``regshift`` 0): registers are one byte
  wide; an access of ``size`` bytes at offset N is ``size`` one-byte accesses at registers
  N, N+1, ..., numbered mod 8 (``serial_ioport_*`` take ``addr & 7``), values little-endian;
* MMIO (``mmio=True``, QEMU's ``serial_mm_ops``, an ns16550a): an access of any width at a
  register's offset hits that one register; a write uses the value's low byte, a read returns
  the register in the low byte and zeroes above.

An offset that is no register's (past the eighth register, or between registers when
``regshift`` > 0) reads 0 and drops writes; the run loops leave such MMIO accesses unserved
(an exit for Python), as ``serve_uart_mmio`` in csrc/runloop.c does. No access raises, and each
costs at most eight register accesses under the UART's lock.
"""
from typing import Callable, List, Optional

from .._native import lib as _nlib
from ..runloop import UartGroup

REGISTERS = 8          # RBR/THR ... SCR


class Uart16550:
    """One 16550 (see the module docstring), a :class:`~pykvm.devices.bus.Device`.

    ``group``: the :class:`~pykvm.runloop.UartGroup` whose state this device reaches (the same
    one the machine's C loops are given, so every vCPU sees one UART); a new, private one if
    None. ``regshift``: register stride (0, 1 or 2: 1, 2 or 4 bytes; QEMU ``regshift``).
    ``mmio``: the access model (module docstring). ``on_output(bytes)``: if given, called
    after each write with the THR output the group holds (every writer's, in order), so a
    Python caller streams it as it is written; without it the output waits in the group for
    whoever drains it (:meth:`take`, or a C loop returning to Python)."""

    def __init__(self, group: Optional[UartGroup] = None, *, regshift: int = 0,
                 mmio: bool = False, on_output: Optional[Callable[[bytes], None]] = None):
        if regshift not in (0, 1, 2):
            raise ValueError(f"16550 regshift must be 0, 1 or 2, not {regshift!r}")
        if not mmio and regshift:
            raise ValueError("a port-I/O 16550 has one-byte registers (regshift 0)")
        self.group = group if group is not None else UartGroup()
        self.regshift = regshift
        self.mmio = mmio
        self.on_output = on_output
        self._state = self.group.state

    @property
    def size(self) -> int:
        """Bytes the register window spans (``8 << regshift``)."""
        return REGISTERS << self.regshift

    # -- one register ------------------------------------------------------------------------
    def read_register(self, reg: int) -> int:
        """Read register ``reg`` (0-7, taken mod 8) with its side effects (module docstring)."""
        return _nlib.pykvm_uart_access(self._state, reg & 7, 0, 0)

    def write_register(self, reg: int, value: int) -> None:
        """Write the low byte of ``value`` to register ``reg`` (0-7, taken mod 8)."""
        _nlib.pykvm_uart_access(self._state, reg & 7, 1, value & 0xFF)
        if self.on_output is not None:
            self.group.drain(self.on_output)

    # -- the bus protocol (pykvm.devices.bus.Device) ------------------------------------------
    def _register(self, offset: int) -> Optional[int]:
        if not 0 <= offset < self.size or offset & ((1 << self.regshift) - 1):
            return None
        return offset >> self.regshift

    def read(self, offset: int, size: int) -> int:
        """The value (``size`` bytes, little-endian) a guest read at ``offset`` gets."""
        reg = self._register(offset)
        if reg is None or size <= 0:
            return 0
        if self.mmio:
            return self.read_register(reg)
        value = 0
        for j in range(min(size, 8)):
            value |= self.read_register((reg + j) & 7) << (8 * j)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Take a guest write of ``value`` (``size`` bytes) at ``offset``."""
        reg = self._register(offset)
        if reg is None or size <= 0:
            return
        if self.mmio:
            _nlib.pykvm_uart_access(self._state, reg, 1, value & 0xFF)
        else:
            for j in range(min(size, 8)):
                _nlib.pykvm_uart_access(self._state, (reg + j) & 7, 1, (value >> (8 * j)) & 0xFF)
        if self.on_output is not None:
            self.group.drain(self.on_output)

    # -- input and output ----------------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Host input for the receiver: :meth:`pykvm.runloop.UartGroup.feed` of this UART's
        group (returns the bytes taken, 0 when its ring is full; never blocks)."""
        return self.group.feed(data)

    def take(self) -> bytes:
        """The THR output written so far and not yet drained (every writer's, in order)."""
        out: List[bytes] = []
        self.group.drain(out.append)
        return b"".join(out)

    @property
    def dropped(self) -> int:
        """THR bytes the group's output buffer had no room for."""
        return self.group.dropped
