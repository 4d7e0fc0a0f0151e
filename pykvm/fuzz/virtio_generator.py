"""Virtio cases of the device fuzzer, ``python -m pykvm.fuzz --virtio`` (docs/fuzzing.md): a
hostile driver for one virtio device behind one transport, as bus accesses and guest-memory
writes a host-side harness (:mod:`pykvm.fuzz.virtio_runner`) replays against the real device
model — no vCPU runs, so thousands of cases a minute fit on one core.

A case's *target* (its ``mode``) is ``TRANSPORT-DEVICE``: transport ``mmio`` (virtio-mmio,
:mod:`pykvm.devices.virtio.mmio`) or ``pci`` (virtio-pci, :mod:`pykvm.devices.virtio.pci`:
common configuration, notify, ISR and device configuration in BAR 4, the MSI-X table and PBA in
BAR 1, the PCI configuration space with its VIRTIO_PCI_CAP_PCI_CFG window), device ``rng``,
``blk`` (a writable temporary image), ``blk-ro`` (a read-only one) or ``console``.

Operations (one list, ``case["vcpus"][0]["ops"]``, run in order):

=======  ==========================================================================
op       what the harness does
=======  ==========================================================================
r        ``["r", addr, size]``: a bus read of 1-8 bytes at a guest-physical address
w        ``["w", addr, size, value]``: a bus write
cr       ``["cr", off, size]``: a PCI configuration read (pci targets)
cw       ``["cw", off, size, value]``: a PCI configuration write, then what the platform
         does after one (MSI-X state, BARs re-mapped)
mem      ``["mem", gpa, hex]``: the driver writes guest RAM (descriptors, rings, buffers)
feed     ``["feed", n, seed]``: ``n`` bytes of host input to the console
resize   ``["resize", cols, rows]``: the console's terminal size changes
=======  ==========================================================================

The recipes are structure-aware: a driver initialisation (reset, ACKNOWLEDGE, DRIVER, feature
words, FEATURES_OK, queue set-up, MSI-X vectors, DRIVER_OK) with steps dropped, repeated,
reordered or given bad values; rings laid out in guest RAM and filled with chains valid for the
device (block requests, entropy buffers, console transmit and receive buffers) and then mutated
— loops, ``next`` and heads past the table, indirect tables nested, empty, misaligned, huge or
outside RAM, lengths near 2^32, buffers outside RAM or across the RAM hole, a device-readable
buffer after a writable one, the available index jumping ahead — then notified; plus random
accesses of every width to every register and configuration byte, notifications of queues
never set up, resets midway, and console input and resizes.

A case is a pure function of (seed, index, targets, deadline) (:func:`generate_case`).
"""
import random
import struct
from typing import Dict, List, Optional

from .generator import blobs_from_json, blobs_to_json, edge_value

CASE_FORMAT = "pykvm-fuzz-virtio-case/1"
TRANSPORTS = ("mmio", "pci")
DEVICES = ("rng", "blk", "blk-ro", "console")
MODES = tuple(f"{t}-{d}" for t in TRANSPORTS for d in DEVICES)    # the targets
DEFAULT_DEADLINE = 20.0         # seconds a case may take (a generous bound, not a speed figure)

# ---- the harness's guest-physical layout ------------------------------------------------------
RAM_LOW = (0, 1 << 20)                  # slot 0: [0, 1 MiB)
RAM_HIGH = (2 << 20, 1 << 20)           # slot 1: [2 MiB, 3 MiB); a hole below it
RING_AREA = 0x10000                     # rings and tables from here (in slot 0)
BUF_AREA = 0x80000                      # data buffers from here
MMIO_BASE = 0xFEB00000                  # the virtio-mmio window (the pc machine's first)
PCI_BAR1 = 0xFE000000                   # MSI-X table and PBA (as the pc machine assigns them)
PCI_BAR4 = PCI_BAR1 + 0x4000            # the virtio structures
IMAGE_SECTORS = (8, 128, 2048)          # sizes of a case's disk image (512-byte sectors)

# virtio-mmio registers (section 4.2.2)
M = {"DeviceFeatures": 0x10, "DeviceFeaturesSel": 0x14, "DriverFeatures": 0x20,
     "DriverFeaturesSel": 0x24, "QueueSel": 0x30, "QueueNumMax": 0x34, "QueueNum": 0x38,
     "QueueReady": 0x44, "QueueNotify": 0x50, "InterruptStatus": 0x60, "InterruptACK": 0x64,
     "Status": 0x70, "QueueDescLow": 0x80, "QueueDescHigh": 0x84, "QueueDriverLow": 0x90,
     "QueueDriverHigh": 0x94, "QueueDeviceLow": 0xA0, "QueueDeviceHigh": 0xA4,
     "SHMSel": 0xAC, "ShmLen": 0xB0, "QueueReset": 0xC0, "ConfigGeneration": 0xFC}
# struct virtio_pci_common_cfg (section 4.1.4.3): offset, width
C = {"dfselect": (0x00, 4), "df": (0x04, 4), "gfselect": (0x08, 4), "gf": (0x0C, 4),
     "msix_config": (0x10, 2), "num_queues": (0x12, 2), "status": (0x14, 1),
     "generation": (0x15, 1), "q_select": (0x16, 2), "q_size": (0x18, 2),
     "q_msix": (0x1A, 2), "q_enable": (0x1C, 2), "q_notify_off": (0x1E, 2),
     "q_desc": (0x20, 8), "q_driver": (0x28, 8), "q_device": (0x30, 8)}
PCI_ISR, PCI_DEVCFG, PCI_NOTIFY = 0x1000, 0x2000, 0x3000
PCI_CFG_CAP, MSIX_CAP = 0x80, 0x98      # pykvm.devices.virtio.pci's capability offsets

# status bits and feature bits (sections 2.1, 6)
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
F_INDIRECT, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32
NEXT, WRITE, INDIRECT = 1, 2, 4

NUM_QUEUES = {"rng": 1, "blk": 1, "blk-ro": 1, "console": 2}
QUEUE_MAX = 256


def _pack_desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr & (2 ** 64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF,
                       nxt & 0xFFFF)


class _Queue:
    """What the generated driver set up for one queue: size, ring addresses, its avail index."""

    def __init__(self, size: int, desc: int, avail: int, used: int):
        self.size, self.desc, self.avail, self.used = size, desc, avail, used
        self.avail_idx = 0
        self.next_desc = 0


class _Gen:
    """One case's generation: the RNG, the target and the driver's idea of the device."""

    def __init__(self, rng: random.Random, target: str):
        self.r = rng
        self.target = target
        self.transport, self.device = target.split("-", 1)
        self.nq = NUM_QUEUES[self.device]
        self.queues: List[Optional[_Queue]] = [None] * self.nq
        self.features = 0
        self.flood = False
        self.ops: List[list] = []
        self._next_ring = RING_AREA
        self._next_buf = BUF_AREA

    # -- values and addresses --------------------------------------------------------------
    def value(self, size: int) -> int:
        return edge_value(self.r, size, small_below=0.65)

    def ring_space(self, n: int, align: int = 16) -> int:
        a = (self._next_ring + align - 1) & ~(align - 1)
        if a + n > BUF_AREA:
            a = RING_AREA
        self._next_ring = a + n
        return a

    def buf(self, n: int) -> int:
        a = self._next_buf
        if a + n > RAM_LOW[1]:
            a = BUF_AREA
        self._next_buf = a + max(n, 1)
        return a

    def bad_addr(self, n: int = 16) -> int:
        """A guest-physical address that is not (wholly) RAM."""
        r = self.r
        lo_end, hi_base, hi_end = RAM_LOW[1], RAM_HIGH[0], RAM_HIGH[0] + RAM_HIGH[1]
        return r.choice((lo_end, lo_end - max(1, n // 2), hi_base - 8, hi_end, hi_end - 1,
                         1 << 32, 1 << 63, 2 ** 64 - 16, 2 ** 64 - 1, MMIO_BASE, PCI_BAR4,
                         r.getrandbits(64)))

    # -- register access, transport-independent ----------------------------------------------
    def _mmio(self, reg: str, value: Optional[int] = None) -> None:
        a = MMIO_BASE + M[reg]
        self.ops.append(["r", a, 4] if value is None else ["w", a, 4, value & 0xFFFFFFFF])

    def _common(self, field: str, value: Optional[int] = None) -> None:
        off, width = C[field]
        a = PCI_BAR4 + off
        if value is None:
            self.ops.append(["r", a, width])
        elif width == 8 and self.r.random() < 0.5:       # 64-bit fields as two halves too
            self.ops += [["w", a, 4, value & 0xFFFFFFFF], ["w", a + 4, 4, (value >> 32) & 0xFFFFFFFF]]
        else:
            self.ops.append(["w", a, width, value & ((1 << (8 * width)) - 1)])

    def status(self, value: int) -> None:
        if self.transport == "mmio":
            self._mmio("Status", value)
        else:
            self._common("status", value & 0xFF)

    def read_status(self) -> None:
        if self.transport == "mmio":
            self._mmio("Status")
        else:
            self._common("status")

    def features_word(self, sel: int, value: int) -> None:
        if self.transport == "mmio":
            self._mmio("DriverFeaturesSel", sel)
            self._mmio("DriverFeatures", value)
        else:
            self._common("gfselect", sel)
            self._common("gf", value)

    def read_features(self, sel: int) -> None:
        if self.transport == "mmio":
            self._mmio("DeviceFeaturesSel", sel)
            self._mmio("DeviceFeatures")
        else:
            self._common("dfselect", sel)
            self._common("df")

    def queue_setup(self, i: int, size: int, desc: int, avail: int, used: int,
                    ready: bool = True) -> None:
        if self.transport == "mmio":
            self._mmio("QueueSel", i)
            self._mmio("QueueNumMax")
            self._mmio("QueueNum", size)
            for reg, v in (("QueueDesc", desc), ("QueueDriver", avail), ("QueueDevice", used)):
                self._mmio(reg + "Low", v & 0xFFFFFFFF)
                self._mmio(reg + "High", v >> 32)
            if ready:
                self._mmio("QueueReady", 1)
        else:
            self._common("q_select", i)
            self._common("q_size")
            self._common("q_size", size)
            self._common("q_desc", desc)
            self._common("q_driver", avail)
            self._common("q_device", used)
            if self.r.random() < 0.7:
                self._common("q_msix", self.r.choice((i + 1, 0, 0xFFFF, 63, i)))
            if ready:
                self._common("q_enable", 1)

    def notify(self, i: int) -> None:
        if self.transport == "mmio":
            self._mmio("QueueNotify", i)
        else:
            self.ops.append(["w", PCI_BAR4 + PCI_NOTIFY + 4 * i, self.r.choice((2, 2, 4)), i])

    def config_access(self) -> None:
        """A read or write of any width at any byte of the device configuration space (and a
        little past it)."""
        r = self.r
        size = r.choice((1, 2, 3, 4, 8))
        off = r.choice((0, 4, 8, 12, 20, 36, 56, 60, r.randrange(0x110)))
        base = MMIO_BASE + 0x100 if self.transport == "mmio" else PCI_BAR4 + PCI_DEVCFG
        if r.random() < 0.6:
            self.ops.append(["r", base + off, size])
        else:
            self.ops.append(["w", base + off, size, self.value(size)])


# -- recipes ------------------------------------------------------------------------------------

def _init(g: _Gen) -> None:
    """The driver's initialisation (section 3.1.1), now and then broken: steps dropped,
    repeated or out of order, features without VERSION_1, bad queue sizes and addresses."""
    r = g.r
    hostile = r.random() < 0.35
    steps: List[tuple] = []
    steps.append(("status", 0))
    steps.append(("status", ACK))
    steps.append(("status", ACK | DRIVER))
    steps += [("readf", 0), ("readf", 1)]
    feat = (1 << F_VERSION_1) | r.getrandbits(24)
    if r.random() < 0.6:
        feat |= 1 << F_INDIRECT
    if r.random() < 0.5:
        feat |= 1 << F_EVENT_IDX
    if hostile and r.random() < 0.2:
        feat &= ~(1 << F_VERSION_1)
    if hostile and r.random() < 0.2:
        feat |= r.getrandbits(64)
    g.features = feat
    steps += [("feat", 0, feat & 0xFFFFFFFF), ("feat", 1, feat >> 32)]
    if hostile and r.random() < 0.2:
        steps.append(("feat", r.choice((2, 3, 4, 0xFFFFFFFF)), r.getrandbits(32)))
    steps.append(("status", ACK | DRIVER | FEATURES_OK))
    steps.append(("readstatus",))
    for i in range(g.nq):
        if hostile and r.random() < 0.15:
            continue                                      # a queue never set up
        size = r.choice((QUEUE_MAX, 128, 16, 8, 4, 2, 1))
        if hostile and r.random() < 0.3:
            size = r.choice((0, 3, 255, 257, 512, 0x8000, 0xFFFF, r.getrandbits(32)))
        n = max(size, 1) if size <= QUEUE_MAX else QUEUE_MAX
        desc = g.ring_space(16 * n, 16)
        avail = g.ring_space(6 + 2 * n, 2)
        used = g.ring_space(6 + 8 * n, 4)
        if hostile and r.random() < 0.3:
            which = r.randrange(3)
            bad = r.choice((g.bad_addr(16 * n), desc + 1, avail + 1, used + 2))
            desc, avail, used = [bad if k == which else v for k, v in
                                 enumerate((desc, avail, used))]
        g.queues[i] = _Queue(size, desc, avail, used)
        steps.append(("queue", i, size, desc, avail, used, not (hostile and r.random() < 0.1)))
    if g.transport == "pci" and r.random() < 0.6:
        steps.append(("msix",))
    steps.append(("status", ACK | DRIVER | FEATURES_OK | DRIVER_OK))
    if hostile:
        for _ in range(r.randint(1, 3)):
            k = r.random()
            if k < 0.3 and len(steps) > 2:                 # drop a step
                del steps[r.randrange(1, len(steps))]
            elif k < 0.6 and len(steps) > 2:               # swap two
                a, b = r.randrange(1, len(steps)), r.randrange(1, len(steps))
                steps[a], steps[b] = steps[b], steps[a]
            elif k < 0.8:                                  # a step again, later
                steps.insert(r.randrange(1, len(steps) + 1), r.choice(steps))
            else:
                steps.insert(r.randrange(1, len(steps) + 1),
                             ("status", r.choice((FAILED, DRIVER_OK, NEEDS_RESET, 0xFF,
                                                  FEATURES_OK, r.getrandbits(8)))))
    for s in steps:
        if s[0] == "status":
            g.status(s[1])
        elif s[0] == "readf":
            g.read_features(s[1])
        elif s[0] == "feat":
            g.features_word(s[1], s[2])
        elif s[0] == "readstatus":
            g.read_status()
        elif s[0] == "queue":
            g.queue_setup(*s[1:])
        elif s[0] == "msix":
            _msix_setup(g)


def _msix_setup(g: _Gen) -> None:
    """MSI-X table entries unmasked and the capability enabled (sometimes function-masked)."""
    r = g.r
    for v in range(g.nq + 1):
        base = PCI_BAR1 + 16 * v
        g.ops += [["w", base, 4, 0xFEE00000], ["w", base + 4, 4, 0], ["w", base + 8, 4, 0x30 + v],
                  ["w", base + 12, 4, 0 if r.random() < 0.9 else 1]]
    g._common("msix_config", r.choice((0, 0, 0xFFFF, 7)))
    g.ops.append(["cw", MSIX_CAP + 2, 2, 0x8000 | (0x4000 if r.random() < 0.1 else 0)])


def _request_bufs(g: _Gen, qi: int) -> List[tuple]:
    """A valid chain for the device: [(addr, len, device_writable)]."""
    r = g.r
    if g.device == "rng":
        return [(g.buf(n), n, True) for n in
                [r.choice((1, 16, 64, 512, 4096, 65536)) for _ in range(r.randint(1, 3))]]
    if g.device == "console":
        if qi == 0:
            return [(g.buf(n), n, True) for n in [r.choice((1, 64, 4096))]]
        out = []
        for _ in range(r.randint(1, 3)):
            n = r.choice((1, 13, 100, 4096))
            a = g.buf(n)
            g.ops.append(["mem", a, bytes(0x20 + r.randrange(0x5F) for _ in range(min(n, 64))).hex()])
            out.append((a, n, False))
        return out
    # blk: header, data, status
    t = r.choice((0, 0, 1, 1, 4, 8, 11, 13, 2, r.getrandbits(32)))
    sector = r.choice((0, 1, 7, 8, 127, 2047, 2048, 2 ** 63, 2 ** 64 - 1, r.getrandbits(16)))
    hdr = g.buf(16)
    g.ops.append(["mem", hdr, struct.pack("<IIQ", t, 0, sector).hex()])
    bufs = [(hdr, 16, False)]
    n = r.choice((0, 512, 512, 1024, 4096, 511, 513, 20))
    if t in (11, 13):                               # segments: sector, count, flags
        nseg = r.choice((1, 1, 2, 33))
        seg = g.buf(16 * nseg)
        g.ops.append(["mem", seg, b"".join(
            struct.pack("<QII", r.choice((0, 8, 2040, 1 << 40)), r.choice((0, 1, 8, 1 << 21)),
                        r.choice((0, 0, 1, 2))) for _ in range(nseg)).hex()])
        bufs.append((seg, 16 * nseg, False))
    elif n:
        a = g.buf(n)
        if t == 1:
            g.ops.append(["mem", a, r.randbytes(min(n, 64)).hex()])
        bufs.append((a, n, t != 1))
    bufs.append((g.buf(1), 1, True))
    return bufs


def _mutate(g: _Gen, q: _Queue, descs: Dict[int, list], qi: int) -> Optional[int]:
    """Break a chain (descs: [addr, len, flags, next] by table index) one of the ways section 2.7
    forbids; returns a head to use instead of the chain's own, or None."""
    r = g.r
    k = r.choice(("loop", "next_past", "head_past", "indirect", "len_huge", "outside", "hole",
                  "r_after_w", "zero_len", "idx_jump", "long_chain", "indirect_nested",
                  "indirect_empty", "indirect_misaligned", "indirect_huge", "indirect_outside",
                  "indirect_next", "alias", "alias"))
    idx: List[int] = list(descs)
    if k == "loop" and idx:
        last = idx[-1]
        descs[last][2] |= NEXT
        descs[last][3] = r.choice(idx)
    elif k == "next_past" and idx:
        descs[idx[0]][2] |= NEXT
        descs[idx[0]][3] = r.choice((q.size, q.size + 1, 0xFFFF))
    elif k == "head_past":
        return r.choice((q.size, 0xFFFF, q.size + r.randrange(100)))
    elif k == "len_huge" and idx:
        descs[r.choice(idx)][1] = r.choice((0xFFFFFFFF, 0xFFFFFFF0, 0x80000000, 1 << 31 | 1))
    elif k == "outside" and idx:
        d = descs[r.choice(idx)]
        d[0] = g.bad_addr(d[1] or 16)
        d[1] = d[1] or 16
    elif k == "hole" and idx:
        d = descs[r.choice(idx)]
        d[0], d[1] = RAM_LOW[1] - 8, r.choice((16, 4096))
    elif k == "r_after_w" and idx:
        first = descs[idx[0]]
        first[2] |= WRITE
        if len(idx) == 1:
            a = g.buf(16)
            j = (idx[0] + 1) % q.size
            first[2] |= NEXT
            first[3] = j
            descs[j] = [a, 16, 0, 0]
        else:
            descs[idx[-1]][2] &= ~WRITE
    elif k == "zero_len" and idx:
        descs[r.choice(idx)][1] = 0
    elif k == "idx_jump":
        q.avail_idx = (q.avail_idx + r.choice((q.size, q.size + 1, 0x8000, 0xFFFF))) & 0xFFFF
    elif k == "alias":
        # every descriptor of the table names the same large stretch of RAM: a chain of up to
        # size x 1 MiB from 1 MiB of guest memory (the lengths sum below 2^32)
        n = r.choice((64 << 10, 512 << 10, RAM_LOW[1] - BUF_AREA))
        w = WRITE if g.device in ("rng", "blk", "blk-ro") or qi == 0 else 0
        for j in range(q.size):
            descs[j] = [BUF_AREA, n, w | NEXT, j + 1]
        descs[q.size - 1][2] &= ~NEXT
        g.flood = r.random() < 0.5               # and every entry of the available ring
        return 0
    elif k == "long_chain":
        # every descriptor of the table in one chain (the last one loops back to the first)
        for j in range(q.size):
            descs[j] = [g.buf(1), 1, WRITE | NEXT, (j + 1) % q.size]
        return 0
    elif k.startswith("indirect") and idx:
        n = r.choice((1, 2, 4, q.size, q.size + 1))
        table = g.ring_space(16 * max(n, 1), r.choice((16, 16, 1)))
        entries = []
        for j in range(n):
            last = j == n - 1
            entries.append([g.buf(64), 64, WRITE | (0 if last else NEXT), j + 1])
        length = 16 * n
        if k == "indirect_nested" and entries:
            entries[0] = [g.ring_space(32), 32, INDIRECT, 0]
        elif k == "indirect_empty":
            length = 0
        elif k == "indirect_misaligned":
            length = 16 * n + r.choice((1, 8, 15))
        elif k == "indirect_huge":
            length = r.choice((0xFFFFFFF0, 16 * 0x8000, 16 * (q.size + 1)))
        elif k == "indirect_outside":
            table = g.bad_addr(length)
        elif k == "indirect_next" and entries:
            entries[-1][2] |= NEXT
            entries[-1][3] = r.choice((n, 0, 0xFFFF))
        g.ops.append(["mem", table, b"".join(_pack_desc(*e) for e in entries).hex()])
        head = idx[0]
        flags = INDIRECT | (NEXT if r.random() < 0.15 else 0)
        descs.clear()
        descs[head] = [table, length, flags, 0]
    return None


def _rings(g: _Gen) -> None:
    """Chains made available in a queue the driver set up, mutated now and then, then a
    notification."""
    r = g.r
    set_up = [i for i, q in enumerate(g.queues) if q is not None]
    if not set_up:
        g.notify(r.randrange(g.nq + 2))
        return
    qi = r.choice(set_up)
    q = g.queues[qi]
    assert q is not None
    size = q.size if 0 < q.size <= QUEUE_MAX and not q.size & (q.size - 1) else 0
    if size == 0 or q.desc % 16 or q.desc + 16 * size > RAM_LOW[1]:
        g.notify(qi)                                       # the queue cannot work: notify anyway
        return
    for _ in range(r.randint(1, 4)):
        bufs = _request_bufs(g, qi)[:size]
        descs: Dict[int, list] = {}
        head = q.next_desc % size
        j = head
        for k, (a, n, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            nxt = (j + 1) % size
            descs[j] = [a, n, (WRITE if w else 0) | (0 if last else NEXT), nxt]
            j = nxt
        q.next_desc = j
        alt = _mutate(g, q, descs, qi) if r.random() < 0.4 else None
        if alt is not None:
            head = alt
        for d, (a, n, f, nx) in descs.items():
            if d < size:
                g.ops.append(["mem", q.desc + 16 * d, _pack_desc(a, n, f, nx).hex()])
        if g.flood and q.avail + 6 + 2 * size <= RAM_LOW[1]:
            g.flood = False
            q.avail_idx = (q.avail_idx + size) & 0xFFFF
            g.ops.append(["mem", q.avail + 4, struct.pack("<H", head & 0xFFFF).hex() * size])
            g.ops.append(["mem", q.avail, struct.pack("<HH", 0, q.avail_idx).hex()])
            break
        if q.avail + 6 + 2 * size <= RAM_LOW[1]:
            slot = q.avail + 4 + 2 * (q.avail_idx % size)
            q.avail_idx = (q.avail_idx + 1) & 0xFFFF
            flags = 1 if r.random() < 0.2 else 0           # VIRTQ_AVAIL_F_NO_INTERRUPT
            g.ops.append(["mem", slot, struct.pack("<H", head & 0xFFFF).hex()])
            g.ops.append(["mem", q.avail, struct.pack("<HH", flags, q.avail_idx).hex()])
            if r.random() < 0.2:                           # used_event (EVENT_IDX)
                g.ops.append(["mem", q.avail + 4 + 2 * size,
                              struct.pack("<H", r.getrandbits(16)).hex()])
    g.notify(qi if r.random() < 0.9 else r.choice((qi ^ 1, g.nq, 0xFFFF, r.getrandbits(16))))
    if r.random() < 0.3:                                   # read the used ring back
        g.ops.append(["r", MMIO_BASE + M["InterruptStatus"], 4] if g.transport == "mmio"
                     else ["r", PCI_BAR4 + PCI_ISR, 1])


def _random_regs(g: _Gen) -> None:
    """Accesses of every width (1-8 bytes) at any offset of the transport's windows."""
    r = g.r
    for _ in range(r.randint(1, 6)):
        size = r.choice((1, 2, 4, 4, 4, 8, 3))
        if g.transport == "mmio":
            a = MMIO_BASE + r.choice((r.randrange(0x200), 4 * r.randrange(0x40), 0x1FC, 0x1FF))
        else:
            a = r.choice((PCI_BAR4 + r.randrange(0x40), PCI_BAR4 + PCI_ISR + r.randrange(4),
                          PCI_BAR4 + PCI_DEVCFG + r.randrange(0x40),
                          PCI_BAR4 + PCI_NOTIFY + r.randrange(0x20), PCI_BAR4 + 0x3FFF,
                          PCI_BAR4 + r.randrange(0x4000), PCI_BAR1 + r.randrange(0x60),
                          PCI_BAR1 + 0x800 + r.randrange(16), PCI_BAR1 + 0xFFC))
        if r.random() < 0.5:
            g.ops.append(["r", a, size])
        else:
            g.ops.append(["w", a, size, g.value(size)])


def _registers(g: _Gen) -> None:
    """Named registers written with hostile values: queue selects past the last queue,
    notifications of queues never set up, feature selects past 3, acks, queue sizes."""
    r = g.r
    if g.transport == "mmio":
        reg = r.choice(list(M))
        g._mmio(reg, g.value(4) if r.random() < 0.7 else None)
    else:
        field = r.choice(list(C))
        off, width = C[field]
        if r.random() < 0.7:
            g._common(field, g.value(width))
        else:
            g._common(field)


def _pci_config(g: _Gen) -> None:
    """PCI configuration space: the command register, BARs (sized and moved), the MSI-X
    control, the VIRTIO_PCI_CAP_PCI_CFG window into BAR 4, and any byte naturally aligned."""
    r = g.r
    k = r.random()
    if k < 0.15:
        g.ops.append(["cw", 0x04, 2, r.choice((0, 2, 6, 0xFFFF))])
    elif k < 0.3:
        bar = r.choice((0x14, 0x20, 0x10))
        g.ops += [["cw", bar, 4, 0xFFFFFFFF], ["cr", bar, 4],
                  ["cw", bar, 4, r.choice((PCI_BAR1 if bar == 0x14 else PCI_BAR4, 0,
                                           0xFFFFF000, MMIO_BASE, r.getrandbits(32)))]]
    elif k < 0.45:
        g.ops.append(["cw", MSIX_CAP + 2, 2, r.choice((0, 0x8000, 0xC000, 0x4000, 0xFFFF))])
    elif k < 0.75:                                         # the PCI_CFG access window
        off = r.choice((0, 0x14, 0x16, 0x18, 0x1C, 0x1000, 0x2000, 0x3000, 0x3004,
                        r.randrange(0x4000), 0x4000, 0xFFFFFFFF))
        length = r.choice((1, 2, 4, 4, 0, 3, 8))
        g.ops += [["cw", PCI_CFG_CAP + 4, 1, r.choice((4, 4, 4, 1, 0, 5))],
                  ["cw", PCI_CFG_CAP + 8, 4, off], ["cw", PCI_CFG_CAP + 12, 4, length]]
        for _ in range(r.randint(1, 3)):
            size = r.choice((1, 2, 4))
            at = PCI_CFG_CAP + 16 + r.choice((0, 0, size if size < 4 else 0))
            if r.random() < 0.5:
                g.ops.append(["cr", at, size])
            else:
                g.ops.append(["cw", at, size, g.value(size)])
    else:
        size = r.choice((1, 2, 4))
        off = r.randrange(0, 256, size)
        if r.random() < 0.5:
            g.ops.append(["cr", off, size])
        else:
            g.ops.append(["cw", off, size, g.value(size)])


def _console_host(g: _Gen) -> None:
    r = g.r
    if r.random() < 0.7:
        g.ops.append(["feed", r.choice((1, 10, 4096, 70000)), r.getrandbits(32)])
    else:
        g.ops.append(["resize", r.choice((1, 80, 0xFFFF)), r.choice((1, 25, 0xFFFF))])


def _reset(g: _Gen) -> None:
    """A reset midway (status 0), sometimes followed by a fresh initialisation."""
    g.status(0)
    for q in g.queues:
        if q is not None:
            q.avail_idx = q.next_desc = 0
    if g.r.random() < 0.7:
        _init(g)


RECIPES = ((30, _rings), (10, _random_regs), (8, _registers), (6, lambda g: g.config_access()),
           (3, _reset), (8, _pci_config), (5, _console_host))


def generate_case(seed: int, index: int, *, modes=MODES, max_vcpus: int = 1,
                  deadline: float = DEFAULT_DEADLINE) -> dict:
    """Virtio case ``index`` of run ``seed`` (a pure function of its arguments); ``modes``:
    the targets to draw from (:data:`MODES`); ``max_vcpus`` is accepted for the supervisor's
    sake (a virtio case is one driver)."""
    rng = random.Random(f"pykvm-fuzz-virtio:{seed}:{index}")
    targets = [m for m in MODES if m in modes] or list(MODES)
    target = rng.choice(targets)
    g = _Gen(rng, target)
    _init(g)
    recipes = [(w, fn) for w, fn in RECIPES
               if not (fn is _pci_config and g.transport != "pci")
               and not (fn is _console_host and g.device != "console")]
    weights = [w for w, _ in recipes]
    fns = [fn for _, fn in recipes]
    nsteps = rng.randint(4, 40)
    for _ in range(nsteps):
        rng.choices(fns, weights)[0](g)
    return {
        "format": CASE_FORMAT, "seed": seed, "index": index, "mode": target,
        "deadline": deadline, "image_sectors": rng.choice(IMAGE_SECTORS),
        "vcpus": [{"ops": g.ops}], "blobs": [],
    }


def case_to_json(case: dict) -> dict:
    """``case`` in its JSON form (a reproducer's "case")."""
    return dict(case, blobs=blobs_to_json(case["blobs"]))


def case_from_json(d: dict) -> dict:
    """The inverse of :func:`case_to_json`; ValueError for a document of another format."""
    if d.get("format") != CASE_FORMAT:
        raise ValueError(f"not a pykvm virtio fuzz case (format {d.get('format')!r})")
    if d.get("mode") not in MODES:
        raise ValueError(f"unknown virtio fuzz target {d.get('mode')!r}")
    return dict(d, blobs=blobs_from_json(d["blobs"]))
