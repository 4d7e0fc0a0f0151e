"""ACPI fixed-hardware power management registers (ACPI 6.x, 4.8), at QEMU pc's ports:

==========  =====  =====================================================================
port        size   register
==========  =====  =====================================================================
0x600       16     PM1a_STS: TMR_STS (0), GBL_STS (5), PWRBTN_STS (8), SLPBTN_STS (9),
                   RTC_STS (10), WAK_STS (15); write 1 to clear
0x602       16     PM1a_EN: TMR_EN (0), GBL_EN (5), PWRBTN_EN (8), SLPBTN_EN (9), RTC_EN (10)
0x604       16     PM1a_CNT: SCI_EN (0, reads 1: there is no SMI command port, the machine is
                   always in ACPI mode, and ACPI 4.8.3.2.1 leaves the bit to the hardware),
                   BM_RLD (1), GBL_RLS (2, write-only), SLP_TYP (12:10), SLP_EN (13,
                   write-only: a write with it set enters the sleep state SLP_TYP names)
0x608       32     PM_TMR: a 24-bit counter at 3.579545 MHz (FADT TMR_VAL_EXT clear),
                   read-only
==========  =====  =====================================================================

Reserved bits read 0 and ignore writes; status bits are write-1-to-clear. Widths and offsets are
as QEMU's ACPI core (hw/acpi/core.c, QEMU 7.2 as Debian ships it) takes them, each access cut by
the port bus (:mod:`.bus`) at the three blocks :func:`pio_ranges` declares: the event block (0x600-0x603) and the control register (0x604-0x605) take 1-
and 2-byte accesses, each served as a 16-bit access at the byte's offset (a byte read at 0x600
or 0x602 gives the low byte of STS or EN, at 0x601 or 0x603 gives 0; a byte write at 0x600 or
0x602 writes the byte zero-extended, so it clears EN's high byte; one at 0x601 or 0x603 does
nothing; the control register is read and written whole at either offset); a 4-byte access is
two 2-byte ones. The timer block (0x608-0x60b) takes any width, each part reading the timer's
low bits (sampled once per piece the bus hands over); writes to it do nothing. Ports
0x606-0x607 are unassigned (all-ones).

The device's register map (the offsets the bus hands it) is the block's own: STS 0, EN 2, CNT
4, TMR 8. The guest moves the block (PIIX4 PMBA) or turns it off (PMREGMISC): the platform
then takes the device off the port bus and attaches it again at :func:`pio_ranges` of the new
base.

TMR_STS is set each time bit 23 of the timer changes; the SCI (IRQ 9) is asserted while any
enabled status bit is set and SCI_EN is on. A write of SLP_EN calls ``on_sleep(slp_typ)``; the
PC machine enters S3 (SLP_TYP 1) or powers off (SLP_TYP 0, S5). Every register write calls
``on_change()`` (the PC machine reschedules the timer interrupt while TMR_EN is set). Every access costs constant
work (the timer is arithmetic on the clock).
"""
from __future__ import annotations

import threading
import time
from .snapstate import DeviceState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional, Tuple


PM_TIMER_HZ = 3579545
TIMER_MASK = 0xFFFFFF
TIMER_MSB = 23

STS_PORT = 0x600
EN_PORT = 0x602
CNT_PORT = 0x604
TMR_PORT = 0x608

TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
WAK_STS = 1 << 15
STS_MASK = TMR_STS | BM_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | WAK_STS
EN_MASK = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS

SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
CNT_MASK = 0x0003 | SLP_TYP_MASK      # the bits that read back (GBL_RLS, SLP_EN: write-only)

PM_BASE = STS_PORT                    # where SeaBIOS leaves the block (PMBA = 0x600)
# offsets in the block (the device's register map)
STS_OFFSET, EN_OFFSET, CNT_OFFSET, TMR_OFFSET = 0, 2, 4, 8
BLOCK_PORTS = 12                      # 0x606-0x607 inside it are unassigned


def pio_ranges(base: int = PM_BASE) -> Tuple[Tuple[int, int, int, int], ...]:
    """The block's port ranges with PM1a_EVT at port ``base`` (QEMU's PIIX4 PM regions): the
    event block (4 ports, 1- and 2-byte accesses), PM1a_CNT (2 ports, 1 and 2 bytes) and PM_TMR
    (4 ports, up to 4 bytes), as ``(base, size, offset, max_access)`` tuples for
    :meth:`.bus.Bus.attach`. ``base`` must leave the 12 ports inside 0-0xffff (a PMBA value
    masked with 0xFFC0 always does)."""
    return ((base + STS_OFFSET, 4, STS_OFFSET, 2), (base + CNT_OFFSET, 2, CNT_OFFSET, 2),
            (base + TMR_OFFSET, 4, TMR_OFFSET, 4))


def ticks_since(t0_ns: int, now_ns: int) -> int:
    """PM timer ticks (3.579545 MHz) from monotonic time ``t0_ns`` to ``now_ns`` (nanoseconds),
    rounded down and not wrapped."""
    return (now_ns - t0_ns) * PM_TIMER_HZ // 1_000_000_000


class AcpiPm(DeviceState):
    """The PM1a event/control blocks and the PM timer. ``set_sci(level)``: drive the SCI line;
    ``on_sleep(slp_typ)``: a write of SLP_EN (called without the device lock held);
    ``on_change()``: after every register write (without the lock; TMR_EN may have changed);
    ``clock``: nanoseconds (time.monotonic_ns). :attr:`PIO_RANGES`: the block at 0x600."""

    SNAPSHOT_FIELDS = ('t0', 'sts', 'en', 'cnt', '_epoch', '_sci')
    SNAPSHOT_MONO = ('t0',)
    SNAPSHOT_RANGES = {"sts": (0, 0xFFFF), "en": (0, 0xFFFF), "cnt": (0, 0xFFFF)}

    PIO_RANGES = pio_ranges(PM_BASE)

    def __init__(self, *, set_sci: Optional[Callable[[int], None]] = None,
                 on_sleep: Optional[Callable[[int], None]] = None,
                 on_change: Optional[Callable[[], None]] = None,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.set_sci = set_sci
        self.on_sleep = on_sleep
        self.on_change = on_change
        self.clock = clock
        self._lock = threading.RLock()
        self.t0 = clock()
        self.sts = 0
        self.en = 0
        self.cnt = SCI_EN
        self._epoch = 0               # timer MSB periods accounted for in TMR_STS
        self._sci = 0

    # -- the timer ---------------------------------------------------------------------------
    def ticks(self) -> int:
        """Timer ticks since the machine started (not wrapped)."""
        return ticks_since(self.t0, self.clock())

    def timer(self) -> int:
        """The PM_TMR value now: the ticks since start-up, wrapped to 24 bits."""
        return self.ticks() & TIMER_MASK

    def next_timer_flip_ns(self) -> int:
        """The monotonic time (ns) at which bit 23 of the timer next changes."""
        epoch = (self.ticks() >> TIMER_MSB) + 1
        return self.t0 + -(-(epoch << TIMER_MSB) * 1_000_000_000 // PM_TIMER_HZ)

    def _sync_timer_status(self) -> None:
        epoch = self.ticks() >> TIMER_MSB
        if epoch != self._epoch:
            self._epoch = epoch
            self.sts |= TMR_STS

    def _update_sci(self) -> None:
        level = 1 if (self.cnt & SCI_EN) and (self.sts & self.en & EN_MASK) else 0
        if level != self._sci:
            self._sci = level
            if self.set_sci:
                self.set_sci(level)

    # -- events from other devices -------------------------------------------------------
    def raise_status(self, bits: int) -> None:
        """Set status bits (RTC_STS on an RTC alarm, WAK_STS on a wake)."""
        with self._lock:
            self.sts |= bits & STS_MASK
            self._update_sci()

    def timer_event(self) -> None:
        """Called at (or after) a flip of timer bit 23 (the PC machine schedules it while
        TMR_EN is set)."""
        with self._lock:
            self._sync_timer_status()
            self._update_sci()

    @property
    def rtc_wake_enabled(self) -> bool:
        """Whether PM1 RTC_EN is set: an RTC alarm may wake the machine from sleep."""
        return bool(self.en & RTC_STS)

    @property
    def timer_interrupt_enabled(self) -> bool:
        """Whether PM1 TMR_EN is set: each flip of timer bit 23 raises the SCI."""
        return bool(self.en & TMR_STS)

    # -- the bus protocol (offsets in the block: STS 0, EN 2, CNT 4, TMR 8) ------------------
    def read(self, offset: int, size: int) -> int:
        """``size`` bytes read at ``offset`` of the block, as the bus cuts them (module
        docstring): each byte offset of the event and control blocks reads the 16-bit register
        there (STS at 0, EN at 2, 0 at 1 and 3, CNT at 4 and 5) truncated to ``size``; the
        timer block reads the timer's low bits; any other offset reads all-ones."""
        mask = (1 << (8 * size)) - 1
        with self._lock:
            if STS_OFFSET <= offset < CNT_OFFSET:
                if offset == STS_OFFSET:
                    self._sync_timer_status()
                    v = self.sts
                else:
                    v = self.en if offset == EN_OFFSET else 0
            elif CNT_OFFSET <= offset < CNT_OFFSET + 2:
                v = self.cnt & CNT_MASK
            elif TMR_OFFSET <= offset < TMR_OFFSET + 4:
                v = self.timer()
            else:
                v = mask
            return v & mask

    def write(self, offset: int, size: int, value: int) -> None:
        """``size`` bytes of ``value`` written at ``offset``, zero-extended to 16 bits (module
        docstring): PM1_STS bits written 1 are cleared, PM1_EN takes the value (reserved bits
        stay 0), PM1_CNT keeps BM_RLD and SLP_TYP and sleeps on SLP_EN (``on_sleep``); other
        offsets, the timer included, ignore writes. The SCI level is recomputed after each
        STS or EN write, piece by piece as the bus hands them (QEMU's ``acpi_pm_evt_write``).
        Calls ``on_change`` last."""
        sleep = None
        v = value & ((1 << (8 * size)) - 1)
        with self._lock:
            if offset == STS_OFFSET:
                self._sync_timer_status()
                self.sts &= ~(v & STS_MASK)
                self._update_sci()
            elif offset == EN_OFFSET:
                self.en = v & EN_MASK
                self._update_sci()
            elif CNT_OFFSET <= offset < CNT_OFFSET + 2:
                self.cnt = (v & CNT_MASK) | SCI_EN
                if v & SLP_EN:
                    sleep = (v & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        if sleep is not None and self.on_sleep:
            self.on_sleep(sleep)
        if self.on_change:
            self.on_change()

    def wake(self, by_rtc: bool) -> None:
        """The machine woke from a sleep state: WAK_STS (and RTC_STS for an RTC alarm)."""
        self.raise_status(WAK_STS | (RTC_STS if by_rtc else 0))
