"""ACPI fixed-hardware power management registers (ACPI 6.x, 4.8), at QEMU pc's ports:

==========  =====  =====================================================================
port        size   register
==========  =====  =====================================================================
0x600       16     PM1a_STS: TMR_STS (0), GBL_STS (5), PWRBTN_STS (8), SLPBTN_STS (9),
                   RTC_STS (10), WAK_STS (15); write 1 to clear
0x602       16     PM1a_EN: TMR_EN (0), GBL_EN (5), PWRBTN_EN (8), SLPBTN_EN (9), RTC_EN (10)
0x604       16     PM1a_CNT: SCI_EN (0, reads 1: there is no SMI command port, the machine is
                   always in ACPI mode), BM_RLD (1), GBL_RLS (2), SLP_TYP (12:10), SLP_EN (13,
                   write-only: a write with it set enters the sleep state SLP_TYP names)
0x608       32     PM_TMR: a 24-bit counter at 3.579545 MHz (FADT TMR_VAL_EXT clear)
==========  =====  =====================================================================

Byte and word accesses to any part of a register work as on the PIIX4. TMR_STS is set each time
bit 23 of the timer changes; the SCI (IRQ 9) is asserted while any enabled status bit is set
and SCI_EN is on. A write of SLP_EN calls ``on_sleep(slp_typ)``; the PC machine enters S3
(SLP_TYP 1) or powers off (SLP_TYP 0, S5).
"""
import threading
import time
from typing import Callable, Optional

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
CNT_MASK = 0x0007 | SLP_TYP_MASK      # the bits that read back


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
    def _reg16(self, base: int) -> int:
        if base == STS_PORT:
            self._sync_timer_status()
            return self.sts
        if base == EN_PORT:
            return self.en
        return self.cnt & CNT_MASK

    def read(self, port: int, size: int) -> int:
        """An IN of ``size`` bytes at ``port`` (0x600-0x60b)."""
        with self._lock:
            value = 0
            timer = self.timer() if port + size > TMR_PORT else 0    # one sample per access
            for i in range(size):
                p = port + i
                if TMR_PORT <= p < TMR_PORT + 4:
                    b = (timer >> (8 * (p - TMR_PORT))) & 0xFF
                elif STS_PORT <= p < CNT_PORT + 2:
                    base = p & ~1
                    b = (self._reg16(base) >> (8 * (p & 1))) & 0xFF
                else:
                    b = 0xFF
                value |= b << (8 * i)
            return value

    def write(self, port: int, size: int, value: int) -> None:
        """An OUT of ``size`` bytes at ``port``."""
        sleep = None
        with self._lock:
            for base in (STS_PORT, EN_PORT, CNT_PORT):
                # the part of this 16-bit register the access covers
                lo, hi = max(port, base), min(port + size, base + 2)
                if lo >= hi:
                    continue
                mask = 0
                bits = 0
                for p in range(lo, hi):
                    shift = 8 * (p - base)
                    mask |= 0xFF << shift
                    bits |= ((value >> (8 * (p - port))) & 0xFF) << shift
                if base == STS_PORT:
                    self._sync_timer_status()
                    self.sts &= ~(bits & STS_MASK)
                elif base == EN_PORT:
                    self.en = (self.en & ~mask) | (bits & mask & EN_MASK)
                else:
                    self.cnt = ((self.cnt & ~mask) | (bits & mask)) & CNT_MASK | SCI_EN
                    if bits & mask & SLP_EN:
                        sleep = (bits & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            self._update_sci()
        if sleep is not None and self.on_sleep:
            self.on_sleep(sleep)

    def wake(self, by_rtc: bool) -> None:
        """The machine woke from a sleep state: WAK_STS (and RTC_STS for an RTC alarm)."""
        self.raise_status(WAK_STS | (RTC_STS if by_rtc else 0))
