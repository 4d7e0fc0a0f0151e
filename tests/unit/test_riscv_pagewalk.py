"""The RISC-V guest page-table walk (pykvm.arch.riscv.pagewalk) on page tables built PTE by
PTE in a bytearray-backed guest RAM: Bare, Sv39, Sv48, Sv57, superpages, Svnapot, and every
way a walk fails."""
import pytest

from pykvm.arch.riscv import pagewalk as pw
from pykvm.errors import GuestMemoryError

RAM_BASE = 0x8000_0000
RAM_SIZE = 1 << 20
V, R, W, X, U, G, A, D = (1 << b for b in range(8))
SATP = {"Sv39": 8, "Sv48": 9, "Sv57": 10}


class Ram:
    """Guest RAM at RAM_BASE: reads outside it raise GuestMemoryError, as Machine.memory does."""

    def __init__(self):
        self.buf = bytearray(RAM_SIZE)
        self.reads = 0
        self.next_table = RAM_BASE

    def read(self, gpa, n):
        self.reads += 1
        if gpa < RAM_BASE or gpa + n > RAM_BASE + RAM_SIZE:
            raise GuestMemoryError(f"guest-physical address {gpa:#x} is not backed by RAM")
        return bytes(self.buf[gpa - RAM_BASE:gpa - RAM_BASE + n])

    def table(self):
        t = self.next_table
        self.next_table += 4096
        return t

    def set_pte(self, table, index, pte):
        off = table - RAM_BASE + index * 8
        self.buf[off:off + 8] = pte.to_bytes(8, "little")


def pte(pa, flags):
    return ((pa >> 12) << 10) | flags


def vpn(va, level):
    return (va >> (12 + 9 * level)) & 0x1FF


def satp(mode, root):
    return (SATP[mode] << 60) | (0x1234 << 44) | (root >> 12)      # an ASID must not matter


def map_page(ram, mode, root, va, pa, flags, leaf_level=0):
    """Map ``va`` -> ``pa`` with a leaf at ``leaf_level``, making the tables on the way (or
    following those already there)."""
    levels = {"Sv39": 3, "Sv48": 4, "Sv57": 5}[mode]
    table = root
    for level in range(levels - 1, leaf_level, -1):
        old = int.from_bytes(ram.read(table + vpn(va, level) * 8, 8), "little")
        if old & V and not old & (R | X):           # a pointer already there: reuse its table
            table = ((old >> 10) & ((1 << 44) - 1)) << 12
            continue
        nxt = ram.table()
        ram.set_pte(table, vpn(va, level), pte(nxt, V))
        table = nxt
    ram.set_pte(table, vpn(va, leaf_level), pte(pa, flags))


def test_bare_is_identity_and_reserved_modes_fail():
    ram = Ram()
    t = pw.walk(ram, 0, 0xDEAD_BEEF)
    assert (t.gpa, t.mode, t.level, t.readable, t.writable, t.executable) == \
        (0xDEAD_BEEF, "Bare", -1, True, True, True)
    assert ram.reads == 0
    for mode in (1, 7, 11, 15):
        assert pw.walk(ram, mode << 60, 0x1000) is None
        assert pw.satp_mode(mode << 60) == f"reserved({mode})"
    assert [pw.satp_mode(m << 60) for m in (0, 8, 9, 10)] == ["Bare", "Sv39", "Sv48", "Sv57"]


@pytest.mark.parametrize("mode", ["Sv39", "Sv48", "Sv57"])
def test_4k_pages_low_and_high_half(mode):
    ram = Ram()
    root = ram.table()
    va_bits = {"Sv39": 39, "Sv48": 48, "Sv57": 57}[mode]
    low, high = 0x4000_1000, ((1 << 64) - (1 << (va_bits - 1))) + 0x5000   # lowest high-half page
    map_page(ram, mode, root, low, RAM_BASE + 0x8_0000, V | R | X | A)
    map_page(ram, mode, root, high, RAM_BASE + 0x9_0000, V | R | W | A | D | U)
    s = satp(mode, root)
    t = pw.walk(ram, s, low + 0x123)
    assert (t.gpa, t.page_size, t.level, t.mode) == (RAM_BASE + 0x8_0123, 4096, 0, mode)
    assert (t.readable, t.writable, t.executable, t.user) == (True, False, True, False)
    assert t.page_remaining == 4096 - 0x123
    t = pw.walk(ram, s, high + 0xFFF)
    assert t.gpa == RAM_BASE + 0x9_0FFF and t.writable and t.user and not t.executable
    assert pw.translate(ram, s, low + 0x1000) is None                 # the next page: V = 0
    # not sign-extended: bit 63 differs from bit VALEN-1
    assert pw.walk(ram, s, high & ~(1 << 63)) is None
    assert pw.walk(ram, s, low | (1 << 63)) is None
    assert ram.reads <= 2 * 5 + 3 * 5


def test_superpages_and_misaligned_ones():
    ram = Ram()
    root = ram.table()
    s = satp("Sv39", root)
    map_page(ram, "Sv39", root, 0x4000_0000, 0x8000_0000, V | R | W | X, leaf_level=2)   # 1 GiB
    t = pw.walk(ram, s, 0x4000_0000 + 0x1234_5678)
    assert (t.gpa, t.page_size, t.level) == (0x9234_5678, 1 << 30, 2)
    map_page(ram, "Sv39", root, 0x20_0000, RAM_BASE + 0x20_0000, V | R, leaf_level=1)    # 2 MiB
    t = pw.walk(ram, s, 0x21_2345)
    assert (t.gpa, t.page_size, t.level) == (RAM_BASE + 0x21_2345, 2 << 20, 1)
    # a 2 MiB leaf whose PPN is not 2 MiB aligned: a page fault, not a translation
    map_page(ram, "Sv39", root, 0x60_0000, RAM_BASE + 0x1000, V | R, leaf_level=1)
    assert pw.walk(ram, s, 0x60_0000) is None
    map_page(ram, "Sv39", root, 0x8000_0000, 0x1000, V | R, leaf_level=2)                # 1 GiB
    assert pw.walk(ram, s, 0x8000_0000) is None


def test_svnapot_64k():
    ram = Ram()
    root = ram.table()
    s = satp("Sv39", root)
    # NAPOT 64 KiB: PPN low bits 1000, N set; the low 4 PPN bits come from the VA
    map_page(ram, "Sv39", root, 0x1_3000, RAM_BASE + 0x4_0000 + 0x8000,
             V | R | W | (1 << 63))
    t = pw.walk(ram, s, 0x1_3456)
    assert (t.gpa, t.page_size) == (RAM_BASE + 0x4_3456, 1 << 16)
    # N with another PPN encoding is reserved
    map_page(ram, "Sv39", root, 0x2_0000, RAM_BASE + 0x4_0000, V | R | (1 << 63))
    assert pw.walk(ram, s, 0x2_0000) is None


@pytest.mark.parametrize("bad", [
    pytest.param(lambda p: p & ~V, id="invalid"),
    pytest.param(lambda p: (p & ~R) | W, id="write-only"),
    pytest.param(lambda p: p | (1 << 54), id="reserved-bit-54"),
    pytest.param(lambda p: p | (3 << 61), id="pbmt-3"),
])
def test_bad_leaf_ptes(bad):
    ram = Ram()
    root = ram.table()
    map_page(ram, "Sv39", root, 0x7000, RAM_BASE + 0x7000, bad(V | R | W))
    assert pw.walk(ram, satp("Sv39", root), 0x7000) is None


@pytest.mark.parametrize("flag", [A, D, U, 1 << 63, 1 << 61])
def test_pointer_ptes_with_leaf_only_bits_fail(flag):
    ram = Ram()
    root = ram.table()
    nxt = ram.table()
    ram.set_pte(root, 0, pte(nxt, V | flag))
    ram.set_pte(nxt, 0, pte(RAM_BASE, V | R))        # would be a valid 2 MiB leaf
    assert pw.walk(ram, satp("Sv39", root), 0x1000) is None
    ram.set_pte(root, 0, pte(nxt, V))
    assert pw.walk(ram, satp("Sv39", root), 0x1000).gpa == RAM_BASE + 0x1000


def test_pointer_at_level_0_and_tables_outside_ram():
    ram = Ram()
    root = ram.table()
    map_page(ram, "Sv39", root, 0x3000, RAM_BASE, V)               # a pointer where a leaf must be
    assert pw.walk(ram, satp("Sv39", root), 0x3000) is None
    # a root beyond RAM, and a pointer to a table at GPA 0 / at the last bytes of the space
    assert pw.walk(ram, (8 << 60) | ((RAM_BASE + RAM_SIZE) >> 12), 0) is None
    ram.set_pte(root, 5, pte(0, V))
    assert pw.walk(ram, satp("Sv39", root), 5 << 30) is None
    ram.set_pte(root, 6, ((1 << 44) - 1) << 10 | V)
    assert pw.walk(ram, satp("Sv39", root), 6 << 30) is None


def test_ranges_split_at_pages_and_stop_at_a_hole():
    ram = Ram()
    root = ram.table()
    s = satp("Sv39", root)
    map_page(ram, "Sv39", root, 0x1_0000, RAM_BASE + 0x5_0000, V | R)
    map_page(ram, "Sv39", root, 0x1_1000, RAM_BASE + 0x5_1000, V | R)     # contiguous: merged
    map_page(ram, "Sv39", root, 0x1_2000, RAM_BASE + 0x3_0000, V | R)     # elsewhere
    assert pw.ranges(ram, s, 0x1_0ff0, 0x2020) == [(RAM_BASE + 0x5_0ff0, 0x1010),
                                                   (RAM_BASE + 0x3_0000, 0x1000)]
    assert pw.ranges(ram, s, 0x1_2ff8, 0x10) == [(RAM_BASE + 0x3_0ff8, 8)]      # then a hole
    assert pw.ranges(ram, s, 0x1_3000, 4) == []
    assert pw.ranges(ram, s, 0x1_0000, 0) == []
    assert pw.ranges(ram, 0, (1 << 64) - 4, 8) == [((1 << 64) - 4, 4), (0, 4)]  # Bare wraps
    with pytest.raises(ValueError):
        pw.ranges(ram, s, 0, -1)
