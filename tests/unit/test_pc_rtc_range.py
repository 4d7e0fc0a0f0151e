"""The CMOS RTC under any date a guest can write (issue 16, faults 1 and 3): century, year,
month, day and time bytes of any value, in BCD or binary, 12- or 24-hour mode, SET raised and
dropped, time running for any span — every register read is one byte, nothing raises, and the
clock wraps after the chip's 10,000 years as the century byte does."""
from hypothesis import given, settings, strategies as st

from pykvm.devices import cmos_rtc as rtc
from pykvm.devices.bus import PIO_LIMIT, Bus

NS = 1_000_000_000
INDEX, DATA = 0x70, 0x71
TIME = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)     # ..., day of month, month, year, century


class Clock:
    def __init__(self):
        self.t = 0

    def __call__(self):
        return self.t


def _rtc():
    """The RTC on a port bus (every access goes through it, as the guest's do), and its
    clock."""
    clk = Clock()
    bus = Bus("pio", PIO_LIMIT)
    bus.attach(rtc.CmosRtc(clock=clk, wall_ns=1_796_006_527 * NS))
    return bus, clk


def _w(r, reg, val):
    r.write(INDEX, 1, reg)
    r.write(DATA, 1, val)


def _r(r, reg):
    r.write(INDEX, 1, reg)
    return r.read(DATA, 1)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.integers(0, 255), min_size=len(TIME), max_size=len(TIME)),
       reg_b=st.sampled_from([0x02, 0x06, 0x00, 0x04]),
       run_s=st.integers(0, 10 ** 12))
def test_any_written_date_reads_back_as_bytes(values, reg_b, run_s):
    r, clk = _rtc()
    _w(r, 0x0B, 0x80 | reg_b)                   # SET, with the mode
    for reg, v in zip(TIME, values):
        _w(r, reg, v)
    _w(r, 0x0B, reg_b)                          # run from what was written
    for step in (0, 1, 3600, 86400 * 40, run_s):
        clk.t += step * NS
        for reg in TIME + (0x0A, 0x0B, 0x0C, 0x0D):
            assert 0 <= _r(r, reg) <= 0xFF
    _w(r, 0x0B, 0x80 | (reg_b ^ 0x04))          # SET again, switching DM: latches the time
    for reg in TIME:
        assert 0 <= _r(r, reg) <= 0xFF


def test_the_last_second_of_year_9999_wraps_to_year_0():
    r, clk = _rtc()
    _w(r, 0x0B, 0x80 | 0x02)                    # SET, BCD, 24-hour
    for reg, v in zip(TIME, (0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x99)):
        _w(r, reg, v)
    _w(r, 0x0B, 0x02)
    clk.t += 2 * NS
    assert [_r(r, reg) for reg in (0x09, 0x32, 0x08, 0x07)] == [0x00, 0x00, 0x01, 0x01]
