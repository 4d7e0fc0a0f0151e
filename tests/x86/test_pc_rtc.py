"""Issue 10: the PC machine's CMOS RTC (ports 0x70/0x71): registers, the update cycle (UIP),
the alarm and update-ended interrupts through the IOAPIC, SET, and CMOS RAM — seen by
pc_rtc.c (beside this file)."""
import calendar
import time

import pytest

pytestmark = pytest.mark.requires_arch("x86_64")


def bcd(v):
    return (v >> 4) * 10 + (v & 0xF)


def test_rtc_registers_update_cycle_alarm_and_set(guest_vm):
    m = guest_vm("pc_rtc.c", machine="pc")
    before = time.time()
    a, b, d, century, year, month, day = m.sync(stage=1)
    assert a & 0x7F == 0x26              # 32.768 kHz divider, 1024 Hz rate select (bit 7, UIP,
                                         # may be caught set: the update cycle runs on its own)
    assert b == 0x02                     # 24-hour BCD, no interrupts enabled
    assert d == 0x80                     # valid RAM and time
    hours, minutes, s0, s1, uip = m.sync(stage=2)     # s1: after the next update (one sync:
    after = time.time()                               # no host round trip between them)
    assert uip == 1
    guest = calendar.timegm((bcd(century) * 100 + bcd(year), bcd(month), bcd(day),
                             bcd(hours), bcd(minutes), bcd(s0)))
    # UTC from the host clock: the guest read it between `before` and `after` (whole seconds)
    assert before - 1 <= guest <= after, (before, guest, after)
    # an update moved the seconds on: by 1, or by as many as the host took (a busy host can
    # keep the guest off the CPU across an update)
    assert 1 <= (bcd(s1) - bcd(s0)) % 60 <= int(after - before) + 2, (s0, s1, after - before)
    # the alarm is set 2 s after an update the guest saw; a guest kept off the CPU past it (a
    # loaded host) gets the same alarm a minute later, still at the alarm second: wait for it
    alarm, sec_at_irq, c, irqs, vector = m.sync(stage=3, timeout=150)
    assert (irqs, vector) == (1, 0x48)   # IRQ 8 through IOAPIC pin 8
    assert c & 0xA0 == 0xA0              # IRQF | AF
    assert sec_at_irq == alarm           # it fired at the alarm second
    irqs, c = m.sync(stage=4)
    assert irqs == 2 and c & 0x90 == 0x90    # update-ended interrupts: IRQF | UF
    start = time.monotonic()
    b_now, h12, hh, mm, ss, ram = m.sync(stage=5)
    took = time.monotonic() - start
    assert b_now == 0x02
    assert h12 == 0x8C                   # binary 12-hour mode: PM | 12
    # the clock runs on from 12:34:56: by as many updates as came between clearing SET and the
    # reads (the first within 1 s, the clock keeping its phase), at most one more than the
    # whole seconds the step took (a loaded host can keep the guest off the CPU in between)
    ran = bcd(hh) * 3600 + bcd(mm) * 60 + bcd(ss) - (12 * 3600 + 34 * 60 + 56)
    assert 0 <= ran <= int(took) + 1, (hh, mm, ss, took)
    assert ram == 0xA5                   # CMOS RAM
    m.done()


def test_cmos_describes_memory_and_cpus(guest_vm):
    m = guest_vm("pc_fwcfg.c", machine="pc", vcpus=2, mem_size=6 << 30)
    cmos = m.platform.rtc.cmos
    assert cmos[0x15] | cmos[0x16] << 8 == 640
    assert cmos[0x34] | cmos[0x35] << 8 == ((3 << 30) - (16 << 20)) >> 16
    assert cmos[0x5B] | cmos[0x5C] << 8 | cmos[0x5D] << 16 == (3 << 30) >> 16
    assert cmos[0x5F] == 1
