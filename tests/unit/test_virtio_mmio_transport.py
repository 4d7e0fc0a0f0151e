"""The virtio-mmio transport (pykvm.devices.virtio.mmio) as a bus device, with virtio-rng behind
it and its rings in real guest RAM: every offset and width answers as section 4.2.2 says, the
interrupt line follows InterruptStatus, and a driver's rule breaks end in the spec's state."""
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.devices.bus import Device
from pykvm.devices.virtio.mmio import MMIO_SIZE, VirtioMmio, cmdline_fragment
from pykvm.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE
from pykvm.devices.virtio.rng import VirtioRng
from pykvm.memory import GuestMemory

RAM = 1 << 20
DESC, AVAIL, USED, BUF = 0x1000, 0x2000, 0x3000, 0x8000
V1_EVENT = (1 << 32) | (1 << 29)


@pytest.fixture
def dev():
    mem = GuestMemory.anonymous(RAM)
    levels = []
    t = VirtioMmio(VirtioRng(), mem, levels.append)
    t.levels, t.mem = levels, mem
    yield t
    mem._close()


def up(t, features=V1_EVENT, size=8):
    t.write(0x70, 4, 0)
    t.write(0x70, 4, 3)
    for sel in (0, 1):
        t.write(0x24, 4, sel)
        t.write(0x20, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    t.write(0x70, 4, 0xB)
    t.write(0x30, 4, 0)
    t.write(0x38, 4, size)
    for reg, addr in ((0x80, DESC), (0x90, AVAIL), (0xA0, USED)):
        t.write(reg, 4, addr)
        t.write(reg + 4, 4, 0)
    t.write(0x44, 4, 1)
    t.write(0x70, 4, 0xF)


def test_is_a_bus_device_and_identifies_itself(dev):
    assert isinstance(dev, Device) and dev.MMIO_SIZE == MMIO_SIZE == 0x200
    assert [dev.read(o, 4) for o in (0, 4, 8)] == [0x74726976, 2, 4]
    assert cmdline_fragment(0xFEB00000, 16) == "virtio_mmio.device=512@0xfeb00000:16"


# the device is kept across examples on purpose: a random walk over the register file
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, MMIO_SIZE - 1), size=st.sampled_from([1, 2, 4, 8]),
       value=st.integers(0, (1 << 64) - 1))
def test_any_access_answers(dev, offset, size, value):
    value &= (1 << 8 * size) - 1
    dev.write(offset, size, value)
    r = dev.read(offset, size)
    assert 0 <= r < 1 << 8 * size
    if offset < 0x100 and (size != 4 or offset % 4):
        assert r == 0                     # the registers take aligned 32-bit accesses only


def test_reserved_and_write_only_registers_read_zero(dev):
    for off in (0x14, 0x20, 0x24, 0x30, 0x38, 0x50, 0x64, 0x80, 0x84, 0xC0, 0xF8):
        assert dev.read(off, 4) == 0


def test_features_ok_needs_version_1_and_zero_resets(dev):
    dev.write(0x70, 4, 3)
    dev.write(0x70, 4, 0xB)
    assert dev.read(0x70, 4) == 3         # no VERSION_1 accepted: FEATURES_OK stays clear
    up(dev)
    assert dev.read(0x70, 4) == 0xF
    dev.write(0x24, 4, 1)
    dev.write(0x20, 4, 0)                 # after FEATURES_OK: ignored
    assert dev.driver_features == V1_EVENT
    dev.write(0x70, 4, 0)
    assert dev.read(0x70, 4) == 0 and dev.read(0x44, 4) == 0


def test_queue_num_not_a_power_of_two_leaves_the_queue_off(dev):
    dev.write(0x30, 4, 0)
    dev.write(0x38, 4, 6)
    dev.write(0x44, 4, 1)
    assert dev.read(0x44, 4) == 0
    dev.write(0x38, 4, 8)
    dev.write(0x44, 4, 1)
    assert dev.read(0x44, 4) == 1
    dev.write(0x30, 4, 1)                 # no queue 1
    assert dev.read(0x34, 4) == 0 and dev.read(0x44, 4) == 0


def _offer(mem, head, n):
    mem.write(AVAIL + 4 + 2 * ((n - 1) % 8), struct.pack("<H", head))
    mem.write(AVAIL + 2, struct.pack("<H", n))


def test_request_interrupt_line_and_ack(dev):
    up(dev)
    dev.mem.write(DESC, struct.pack("<QIHH", BUF, 16, DESC_F_WRITE, 0))
    _offer(dev.mem, 0, 1)
    dev.write(0x50, 4, 0)
    assert struct.unpack("<HHII", dev.mem.read(USED, 12))[1:] == (1, 0, 16)
    assert dev.read(0x60, 4) == 1 and dev.levels == [1]
    dev.write(0x64, 4, 1)
    assert dev.read(0x60, 4) == 0 and dev.levels == [1, 0]


def test_looping_chain_sets_needs_reset_with_a_config_interrupt(dev):
    up(dev)
    dev.mem.write(DESC, struct.pack("<QIHH", BUF, 16, DESC_F_WRITE | DESC_F_NEXT, 0))
    _offer(dev.mem, 0, 1)
    dev.write(0x50, 4, 0)
    assert dev.read(0x70, 4) == 0x4F and dev.read(0x60, 4) == 2 and dev.levels == [1]
    dev.write(0x50, 4, 0)                 # further notifies are dropped
    assert dev.queue_errors == 1
    dev.write(0x70, 4, 0)                 # reset: the line drops, the device works again
    assert dev.levels == [1, 0] and dev.read(0x70, 4) == 0
    up(dev)
    dev.mem.write(USED, bytes(16))
    dev.mem.write(DESC, struct.pack("<QIHH", BUF, 16, DESC_F_WRITE, 0))
    _offer(dev.mem, 0, 1)
    dev.write(0x50, 4, 0)
    assert dev.read(0x60, 4) == 1


def test_rings_outside_ram_set_needs_reset_at_driver_ok(dev):
    dev.write(0x70, 4, 3)
    dev.write(0x24, 4, 1)
    dev.write(0x20, 4, 1)
    dev.write(0x70, 4, 0xB)
    dev.write(0x38, 4, 8)
    dev.write(0x80, 4, 0)
    dev.write(0x84, 4, 0x10)              # 64 GiB: not RAM
    dev.write(0x44, 4, 1)
    dev.write(0x70, 4, 0xF)
    assert dev.read(0x70, 4) & 0x40
    dev.write(0x50, 4, 0)                 # the queue never came up: dropped
    dev.write(0x50, 4, 0xFFFFFFFF)
