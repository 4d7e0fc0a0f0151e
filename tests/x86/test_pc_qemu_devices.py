"""Issue 16 (faults 2 and 6): the pc machine's i8042, fw_cfg, PCI configuration and PIIX4 PM
block, RTC and multiboot ``mem_lower`` seen by small multiboot kernels on this host's /dev/kvm,
with the console QEMU 7.2 (TCG, after SeaBIOS) prints for the same kernels. When
qemu-system-x86_64 is installed, QEMU is run on each kernel too and must print the same."""
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.requires_arch("x86_64")

PYKVM = [sys.executable, "-m", "pykvm"]

# harness: multiboot header, COM1 output, hex printing, exit through isa-debug-exit (0xf4)
LIB = r"""
.section .text
.globl _start
.align 4
.long 0x1BADB002
.long 0
.long -(0x1BADB002)
_start:
  mov $0x90000, %esp
  mov %ebx, mbi
  call main
  mov $0, %al
  mov $0xf4, %dx
  out %al, %dx
  cli
  hlt
putc:
  push %edx
  mov $0x3f8, %dx
  out %al, %dx
  pop %edx
  ret
hex8:
  push %eax
  push %eax
  shr $4, %al
  call nib
  pop %eax
  call nib
  pop %eax
  ret
nib:
  and $0xf, %al
  cmp $10, %al
  jb 1f
  add $('a'-10), %al
  jmp 2f
1: add $'0', %al
2: call putc
  ret
hex16:
  push %eax
  xchg %al, %ah
  call hex8
  xchg %al, %ah
  call hex8
  pop %eax
  ret
hex32:
  push %eax
  ror $16, %eax
  call hex16
  rol $16, %eax
  call hex16
  pop %eax
  ret
sp:
  push %eax
  mov $' ', %al
  call putc
  pop %eax
  ret
nl:
  push %eax
  mov $'\n', %al
  call putc
  pop %eax
  ret
puts:
  push %eax
  push %esi
1: lodsb
  test %al, %al
  jz 2f
  call putc
  jmp 1b
2: pop %esi
  pop %eax
  ret
.macro PRINT s
  .section .rodata
  9: .asciz "\s"
  .section .text
  push %esi
  mov $9b, %esi
  call puts
  pop %esi
.endm
.macro CMD c
  mov $\c, %al
  out %al, $0x64
.endm
.macro DAT d
  mov $\d, %al
  out %al, $0x60
.endm
.macro RD port, width
  mov $\port, %dx
  .if \width == 1
  in %dx, %al
  call hex8
  .elseif \width == 2
  in %dx, %ax
  call hex16
  .else
  in %dx, %eax
  call hex32
  .endif
  call sp
.endm
.macro CFG a
  mov $0xcf8, %dx
  mov $\a, %eax
  out %eax, %dx
.endm
.macro CMOSW idx, val
  mov $\idx, %al
  out %al, $0x70
  mov $\val, %al
  out %al, $0x71
.endm
.macro CMOSR idx
  mov $\idx, %al
  out %al, $0x70
  in $0x71, %al
  call hex8
  call sp
.endm
.section .data
mbi: .long 0
.section .text
"""

KERNELS = {
    # the controller as SeaBIOS leaves it, then what a driver probing for it does
    "kbc": (r"""
main:
  PRINT "st="
  RD 0x64, 1
  RD 0x60, 1
  PRINT "c20:"
  CMD 0x20
  RD 0x64, 1
  RD 0x60, 1
  RD 0x64, 1
  RD 0x60, 1
  PRINT "caa:"
  CMD 0xaa
  RD 0x64, 1
  RD 0x60, 1
  PRINT "cd0:"
  CMD 0xd0
  RD 0x60, 1
  PRINT "ca1:"
  CMD 0xa1
  RD 0x64, 1
  PRINT "cab:"
  CMD 0xab
  RD 0x60, 1
  PRINT "cc0:"
  CMD 0xc0
  RD 0x60, 1
  call nl
  PRINT "c60:"
  CMD 0x60
  DAT 0x45
  CMD 0x20
  RD 0x64, 1
  RD 0x60, 1
  PRINT "cd2:"
  CMD 0xd2
  DAT 0x77
  RD 0x64, 1
  RD 0x60, 1
  PRINT "cd3:"
  CMD 0xd3
  DAT 0x66
  RD 0x64, 1
  RD 0x60, 1
  RD 0x64, 1
  PRINT "ca7:"
  CMD 0xa7
  CMD 0x20
  RD 0x60, 1
  PRINT "cae:"
  CMD 0xad
  CMD 0x20
  RD 0x60, 1
  call nl
  PRINT "kbd ff:"
  DAT 0xff
  RD 0x60, 1
  RD 0x60, 1
  RD 0x64, 1
  PRINT "kbd f2:"
  DAT 0xf2
  RD 0x60, 1
  RD 0x60, 1
  RD 0x60, 1
  PRINT "wide:"
  RD 0x64, 2
  RD 0x64, 4
  RD 0x60, 4
  RD 0x62, 1
  RD 0x65, 1
  call nl
  PRINT "reset\n"
  CMD 0xfe
  PRINT "still here\n"
  ret
""", "st=1c fa c20:1d 61 1c 61 caa:1d 55 cd0:cf ca1:1c cab:00 cc0:80 \n"
         "c60:1d 45 cd2:1d 77 cd3:3d 66 1c ca7:65 cae:75 \n"
         "kbd ff:fa aa 1c kbd f2:fa ab 41 wide:1c1c 1c1c1c1c 41414141 ff ff \n"
         "reset\n", 0),
    # a 0xd1 write of the output port with bit 0 clear resets too
    "kbc_outport": (r"""
main:
  PRINT "d1\n"
  CMD 0xd1
  DAT 0xce
  PRINT "still here\n"
  ret
""", "d1\n", 0),
    # fw_cfg: only byte reads move through an item; wider reads give 0 and consume nothing
    "fwcfg": (r"""
main:
  mov $0x510, %dx
  mov $0, %ax
  out %ax, %dx
  RD 0x511, 2
  RD 0x511, 1
  RD 0x511, 4
  RD 0x511, 1
  RD 0x510, 2
  RD 0x510, 4
  RD 0x510, 1
  mov $0x510, %dx
  mov $0, %ax
  out %ax, %dx
  mov $0x511, %dx
  mov $buf, %edi
  mov $2, %ecx
  rep insw
  mov buf, %eax
  call hex32
  call sp
  mov $0x510, %dx
  mov $0x00050000, %eax
  out %eax, %dx
  mov $0x511, %dx
  mov $0x0005, %ax
  out %ax, %dx
  RD 0x511, 1
  call nl
  ret
.section .data
buf: .long 0
.section .text
""", "0000 51 00000000 45 0000 00000000 4d 00000000 51 \n", 1),
    # PCI: aligned-only data port, read-only latency timer, QEMU's reset values, PMBA/PMREGMISC
    "pci": (r"""
main:
  CFG 0x80000000
  RD 0xcfc, 2
  RD 0xcfd, 2
  RD 0xcfe, 2
  RD 0xcff, 2
  RD 0xcfd, 4
  RD 0xcfe, 4
  RD 0xcfd, 1
  RD 0xcfa, 2
  RD 0xcfb, 1
  call nl
  CFG 0x80000804
  mov $0xcfd, %dx
  mov $0xffff, %ax
  out %ax, %dx
  RD 0xcfc, 4
  CFG 0x80000004
  RD 0xcfc, 4
  CFG 0x80000b04
  RD 0xcfc, 4
  CFG 0x8000000c
  mov $0xcfd, %dx
  mov $0xff, %al
  out %al, %dx
  RD 0xcfc, 4
  CFG 0x8000084c
  RD 0xcfc, 4
  CFG 0x800008a0
  RD 0xcfc, 4
  CFG 0x800008a8
  RD 0xcfc, 4
  CFG 0x80000870
  mov $0xffffffff, %eax
  mov $0xcfc, %dx
  out %eax, %dx
  RD 0xcfc, 4
  call nl
  CFG 0x80000b40
  mov $0xb000, %eax
  mov $0xcfc, %dx
  out %eax, %dx
  RD 0xcfc, 4
  mov $0xb008, %dx
  in %dx, %eax
  cmp $0xffffffff, %eax
  setne %al
  call hex8
  call sp
  mov $0x608, %dx
  in %dx, %eax
  cmp $0xffffffff, %eax
  setne %al
  call hex8
  call sp
  CFG 0x80000b80
  mov $0xcfc, %dx
  mov $0, %al
  out %al, %dx
  RD 0xcfc, 1
  mov $0xb008, %dx
  in %dx, %eax
  cmp $0xffffffff, %eax
  setne %al
  call hex8
  call sp
  mov $1, %al
  mov $0xcfc, %dx
  out %al, %dx
  CFG 0x80000b40
  mov $0x601, %eax
  mov $0xcfc, %dx
  out %eax, %dx
  mov $0x608, %dx
  in %dx, %eax
  cmp $0xffffffff, %eax
  setne %al
  call hex8
  call nl
  ret
""", "8086 0000 1237 0000 00000000 00000000 80 0000 00 \n"
         "02000103 00000103 02800103 00000000 0003004d 00000008 0000000f ffffffff \n"
         "0000b000 01 00 00 00 01\n", 1),
    # multiboot mem_lower (KiB below 640 KiB: the EBDA's last KiB is reserved)
    "mbi": (r"""
main:
  mov mbi, %ebx
  mov 4(%ebx), %eax
  call hex32
  call nl
  ret
""", "0000027f\n", 1),
}


def build(tmp_path, name: str) -> str:
    body = KERNELS[name][0]
    src, obj, elf = (os.path.join(tmp_path, name + ext) for ext in (".S", ".o", ".elf"))
    with open(src, "w") as f:
        f.write(LIB + body)
    r = subprocess.run(["as", "--32", "-o", obj, src], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-o", elf, obj],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return elf


needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="GNU as/ld not installed")


@needs_binutils
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_pykvm_prints_what_qemu_prints(tmp_path, name):
    _, console, status = KERNELS[name]
    elf = build(tmp_path, name)
    p = subprocess.run(PYKVM + ["run", elf, "--timeout", "30"], capture_output=True, text=True,
                       timeout=90)
    assert (p.stdout, p.returncode) == (console, status), p.stderr


@needs_binutils
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_qemu_prints_the_same(tmp_path, name):
    _, console, status = KERNELS[name]
    elf = build(tmp_path, name)
    q = subprocess.run(["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64M",
                        "-kernel", elf, "-display", "none", "-nodefaults", "-serial", "stdio",
                        "-monitor", "none", "-no-reboot",
                        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                       capture_output=True, text=True, timeout=60)
    assert (q.stdout, q.returncode) == (console, status), q.stderr
