"""Issue 16 (faults 2, 3, 6): the PC's CMOS RTC, fw_cfg, ACPI PM registers and pc-testdev under
hostile guest inputs — every width and alignment QEMU's memory core would pass them (checked
against QEMU 7.2 by hand: see each model's docstring), read-only/reserved/W1C bits, QEMU's x86
fw_cfg keys, and bounded host work (counted, never timed)."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.devices import acpi_pm as pm, cmos_rtc as rtc
from pykvm.devices.fw_cfg import FwCfg
from pykvm.devices.testdev import PcTestdev

from device_buses import pio

NS = 1_000_000_000
GiB = 1 << 30


class Clock:
    def __init__(self, t=1_000 * NS):
        self.t = t

    def __call__(self):
        return self.t


def make_rtc():
    clk = Clock()
    # 2026-11-30 02:42:07.500 UTC
    return rtc.CmosRtc(clock=clk, wall_ns=1_796_006_527 * NS + NS // 2), clk


# -- RTC: fault 3 (bounded work) ---------------------------------------------------------------
def _brute_next_alarm(r, after_s):
    """Reference: the time-of-day values whose *encoded* form (DM, 24/12 as the time registers
    hold them) equals each alarm byte, then the first combination after ``after_s``."""
    c = r.cmos

    def matches(reg, values, enc):
        a = c[reg]
        return list(values) if a & 0xC0 == 0xC0 else [v for v in values if enc(v) == a]
    secs = matches(rtc.SECONDS_ALARM, range(60), r._encode)
    mins = matches(rtc.MINUTES_ALARM, range(60), r._encode)
    hours = matches(rtc.HOURS_ALARM, range(24), r._encode_hour)
    day0 = (after_s // 86400) * 86400
    for day in (0, 1):
        for h in hours:
            for m in mins:
                for s in secs:
                    t = day0 + day * 86400 + h * 3600 + m * 60 + s
                    if t > after_s:
                        return t
    return None


@settings(max_examples=300, deadline=None)
@given(sec=st.integers(0, 255), mnt=st.integers(0, 255), hr=st.integers(0, 255),
       mode=st.sampled_from([0, rtc.B_DM, rtc.B_24H, rtc.B_DM | rtc.B_24H]),
       after=st.integers(1_700_000_000, 1_900_000_000))
def test_next_alarm_is_closed_form_and_matches_stepping(sec, mnt, hr, mode, after):
    r, _ = make_rtc()
    r.cmos[rtc.REG_B] = mode
    r.cmos[rtc.SECONDS_ALARM], r.cmos[rtc.MINUTES_ALARM], r.cmos[rtc.HOURS_ALARM] = sec, mnt, hr
    calls = []
    real = r._time_regs
    r._time_regs = lambda s: calls.append(s) or real(s)      # counts per-second work
    got = r._next_alarm(after)
    assert calls == []                                        # no stepping through time
    r._time_regs = real
    assert got == _brute_next_alarm(r, after)


def test_never_matching_alarm_costs_constant_work_per_cmos_write():
    r, clk = make_rtc()
    io = pio(r)
    r.write_register(rtc.REG_B, rtc.B_24H | rtc.B_AIE)
    r.write_register(rtc.SECONDS_ALARM, 0x7F)                 # BCD 7F: never a seconds value
    calls = []
    real = r._time_regs
    r._time_regs = lambda s: calls.append(s) or real(s)
    for i in range(1000):
        io.write(0x70, 1, 0x40 + (i & 0x3F))
        io.write(0x71, 1, i & 0xFF)                            # CMOS RAM writes
        r.next_event_ns()
        clk.t += NS // 3
        r.poll()
    assert r.alarm_armed() is False and r.next_event_ns() is None
    assert len(calls) == 0                                    # nothing proportional to time


@pytest.mark.parametrize("alarm,mode,expect", [
    ((0x7F, 0xC0, 0xC0), rtc.B_24H, None),                    # invalid BCD second
    ((0x3C, 0xC0, 0xC0), rtc.B_24H | rtc.B_DM, None),         # binary 60
    ((0xC0, 0xC0, 0x00), 0, None),                            # hour 0 in 12-hour mode
    ((0x1A, 0xC0, 0xC0), rtc.B_24H, None),                    # BCD digit A
    ((0x10, 0x43, 0x02), rtc.B_24H, 1_796_006_527 - 7 + 60 + 10),   # 02:43:10 today
    ((0x05, 0x42, 0x02), rtc.B_24H, 1_796_006_527 - 2 + 86400),     # 02:42:05 tomorrow
    ((0xC0, 0xC0, 0x82), 0, 1_796_006_527 - 2 * 3600 - 42 * 60 - 7 + 14 * 3600),  # 2 PM
])
def test_alarm_values(alarm, mode, expect):
    r, _ = make_rtc()
    r.cmos[rtc.REG_B] = mode
    r.cmos[rtc.SECONDS_ALARM], r.cmos[rtc.MINUTES_ALARM], r.cmos[rtc.HOURS_ALARM] = alarm
    assert r._next_alarm(1_796_006_527) == expect


# -- RTC: fault 2 (registers and widths) --------------------------------------------------------
def test_rtc_read_only_bits_and_read_to_clear():
    r, clk = make_rtc()
    io = pio(r)
    r.write_register(rtc.REG_D, 0)
    assert r.read_register(rtc.REG_D) == 0x80                 # VRT read-only
    r.write_register(rtc.REG_A, 0xA6)
    assert r.read_register(rtc.REG_A) & 0x7F == 0x26          # UIP read-only
    r.write_register(rtc.REG_C, 0xF0)
    assert r.read_register(rtc.REG_C) == 0                    # read-only
    r.write_register(rtc.REG_B, rtc.B_24H | rtc.B_UIE)
    clk.t += 2 * NS
    assert r.read_register(rtc.REG_C) == rtc.C_IRQF | rtc.C_UF | rtc.C_PF
    assert r.read_register(rtc.REG_C) == 0                    # cleared by reading
    io.write(0x70, 1, 0x8F)                                    # bit 7: NMI mask, not the index
    assert r.index == 0x0F and r.nmi_masked
    io.write(0x70, 1, 0x0F)
    assert not r.nmi_masked


def test_rtc_widths_as_qemu():
    r, _ = make_rtc()
    io = pio(r)
    io.write(0x70, 2, 0x5A20)                                  # index 0x20, then data 0x5a
    assert r.cmos[0x20] == 0x5A
    assert io.read(0x70, 2) == 0x5AFF                          # index port reads 0xff
    assert io.read(0x71, 2) == 0xFF5A                          # 0x72 unassigned
    assert io.read(0x70, 4) == 0x5AFF5AFF                      # index, data, index, data
    io.write(0x70, 4, 0x66217755)                              # cmos[0x55]=0x77, cmos[0x21]=0x66
    assert (r.cmos[0x55], r.cmos[0x21]) == (0x77, 0x66)
    io.write(0x71, 4, 0xFFFFFF33)                              # one data byte; the rest dropped
    assert r.cmos[0x21] == 0x33 and r.index == 0x21


def test_rtc_divider_reset_stops_the_clock_and_restarts_half_a_second_later():
    r, clk = make_rtc()
    r.write_register(rtc.REG_A, 0x70)                         # divider reset
    frozen = r.read_register(rtc.SECONDS)
    clk.t += 5 * NS
    assert r.read_register(rtc.SECONDS) == frozen             # stopped
    assert not r.read_register(rtc.REG_A) & rtc.A_UIP
    r.write_register(rtc.SECONDS, 0x30)
    r.write_register(rtc.REG_A, 0x26)                         # running again
    assert r.read_register(rtc.SECONDS) == 0x30
    clk.t += NS // 2 - 1
    assert r.read_register(rtc.SECONDS) == 0x30
    clk.t += 1
    assert r.read_register(rtc.SECONDS) == 0x31               # first update 500 ms later


def test_rtc_b_write_lowers_irqf_when_flag_no_longer_enabled():
    levels = []
    clk = Clock()
    r = rtc.CmosRtc(clock=clk, wall_ns=1_796_006_527 * NS, set_irq=levels.append)
    r.write_register(rtc.REG_B, rtc.B_24H | rtc.B_UIE)
    clk.t += NS
    r.poll()
    assert levels == [1]
    r.write_register(rtc.REG_B, rtc.B_24H)                    # UF stays, IRQF drops (QEMU)
    assert levels == [1, 0] and r.cmos[rtc.REG_C] & rtc.C_UF


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x70, 0x71]), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF), st.booleans(), st.integers(0, 3 * NS)),
                max_size=60))
def test_rtc_hostile_accesses_never_raise(ops):
    r, clk = make_rtc()
    io = pio(r)
    for port, size, value, is_write, dt in ops:
        clk.t += dt
        if is_write:
            io.write(port, size, value)
        else:
            assert 0 <= io.read(port, size) < 1 << (8 * size)
        r.next_event_ns()
        r.alarm_armed()
        assert r.read_register(rtc.REG_D) == 0x80


# -- fw_cfg: faults 2, 3, 6 -------------------------------------------------------------------
def sel(f, key):
    f.write_bytes(0x510, 2, key.to_bytes(2, "little"))


def test_fw_cfg_selector_is_16_bit_only():
    f = pio(FwCfg(ram_size=6 * GiB, nb_cpus=3))
    sel(f, 0)
    assert f.read_bytes(0x511, 1, 1) == b"Q"
    f.write_bytes(0x510, 1, b"\x03")                             # a data write: ignored
    assert f.read_bytes(0x511, 1, 1) == b"E"
    f.write_bytes(0x510, 4, (0x00050003).to_bytes(4, "little"))  # not a valid access
    f.write_bytes(0x511, 2, b"\x03\x00")                         # 16-bit at 0x511: not valid
    assert f.read_bytes(0x511, 1, 1) == b"M"
    assert f.read_bytes(0x510, 1, 1) == b"U"                     # 8-bit reads at 0x510: data too
    sel(f, 0)
    # QEMU 7.2 (TCG: an IN reaches the region whole): 16- and 32-bit reads at either port are
    # not valid accesses: 0, and the read position stays (fw2.elf of the hostile run)
    assert f.read_bytes(0x510, 2, 1) == b"\0\0"
    assert f.read_bytes(0x510, 4, 1) == bytes(4)
    assert f.read_bytes(0x511, 2, 1) == b"\0\0"
    assert f.read_bytes(0x511, 4, 1) == bytes(4)
    assert f.read_bytes(0x511, 2, 3) == bytes(6)                 # rep insw: each unit likewise
    assert f.read_bytes(0x511, 1, 1) == b"Q"                     # nothing was consumed


def test_fw_cfg_arch_keys_write_channel_and_invalid_keys():
    f = pio(FwCfg(ram_size=6 * GiB, nb_cpus=3))

    def item(key, n):
        sel(f, key)
        return f.read_bytes(0x511, 1, n)
    assert item(0x4003, 8) == struct.pack("<Q", 6 * GiB)      # bit 14 ignored for reads
    assert item(0x8003, 8) == bytes(8)                        # no legacy E820 item (QEMU)
    assert item(0x8000, 4) == bytes(4) and item(0x8001, 4) == bytes(4)
    assert item(0x8002, 4) == struct.pack("<I", 1)            # IRQ0 override
    hpet = item(0x8004, 130)
    assert hpet[0] == 0xFF and hpet[1:] == bytes(129)         # no HPET: count 0xff, 121 bytes
    assert item(0xC002, 4) == struct.pack("<I", 1)            # arch + write channel
    for key in (0x0040, 0x3FFF, 0x8040, 0xFFFF, 0x1234):
        assert item(key, 8) == bytes(8)
    assert item(0x0001, 4) == struct.pack("<I", 1)            # no DMA bit: nothing at 0x514


def test_fw_cfg_huge_rep_insb_costs_its_size():
    dev = FwCfg(ram_size=6 * GiB, nb_cpus=3)
    f = pio(dev)
    sel(f, 0)
    out = f.read_bytes(0x511, 1, 1 << 16)
    assert out[:4] == b"QEMU" and out[4:] == bytes((1 << 16) - 4) and dev.offset == 4


# -- PM: fault 2 ------------------------------------------------------------------------------
def test_pm_widths_as_qemu_acpi_core():
    clk = Clock(0)
    p = pm.AcpiPm(clock=clk)
    io = pio(p)
    io.write(0x602, 2, 0xFFFF)
    assert io.read(0x602, 2) == pm.EN_MASK                     # reserved bits stay 0
    io.write(0x602, 2, 0x0401)
    assert io.read(0x602, 1) == 0x01 and io.read(0x603, 1) == 0
    assert io.read(0x601, 2) == 0x0100
    assert io.read(0x600, 4) == 0x0401_0000 | io.read(0x600, 2)
    assert io.read(0x602, 4) == 0x0401 | (pm.SCI_EN << 16)
    assert io.read(0x604, 4) == 0xFFFF_0000 | pm.SCI_EN        # 0x606-0x607 unassigned
    assert io.read(0x606, 1) == 0xFF and io.read(0x606, 2) == 0xFFFF
    io.write(0x602, 1, 0x05)                                   # zero-extended: EN high byte 0
    assert io.read(0x602, 2) == 0x0001
    io.write(0x603, 1, 0x04)                                   # offset 3: nothing
    assert io.read(0x602, 2) == 0x0001
    io.write(0x600, 4, 0x0100_0000)                            # STS W1C 0, EN = 0x0100
    assert io.read(0x602, 2) == 0x0100
    io.write(0x604, 2, 0x0006)                                 # SCI_EN stays, GBL_RLS write-only
    assert io.read(0x604, 2) == 0x0003


def test_pm_status_write_one_to_clear_and_timer_read_only():
    clk = Clock(0)
    p = pm.AcpiPm(clock=clk)
    io = pio(p)
    p.raise_status(pm.RTC_STS | pm.WAK_STS)
    io.write(0x600, 2, pm.RTC_STS)
    assert io.read(0x600, 2) == pm.WAK_STS
    io.write(0x600, 2, 0)
    assert io.read(0x600, 2) == pm.WAK_STS                     # writing 0 keeps it
    clk.t = NS
    before = io.read(0x608, 4)
    for size in (1, 2, 4):
        io.write(0x608, size, 0)
    assert io.read(0x608, 4) == before == 3_579_545
    assert io.read(0x608, 1) == before & 0xFF and io.read(0x60A, 2) == before & 0xFFFF


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0x600, 0x60B), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF), st.booleans()), max_size=60))
def test_pm_hostile_accesses(ops):
    p = pm.AcpiPm(clock=Clock(NS))
    io = pio(p)
    for port, size, value, is_write in ops:
        if is_write:
            io.write(port, size, value)
        else:
            assert 0 <= io.read(port, size) < 1 << (8 * size)
        assert not p.en & ~pm.EN_MASK and not p.sts & ~pm.STS_MASK
        assert p.cnt & pm.SCI_EN and not p.cnt & ~pm.CNT_MASK


# -- pc-testdev: fault 2 ----------------------------------------------------------------------
def test_testdev_widths_as_qemu():
    irqs = []
    dev = PcTestdev(set_irq=lambda line, level: irqs.append((line, level)))
    t = pio(dev)
    t.write(0xE0, 4, 0x11223344)
    assert t.read(0xE0, 4) == 0x11223344 and t.read(0xE1, 2) == 0x2233
    assert t.read(0xE2, 4) == 0x1122                          # then the flush port: 0
    assert t.read(0xE8, 1) == 0x44 and t.read(0xE8, 4) == 0x11223344
    assert t.read(0xEA, 4) == 0xFFFF1122                      # past 0xeb: unassigned
    assert t.read(0xE4, 1) == 0 and t.read(0x2000, 1) == 0
    t.write(0xE3, 2, 0xAA55)                                  # byte 3, then a flush
    assert t.read(0xE0, 4) == 0x55223344 and dev.flushes == 1
    t.write(0x2016, 2, 0x0100)                                # two lines, a byte each
    assert irqs == [(22, 0), (23, 1)]
