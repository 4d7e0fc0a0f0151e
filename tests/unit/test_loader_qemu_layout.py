"""Issue 16, fault 5: images QEMU's ``-kernel`` boots load on pykvm's PC, and the platform's
own structures stay intact. QEMU's pc loses the image bytes that land in its VGA window and
its write-protected BIOS shadow ([0xA0000, 1 MiB)); pykvm's PC drops the bytes that land in
what it claims (the same range: video window, ACPI tables and BIOS area) and refuses an image
whose entry point lies there. These tests claim [0x9FC00, 1 MiB), as a platform that keeps the
EBDA would (pykvm's PC leaves the EBDA to images: test_loader_hostile_inputs.py). Multiboot header rules follow hw/i386/multiboot.c."""

import pytest

from pykvm import boot
from pykvm.arch.x86 import layout
from pykvm.boot import x86_images
from pykvm.boot import LoadError

from test_loader import CODE, FakeMem, make_elf, mb_header, seg

MiB = 1 << 20
CLAIMED = [(layout.EBDA_START, layout.LOW_RAM_END)]     # a platform that claims the EBDA too
PATTERN = bytes(range(256)) * ((layout.LOW_RAM_END - layout.EBDA_START) // 256)


def pc_load(img, ram=64 * MiB, **kw):
    """Load ``img`` as the PC machine does, with the claimed range pre-filled with a pattern
    (standing for the ACPI tables and BIOS data). Returns (memory, PlacedImage)."""
    mem = FakeMem(ram)
    mem.write(layout.EBDA_START, PATTERN)
    placed = x86_images.load(mem, img, ram=[(0, ram)],
                         memory_map=layout.e820_map(ram, bios_area=True), claimed=CLAIMED, **kw)
    return mem, placed


def intact(mem):
    return mem.read(layout.EBDA_START, len(PATTERN)) == PATTERN


def ld_default_layout(cls=32):
    """What GNU ld makes of a kernel linked at 1 MiB (-Ttext=0x100000, -z separate-code): a
    read-only LOAD segment one page below 1 MiB holding only the ELF and program headers, then
    the text at 1 MiB (with the multiboot header), then a BSS (p_filesz 0)."""
    return make_elf([seg(0xFF000, b"\x7fELF-and-phdrs" * 12, flags=4),
                     seg(0x100000, CODE, flags=5),
                     seg(0x102000, b"", memsz=0x2001, flags=6)], 0x100000, cls=cls,
                    head=mb_header())


def test_ld_default_layout_boots_and_the_tables_stay_intact():
    mem, placed = pc_load(ld_default_layout())
    assert placed.loaded.entry == 0x100000 and placed.loaded.mode == "protected"
    assert placed.dropped == [(0xFF000, 0xFF000 + 14 * 12)]
    assert intact(mem)
    assert mem.read(0x100000, len(CODE)) == CODE
    assert (0xFF000, 14 * 12) not in placed.loaded.written


def test_segment_straddling_1mib_keeps_its_part_above():
    # one segment from 0xF8000 to past 1 MiB: the part in the BIOS area is dropped, the part
    # above is loaded at the right file offset, the BSS tail zeroed
    data = bytes(range(256)) * 0x90                # 36 KiB: file bytes up to 0x101000
    img = make_elf([seg(0xF8000, data, memsz=0xA000)], 0x100010, cls=32, head=mb_header())
    mem, placed = pc_load(img)
    assert intact(mem)
    assert placed.dropped == [(0xF8000, 0x100000)]
    assert mem.read(0x100000, 0x1000) == data[0x8000:]
    assert mem.read(0x101000, 0x1000) == bytes(0x1000)


def test_aout_kludge_range_across_the_claimed_window():
    # load_addr 0x90000 with 512 KiB of file: RAM below the EBDA and above 1 MiB get their
    # bytes, the claimed range keeps the platform's
    body = bytearray(0x80000)
    hdr = mb_header(0x10003, aout=(0x90000, 0x90000, 0, 0x120000, 0x100000))
    body[:len(hdr)] = hdr
    body[0x70000:0x70004] = b"HIGH"                 # lands at 0x100000 (the entry)
    body[0x1000:0x1004] = b"LOW!"                   # lands at 0x91000
    mem, placed = pc_load(bytes(body))
    assert intact(mem)
    assert mem.read(0x100000, 4) == b"HIGH" and mem.read(0x91000, 4) == b"LOW!"
    assert placed.dropped == [(layout.EBDA_START, layout.LOW_RAM_END)]
    assert mem.read(0x110000, 0x10000) == bytes(0x10000)      # the BSS


@pytest.mark.parametrize("entry", [0x9FC00, 0xA0000, 0xE0000, 0xFFFF0])
def test_entry_in_the_claimed_range_is_refused_in_one_line(entry):
    img = make_elf([seg(0x90000, bytes(0x70000) + CODE)], entry, cls=32, head=mb_header())
    with pytest.raises(LoadError) as e:
        pc_load(img)
    msg = str(e.value)
    assert "\n" not in msg and f"entry point {entry:#x}" in msg and "platform uses" in msg


def test_nothing_is_written_when_refused():
    img = make_elf([seg(0x90000, b"\x11" * 0x70000 + CODE)], 0xE0000, cls=32, head=mb_header())
    mem = FakeMem(64 * MiB)
    before = mem.read(0x90000, 0x70100)
    with pytest.raises(LoadError):
        x86_images.load(mem, img, ram=[(0, 64 * MiB)], memory_map=layout.e820_map(64 * MiB),
                    claimed=CLAIMED)
    assert mem.read(0x90000, 0x70100) == before


def test_without_claimed_ranges_nothing_is_dropped():
    mem = FakeMem(64 * MiB)
    placed = x86_images.load(mem, ld_default_layout(), ram=[(0, 64 * MiB)],
                         memory_map=layout.e820_map(64 * MiB))
    assert placed.dropped == [] and mem.read(0xFF000, 4) == b"\x7fELF"


def test_clip_segments_keeps_virtual_addresses_and_zero_fill():
    s = boot.Segment(0x9F000, memoryview(b"\xAB" * 0x2000), 0x70000, 7, 0xC009F000, 3)
    kept, dropped = x86_images.clip_segments([s], [(0x9FC00, 0x100000)])
    assert dropped == [(0x9FC00, 0x100000)]
    (low,) = [k for k in kept if k.addr < 0x9FC00]
    (high,) = [k for k in kept if k.addr >= 0x100000]
    assert (low.addr, low.memsz, low.filesz, low.vaddr) == (0x9F000, 0xC00, 0xC00, 0xC009F000)
    assert (high.addr, high.filesz, high.memsz, high.vaddr) == (0x100000, 0, 0xF000, 0xC0100000)
    assert low.index == high.index == 3


# ---- multiboot header rules as QEMU reads them (hw/i386/multiboot.c) -------------------------

def test_elf64_with_aout_kludge_is_loaded_by_the_header_fields_in_protected_mode():
    # QEMU looks at flag bit 16 before the ELF: an x86-64 ELF with the kludge boots there
    hdr = mb_header(0x10003, aout=(0x100000, 0x100000, 0, 0x110000, 0x100000 + 0x40))
    img = make_elf([seg(0x200000, CODE)], 0x200000, cls=64, head=hdr)
    off = img.index(hdr)
    plan = boot.parse_image(img)
    assert plan.format == "elf64-multiboot-aout" and plan.mode == "protected"
    assert plan.entry == 0x100040 and plan.segments[0].addr == 0x100000
    assert bytes(plan.segments[0].data[:len(hdr)]) == hdr and plan.multiboot.offset == off


def test_elf64_with_a_plain_multiboot_header_still_boots_in_long_mode():
    # QEMU refuses an x86-64 ELF without the kludge; pykvm keeps booting it, in long mode
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=64, head=mb_header())
    plan = boot.parse_image(img)
    assert plan.format == "elf64" and plan.mode == "long"


@pytest.mark.parametrize("flags", [0x8, 0x10, 0x8000, 0xFFF8 | 0x3])
def test_undefined_required_bits_are_ignored(flags):
    img = make_elf([seg(0x100000, CODE)], 0x100000, cls=32, head=mb_header(flags))
    assert boot.parse_image(img).mode == "protected"
    kludge = mb_header(flags | 0x10000, aout=(0x100000, 0x100000, 0, 0, 0x100000))
    assert boot.parse_image(kludge + CODE).format == "multiboot-aout"


def test_overlapping_elf_segments_are_refused_as_qemu_refuses_them():
    # file bytes over file bytes: QEMU 7.2 stops with "Some ROM regions are overlapping" (or
    # "Error while fetching elf kernel from rom"); a BSS over another segment is another story
    # (tests/unit/test_loader_qemu_elf_rules.py)
    img = make_elf([seg(0x100000, CODE, memsz=0x2000), seg(0x100020, CODE)], 0x100000, cls=32,
                   head=mb_header())
    with pytest.raises(LoadError, match="overlapping segments"):
        boot.parse_image(img)


def test_clip_segments_random_layouts_lose_and_move_no_byte():
    import random
    rng = random.Random(16)
    for _ in range(300):
        segs, pos = [], rng.randrange(0, 0x120000, 0x10)
        for i in range(rng.randrange(1, 5)):
            memsz = rng.randrange(1, 0x30000)
            filesz = rng.randrange(0, memsz + 1)
            data = bytes(rng.randrange(256) for _ in range(min(filesz, 64))) * \
                (filesz // 64 + 1)
            segs.append(boot.Segment(pos, memoryview(data[:filesz]), memsz, 7, None, i))
            pos += memsz + rng.randrange(0, 0x8000)
        claimed = sorted({(a, a + rng.randrange(1, 0x40000))
                          for a in (rng.randrange(0, 0x120000) for _ in range(2))})
        kept, dropped = x86_images.clip_segments(segs, claimed)
        for k in kept:                                  # nothing kept in a claimed range
            assert not any(k.addr < c1 and c0 < k.end for c0, c1 in claimed)
            src = next(s for s in segs if s.index == k.index)
            off = k.addr - src.addr                     # same bytes at the same addresses
            assert bytes(k.data) == bytes(src.data[off:off + k.memsz])
            assert k.filesz <= k.memsz
        covered = sorted([(k.addr, k.end) for k in kept] + dropped)
        assert sum(b - a for a, b in covered) == sum(s.memsz for s in segs)
