"""Issue 16, faults 4 and 5, the hostile tester's second round, without /dev/kvm:

* QEMU's ELF entry rule (``load_elf``, include/hw/elf_ops.h): ``e_entry`` is translated from
  virtual to physical only through an executable ``PT_LOAD`` with ``p_vaddr != p_paddr`` whose
  file bytes hold it, otherwise it is taken as physical (higher-half multiboot kernels linked
  with ``ENTRY(_start - 0xC0000000)``);
* the EBDA [0x9FC00, 0xA0000) is RAM an image may use on the pc, as on QEMU; pykvm keeps
  nothing there and places none of its own structures there;
* loader inputs (multiboot modules, the x86 Linux initrd, the RISC-V initrd, the image itself)
  are streamed: a 1 GiB file of holes or zeros commits no guest RAM and no loader buffers.

Guest RAM is the real thing (:func:`pykvm.memory.new_mapping`), measured through its mapping's
``Rss`` in /proc/self/smaps; the loader's own peak is measured as VmHWM of a subprocess."""
import os
import subprocess
import sys
import textwrap

import pytest

from pykvm import boot
from pykvm.platform import riscv_virt as riscv_platform
from pykvm.arch.x86 import layout
from pykvm.platform import pc
from pykvm.boot import x86_images, linux_x86
from pykvm.memory import GuestMemory, MemorySlot, new_mapping

from test_loader import EM_RISCV, make_elf, mb_header, seg
from test_riscv_linux_image import riscv_image
from test_x86_linux import bzimage

GiB = 1 << 30
MiB = 1 << 20
BOUND_KIB = 64 * 1024          # what a load may commit, at most (64 MiB)
PF_X, PF_W, PF_R = 1, 2, 4
PC_MAP = layout.e820_map(2 * GiB, bios_area=True)


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
    """Resident KiB of ``mem``'s first slot (:meth:`pykvm.memory.MemorySlot.resident`; a
    mapping the kernel merged with it counts too, which only makes the bound stricter)."""
    return next(iter(mem)).resident() // 1024


def pc_load(mem, image, **kw):
    return x86_images.load(mem, image, ram=[(0, mem.size)], memory_map=PC_MAP,
                       claimed=list(pc.PC_CLAIMED), **kw)


# ---- F1: the entry point, QEMU's rule --------------------------------------------------------

def elf32_mb(segments, entry):
    return make_elf(segments, entry, cls=32, head=mb_header(0x3))


def test_higher_half_kernel_with_a_physical_entry():
    # linked at 0xC0100000, loaded at 1 MiB, ENTRY(_start - 0xC0000000): e_entry is physical
    img = elf32_mb([seg(0xC0100000, b"\xf4" * 64, paddr=0x100000, flags=PF_R | PF_X)],
                   0x10000C)
    plan = boot.parse_elf(img)
    assert plan.entry == 0x10000C and plan.segments[0].addr == 0x100000


def test_higher_half_kernel_with_a_virtual_entry_is_translated():
    img = elf32_mb([seg(0xC0100000, b"\xf4" * 64, paddr=0x100000, flags=PF_R | PF_X)],
                   0xC010000C)
    assert boot.parse_elf(img).entry == 0x10000C


@pytest.mark.parametrize("flags,entry,why", [
    (PF_R | PF_W, 0xC0100010, "not executable: QEMU jumps to the virtual address"),
    (PF_R | PF_X, 0xC0100080, "in the BSS, past p_filesz: QEMU does not translate it"),
])
def test_entries_qemu_does_not_translate_are_physical_and_refused(flags, entry, why):
    img = elf32_mb([seg(0xC0100000, b"\xf4" * 64, memsz=0x1000, paddr=0x100000, flags=flags)],
                   entry)
    with pytest.raises(boot.LoadError, match="outside every loadable segment"):
        boot.parse_elf(img)


def test_identity_segments_take_the_entry_as_it_is():
    img = elf32_mb([seg(0x100000, b"\xf4" * 64, flags=PF_R | PF_X),
                    seg(0x200000, b"\x11" * 16, flags=PF_R | PF_W)], 0x200004)
    assert boot.parse_elf(img).entry == 0x200004        # in a data segment: QEMU jumps there


def test_riscv_elf_follows_the_same_rule():
    img = make_elf([seg(0xFFFFFFFF80000000, b"\x13\0\0\0" * 16, paddr=0x80200000,
                        flags=PF_R | PF_X)], 0x80200008, machine=EM_RISCV)
    assert boot.parse_elf(img, arch="riscv64").entry == 0x80200008
    img = make_elf([seg(0xFFFFFFFF80000000, b"\x13\0\0\0" * 16, paddr=0x80200000,
                        flags=PF_R | PF_X)], 0xFFFFFFFF80000008, machine=EM_RISCV)
    assert boot.parse_elf(img, arch="riscv64").entry == 0x80200008


def test_elf64_long_mode_guests_unchanged():
    img = make_elf([seg(0x100000, b"\xf4" * 64)], 0x100010)
    assert boot.parse_elf(img).entry == 0x100010
    with pytest.raises(boot.LoadError, match="outside every loadable segment"):
        boot.parse_elf(make_elf([seg(0x100000, b"\xf4" * 64)], 0x300000))
    with pytest.raises(boot.LoadError, match="p_paddr 0x200000 != p_vaddr"):
        boot.parse_elf(make_elf([seg(0x100000, b"\xf4" * 64, paddr=0x200000)], 0x200000))


# ---- F2: the EBDA is image RAM ---------------------------------------------------------------

def test_nothing_of_the_platform_lives_in_the_ebda():
    assert all(not (a < 0xA0000 and layout.EBDA_START < b) for a, b in pc.PC_CLAIMED)
    assert pc.ACPI_TABLES_ADDR >= 0xA0000
    assert (layout.EBDA_START, 0xA0000 - layout.EBDA_START, layout.E820_RESERVED) in PC_MAP


def test_image_bytes_and_entry_in_the_ebda_load(big_ram):
    code = bytes(range(256)) * 16                          # 4 KiB, [0x9F000, 0xA0000)
    img = elf32_mb([seg(0x9F000, code, flags=PF_R | PF_X)], 0x9FD00)
    placed = pc_load(big_ram, img)
    assert placed.loaded.entry == 0x9FD00 and placed.dropped == []
    assert big_ram.read(0x9F000, len(code)) == code


@pytest.mark.parametrize("entry", [0xA0000, 0xC0000, 0xE0000, 0xFFFF0])
def test_entries_in_the_video_window_or_bios_area_stay_refused(big_ram, entry):
    img = elf32_mb([seg(0x9F000, b"\xf4" * 0x61000, flags=PF_R | PF_X)], entry)
    with pytest.raises(boot.LoadError, match="platform uses"):
        pc_load(big_ram, img)


def test_vmm_placements_keep_out_of_the_ebda(big_ram, tmp_path):
    # the image ends just below the EBDA: its module goes page-aligned after it, but pykvm
    # never puts a module, the multiboot information or a boot structure in E820-reserved RAM
    mod = tmp_path / "mod"
    mod.write_bytes(b"M" * 0x1800)
    img = elf32_mb([seg(0x90000, b"\xf4" * 0xE800, flags=PF_R | PF_X)], 0x90000)
    placed = pc_load(big_ram, img, initrd=[str(mod)])
    reserved = [(a, a + n) for a, n, t in PC_MAP if t != layout.E820_RAM]
    ours = [(s, e) for s, e, _ in placed.modules]
    ours.append((placed.loaded.multiboot_info, placed.loaded.multiboot_info + 0x1000))
    ours += placed.layout.ranges("protected", 1, 2 * GiB)
    for a, b in ours:
        assert not any(a < r1 and r0 < b for r0, r1 in reserved), (hex(a), hex(b))
    (start, end, _), = placed.modules
    assert big_ram.read(start, end - start) == b"M" * 0x1800


# ---- F6: streamed inputs ----------------------------------------------------------------------

def sparse_file(path, size, pieces):
    """A sparse file of ``size`` bytes with ``pieces`` {offset: bytes} written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
    return str(path)


PIECES = {0: b"HEAD", 300 * MiB + 5: b"middle" * 100, GiB - 4: b"TAIL"}


def check_pieces(mem, base):
    for off, data in PIECES.items():
        assert mem.read(base + off, len(data)) == data
    assert mem.read(base + 4, 4096) == bytes(4096)
    assert mem.read(base + 700 * MiB, 4096) == bytes(4096)


def test_input_file_streams_a_sparse_gib_without_committing_it(big_ram, tmp_path):
    f = boot.InputFile(sparse_file(tmp_path / "rd", GiB, PIECES), 2 * GiB)
    with f:
        assert f.size == GiB
        before = rss_kib(big_ram)
        f.copy_to(big_ram, 0x40000000)
        assert rss_kib(big_ram) - before < BOUND_KIB
    check_pieces(big_ram, 0x40000000)


def test_input_file_zero_chunks_overwrite_old_bytes(big_ram, tmp_path):
    # RAM that an earlier run dirtied reads as the file afterwards: holes and zero chunks
    # are zero-filled, not skipped
    big_ram.write(0x10000000, b"\xAA" * (4 * MiB))
    path = tmp_path / "rd"
    path.write_bytes(bytes(2 * MiB) + b"x" + bytes(MiB))   # written zeros, not holes
    with boot.InputFile(str(path), GiB) as f:
        f.copy_to(big_ram, 0x10000000)
    assert big_ram.read(0x10000000, 3 * MiB + 1) == bytes(2 * MiB) + b"x" + bytes(MiB)
    assert big_ram.read(0x10000000 + 3 * MiB + 1, 16) == b"\xAA" * 16


def test_input_file_that_shrinks_is_refused(big_ram, tmp_path):
    path = tmp_path / "rd"
    path.write_bytes(b"y" * (3 * MiB))
    with boot.InputFile(str(path), GiB) as f:
        os.truncate(path, MiB)
        with pytest.raises(boot.LoadError, match="changed while it was read"):
            f.copy_to(big_ram, 0x1000000)


def test_input_file_refusals(tmp_path):
    with pytest.raises(boot.LoadError, match="too large"):
        boot.InputFile(sparse_file(tmp_path / "big", 2 * MiB, {}), MiB)
    with pytest.raises(boot.LoadError, match="a directory"):
        boot.InputFile(str(tmp_path), MiB)
    with pytest.raises(boot.LoadError, match="No such file"):
        boot.InputFile(str(tmp_path / "none"), MiB)


def test_input_file_with_no_st_size_is_read_bounded(big_ram):
    with boot.InputFile("/proc/self/cmdline", MiB) as f:    # st_size 0, bytes on read
        assert f.size > 0
        f.copy_to(big_ram, 0x100000)
    assert b"python" in big_ram.read(0x100000, f.size).lower()


def test_multiboot_module_sparse_gib(big_ram, tmp_path):
    rd = sparse_file(tmp_path / "rd", GiB, PIECES)
    img = elf32_mb([seg(0x100000, b"\xf4" * 64, flags=PF_R | PF_X)], 0x100000)
    before = rss_kib(big_ram)
    placed = pc_load(big_ram, img, initrd=[rd + " args"])
    assert rss_kib(big_ram) - before < BOUND_KIB
    (start, end, text), = placed.modules
    assert end - start == GiB and text == rd + " args"
    check_pieces(big_ram, start)


def test_x86_linux_initrd_sparse_gib(big_ram, tmp_path):
    rd1 = sparse_file(tmp_path / "rd1", GiB, PIECES)
    rd2 = tmp_path / "rd2"
    rd2.write_bytes(b"070701")
    before = rss_kib(big_ram)
    img = linux_x86.load(big_ram, bzimage(), initrd=[rd1, str(rd2)],
                     e820=layout.e820_map(2 * GiB))
    assert rss_kib(big_ram) - before < BOUND_KIB
    start, size = img.initrd
    assert size == GiB + 6
    check_pieces(big_ram, start)
    assert big_ram.read(start + GiB, 6) == b"070701"      # concatenated, as QEMU's -initrd


def test_riscv_initrd_sparse_gib(tmp_path):
    base = riscv_platform.RAM_BASE
    mem = ram(2 * GiB, base)
    try:
        from test_riscv_platform import virt
        p = virt(mem, 2 * GiB)
        before = rss_kib(mem)
        p.load(riscv_image(image_size=0x3000), initrd=(sparse_file(tmp_path / "rd", GiB,
                                                                    PIECES),))
        assert rss_kib(mem) - before < BOUND_KIB
        start, end = p.initrd
        assert end - start == GiB
        check_pieces(mem, start)
    finally:
        mem._close()


def aout_file(path, size, *, sparse=True):
    """A multiboot a.out-kludge image at 1 MiB that loads the whole ``size``-byte file: code
    in its first page, zeros (holes or written) up to a last page of 'T'."""
    code = b"\xf4" * 16
    hdr = mb_header(0x10003, aout=(0x100000, 0x100000, 0, 0, 0x100020))
    with open(path, "wb") as f:
        f.write((hdr + bytes(0x20 - len(hdr)) + code).ljust(4096, b"\0"))
        if sparse:
            f.seek(size - 4096)
        else:
            while f.tell() < size - 4096:
                f.write(bytes(min(MiB, size - 4096 - f.tell())))
        f.write(b"T" * 4096)
    return str(path)


@pytest.mark.parametrize("sparse", [True, False])
def test_a_big_image_of_zeros_commits_little(big_ram, tmp_path, sparse):
    size = (900 if sparse else 96) * MiB
    path = aout_file(tmp_path / "img", size, sparse=sparse)
    before = rss_kib(big_ram)
    placed = pc_load(big_ram, path)
    assert rss_kib(big_ram) - before < BOUND_KIB
    assert placed.loaded.entry == 0x100020
    assert big_ram.read(0x100020, 16) == b"\xf4" * 16
    assert big_ram.read(0x100000 + size - 4096, 4096) == b"T" * 4096
    assert big_ram.read(0x100000 + size // 2, 4096) == bytes(4096)


def test_read_image_maps_a_big_file_sparsely(tmp_path):
    path = aout_file(tmp_path / "img", 64 * MiB)
    data = boot.image._read_image(path, GiB)
    assert len(data) == 64 * MiB and data[-4096:] == b"T" * 4096
    assert data[MiB:MiB + 16] == bytes(16)
    plan = boot.parse_image(data)
    assert plan.entry == 0x100020 and plan.segments[0].memsz == 64 * MiB


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from pykvm.arch.x86 import layout
    from pykvm.platform import pc
    from pykvm.boot import x86_images
    from pykvm.memory import GuestMemory, MemorySlot, new_mapping
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    mem = GuestMemory()
    m, pin = new_mapping(2 << 30)
    mem._add(MemorySlot(0, 0, 2 << 30, 0, m, pin))
    base = hwm()
    x86_images.load(mem, sys.argv[1], ram=[(0, 2 << 30)],
                memory_map=layout.e820_map(2 << 30, bios_area=True),
                claimed=list(pc.PC_CLAIMED), initrd=sys.argv[2:])
    print(base, hwm())
""")


@pytest.mark.parametrize("what", ["module", "image"])
def test_peak_host_memory_of_a_load_is_bounded(tmp_path, what):
    # VmHWM (the process's peak RSS) over the whole load: loader buffers and guest RAM
    rd = sparse_file(tmp_path / "rd", GiB, PIECES)
    img = aout_file(tmp_path / "img", 900 * MiB)
    small = aout_file(tmp_path / "small", 2 * MiB)
    argv = [small, rd] if what == "module" else [img]
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *argv], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    base, peak = map(int, r.stdout.split())
    assert peak - base < BOUND_KIB, f"peak RSS grew by {peak - base} KiB"
