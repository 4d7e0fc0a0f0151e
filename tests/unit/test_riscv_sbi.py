"""SBI services with a fake exit object and a bytearray guest memory."""

import threading
import time

import pytest

from pykvm.arch.riscv import sbi as S
from pykvm.arch.riscv.extensions import (
    PYKVM_REPORT_EID, SBI_ERR_INVALID_PARAM, SBI_ERR_NOT_SUPPORTED, SBI_EXT_DBCN,
    SBI_EXT_SUSP, SBI_SUCCESS,
)

BASE = 0x80000000


class Mem:
    def __init__(self, size=0x10000):
        self.buf = bytearray(size)

    def read(self, gpa, n):
        off = gpa - BASE
        if off < 0 or n < 0 or off + n > len(self.buf):
            raise ValueError(f"gpa {gpa:#x}+{n} out of range")
        return bytes(self.buf[off:off + n])

    def put(self, gpa, data):
        self.buf[gpa - BASE:gpa - BASE + len(data)] = data


class FakeSbiExit:
    def __init__(self, eid, fid, *args):
        self.extension_id = eid
        self.function_id = fid
        self.args = tuple(args) + (0,) * (6 - len(args))
        self.ret = None

    def set_return(self, error, value):
        self.ret = (error, value)


def test_dbcn_write_and_write_byte():
    mem = Mem()
    mem.put(BASE + 0x100, b"hello, world\n")
    sbi = S.SbiServices(mem)
    ex = FakeSbiExit(SBI_EXT_DBCN, S.DBCN_WRITE, 13, BASE + 0x100, 0)
    assert sbi.handle(ex) == "dbcn"
    assert ex.ret == (SBI_SUCCESS, 13)
    ex = FakeSbiExit(SBI_EXT_DBCN, S.DBCN_WRITE_BYTE, 0x121)   # only the low byte
    sbi.handle(ex)
    assert ex.ret == (SBI_SUCCESS, 0)
    assert bytes(sbi.console) == b"hello, world\n!"
    assert sbi.console_text == "hello, world\n!"


def test_dbcn_write_bounds():
    mem = Mem(0x1000)
    out = []
    sbi = S.SbiServices(mem, console=out.append, max_write=8)
    for args in [(4, BASE + 0xFFE, 0),        # runs past the end of RAM
                 (4, 0x1000, 0),              # below RAM
                 (4, BASE, 1),                # base_addr_hi set on rv64
                 (16, (1 << 64) - 4, 0)]:     # wraps the address space
        ex = FakeSbiExit(SBI_EXT_DBCN, S.DBCN_WRITE, *args)
        sbi.handle(ex)
        assert ex.ret == (SBI_ERR_INVALID_PARAM, 0), args
    ex = FakeSbiExit(SBI_EXT_DBCN, S.DBCN_WRITE, 0, 0, 0)
    sbi.handle(ex)
    assert ex.ret == (SBI_SUCCESS, 0)
    mem.put(BASE, b"0123456789")
    ex = FakeSbiExit(SBI_EXT_DBCN, S.DBCN_WRITE, 10, BASE, 0)
    sbi.handle(ex)
    assert ex.ret == (SBI_SUCCESS, 8)          # a short write, as the spec allows
    assert out == [b"01234567"]


def test_dbcn_read_returns_nothing_and_unknown_fid():
    sbi = S.SbiServices(Mem())
    ex = FakeSbiExit(SBI_EXT_DBCN, S.DBCN_READ, 8, BASE, 0)
    sbi.handle(ex)
    assert ex.ret == (SBI_SUCCESS, 0)
    ex = FakeSbiExit(SBI_EXT_DBCN, 7)
    sbi.handle(ex)
    assert ex.ret == (SBI_ERR_NOT_SUPPORTED, 0)


def test_report_call_goes_to_callback():
    seen = []
    sbi = S.SbiServices(Mem(), on_report=seen.append)
    ex = FakeSbiExit(PYKVM_REPORT_EID, 0, BASE + 0x40)
    assert sbi.handle(ex) == "report"
    assert seen == [BASE + 0x40] and ex.ret == (SBI_SUCCESS, 0)


def test_report_callback_exception_propagates_after_return_is_set():
    def boom(addr):
        raise RuntimeError("guest assertion")
    sbi = S.SbiServices(Mem(), on_report=boom)
    ex = FakeSbiExit(PYKVM_REPORT_EID, 0, BASE)
    with pytest.raises(RuntimeError):
        sbi.handle(ex)
    assert ex.ret == (SBI_SUCCESS, 0)


def test_unknown_calls_are_not_supported():
    sbi = S.SbiServices(Mem())
    for eid, fid in [(0x10, 3), (0x735049, 0), (PYKVM_REPORT_EID, 1), (SBI_EXT_SUSP, 5)]:
        ex = FakeSbiExit(eid, fid)
        assert sbi.handle(ex) == "unsupported"
        assert ex.ret == (SBI_ERR_NOT_SUPPORTED, 0)
    assert len(sbi.unsupported) == 4


def test_suspend_records_event_and_returns_success():
    sbi = S.SbiServices(Mem())
    ex = FakeSbiExit(SBI_EXT_SUSP, S.SUSP_SYSTEM_SUSPEND, 0, 0x80200058, 0x1234abcd5678ef90)
    t0 = time.monotonic()
    assert sbi.handle(ex) == "suspend"
    assert ex.ret == (SBI_SUCCESS, 0)
    (ev,) = sbi.suspends
    assert (ev.sleep_type, ev.resume_addr, ev.opaque) == (0, 0x80200058, 0x1234abcd5678ef90)
    assert t0 <= ev.requested_at <= ev.woken_at
    assert not ev.woken_early


@pytest.mark.parametrize("a0", [1 << 32, 0xFFFFFFFF00000000, 0x8000000000000000])
def test_suspend_sleep_type_is_the_low_32_bits(a0):
    # sleep_type is a 32-bit SBI argument: KVM compares the low 32 bits, accepts this as
    # suspend-to-RAM and queues the resume before forwarding; pykvm must sleep like type 0
    sbi = S.SbiServices(Mem(), suspend_seconds=0.05)
    ex = FakeSbiExit(SBI_EXT_SUSP, 0, a0, BASE + 0x58, 7)
    t0 = time.monotonic()
    assert sbi.handle(ex) == "suspend"
    assert ex.ret == (SBI_SUCCESS, 0)
    (ev,) = sbi.suspends
    assert (ev.sleep_type, ev.a0, ev.resume_addr, ev.opaque) == (0, a0, BASE + 0x58, 7)
    assert time.monotonic() - t0 >= 0.05 and ev.woken_at - ev.requested_at >= 0.05


@pytest.mark.parametrize("sleep_type", [1, 0x7FFFFFFF, 0x80000000, (1 << 32) | 1])
def test_suspend_never_rejudges_what_kvm_forwarded(sleep_type):
    # KVM forwards a SUSP only after accepting it (and has queued the resume by then), so
    # pykvm does not answer INVALID_PARAM for it: the guest would resume without a sleep
    sbi = S.SbiServices(Mem())
    ex = FakeSbiExit(SBI_EXT_SUSP, 0, sleep_type, BASE, 0)
    sbi.handle(ex)
    assert ex.ret == (SBI_SUCCESS, 0)
    assert [e.sleep_type for e in sbi.suspends] == [sleep_type & 0xFFFFFFFF]


def test_suspend_waits_and_wake_ends_it_early():
    sbi = S.SbiServices(Mem(), suspend_seconds=30)
    started = threading.Event()
    sbi.on_suspend = lambda ev: started.set()
    threading.Thread(target=lambda: (started.wait(5), sbi.wake()), daemon=True).start()
    ex = FakeSbiExit(SBI_EXT_SUSP, 0, 0, BASE, 7)
    sbi.handle(ex)
    assert ex.ret == (SBI_SUCCESS, 0)
    assert sbi.suspends[0].woken_early                 # not the 30 s it asked for
    assert sbi.suspends[0].woken_early and sbi.suspends[0].opaque == 7


def test_suspend_timeout_elapses():
    sbi = S.SbiServices(Mem(), suspend_seconds=0.05)
    ex = FakeSbiExit(SBI_EXT_SUSP, 0, 0, BASE, 0)
    t0 = time.monotonic()
    sbi.handle(ex)
    assert time.monotonic() - t0 >= 0.04
    assert not sbi.suspends[0].woken_early


def test_enable_sbi_extension_uses_one_reg():
    from pykvm.arch.riscv import regs as R

    class V:
        def __init__(self):
            self.writes = []

        def set_one_reg(self, rid, value):
            self.writes.append((rid, value))

    v = V()
    S.enable_sbi_extension(v, "susp")
    S.enable_sbi_extension(v, "dbcn")
    assert v.writes == [(0x803000000800000B, 1), (R.reg_id("sbi_ext.dbcn"), 1)]
