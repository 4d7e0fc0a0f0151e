"""The virtio-pci transport (virtio 1.2 section 4.1) driven as a driver drives it: capabilities
found in configuration space, features negotiated through the common configuration, a queue
set up in real guest memory, notifications, MSI-X messages and INTx, and what a confused or
hostile driver gets."""
import struct

import pytest

from pykvm.devices.virtio import (INT_VRING, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET,
                                  STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                                  VirtioDevice)
from pykvm.devices.virtio import pci as P
from pykvm.kvm import Kvm

pytestmark = pytest.mark.requires_kvm

RAM = 1 << 20
DESC, AVAIL, USED, BUF_IN, BUF_OUT = 0x1000, 0x2000, 0x3000, 0x8000, 0x9000


class Reverser(VirtioDevice):
    """A device of our own for the transport's sake: each chain's readable bytes come back
    reversed in its writable part."""
    device_id = 4
    num_queues = 1

    def __init__(self):
        self.queues = None
        self.handles = None
        self.resets = 0

    def device_features(self):
        return 1 << 5

    def config_read(self, offset, size):
        return int.from_bytes(b"CFGSPACE"[offset:offset + size].ljust(size, b"\0"), "little")

    def activate(self, features, queues, handles):
        self.queues, self.handles = queues, handles

    def notify(self, index):
        q = self.queues[index]
        while (c := q.pop()) is not None:
            q.push(c, c.write(c.read()[::-1]))
        if q.needs_interrupt():
            self.handles.interrupt(INT_VRING, index)

    def reset(self):
        self.resets += 1
        self.queues = None


@pytest.fixture
def mem():
    vm = Kvm().create_vm()
    vm.add_memory(0, RAM)
    yield vm.memory
    vm.close()


@pytest.fixture
def dev(mem):
    sent, intx = [], []
    t = P.VirtioPci(Reverser(), mem, bars=(0xFE000000, 0xFE004000), intx_line=10,
                    send_msi=lambda a, d: sent.append((a, d)), set_intx=intx.append)
    t.sent, t.intx = sent, intx
    return t


def caps(f):
    """{cfg_type: (bar, offset, length)} and the capability ids, by walking the list."""
    out, ids, off, seen = {}, [], f.read(0x34, 1), 0
    while off and seen < 48:
        cid = f.read(off, 1)
        ids.append(cid)
        if cid == P.CAP_VENDOR:
            out[f.read(off + 3, 1)] = (f.read(off + 4, 1), f.read(off + 8, 4), f.read(off + 12, 4))
        off, seen = f.read(off + 1, 1), seen + 1
    return out, ids


def negotiate(t, features=(1 << 32) | (1 << 5)):
    t.write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for sel in (0, 1):
        t.write(0x08, 4, sel)
        t.write(0x0C, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    t.write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    return t.read(0x14, 1)


def setup_queue(t, size=8):
    t.write(0x16, 2, 0)
    t.write(0x18, 2, size)
    t.write(0x20, 8, DESC)
    t.write(0x28, 4, AVAIL)
    t.write(0x2C, 4, 0)
    t.write(0x30, 8, USED)
    t.write(0x1C, 2, 1)


def post(mem, data, head=0, idx=1):
    mem.write(BUF_OUT, data)
    mem.write(DESC + 16 * head, struct.pack("<QIHH", BUF_OUT, len(data), 1, head + 1))
    mem.write(DESC + 16 * (head + 1), struct.pack("<QIHH", BUF_IN, 64, 2, 0))
    mem.write(AVAIL + 4 + 2 * (idx - 1) % 16, struct.pack("<H", head))
    mem.write(AVAIL + 2, struct.pack("<H", idx))


def test_identity_and_capabilities(dev):
    f = dev.pci
    assert f.read(0, 2) == 0x1AF4 and f.read(2, 2) == 0x1044 and f.read(8, 1) == 1
    found, ids = caps(f)
    assert ids[-1] == P.CAP_MSIX and P.CAP_VENDOR in ids
    assert found[P.CFG_COMMON] == (4, 0x0000, 0x3C) and found[P.CFG_ISR][:2] == (4, 0x1000)
    assert found[P.CFG_NOTIFY][:2] == (4, 0x3000) and found[P.CFG_DEVICE][:2] == (4, 0x2000)
    assert P.CFG_PCI in found
    assert [(b, s) for b, s, _ in dev.windows()] == [(0xFE000000, 0x1000), (0xFE004000, 0x4000)]


def test_features_need_version_1(dev):
    assert not negotiate(dev, features=1 << 5) & STATUS_FEATURES_OK      # legacy refused
    dev.write(0x14, 1, 0)
    assert negotiate(dev) & STATUS_FEATURES_OK
    dev.write(0x00, 4, 1)
    assert dev.read(0x04, 4) & 1                                          # VERSION_1 offered


def test_a_request_round_trips_with_intx(dev, mem):
    negotiate(dev)
    setup_queue(dev)
    dev.write(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    post(mem, b"hello")
    dev.write(0x3000, 2, 0)                                               # notify queue 0
    assert mem.read(USED + 2, 2) == b"\x01\x00"
    assert struct.unpack("<II", mem.read(USED + 4, 8)) == (0, 5)
    assert mem.read(BUF_IN, 5) == b"olleh"
    assert dev.intx == [1] and dev.sent == []
    assert dev.read(0x1000, 1) == 1 and dev.read(0x1000, 1) == 0          # ISR read clears
    assert dev.intx == [1, 0]
    assert dev.read(0x2000, 4) == int.from_bytes(b"CFGS", "little")


def test_msix_vectors_masking_and_pending(dev, mem):
    f = dev.pci
    f.write(P.MSIX_CAP + 2, 2, 0x8000)                                    # MSI-X enable
    dev.msix.write(16 * 1, 4, 0xFEE00000)
    dev.msix.write(16 * 1 + 8, 4, 0x4041)
    negotiate(dev)
    setup_queue(dev)
    dev.write(0x1A, 2, 1)
    assert dev.read(0x1A, 2) == 1
    dev.write(0x1A, 2, 40)                                               # past the table
    assert dev.read(0x1A, 2) == 0xFFFF
    dev.write(0x1A, 2, 1)
    dev.write(0x14, 1, 0x0F)
    post(mem, b"ab")
    dev.write(0x3000, 2, 0)
    assert dev.sent == [] and dev.msix.read(P.MSIX_PBA, 8) == 0b10      # masked: pending
    dev.msix.write(16 * 1 + 12, 4, 0)                                    # unmask: it goes
    assert dev.sent == [(0xFEE00000, 0x4041)] and dev.msix.read(P.MSIX_PBA, 8) == 0
    assert dev.intx == []


def test_hostile_driver(dev, mem):
    negotiate(dev)
    dev.write(0x18, 2, 6)                                                # not a power of 2
    assert dev.read(0x18, 2) == 256                                      # still the maximum
    dev.write(0x3000 + 4 * 7, 2, 0)                                      # a queue that is not there
    dev.write(0x3001, 1, 0)                                              # not a notify slot
    for off in range(0, 0x40):
        for size in (1, 2, 4, 8):
            dev.read(off, size)                                          # any width answers
    setup_queue(dev)
    dev.write(0x14, 1, 0x0F)
    mem.write(DESC, struct.pack("<QIHH", BUF_OUT, 4, 1, 0))             # a chain that loops
    mem.write(AVAIL + 4, struct.pack("<H", 0))
    mem.write(AVAIL + 2, struct.pack("<H", 1))
    dev.write(0x3000, 2, 0)
    assert dev.read(0x14, 1) & STATUS_DEVICE_NEEDS_RESET
    assert dev.core.queue_errors == 1
    dev.write(0x14, 1, 0)                                                # reset recovers
    assert dev.read(0x14, 1) == 0 and dev.core.device.resets >= 1


def test_pci_cfg_window_reaches_the_common_configuration(dev):
    f = dev.pci
    f.write(P.PCI_CFG_CAP + 4, 1, 4)                                     # BAR 4
    f.write(P.PCI_CFG_CAP + 8, 4, 0x12)                                  # num_queues
    f.write(P.PCI_CFG_CAP + 12, 4, 2)
    assert f.read(P.PCI_CFG_CAP + 16, 4) == 1
    f.write(P.PCI_CFG_CAP + 4, 1, 0)                                     # another BAR: nothing
    assert f.read(P.PCI_CFG_CAP + 16, 4) == 0
