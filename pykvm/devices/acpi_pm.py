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
:mod:`.ioaccess`: the event block (0x600-0x603) and the control register (0x604-0x605) take 1-
and 2-byte accesses, each served as a 16-bit access at the byte's offset (a byte read at 0x600
or 0x602 gives the low byte of STS or EN, at 0x601 or 0x603 gives 0; a byte write at 0x600 or
0x602 writes the byte zero-extended, so it clears EN's high byte; one at 0x601 or 0x603 does
nothing; the control register is read and written whole at either offset); a 4-byte access is
two 2-byte ones. The timer block (0x608-0x60b) takes any width, each part reading the timer's
low bits; writes to it do nothing. Ports 0x606-0x607 are unassigned (all-ones).

TMR_STS is set each time bit 23 of the timer changes; the SCI (IRQ 9) is asserted while any
enabled status bit is set and SCI_EN is on. A write of SLP_EN calls ``on_sleep(slp_typ)``; the
PC machine enters S3 (SLP_TYP 1) or powers off (SLP_TYP 0, S5). Every access costs constant
work (the timer is arithmetic on the clock).
"""
import threading
import time
from typing import Callable, Optional

from .ioaccess import pieces

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

# QEMU's PIIX4 PM regions: (first port, ports, largest valid access)
_EVT, _CNT, _TMR = 0, 1, 2
_PORTS = ((STS_PORT, 4, 2), (CNT_PORT, 2, 2), (TMR_PORT, 4, 4))


def ticks_since(t0_ns: int, now_ns: int) -> int:
    """PM timer ticks (3.579545 MHz) from monotonic time ``t0_ns`` to ``now_ns`` (nanoseconds),
    rounded down and not wrapped."""
    return (now_ns - t0_ns) * PM_TIMER_HZ // 1_000_000_000


class AcpiPm:
    """The PM1a event/control blocks and the PM timer. ``set_sci(level)``: drive the SCI line;
    ``on_sleep(slp_typ)``: a write of SLP_EN (called without the device lock held);
    ``clock``: nanoseconds (time.monotonic_ns)."""

    def __init__(self, *, set_sci: Optional[Callable[[int], None]] = None,
                 on_sleep: Optional[Callable[[int], None]] = None,
                 clock: Callable[[], int] = time.monotonic_ns):
        self.set_sci = set_sci
        self.on_sleep = on_sleep
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

    # -- registers ---------------------------------------------------------------------------
    def _read16(self, region: int, off: int) -> int:
        if region == _EVT:
            if off == 0:
                self._sync_timer_status()
                return self.sts
            return self.en if off == 2 else 0
        return self.cnt & CNT_MASK

    def read(self, port: int, size: int) -> int:
        """An IN of ``size`` bytes (1, 2 or 4) at ``port`` (0x600-0x60b), as the module
        docstring says."""
        with self._lock:
            value = 0
            timer = None
            for region, off, n, pos in pieces(port, size, _PORTS):
                mask = (1 << (8 * n)) - 1
                if region is None:
                    v = mask
                elif region == _TMR:
                    if timer is None:
                        timer = self.timer()            # one sample per access
                    v = timer & mask
                else:
                    v = self._read16(region, off) & mask
                value |= v << (8 * pos)
            return value

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT of ``size`` bytes of ``value`` at ``port``, as the module docstring says:
        PM1_STS bits written 1 are cleared, PM1_EN takes the value (reserved bits stay 0),
        PM1_CNT keeps BM_RLD and SLP_TYP and sleeps on SLP_EN; the timer ignores writes."""
        sleep = None
        with self._lock:
            for region, off, n, pos in pieces(port, size, _PORTS):
                v = (value >> (8 * pos)) & ((1 << (8 * n)) - 1)   # zero-extended to 16 bits
                if region == _EVT and off == 0:
                    self._sync_timer_status()
                    self.sts &= ~(v & STS_MASK)
                elif region == _EVT and off == 2:
                    self.en = v & EN_MASK
                elif region == _CNT:
                    self.cnt = (v & CNT_MASK) | SCI_EN
                    if v & SLP_EN:
                        sleep = (v & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            self._update_sci()
        if sleep is not None and self.on_sleep:
            self.on_sleep(sleep)

    def wake(self, by_rtc: bool) -> None:
        """The machine woke from a sleep state: WAK_STS (and RTC_STS for an RTC alarm)."""
        self.raise_status(WAK_STS | (RTC_STS if by_rtc else 0))
