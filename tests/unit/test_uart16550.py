"""pykvm.devices.uart16550.Uart16550: the bus device on pykvm's one 16550 model (the C one in
csrc/runloop.c, reached through pykvm_uart_access). No KVM is needed: the model runs in the
native module without a vCPU (no interrupt line is connected). Expected values follow the
16550 data sheet and QEMU's hw/char/serial.c, as the module docstring states them."""
import random

import pytest

from pykvm.devices.bus import Bus, Device, PIO_LIMIT, MMIO_LIMIT
from pykvm.devices.uart16550 import Uart16550
from pykvm.runloop import UartGroup

THR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)


def test_is_a_bus_device_with_reset_values():
    u = Uart16550()
    assert isinstance(u, Device)
    # LSR: THRE | TEMT (transmitter always empty); MSR: DCD, DSR, CTS; IIR: no interrupt
    assert [u.read(r, 1) for r in (LSR, MSR, IIR, IER, LCR, MCR, SCR)] == \
        [0x60, 0xB0, 0x01, 0, 0, 0, 0]


def test_thr_bytes_are_output_and_raise_thr_empty_until_iir_reports_it():
    out = []
    u = Uart16550(on_output=out.append)
    u.write(IER, 1, 0x02)                       # IER.THRI: THR empty pending at once
    assert u.read(IIR, 1) == 0x02 and u.read(IIR, 1) == 0x01     # the IIR read clears it
    u.write(THR, 1, ord("H"))
    assert b"".join(out) == b"H"
    assert u.read(IIR, 1) == 0x02 and u.read(IIR, 1) == 0x01
    u.write(IER, 1, 0xFF)
    assert u.read(IER, 1) == 0x0F                # bits 3:0 kept


def test_without_on_output_the_group_keeps_the_bytes_for_take():
    u = Uart16550()
    for b in b"hello":
        u.write(THR, 1, b)
    assert u.take() == b"hello" and u.take() == b""


def test_dlab_switches_registers_0_and_1_to_the_divisor_latch():
    u = Uart16550()
    u.write(LCR, 1, 0x80)
    u.write(0, 1, 0x0C)
    u.write(1, 1, 0x01)
    assert (u.read(0, 1), u.read(1, 1)) == (0x0C, 0x01)
    u.write(LCR, 1, 0x03)
    assert u.take() == b"" and u.read(IER, 1) == 0        # neither THR nor IER was written


def test_loopback_fifo_overrun_and_interrupt_identification():
    out = []
    u = Uart16550(on_output=out.append)
    u.write(MCR, 1, 0x1F)                        # loopback, DTR, RTS, OUT1, OUT2
    assert u.read(MSR, 1) == 0xF0                # MSR mirrors MCR
    u.write(THR, 1, 0x41)
    assert out == [] and u.read(LSR, 1) == 0x61 and u.read(THR, 1) == 0x41
    u.write(THR, 1, 0x42)
    u.write(THR, 1, 0x43)                        # FIFOs off: overruns RBR
    assert u.read(LSR, 1) == 0x63 and u.read(LSR, 1) == 0x61 and u.read(THR, 1) == 0x43
    u.write(IIR, 1, 0x01)                        # FCR: FIFOs on, trigger level 1
    u.write(IER, 1, 0x05)                        # received data + line status interrupts
    for i in range(18):
        u.write(THR, 1, 0x61 + i)                # two bytes too many for 16
    assert u.read(IIR, 1) == 0xC6                # line status (OE) first, FIFOs on
    assert u.read(LSR, 1) == 0x63 and u.read(IIR, 1) == 0xC4
    assert bytes(u.read(THR, 1) for _ in range(17)) == bytes(range(0x61, 0x71)) + b"\0"
    u.write(IIR, 1, 0xC1)                        # trigger level 14
    u.write(THR, 1, 0x78)
    assert u.read(IIR, 1) == 0xCC                # character timeout below the trigger


def test_port_access_is_one_byte_per_register_mod_8():
    u = Uart16550()
    u.write(SCR, 1, 0x5A)
    u.write(LCR, 2, 0x0303)                      # LCR 3, MCR 3
    assert u.read(MCR, 4) == 0x5AB06003          # MCR, LSR, MSR, SCR
    assert u.read(SCR, 2) == 0x005A              # SCR, then register 8 mod 8 = RBR (0)
    u.write(THR, 4, 0x00000069)                  # THR 'i', IER 0, FCR 0, LCR 0
    assert u.take() == b"i" and u.read(LCR, 1) == 0


def test_mmio_access_hits_one_register_whatever_its_width():
    u = Uart16550(regshift=2, mmio=True)
    assert u.size == 32
    u.write(SCR << 2, 4, 0x12345677)             # the low byte
    assert u.read(SCR << 2, 8) == 0x77           # the register, zeroes above
    assert u.read(LSR << 2, 4) == 0x60
    u.write(0, 8, 0xFFFFFF41)
    assert u.take() == b"A"
    assert u.read(1, 1) == 0 and u.read(32, 4) == 0       # between registers, past the window
    u.write(2, 1, 0x41)
    u.write(1000, 1, 0x41)
    assert u.take() == b""


def test_two_devices_on_one_group_are_one_uart():
    group = UartGroup()
    port = Uart16550(group)
    mmio = Uart16550(group, regshift=0, mmio=True)
    port.write(SCR, 1, 0x99)
    assert mmio.read(SCR, 1) == 0x99
    port.write(THR, 1, ord("a"))
    mmio.write(THR, 1, ord("b"))
    assert port.take() == b"ab"                  # one output, in write order


def test_output_nobody_drains_is_bounded_and_counted():
    u = Uart16550()
    for _ in range(UartGroup.OUT_CAP + 100):
        u.write(THR, 1, 0x2E)
    assert u.dropped == 100 and len(u.take()) == UartGroup.OUT_CAP


def test_on_a_bus_every_width_and_offset_is_answered():
    pio, mmio = Bus("pio", PIO_LIMIT), Bus("mmio", MMIO_LIMIT)
    pio.insert(0x3F8, 8, Uart16550(), max_access=4)
    mmio.insert(0x10000000, 32, Uart16550(regshift=2, mmio=True), max_access=8)
    rng = random.Random(17)
    for _ in range(3000):
        size = rng.choice((1, 2, 4, 8))
        value = rng.getrandbits(64)
        a = 0x3F8 + rng.randrange(-2, 10)
        b = 0x10000000 + rng.randrange(-4, 40)
        if rng.random() < 0.5:
            pio.write(a, size, value)
            mmio.write(b, size, value)
        else:
            assert 0 <= pio.read(a, size) < 1 << (8 * size)
            assert 0 <= mmio.read(b, size) < 1 << (8 * size)


@pytest.mark.parametrize("kw", [{"regshift": 3, "mmio": True}, {"regshift": 1}])
def test_bad_geometry_is_refused(kw):
    with pytest.raises(ValueError):
        Uart16550(**kw)
