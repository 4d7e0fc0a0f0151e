"""Issue 16, fault 4: loading an image commits host memory only for what the image holds,
never for the zero-filled sizes it names (multiboot a.out-kludge ``bss_end_addr``, ELF
``p_memsz`` > ``p_filesz``, a RISC-V Image's ``image_size``). Guest RAM here is the real
thing (:func:`pykvm.memory.new_mapping`: a private anonymous MAP_NORESERVE mapping), measured
through the mapping's own ``Rss`` in /proc/self/smaps; no /dev/kvm is needed."""
import struct

import pytest

from pykvm import boot
from pykvm.arch.x86 import layout
from pykvm.boot import x86_images
from pykvm.memory import GuestMemory, MemorySlot, new_mapping

from test_loader import make_elf, mb_header, seg

GiB = 1 << 30
MiB = 1 << 20
BOUND_KIB = 64 * 1024          # what a load may commit in these tests, at most (64 MiB)


def ram(size, gpa=0):
    mem = GuestMemory()
    m, pin = new_mapping(size, gpa)
    mem._add(MemorySlot(0, gpa, size, 0, m, pin))
    return mem


@pytest.fixture
def big_ram():
    mem = ram(2 * GiB)
    yield mem
    mem._close()


def rss_kib(mem) -> int:
    """Resident KiB of ``mem``'s first slot (:meth:`pykvm.memory.MemorySlot.resident`)."""
    return next(iter(mem)).resident() // 1024


class View:
    """A memory object with only size/read/write (as the RISC-V platform hands the loader):
    the loader's fallback zero fill must not commit memory either."""

    def __init__(self, mem, base=0):
        self.mem, self.base, self.size = mem, base, mem.size

    def write(self, gpa, data):
        self.mem.write(gpa - self.base, data)

    def read(self, gpa, n):
        return self.mem.read(gpa - self.base, n)


def aout_image(bss_end):
    """A 4 KiB multiboot image (a.out kludge) loaded at 1 MiB whose BSS ends at ``bss_end``."""
    hdr = mb_header(0x10003, aout=(0x100000, 0x100000, 0, bss_end, 0x100040))
    return (hdr + bytes(0x40 - len(hdr)) + b"\xf4" * 64).ljust(4096, b"\x90")


@pytest.mark.parametrize("via", ["GuestMemory.zero", "read-only fallback"])
def test_aout_bss_near_the_top_of_2g_commits_little(big_ram, via):
    mem = big_ram if via == "GuestMemory.zero" else View(big_ram)
    before = rss_kib(big_ram)
    li = boot.load_image(mem, aout_image(0x78000000))
    assert li.plan.segments[0].end == 0x78000000
    assert rss_kib(big_ram) - before < BOUND_KIB
    assert big_ram.read(0x100040, 1) == b"\xf4"


def test_elf_with_huge_memsz_commits_little(big_ram):
    img = make_elf([seg(0x100000, b"\xf4" * 100, memsz=0x70000000)], 0x100000)
    before = rss_kib(big_ram)
    boot.load_image(big_ram, img)
    assert rss_kib(big_ram) - before < BOUND_KIB


def test_pc_placement_with_huge_bss_commits_little(big_ram):
    # the PC machine's loader (modules, multiboot info, boot structures) on top
    before = rss_kib(big_ram)
    placed = x86_images.load(big_ram, aout_image(0x7F000000), ram=[(0, 2 * GiB)],
                         memory_map=layout.e820_map(2 * GiB, bios_area=True),
                         claimed=[(layout.EBDA_START, layout.LOW_RAM_END)])
    assert placed.loaded.entry == 0x100040
    assert rss_kib(big_ram) - before < BOUND_KIB


def test_riscv_image_size_commits_little():
    base = 0x80000000
    mem = ram(2 * GiB, base)
    try:
        # a RISC-V Image header: code0/code1, text_offset 0x200000, image_size ~1.9 GiB
        hdr = struct.pack("<IIQQQIIQ8s4sI", 0x13, 0, 0x200000, 0x76000000, 0, 0x2, 0, 0,
                          b"RISCV\0\0\0", b"RSC\x05", 0)
        before = rss_kib(mem)
        view = View(mem)
        view.base, view.size = 0, 2 * GiB          # as the RISC-V platform's RAM view
        li = boot.load_image(view, hdr + bytes(4096), arch="riscv64", ram_base=base,
                               reserved=None)
        assert li.plan.segments[0].memsz == 0x76000000
        assert rss_kib(mem) - before < BOUND_KIB
    finally:
        mem._close()


def test_bss_is_zero_after_a_reload_into_written_ram():
    # a reset/reload: RAM the previous run wrote must read as zeros where the image says BSS
    mem = ram(64 * MiB)
    try:
        img = make_elf([seg(0x100000, b"\xf4" * 100, memsz=0x300123)], 0x100000)
        boot.load_image(mem, img)
        for a in (0x100064, 0x100FFF, 0x101000, 0x2FFFFF, 0x400122):   # partial, whole pages
            mem.write(a, b"\xAA")
        mem.write(0x400123, b"\xBB")                                     # past the BSS: kept
        boot.load_image(mem, img)
        assert mem.read(0x100064, 0x300123 - 100) == bytes(0x300123 - 100)
        assert mem.read(0x100000, 100) == b"\xf4" * 100
        assert mem.read(0x400123, 1) == b"\xBB"
    finally:
        mem._close()


@pytest.mark.parametrize("gpa,n", [(0, 1), (5, 4096), (4095, 2), (4096, 8192), (100, 3 * 4096),
                                   (0, 16 * 4096)])
def test_guest_memory_zero_is_exact(gpa, n):
    mem = ram(16 * 4096)
    try:
        mem.write(0, b"\x5a" * 16 * 4096)
        mem.zero(gpa, n)
        got = mem.read(0, 16 * 4096)
        assert got[:gpa] == b"\x5a" * gpa
        assert got[gpa:gpa + n] == bytes(n)
        assert got[gpa + n:] == b"\x5a" * (16 * 4096 - gpa - n)
    finally:
        mem._close()


def test_guest_memory_zero_outside_ram_changes_nothing():
    from pykvm.errors import GuestMemoryError
    mem = ram(4 * 4096)
    try:
        mem.write(0, b"\x5a" * 4 * 4096)
        with pytest.raises(GuestMemoryError):
            mem.zero(4096, 4 * 4096)
        assert mem.read(0, 4 * 4096) == b"\x5a" * 4 * 4096
    finally:
        mem._close()


def test_slot_resident_follows_what_is_touched_and_zeroed():
    mem = ram(64 * MiB)
    try:
        slot = next(iter(mem))
        before = slot.resident()
        mem.write(16 * MiB, b"\x01" * (4 * MiB))
        assert slot.resident() - before >= 4 * MiB
        mem.zero(16 * MiB, 4 * MiB)                   # whole pages: released again
        assert slot.resident() - before < 1 * MiB
    finally:
        mem._close()
