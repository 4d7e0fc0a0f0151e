"""Shared helpers of the hardware tests: tiny real-mode guests assembled with binutils (GNU as,
Intel syntax; loaded flat at 0x8000 with CS = DS = 0), a real-mode vCPU at a given address, and
the process's resident memory."""
import os
import subprocess
import tempfile


def asm16(body: str) -> bytes:
    """Assemble 16-bit code (GNU as, Intel syntax) into a flat image loaded at 0x8000."""
    src = ".intel_syntax noprefix\n.code16\n.org 0\n" + body + "\n"
    with tempfile.TemporaryDirectory() as d:
        s, o, b = (os.path.join(d, n) for n in ("g.S", "g.o", "g.bin"))
        with open(s, "w") as f:
            f.write(src)
        r = subprocess.run(["as", "--32", "-o", o, s], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", o, b], check=True,
                       capture_output=True)
        with open(b, "rb") as f:
            return f.read()


def real_mode_vcpu(vm, *, rip: int = 0x1000, flat_data: bool = False):
    """A new vCPU of ``vm`` in real mode at CS:IP 0:``rip`` with RFLAGS 2 (and DS = ES = 0 when
    ``flat_data``)."""
    v = vm.create_vcpu()
    s = v.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    if flat_data:
        s.ds.base, s.ds.selector = 0, 0
        s.es.base, s.es.selector = 0, 0
    v.set_sregs(s)
    r = v.get_regs()
    r.rip, r.rflags = rip, 2
    v.set_regs(r)
    return v


def real_mode_vm(kvm, code: bytes, ram: int, *, at: int = 0x1000, flat_data: bool = False):
    """(vm, vcpu): a VM of ``ram`` bytes at GPA 0 holding ``code`` at ``at``, and one real-mode
    vCPU starting there (see :func:`real_mode_vcpu`)."""
    vm = kvm.create_vm()
    vm.add_memory(0, ram)
    vm.memory.write(at, code)
    return vm, real_mode_vcpu(vm, rip=at, flat_data=flat_data)


SPIN = "1:  jmp 1b"
# vCPU 0 takes the first branch, the others the second (CPUID.1:EBX[31:24] = APIC id = index).
BY_VCPU = """
    mov eax, 1
    cpuid
    shr ebx, 24
    test ebx, ebx
    jnz others
{first}
others:
{others}
"""
# A report at {addr} through the report port.
REPORT = """
    mov dx, 0x1000
    mov eax, {addr}
    out dx, eax
"""
# PRINT reports of 4000 bytes, as fast as the guest can send them.
PRINT_FLOOD = """
again:
    mov dx, 0x1000
    mov eax, 0x8100
    out dx, eax
    jmp again
.org 0x100
    .quad 4, 2, 0x8200, 4000
.org 0x200
    .fill 4000, 1, 0x41
"""


def rss_kib() -> int:
    """This process's resident set size in KiB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
