"""The PC's CMOS real-time clock (a Motorola MC146818 as the PC wires it): index port 0x70 (bit 7
masks NMI), data port 0x71, 128 bytes of CMOS.

Registers (MC146818A data sheet; the PC's use of the CMOS bytes):

====  ===========================================================================
0-9   seconds, seconds alarm, minutes, minutes alarm, hours, hours alarm, day of week
      (1 = Sunday), day of month, month, year: the guest's time, UTC from the host clock at
      start-up, in BCD or binary (B.DM) and 24- or 12-hour form (B.24/12, PM = bit 7)
0x0A  A: UIP (bit 7, read-only), divider (6:4, 010 = 32.768 kHz), rate select (3:0)
0x0B  B: SET (7), PIE (6), AIE (5), UIE (4), SQWE (3), DM (2), 24/12 (1), DSE (0)
0x0C  C (read-only, cleared by reading): IRQF (7), PF (6), AF (5), UF (4)
0x0D  D: VRT (bit 7, always 1)
0x32  century (BCD)
====  ===========================================================================

The clock ticks once per second of host time. UIP reads 1 during the 244 µs before each update
and — so that a guest polling for it cannot miss it between two reads — also on the first read
of A after an update that no read of A saw in progress, if the read before it came less than
20 ms before that update. SET freezes the time registers (they
read back what is written); clearing SET starts the clock from them. So does register A's divider:
DV2-0 other than 000/001/010 stops the clock (11x holds the divider in reset), and leaving reset
restarts it with the first update half a second later (QEMU's mc146818rtc). An alarm register
with its two high bits set matches any value ("don't care"); one no time register value can equal
in the current DM and 24/12 modes (an invalid BCD digit, 60 seconds, hour 0 in 12-hour mode)
never matches. The next alarm is found in closed form, and every port access costs constant work.

Each second boundary sets UF, and AF when the time then matches the alarm; PF is set at the
periodic rate rate select names. IRQF = (PF & PIE) | (AF & AIE) | (UF & UIE); while it is set the
IRQ 8 line is high (``set_irq``), reading C lowers it. ``on_alarm`` is called for every alarm
(the PC machine sets PM1 RTC_STS and wakes from S3). :meth:`next_event_ns` tells the machine
when to call :meth:`poll` next so that an enabled interrupt is raised on time.
"""
from __future__ import annotations

import threading
import time
from .snapstate import DeviceState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

INDEX_PORT = 0x70
DATA_PORT = 0x71

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0, 1, 2, 3, 4, 5
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32

A_UIP = 0x80
A_DV_MASK = 0x70
A_DV_NORMAL = 0x20
A_RS_MASK = 0x0F
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM, B_24H, B_DSE = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, \
    0x02, 0x01
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80
DONT_CARE = 0xC0

NS = 1_000_000_000
UIP_WINDOW_NS = 244_000            # UIP goes high this long before each update
UIP_POLL_GAP_NS = 20_000_000       # a read of A this close before a missed update still sees it
TIME_REGS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR)


def bcd(v: int) -> int:
    """``v`` (0-99) in packed BCD: tens in the high nibble, units in the low one."""
    return ((v // 10) << 4) | (v % 10)


def from_bcd(v: int) -> int:
    """The number a packed BCD byte ``v`` holds (the inverse of :func:`bcd`)."""
    return (v >> 4) * 10 + (v & 0xF)


def _days_from_civil(year: int, month: int) -> int:
    """Days from 1970-01-01 to the first of ``month`` (1-12) of ``year`` (proleptic Gregorian,
    any year): closed form."""
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(days: int):
    """(year, month 1-12, day 1-31) of the day ``days`` after 1970-01-01 (proleptic Gregorian,
    any integer): closed form, the inverse of :func:`_days_from_civil`."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


# The RTC counts years 0-9999 (a BCD century byte and a year byte): 10,000 Gregorian years are
# 25 cycles of 146,097 days, a whole number of weeks, so the clock wraps cleanly after them.
CLOCK_PERIOD_S = 25 * 146097 * 86400


def periodic_ns(rate_select: int) -> Optional[int]:
    """The periodic interrupt period for rate select bits (32.768 kHz time base), or None."""
    rs = rate_select & 0xF
    if rs == 0:
        return None
    if rs <= 2:
        rs += 7                          # 1 -> 256 Hz, 2 -> 128 Hz (as rates 8 and 9)
    return (1 << (rs - 1)) * NS // 32768


class CmosRtc(DeviceState):
    """The RTC and its CMOS. ``set_irq(level)`` drives IRQ 8; ``on_alarm()`` is called for
    every alarm; ``on_change()`` after every port write (reschedule :meth:`poll`); ``clock``
    gives monotonic nanoseconds; ``wall_ns`` the host's UTC time in nanoseconds at start-up
    (default: now).

    On the port bus: one two-port block at 0x70 (offset 0: index, 1: data) taking accesses of
    up to 4 bytes, QEMU's "rtc" I/O region (the bus cuts an access at 0x71 to one byte)."""

    SNAPSHOT_FIELDS = ('cmos', 'index', 'nmi_masked', 'offset_ns', '_last_ns', '_last_a_ns', '_a_showed_uip', '_irq', '_raw', '_raw_s', '_raw_mode')
    SNAPSHOT_MONO = ('_last_ns', '_last_a_ns')
    SNAPSHOT_OFFSET = ('offset_ns',)
    SNAPSHOT_RANGES = {"index": (0, 0x7F), "_raw_mode": (0, 0xFF)}

    PIO_RANGES = ((INDEX_PORT, 2, 0, 4),)

    def __init__(self, *, set_irq: Optional[Callable[[int], None]] = None,
                 on_alarm: Optional[Callable[[], None]] = None,
                 on_change: Optional[Callable[[], None]] = None,
                 clock: Callable[[], int] = time.monotonic_ns,
                 wall_ns: Optional[int] = None):
        self.set_irq = set_irq
        self.on_alarm = on_alarm
        self.on_change = on_change          # registers changed: reschedule poll()
        self.clock = clock
        self._lock = threading.RLock()
        self.cmos = bytearray(128)
        self.index = 0
        self.nmi_masked = False
        now = clock()
        wall = time.time_ns() if wall_ns is None else wall_ns
        self.offset_ns = wall - now       # guest RTC time (ns since the epoch) = mono + offset
        self.cmos[REG_A] = A_DV_NORMAL | 0x06          # 32.768 kHz, 1024 Hz periodic rate
        self.cmos[REG_B] = B_24H
        self.cmos[REG_D] = D_VRT
        self._last_ns = now                # flags (UF/AF/PF) are accounted up to here
        self._last_a_ns = now              # when A was last read, and whether it showed UIP
        self._a_showed_uip = False
        self._irq = 0
        self._raw: Optional[dict] = None   # the bytes the clock restarted from (_current_regs)
        self._raw_s = 0                    # and the guest second they stand for
        self._raw_mode = 0                 # and the DM / 24-hour bits they were written in

    # -- time ------------------------------------------------------------------------------
    def guest_ns(self, mono: Optional[int] = None) -> int:
        """The guest's RTC time in nanoseconds since the Unix epoch (UTC) at monotonic time
        ``mono`` (nanoseconds; now when None)."""
        return (self.clock() if mono is None else mono) + self.offset_ns

    def _divider_running(self) -> bool:
        """Whether register A's divider bits (DV2-0, bits 6:4) let the divider chain run: 000,
        001 and 010 do (QEMU's ``rtc_running``); 11x holds it in reset, the rest are test modes
        that stop it."""
        return (self.cmos[REG_A] & A_DV_MASK) <= A_DV_NORMAL

    def _running(self) -> bool:
        """Whether the time registers count: the divider runs and B.SET is clear."""
        return not self.cmos[REG_B] & B_SET and self._divider_running()

    def _encode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM else bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM else from_bcd(v)

    def _encode_hour(self, h: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._encode(h)
        return self._encode(h % 12 or 12) | (0x80 if h >= 12 else 0)

    def _decode_hour(self, v: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._decode(v)
        h = self._decode(v & 0x7F) % 12
        return h + 12 if v & 0x80 else h

    def _time_regs(self, seconds: int) -> dict:
        # any guest second (a guest may set any date, or none that exists): the chip's 10,000
        # year range wraps, so every byte stays a byte; no host calendar call is involved
        days, sod = divmod(seconds % CLOCK_PERIOD_S, 86400)
        year, month, mday = _civil_from_days(days)
        year %= 10000
        hour, rest = divmod(sod, 3600)
        minute, sec = divmod(rest, 60)
        wday = (days + 4) % 7 + 1                  # 1970-01-01 was a Thursday; Sunday = 1
        return {SECONDS: self._encode(sec), MINUTES: self._encode(minute),
                HOURS: self._encode_hour(hour), DAY_OF_WEEK: self._encode(wday),
                DAY_OF_MONTH: self._encode(mday), MONTH: self._encode(month),
                YEAR: self._encode(year % 100), CENTURY: bcd(year // 100)}

    def _regs_to_seconds(self) -> int:
        """The time the registers hold, decoded in the current DM and 24/12 modes, leniently:
        a byte that is no valid value in these modes (BCD bytes read as binary after a DM
        switch, day 0, month 13...) still counts arithmetically (a day of month past the end
        runs into the next month, as QEMU's ``mktimegm`` takes it), so what the guest wrote is
        never replaced by host time. Closed form."""
        c = self.cmos
        year = from_bcd(c[CENTURY]) * 100 + self._decode(c[YEAR])
        month = self._decode(c[MONTH]) - 1
        year += month // 12
        month = month % 12 + 1
        days = _days_from_civil(year, month) + self._decode(c[DAY_OF_MONTH]) - 1
        return days * 86400 + self._decode_hour(c[HOURS]) * 3600 + \
            self._decode(c[MINUTES]) * 60 + self._decode(c[SECONDS])

    def _current_regs(self, seconds: int) -> dict:
        """The time registers at guest second ``seconds`` while the clock runs: computed from
        the time, except the bytes the guest wrote (or that were latched) at the last restart
        whose field no update has carried into since: until the first update the seconds byte,
        until the minute changes the minutes byte, and so on up to the date bytes until the day
        changes. The MC146818 counts the bytes as stored, so a byte that is no valid value in
        the current mode reads back as written until the chip carries into it. Once the guest
        changes DM or 24/12 while the clock runs, every byte is the time in the new mode (as
        QEMU re-encodes it)."""
        regs = self._time_regs(seconds)
        raw = self._raw
        if raw is not None and self.cmos[REG_B] & (B_DM | B_24H) == self._raw_mode:
            t0 = self._raw_s
            for unit, fields in ((1, (SECONDS,)), (60, (MINUTES,)), (3600, (HOURS,)),
                                 (86400, (DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY))):
                if seconds // unit == t0 // unit:        # no carry into these fields yet
                    for reg in fields:
                        regs[reg] = raw[reg]
        return regs

    def _freeze(self) -> None:
        """Latch the current time into the time registers (SET went high)."""
        for reg, v in self._current_regs(self.guest_ns() // NS).items():
            self.cmos[reg] = v
        self._raw = None

    def _restart_from_regs(self, phase_ns: Optional[int] = None) -> None:
        """Start the clock from the time registers, ``phase_ns`` into the current second (the
        running clock's own phase when None). The register bytes are kept (see
        :meth:`_current_regs`)."""
        now = self.clock()
        phase = self.guest_ns(now) % NS if phase_ns is None else phase_ns
        start = self._regs_to_seconds()
        self.offset_ns = start * NS + phase - now
        self._last_ns = now
        self._raw = {reg: self.cmos[reg] for reg in TIME_REGS + (CENTURY,)}
        self._raw_s = start
        self._raw_mode = self.cmos[REG_B] & (B_DM | B_24H)

    # -- flags ---------------------------------------------------------------------------------
    def _alarm_field(self, reg: int, top: int, hour: bool = False) -> Optional[int]:
        """The one value (0 <= v < top) alarm register ``reg`` matches, -1 for "don't care" (its two
        high bits set), or None when no time register value can ever equal it (an invalid BCD
        digit, a value out of range, hour 0 in 12-hour mode): the MC146818 compares the alarm
        byte with the time byte as stored, in the current DM and 24/12 modes."""
        a = self.cmos[reg]
        if a & DONT_CARE == DONT_CARE:
            return -1
        if hour:
            v = self._decode_hour(a)
            return v if 0 <= v < top and self._encode_hour(v) == a else None
        v = self._decode(a)
        return v if 0 <= v < top and self._encode(v) == a else None

    def _next_alarm(self, after_s: int) -> Optional[int]:
        """The first second s > ``after_s`` (guest seconds since the epoch) whose time of day
        matches the alarm registers, or None if it never can. Closed form: a constant amount of
        work whatever the alarm (MC146818A data sheet, "Alarm"; a day has no leap second here)."""
        sec = self._alarm_field(SECONDS_ALARM, 60)
        mnt = self._alarm_field(MINUTES_ALARM, 60)
        hr = self._alarm_field(HOURS_ALARM, 24, hour=True)
        if sec is None or mnt is None or hr is None:
            return None

        def first(field, at_least, top):
            """The smallest value >= at_least the field matches, or None."""
            if field == -1:
                return at_least if at_least < top else None
            return field if field >= at_least else None

        t = after_s + 1
        day, sod = divmod(t, 86400)
        h0, rest = divmod(sod, 3600)
        m0, s0 = divmod(rest, 60)
        lo_s, lo_m, lo_h = first(sec, 0, 60), first(mnt, 0, 60), first(hr, 0, 24)
        if hr == -1 or hr == h0:
            if mnt == -1 or mnt == m0:
                s = first(sec, s0, 60)
                if s is not None:
                    return day * 86400 + h0 * 3600 + m0 * 60 + s
            m = first(mnt, m0 + 1, 60)
            if m is not None:
                return day * 86400 + h0 * 3600 + m * 60 + lo_s
        h = first(hr, h0 + 1, 24)
        if h is not None:
            return day * 86400 + h * 3600 + lo_m * 60 + lo_s
        return (day + 1) * 86400 + lo_h * 3600 + lo_m * 60 + lo_s

    def _account(self, now: int) -> int:
        """Flags from the events in (last, now]; returns the new C bits (not yet IRQF)."""
        last = self._last_ns
        self._last_ns = now
        bits = 0
        if now <= last:
            return 0
        rate = periodic_ns(self.cmos[REG_A])
        if rate and self._divider_running() and \
                self.guest_ns(now) // rate != self.guest_ns(last) // rate:
            bits |= C_PF
        if self._running():
            s0, s1 = self.guest_ns(last) // NS, self.guest_ns(now) // NS
            if s1 > s0:
                bits |= C_UF
                a = self._next_alarm(s0)
                if a is not None and a <= s1:
                    bits |= C_AF
        return bits

    def _update_flags(self, now: Optional[int] = None) -> None:
        now = self.clock() if now is None else now
        new = self._account(now)
        c = self.cmos[REG_C] | new
        b = self.cmos[REG_B]
        if (c & C_PF and b & B_PIE) or (c & C_AF and b & B_AIE) or (c & C_UF and b & B_UIE):
            c |= C_IRQF
        self.cmos[REG_C] = c
        if new & C_AF and self.on_alarm:
            self.on_alarm()
        self._drive_irq()

    def _drive_irq(self) -> None:
        level = 1 if self.cmos[REG_C] & C_IRQF else 0
        if level != self._irq:
            self._irq = level
            if self.set_irq:
                self.set_irq(level)

    def poll(self) -> None:
        """Account the events up to now and raise IRQ 8 for enabled ones (the PC machine calls
        this at :meth:`next_event_ns`)."""
        with self._lock:
            self._update_flags()

    def next_event_ns(self) -> Optional[int]:
        """The monotonic time of the next event an enabled interrupt waits for, or None."""
        with self._lock:
            b = self.cmos[REG_B]
            now = self.clock()
            out = []
            if b & B_PIE and self._divider_running():
                rate = periodic_ns(self.cmos[REG_A])
                if rate:
                    g = self.guest_ns(now)
                    out.append((g // rate + 1) * rate - self.offset_ns)
            if self._running() and b & (B_UIE | B_AIE):
                s = self.guest_ns(now) // NS
                if b & B_UIE:
                    out.append((s + 1) * NS - self.offset_ns)
                else:
                    a = self._next_alarm(s)
                    if a is not None:
                        out.append(a * NS - self.offset_ns)
            return min(out) if out else None

    def alarm_armed(self) -> bool:
        """Whether an alarm interrupt is enabled and can happen."""
        with self._lock:
            if not (self.cmos[REG_B] & B_AIE and self._running()):
                return False
            return self._next_alarm(self.guest_ns() // NS) is not None

    # -- ports ---------------------------------------------------------------------------------
    def _uip(self, now: int) -> bool:
        if not self._running():
            return False
        g = self.guest_ns(now)
        in_window = NS - g % NS <= UIP_WINDOW_NS
        last = self.guest_ns(self._last_a_ns)
        # an update that fell between two reads of a guest polling A (reads less than
        # UIP_POLL_GAP_NS apart around it) still shows as UIP once
        missed = not self._a_showed_uip and last // NS != g // NS and \
            (last // NS + 1) * NS - last <= UIP_POLL_GAP_NS
        self._last_a_ns = now
        self._a_showed_uip = in_window or missed
        return self._a_showed_uip

    def read_register(self, reg: int) -> int:
        """CMOS register ``reg`` (0-0x7f) as a read of port 0x71 returns it: A with UIP computed, C
        read and cleared (lowering IRQ 8), D with VRT set, the time registers from the running
        clock unless SET is on, any other byte as stored."""
        with self._lock:
            now = self.clock()
            if reg == REG_A:
                return (self.cmos[REG_A] & ~A_UIP) | (A_UIP if self._uip(now) else 0)
            if reg == REG_C:
                self._update_flags(now)
                v = self.cmos[REG_C]
                self.cmos[REG_C] = 0
                self._drive_irq()
                return v
            if reg == REG_D:
                return D_VRT
            if (reg in TIME_REGS or reg == CENTURY) and self._running():
                return self._current_regs(self.guest_ns(now) // NS)[reg]
            return self.cmos[reg & 0x7F]

    def write_register(self, reg: int, value: int) -> None:
        """Write byte ``value`` to CMOS register ``reg`` (0-0x7f), as QEMU's mc146818rtc does:

        * A: UIP (bit 7) is read-only; stopping the divider (DV2-0 not 000/001/010) latches the
          time into the time registers, starting it again restarts the clock from them, the first
          update half a second after leaving divider reset (11x);
        * B: setting SET latches the time and clears UIE, clearing it restarts the clock from the
          time registers (keeping the sub-second phase); IRQF (and IRQ 8) then follows the flags
          in C the new B enables;
        * C and D are read-only; a time register sets the clock while it runs (stored only while
          it is stopped); any other byte is stored.

        Calls ``on_change`` after."""
        with self._lock:
            value &= 0xFF
            reg &= 0x7F
            if reg == REG_A:
                self._update_flags()
                was_running = self._running()
                old = self.cmos[REG_A]
                if was_running and (value & A_DV_MASK) > A_DV_NORMAL:
                    self._freeze()
                self.cmos[REG_A] = value & ~A_UIP
                if not was_running and self._running():
                    self._restart_from_regs(NS // 2 if old & 0x60 == 0x60 else 0)
            elif reg == REG_B:
                self._update_flags()
                old = self.cmos[REG_B]
                was_running = self._running()
                if value & B_SET:
                    value &= ~B_UIE              # SET clears UIE
                    if was_running:
                        self._freeze()
                self.cmos[REG_B] = value
                if old & B_SET and not value & B_SET and self._running():
                    self._restart_from_regs()
                # IRQF follows the flags the new B enables (QEMU raises or lowers IRQ 8 here)
                c = self.cmos[REG_C]
                if c & value & (C_PF | C_AF | C_UF):
                    self.cmos[REG_C] = c | C_IRQF
                else:
                    self.cmos[REG_C] = c & ~C_IRQF
                self._drive_irq()
            elif reg in (REG_C, REG_D):
                pass                                  # read-only
            elif reg in TIME_REGS or reg == CENTURY:
                if self._running():
                    self._update_flags()
                    self._freeze()
                    self.cmos[reg] = value
                    self._restart_from_regs()
                else:
                    self.cmos[reg] = value
            else:
                self.cmos[reg] = value
        if self.on_change:
            self.on_change()

    def read(self, offset: int, size: int) -> int:
        """``size`` bytes read at ``offset`` of the RTC's two-port block (0: index, 1: data), as
        the bus hands them (:attr:`PIO_RANGES`: accesses of up to 4 bytes, not cut at the
        block's end, as QEMU's "rtc" region takes them): each byte at an even offset is the
        write-only index port and reads 0xff, each byte at an odd offset reads the selected
        register (so a 4-byte read at 0x70 is index, data, index, data)."""
        value = 0
        for k in range(size):
            b = self.read_register(self.index) if (offset + k) & 1 else 0xFF
            value |= b << (8 * k)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """``size`` bytes of ``value`` written at ``offset``, byte by byte as :meth:`read`: at
        an even offset select the register (bits 6:0) and set the NMI mask (bit 7), at an odd
        one write the selected register."""
        for k in range(size):
            b = (value >> (8 * k)) & 0xFF
            if (offset + k) & 1:
                self.write_register(self.index, b)
            else:
                self.index = b & 0x7F
                self.nmi_masked = bool(b & 0x80)

    # -- firmware defaults -------------------------------------------------------------------
    def set_memory_info(self, *, below_4g: int, above_4g: int, cpus: int) -> None:
        """The CMOS bytes a PC BIOS leaves describing RAM and CPUs (base memory 640 KiB; KiB
        above 1 MiB at 0x17/0x30; 64 KiB units above 16 MiB at 0x34 and above 4 GiB at 0x5b;
        CPUs - 1 at 0x5f)."""
        c = self.cmos
        c[0x15], c[0x16] = 0x80, 0x02                       # 640 KiB
        ext = min(max(0, below_4g - (1 << 20)) >> 10, 0xFFFF)
        c[0x17], c[0x18] = ext & 0xFF, ext >> 8
        c[0x30], c[0x31] = ext & 0xFF, ext >> 8
        over16 = min(max(0, below_4g - (16 << 20)) >> 16, 0xFFFF)
        c[0x34], c[0x35] = over16 & 0xFF, over16 >> 8
        high = above_4g >> 16
        c[0x5B], c[0x5C], c[0x5D] = high & 0xFF, (high >> 8) & 0xFF, (high >> 16) & 0xFF
        c[0x5F] = max(0, cpus - 1) & 0xFF
