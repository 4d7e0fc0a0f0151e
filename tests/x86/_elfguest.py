"""Tiny ELF guests for the hardware tests, assembled and linked with binutils (GNU as, Intel
syntax): ELF64 long-mode guests for the bare machine and multiboot ELF32 guests for the pc
machine, with symbols and DWARF line tables (``as -g``)."""
import os
import subprocess

MULTIBOOT_HEADER = """
.align 4
.long 0x1BADB002
.long 0
.long -(0x1BADB002)
"""


def elf_guest(tmp_path, body: str, *, bits: int = 64, text: int = 0x200000,
              data: int = 0x210000, name: str = "guest") -> str:
    """Assemble ``body`` (after ``_start:``) into an ELF guest under ``tmp_path`` and return
    its path: ``bits`` 64 (long mode, bare machine) or 32 (multiboot, pc machine; ``text``
    should then be 0x100000). ``.data`` goes at ``data``."""
    src = os.path.join(tmp_path, f"{name}.S")
    obj = os.path.join(tmp_path, f"{name}.o")
    out = os.path.join(tmp_path, f"{name}.elf")
    head = ".intel_syntax noprefix\n" + (".code64\n" if bits == 64 else ".code32\n")
    head += ".text\n" + (MULTIBOOT_HEADER if bits == 32 else "")
    with open(src, "w") as f:
        f.write(head + ".globl _start\n_start:\n" + body + "\n")
    r = subprocess.run(["as", "--64" if bits == 64 else "--32", "-g", "-o", obj, src],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    emu = ["-m", "elf_x86_64"] if bits == 64 else ["-m", "elf_i386"]
    r = subprocess.run(["ld", *emu, "-nostdlib", "-static", f"-Ttext={text:#x}",
                        f"-Tdata={data:#x}", "-e", "_start", "-o", out, obj],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out
