"""Issue 10: booting on the PC machine — multiboot modules and command line, images linked below
1 MiB, the memory map around the 32-bit PCI hole (4 and 6 GiB guests), SMP bring-up by
INIT/SIPI, the machine chosen by the image — with guests of our own (pc_*.c, beside this file)."""

import pytest

from pykvm.machine import Machine

pytestmark = pytest.mark.requires_arch("x86_64")

GiB = 1 << 30


def syncs(result):
    return [(r.stage, r.values_list) for r in result.reports if r.kind == "sync"]


def run(guest_vm, name, **kw):
    m = guest_vm(name, **kw)
    r = m.run(timeout=30)
    assert r.exit == "done", (r.exit, r.detail)
    return m, syncs(r)


def test_multiboot_modules_and_command_line(guest_vm, guest_image, tmp_path):
    a = tmp_path / "first.bin"
    a.write_bytes(b"hello\n")
    b = tmp_path / "second.bin"
    b.write_bytes(bytes(range(256)) * 20 + b"\x7f")
    m, s = run(guest_vm, "pc_multiboot.c", cmdline="x=1 y", initrd=[str(a), f"{b} arg1 arg2"])
    mem = m.memory
    (_, (magic, mbi, flags, _lower, _upper, cmdline, _here)), (_, info) = s[0], s[1]
    assert magic == 0x2BADB002 and flags & 0x24F == 0x24F      # MEM|DEV|CMDLINE|MODS|MMAP|NAME
    # the image's file name first, then the arguments (as QEMU's and GRUB's loaders pass it)
    assert mem.read_cstring(cmdline) == f"{guest_image('pc_multiboot.c')} x=1 y"
    mods_count, mods_addr, mmap_len, mmap_addr, name_addr, image_end = info
    assert mem.read_cstring(name_addr) == "pykvm"
    assert mods_count == 2
    mods = [v for st, v in s if st == 3]
    (i0, s0, e0, str0, first0, last0), (i1, s1, e1, str1, first1, last1) = mods
    assert s0 % 4096 == 0 and s1 % 4096 == 0 and image_end <= s0 < e0 <= s1   # page-aligned, in order
    assert (e0 - s0, e1 - s1) == (6, 256 * 20 + 1)
    assert mem.read(s0, 6) == b"hello\n" and mem.read(s1, e1 - s1) == b.read_bytes()
    assert (first0, last0) == (int.from_bytes(b"hell", "little"), 0x0A)
    assert mem.read_cstring(str0) == str(a)
    assert mem.read_cstring(str1) == f"{b} arg1 arg2"
    assert not (mbi <= s0 < mbi + 4096)


def test_multiboot_without_modules(guest_vm, guest_image):
    m, s = run(guest_vm, "pc_multiboot.c")
    mods_count = s[1][1][0]
    assert mods_count == 0
    assert m.memory.read_cstring(s[0][1][5]) == f"{guest_image('pc_multiboot.c')} "


def test_image_below_1mib_gets_boot_structures_elsewhere(guest_vm, tmp_path):
    mod = tmp_path / "m"
    mod.write_bytes(b"low!")
    m, s = run(guest_vm, "pc_lowmem.c", initrd=[str(mod)])
    magic, mbi, flags, lower, upper, cmdline, here = s[0][1]
    image_end = s[1][1][5]
    assert magic == 0x2BADB002
    assert 0x8000 <= here < 0x9000                  # linked and run at 0x8000
    assert image_end > 0x30000                      # covering the default GDT/stack/MBI places
    assert not 0x8000 <= mbi < image_end            # the multiboot info went elsewhere
    (_, start, end, string, first, _) = [v for st, v in s if st == 3][0]
    assert start >= image_end and (first, end - start) == (int.from_bytes(b"low!", "little"), 4)
    assert m.platform.boot_layout.base not in range(0x8000 - 0x90000, image_end)


def test_image_overlapping_the_pc_bios_area_is_refused():
    import struct
    from pykvm.boot import LoadError
    # a tiny multiboot a.out-kludge image asking to be loaded at 0xE0000 (the ACPI tables)
    hdr = struct.pack("<IIIIIIII", 0x1BADB002, 0x10000, (-(0x1BADB002 + 0x10000)) & 0xFFFFFFFF,
                      0xE0000, 0xE0000, 0, 0, 0xE0020)
    with pytest.raises(LoadError, match="platform uses"):
        Machine(hdr + b"\xf4" * 64)


@pytest.mark.parametrize("mem", [64 << 20, 4 * GiB, 6 * GiB])
def test_big_guests_read_the_same_apic_versions(guest_vm, mem):
    m = guest_vm("pc_apic.c", machine="pc", mem_size=mem)
    high = 4 * GiB + (2 << 20)
    m.set_params(high if mem > 4 * GiB - 512 * (1 << 20) else 0)
    ioapic_ver, lapic_ver, ram, back, ioapic_id = m.sync(stage=1)
    assert ioapic_ver == 0x0017_0011              # 24 pins, version 0x11, at 0xFEC00000
    assert lapic_ver & 0xFF == 0x14               # an integrated local APIC at 0xFEE00000
    assert ram == mem                             # fw_cfg RAM size: all of it
    if mem >= 4 * GiB:
        assert back == 0x5CA1AB1E0DDBA11          # RAM above 4 GiB works
    m.done()


@pytest.mark.parametrize("mem,below,above", [(64 << 20, 64 << 20, 0),
                                             (3 * GiB + (256 << 20), 3 * GiB + (256 << 20), 0),
                                             (4 * GiB, 3 * GiB, GiB),
                                             (6 * GiB, 3 * GiB, 3 * GiB)])
def test_memory_map_follows_the_pci_hole(guest_vm, mem, below, above):
    m, s = run(guest_vm, "pc_multiboot.c", mem_size=mem)
    upper = s[0][1][4]
    assert upper == (below - (1 << 20)) // 1024
    mmap = [tuple(v[1:4]) for st, v in s if st == 4]
    ram = [(base, length) for base, length, kind in mmap if kind == 1]
    assert ram[0] == (0, 0x9FC00) and ram[1] == (1 << 20, below - (1 << 20))
    assert ram[2:] == ([(4 * GiB, above)] if above else [])
    assert (0xE0000, 0x20000, 2) in mmap          # ACPI tables and BIOS area reserved
    slots = sorted((sl.gpa, sl.size) for sl in m.memory)
    assert slots == [(0, below)] + ([(4 * GiB, above)] if above else [])


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_smp_bring_up_by_init_sipi(guest_vm, vcpus):
    m = guest_vm("pc_smp.c", machine="pc", vcpus=vcpus)
    r = m.run(timeout=30)
    assert (r.exit, r.exit_code) == ("debug_exit", 1), r.detail
    (stage, (ran, cpus, mask, bsp)), = syncs(r)
    assert (ran, cpus, bsp) == (vcpus - 1, vcpus, 0)
    assert mask == ((1 << vcpus) - 1) & ~1         # each AP once, with its own APIC id


def test_machine_is_chosen_by_the_image(guest_vm):
    assert guest_vm("pc_multiboot.c").platform.name == "pc"          # multiboot: a PC
    assert guest_vm("hello").platform.name == "bare"                     # ELF64: bare
    assert guest_vm("pc_multiboot.c", machine="bare").platform.name == "bare"    # unless asked
    assert guest_vm("hello", machine="pc").platform.name == "pc"


def test_unassigned_ports_on_a_pc_read_all_ones(guest_vm):
    m = guest_vm("pc_fwcfg.c", machine="pc")
    assert m.platform.pio.read(0x1234, 2) == 0xFFFF
    m.platform.pio.write(0x1234, 1, 0)         # dropped
    assert m.platform.pio.unassigned[0x1234] == 2
