"""The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status / command), as far as a
guest probing for a controller, resetting the machine through it or switching A20 sees it.
Modelled on QEMU's ``hw/input/pckbd.c`` (QEMU 7.2) and checked against it (TCG, after SeaBIOS).

What is modelled:

* the status register (0x64 read): OBF (0), SELFTEST (2), CMD (3, always set as in QEMU),
  UNLOCKED (4), MOUSE_OBF (5);
* controller commands (0x64 write): 0x20 read command byte, 0x60 write command byte (next
  data byte), 0xA1 (version: nothing answered, as QEMU), 0xA7/0xA8 mouse interface
  disable/enable, 0xA9 mouse interface test (0x00), 0xAA self test (0x55, sets SELFTEST), 0xAB
  keyboard interface test (0x00), 0xAD/0xAE keyboard interface disable/enable, 0xC0 read input
  port (0x80), 0xD0 read output port, 0xD1 write output port (next data byte: bit 0 clear =
  CPU reset, bit 1 = A20), 0xD2/0xD3 write the keyboard/mouse output buffer (next data byte),
  0xD4 write to the mouse (next data byte), 0xDD/0xDF A20 off/on, 0xF0-0xFF pulse output port
  bits (bit 0 pulsed, as in 0xFE: CPU reset; others do nothing); any other command is ignored;
* a keyboard and a mouse that only answer commands, as QEMU's ``hw/input/ps2.c``: the keyboard
  acknowledges (0xFA) 0x00, 0xF4, 0xFA, 0xF5/0xF6 (reset), 0xFF (reset, then 0xAA), 0xF2
  (identify: then 0xAB 0x41, 0x83 without translation), and 0xED/0xF0/0xF3/0xFC with their
  parameter byte; 0xF0 0x00 answers the scan code set (0x43/0x41/0x3F for sets 1-3 while the
  controller translates, else 1-3), 0xF0 1-3 selects it; 0xEE (echo) answers 0xEE alone; any
  other command answers 0xFE (resend). The mouse acknowledges every byte; 0xFF adds 0xAA 0x00
  and 0xF2 adds 0x00. They never produce key presses or movement (no input backend), and
  LED, rate and resolution parameters are acknowledged and dropped;
* IRQ 1 while keyboard data waits and command byte bit 0 is set (bit 4 clear), IRQ 12 while
  mouse data waits and bit 1 is set.

A reset request (0xFE, or a 0xD1 write with bit 0 clear) calls ``on_reset``: the same path as a
reset through port 0xCF9 or 0x92. A20 cannot be masked under KVM: the output port's bit 1 is
kept and read back but the guest's addresses are never wrapped.

Initial state: what QEMU's controller holds when SeaBIOS hands over (it ran the self test,
reset the keyboard and wrote command byte 0x61): status 0x1C, command byte 0x61 (keyboard
interrupt, mouse disabled, scan code translation), output port 0xCF (QEMU's reset value), and
the data port repeating the keyboard's last byte 0xFA. QEMU's power-on values are status 0x18,
command byte 0x03.

Widths: an access of 2 or 4 bytes at 0x60 or 0x64 is that many byte accesses to the same
register, the lowest byte first (the 8042's registers are 8 bits wide). QEMU 7.2 under TCG
differs here: its keyboard sees a 16-bit write to 0x60 as one unknown command and answers 0xFE.
No driver issues such accesses; ports 0x61-0x63 and 0x65-0x67 are not this device. Reading
an empty output buffer repeats the last byte read. Each access costs constant work; the output queues hold 16 bytes each (more are
dropped, as QEMU's PS/2 queue does when full).
"""
from __future__ import annotations

import threading
from .snapstate import DeviceState
from collections import deque

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

DATA_PORT = 0x60
STATUS_PORT = 0x64
COMMAND_PORT = 0x64
PORTS = (DATA_PORT, STATUS_PORT)
DATA_OFFSET = 0                 # the registers' offsets in the device's map (port - 0x60)
STATUS_OFFSET = 4

KBD_IRQ = 1
MOUSE_IRQ = 12

STAT_OBF = 0x01
STAT_SELFTEST = 0x04
STAT_CMD = 0x08
STAT_UNLOCKED = 0x10
STAT_MOUSE_OBF = 0x20

MODE_KBD_INT = 0x01
MODE_MOUSE_INT = 0x02
MODE_DISABLE_KBD = 0x10
MODE_DISABLE_MOUSE = 0x20
MODE_KCC = 0x40                 # translate scan codes to set 1

OUT_RESET = 0x01                # 1 = running, 0 = CPU reset
OUT_A20 = 0x02
OUT_OBF = 0x10
OUT_MOUSE_OBF = 0x20
OUT_ONES = 0xCC

CCMD_READ_MODE = 0x20
CCMD_WRITE_MODE = 0x60
CCMD_MOUSE_DISABLE = 0xA7
CCMD_MOUSE_ENABLE = 0xA8
CCMD_TEST_MOUSE = 0xA9
CCMD_SELF_TEST = 0xAA
CCMD_KBD_TEST = 0xAB
CCMD_KBD_DISABLE = 0xAD
CCMD_KBD_ENABLE = 0xAE
CCMD_READ_INPORT = 0xC0
CCMD_READ_OUTPORT = 0xD0
CCMD_WRITE_OUTPORT = 0xD1
CCMD_WRITE_OBUF = 0xD2
CCMD_WRITE_AUX_OBUF = 0xD3
CCMD_WRITE_MOUSE = 0xD4
CCMD_DISABLE_A20 = 0xDD
CCMD_ENABLE_A20 = 0xDF
CCMD_PULSE_BITS = 0xF0
CCMD_RESET = 0xFE

SELF_TEST_OK = 0x55
ACK = 0xFA
RESEND = 0xFE
POR = 0xAA
KBD_SCANCODE = 0xF0                           # get (parameter 0) / set (1-3) the scan code set
_KBD_PARAM_CMDS = (0xED, KBD_SCANCODE, 0xF3, 0xFC)   # LEDs, scan code set, rate, make/break
_SET_ID = {1: 0x43, 2: 0x41, 3: 0x3F}          # a set's number as the translating 8042 shows it
QUEUE_SIZE = 16

_EXPECTS_DATA = (CCMD_WRITE_MODE, CCMD_WRITE_OBUF, CCMD_WRITE_AUX_OBUF, CCMD_WRITE_MOUSE,
                 CCMD_WRITE_OUTPORT)
_KBD, _AUX = 1, 2


class I8042(DeviceState):
    """The controller. ``on_reset()``: a CPU reset request (called without the lock held);
    ``set_irq(irq, level)``: drive ISA IRQ 1 or 12.

    On the port bus (:mod:`.bus`): each register is a one-port range taking accesses of up to
    4 bytes, so that an access starting at 0x60 or 0x64 reaches it whole (a run of byte
    accesses to that register, as the module docstring says); an access starting at another
    port is cut by the bus and its bytes at 0x60/0x64 reach the register one at a time."""

    SNAPSHOT_FIELDS = ('status', 'mode', 'outport', 'write_cmd', 'kbd', 'aux', 'last', 'kbd_cmd', 'scancode_set', 'aux_param', '_irq')
    SNAPSHOT_RANGES = {"status": (0, 0xFF), "mode": (0, 0xFF), "outport": (0, 0xFF),
                       "write_cmd": (0, 0xFF), "kbd_cmd": (0, 0xFF), "scancode_set": (1, 3)}
    SNAPSHOT_LENGTHS = {"kbd": QUEUE_SIZE, "aux": QUEUE_SIZE}

    PIO_RANGES = ((DATA_PORT, 1, DATA_OFFSET, 4), (STATUS_PORT, 1, STATUS_OFFSET, 4))

    def __init__(self, *, on_reset: Optional[Callable[[], None]] = None,
                 set_irq: Optional[Callable[[int, int], None]] = None):
        self.on_reset = on_reset
        self.set_irq = set_irq
        self._lock = threading.Lock()
        self.status = STAT_CMD | STAT_UNLOCKED | STAT_SELFTEST
        self.mode = MODE_KBD_INT | MODE_DISABLE_MOUSE | MODE_KCC
        self.outport = OUT_RESET | OUT_A20 | OUT_ONES
        self.write_cmd = 0                      # the command waiting for a data byte
        self.kbd: deque = deque()
        self.aux: deque = deque()
        self.last = {_KBD: ACK, _AUX: 0}        # what an empty queue repeats
        self.kbd_cmd: Optional[int] = None      # the keyboard command waiting for its parameter
        self.scancode_set = 2
        self.aux_param = False
        self._irq = {KBD_IRQ: 0, MOUSE_IRQ: 0}

    # -- queues and interrupts -------------------------------------------------------------
    def _queue(self, b: int, aux: bool = False) -> None:
        q = self.aux if aux else self.kbd
        if len(q) < QUEUE_SIZE:
            q.append(b & 0xFF)

    def _pending(self) -> int:
        """QEMU's pending mask: keyboard data takes priority over mouse data."""
        return (_KBD if self.kbd else 0) | (_AUX if self.aux else 0)

    def _update(self) -> list:
        """Recompute OBF / MOUSE_OBF and the IRQ levels; return the (irq, level) changes."""
        kbd_level = aux_level = 0
        self.status &= ~(STAT_OBF | STAT_MOUSE_OBF)
        self.outport &= ~(OUT_OBF | OUT_MOUSE_OBF)
        pending = self._pending()
        if pending:
            self.status |= STAT_OBF
            self.outport |= OUT_OBF
            if pending == _AUX:
                self.status |= STAT_MOUSE_OBF
                self.outport |= OUT_MOUSE_OBF
                aux_level = 1 if self.mode & MODE_MOUSE_INT else 0
            elif self.mode & MODE_KBD_INT and not self.mode & MODE_DISABLE_KBD:
                kbd_level = 1
        changes = []
        for irq, level in ((KBD_IRQ, kbd_level), (MOUSE_IRQ, aux_level)):
            if self._irq[irq] != level:
                self._irq[irq] = level
                changes.append((irq, level))
        return changes

    def _signal(self, changes) -> None:
        if self.set_irq:
            for irq, level in changes:
                self.set_irq(irq, level)

    # -- the keyboard and mouse (command answers only) -------------------------------------
    def _keyboard(self, b: int) -> None:
        """A byte for the keyboard (QEMU's ``ps2_write_keyboard``): a command, or the parameter
        of the one before."""
        cmd, self.kbd_cmd = self.kbd_cmd, None
        if cmd == KBD_SCANCODE:
            if b == 0:                           # get: the set, translated when the controller
                self._queue(ACK)                 # translates (command byte bit 6)
                self._queue(_SET_ID[self.scancode_set] if self.mode & MODE_KCC
                            else self.scancode_set)
            elif 1 <= b <= 3:
                self.scancode_set = b
                self._queue(ACK)
            else:
                self._queue(RESEND)
            return
        if cmd is not None:                      # LEDs, typematic rate, make/break: taken
            self._queue(ACK)
            return
        if b == 0xEE:                            # echo
            self._queue(0xEE)
        elif b == 0xF2:                          # identify: an MF2 keyboard
            self._queue(ACK)
            self._queue(0xAB)
            self._queue(0x41 if self.mode & MODE_KCC else 0x83)
        elif b in _KBD_PARAM_CMDS:
            self.kbd_cmd = b
            self._queue(ACK)
        elif b in (0xF5, 0xF6, 0xFF):            # reset (and disable / enable scanning)
            self.scancode_set = 2
            self._queue(ACK)
            if b == 0xFF:
                self._queue(POR)
        elif b in (0x00, 0xF4, 0xFA):            # QEMU acknowledges these without more
            self._queue(ACK)
        else:                                    # anything else: "send the command again"
            self._queue(RESEND)

    def _mouse(self, b: int) -> None:
        if self.aux_param:                       # the parameter of 0xE8, 0xF3
            self.aux_param = False
            self._queue(ACK, aux=True)
            return
        self._queue(ACK, aux=True)
        if b == 0xFF:
            self._queue(POR, aux=True)
            self._queue(0x00, aux=True)
        elif b == 0xF2:
            self._queue(0x00, aux=True)
        elif b == 0xE9:                          # status request: three bytes
            for _ in range(3):
                self._queue(0x00, aux=True)
        elif b in (0xE8, 0xF3):
            self.aux_param = True

    # -- registers -----------------------------------------------------------------------------
    def _read_data(self) -> int:
        src = _AUX if self._pending() == _AUX else _KBD
        q = self.aux if src == _AUX else self.kbd
        if q:
            self.last[src] = q.popleft()
        return self.last[src]

    def _write_command(self, cmd: int) -> bool:
        """One command byte; True if it requests a CPU reset."""
        if cmd & CCMD_PULSE_BITS == CCMD_PULSE_BITS:
            return not cmd & 1                   # pulsing bit 0 low resets the CPU
        if cmd == CCMD_READ_MODE:
            self._queue(self.mode)
        elif cmd in _EXPECTS_DATA:
            self.write_cmd = cmd
        elif cmd == CCMD_MOUSE_DISABLE:
            self.mode |= MODE_DISABLE_MOUSE
        elif cmd == CCMD_MOUSE_ENABLE:
            self.mode &= ~MODE_DISABLE_MOUSE
        elif cmd in (CCMD_TEST_MOUSE, CCMD_KBD_TEST):
            self._queue(0x00)
        elif cmd == CCMD_SELF_TEST:
            self.status |= STAT_SELFTEST
            self._queue(SELF_TEST_OK)
        elif cmd == CCMD_KBD_DISABLE:
            self.mode |= MODE_DISABLE_KBD
        elif cmd == CCMD_KBD_ENABLE:
            self.mode &= ~MODE_DISABLE_KBD
        elif cmd == CCMD_READ_INPORT:
            self._queue(0x80)
        elif cmd == CCMD_READ_OUTPORT:
            self._queue(self.outport)
        elif cmd == CCMD_ENABLE_A20:
            self.outport |= OUT_A20
        elif cmd == CCMD_DISABLE_A20:
            self.outport &= ~OUT_A20
        return False

    def _write_data(self, b: int) -> bool:
        """One data byte; True if it requests a CPU reset."""
        cmd, self.write_cmd = self.write_cmd, 0
        if cmd == 0:
            self._keyboard(b)
        elif cmd == CCMD_WRITE_MODE:
            self.mode = b
        elif cmd == CCMD_WRITE_OBUF:
            self._queue(b)
        elif cmd == CCMD_WRITE_AUX_OBUF:
            self._queue(b, aux=True)
        elif cmd == CCMD_WRITE_MOUSE:
            self._mouse(b)
        elif cmd == CCMD_WRITE_OUTPORT:
            self.outport = b
            return not b & OUT_RESET
        return False

    # -- the bus protocol (offsets: DATA_OFFSET, STATUS_OFFSET; see PIO_RANGES) -------------
    def read(self, offset: int, size: int) -> int:
        """``size`` bytes (1-4) read at ``offset``: ``size`` byte reads of the data register
        (offset 0) or the status register (offset 4), the first in the lowest byte; any other
        offset reads all-ones. Never raises."""
        if offset not in (DATA_OFFSET, STATUS_OFFSET):
            return (1 << (8 * size)) - 1
        with self._lock:
            value = 0
            changes = []
            for i in range(size):
                if offset == STATUS_OFFSET:
                    b = self.status
                else:
                    b = self._read_data()
                    changes += self._update()
                value |= b << (8 * i)
        self._signal(changes)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """``size`` bytes of ``value`` written at ``offset``: ``size`` byte writes, lowest byte
        first, to the command register (offset 4) or the data register (offset 0); a reset
        request calls ``on_reset`` once, outside the lock. Other offsets: dropped."""
        if offset not in (DATA_OFFSET, STATUS_OFFSET):
            return
        reset = False
        with self._lock:
            changes = []
            for i in range(size):
                b = (value >> (8 * i)) & 0xFF
                if offset == STATUS_OFFSET:
                    reset |= self._write_command(b)
                else:
                    reset |= self._write_data(b)
                changes += self._update()
        self._signal(changes)
        if reset and self.on_reset:
            self.on_reset()
