"""Issue 16, faults 4 and 5 on real KVM: images built here with the host's GNU as/ld the way
kernels are linked for QEMU ``-kernel`` boot on pykvm's PC with QEMU's console and status, the
platform's ACPI tables stay intact, and a BSS or ``p_memsz`` that names most of the guest's
RAM costs the host no memory for it. One test compares with QEMU itself (TCG) when
qemu-system-x86_64 is installed."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from pykvm.machine import Machine

pytestmark = pytest.mark.requires_kvm

PYKVM = [sys.executable, "-m", "pykvm"]
GiB = 1 << 30

# 32-bit protected-mode guest: checks EAX, prints, finds the RSDP in [0xE0000, 1 MiB) and checks
# its checksum (as a guest sees the platform's tables), exits through isa-debug-exit (0xf4).
# Sections are selected by the tests (%s): .rodata/.bss for ld's layout, .text for the kludge.
GUEST = r"""
    .section .text
    .code32
    .align 4
mb: .long 0x1BADB002, FLAGS, -(0x1BADB002 + FLAGS)
    .long mb, 0x100000, LOAD_END, BSS_END, _start
    .globl _start
_start:
    mov $0x80000, %%esp
    cmp $0x2BADB002, %%eax
    jne fail
    mov $msg, %%esi
    call puts
    movb $0x5a, BSS_LAST           # touch the last byte of the BSS and read its first
    cmpb $0, BSS_FIRST
    jne fail
    mov $0xE0000, %%edi
1:  cmpl $0x20445352, (%%edi)
    jne 2f
    cmpl $0x20525450, 4(%%edi)
    je 3f
2:  add $16, %%edi
    cmp $0x100000, %%edi
    jb 1b
    jmp fail
3:  xor %%eax, %%eax
    xor %%ecx, %%ecx
4:  add (%%edi,%%ecx), %%al
    inc %%ecx
    cmp $20, %%ecx
    jb 4b
    test %%al, %%al
    jnz fail
    mov $ok, %%esi
    call puts
    mov $3, %%al
    out %%al, $0xf4
    hlt
fail:
    mov $bad, %%esi
    call puts
    mov $5, %%al
    out %%al, $0xf4
    hlt
puts:
    mov $0x3f8, %%dx
5:  lodsb
    test %%al, %%al
    jz 6f
    out %%al, %%dx
    jmp 5b
6:  ret
    .section %s
msg: .asciz "hello from a kernel linked at 1 MiB\n"
ok:  .asciz "rsdp ok\n"
bad: .asciz "rsdp bad\n"
etext:
    .section .bss
bss: .space %d
"""
CONSOLE = "hello from a kernel linked at 1 MiB\nrsdp ok\n"


def _build(d, name, *, bss=0x2000, elf64=False, kludge=False):
    """Assemble and link with GNU ld's default layout at 1 MiB (-Ttext=0x100000)."""
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU binutils (as, ld) not installed")
    flags = 0x10003 if kludge else 0x3
    syms = {"FLAGS": flags, "LOAD_END": "etext" if kludge else 0,
            "BSS_END": "_end" if kludge else 0, "BSS_FIRST": "bss", "BSS_LAST": f"bss+{bss - 1}"}
    src = "".join(f".set {k}, {v}\n" for k, v in syms.items() if k != "BSS_LAST"
                  and k != "BSS_FIRST") + GUEST % (".text" if kludge else ".rodata", bss)
    src = src.replace("BSS_LAST", syms["BSS_LAST"]).replace("BSS_FIRST", syms["BSS_FIRST"])
    s, o, e = (os.path.join(d, name + x) for x in (".S", ".o", ".elf"))
    with open(s, "w") as f:
        f.write(src)
    arch = ["--64"] if elf64 else ["--32"]
    r = subprocess.run(["as", *arch, "-o", o, s], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    emu = "elf_x86_64" if elf64 else "elf_i386"
    r = subprocess.run(["ld", "-m", emu, "-Ttext=0x100000", "-o", e, o], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return e


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("qemu-images"))
    return {"ld32": _build(d, "ld32"),
            "elf64_kludge": _build(d, "elf64_kludge", elf64=True, kludge=True),
            "huge_bss": _build(d, "huge_bss", bss=0x70000000),
            "huge_kludge_bss": _build(d, "huge_kludge_bss", bss=0x70000000, kludge=True)}


def _load_segments(path):
    out = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True).stdout
    return [ln.split() for ln in out.splitlines() if ln.strip().startswith("LOAD")]


def test_the_ld_image_has_the_header_segment_below_1mib(imgs):
    first = _load_segments(imgs["ld32"])[0]
    assert int(first[2], 16) < 0x100000 <= int(_load_segments(imgs["ld32"])[1][2], 16)


@pytest.mark.parametrize("name", ["ld32", "elf64_kludge"])
def test_pykvm_run_boots_it_with_console_and_status(imgs, name):
    r = subprocess.run(PYKVM + ["run", imgs[name], "--json", "--timeout", "20"],
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert (out["console"], out["exit_code"], r.returncode) == (CONSOLE, 7, 7), r.stderr


def _rss_kib(m):
    """Resident KiB of the guest-RAM slot at guest-physical 0."""
    return next(iter(m.vm.memory)).resident() // 1024


@pytest.mark.parametrize("name", ["ld32", "huge_bss", "huge_kludge_bss"])
def test_tables_intact_and_host_memory_follows_the_guest(imgs, name):
    m = Machine(imgs[name], mem_size=2 * GiB)
    try:
        rss = _rss_kib(m)
        assert rss < 64 * 1024, f"loading committed {rss} KiB"
        r = m.run(timeout=20)
        assert (r.console_text, r.exit_code) == (CONSOLE, 7)
        tables = m.platform.tables
        assert m.vm.memory.read(tables.base, len(tables.blob)) == tables.blob
        assert _rss_kib(m) < 64 * 1024
    finally:
        m.close()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
@pytest.mark.parametrize("name", ["ld32", "elf64_kludge"])
def test_qemu_boots_it_the_same(imgs, name):
    q = subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64M",
                        "-kernel", imgs[name], "-display", "none", "-nodefaults",
                        "-serial", "stdio", "-monitor", "none", "-no-reboot",
                        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                       capture_output=True, text=True, timeout=60)
    p = subprocess.run(PYKVM + ["run", imgs[name], "--timeout", "20"], capture_output=True,
                       text=True, timeout=60)
    assert (p.stdout, p.returncode) == (q.stdout, q.returncode) == (CONSOLE, 7), q.stderr
